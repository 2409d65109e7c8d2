"""Issue 28, convflow on ild-ecal: why do the generated showers lack their faint halo?

With cell-by-cell standardisation the ILD flows put the core where the data has it, but
make half the reference's hits (342 against 710) and a core ~1.24x too hot
(docs/convflow.md). This experiment runs on a slice of the real ild-ecal showers (layers
FIRST .. FIRST + N - 1 of the reference-simulator files: the same cells, spectrum and
sparsity, a fraction of the cost) and trains the `cpu` convflow with one change at a time:

    python bench/check_convflow_halo.py --train ild-ecal-train.h5 --test ild-ecal-test.h5 \\
        [--first 8 --layers 6 --epochs 4] [--noise-per-threshold 0.01] \\
        [--standardise-cells on|off] [--normalise-by energy|max|fixed] [--calibrate-hits N] \\
        [--cut-groups layer,ring,cell,occupancy] [--temperatures 1,0.9,0.8]
        [--layer-energy noisy|deposited] [--out figures.json]

Reports per layer: hits per shower generated / reference, the hits in rings around the
axis, the hottest cell generated / reference, the share of hits under 0.1 MeV, and the
validation NLL. About 4 minutes per epoch of 5,000 showers on one thread (6 layers).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from pipeline import core_share_spread, report_figures, toy_experiment_parser

from caloforge.data import ShowerData, read_showers
from caloforge.features import high_level_features
from caloforge.geometry import CartesianLayer, Geometry
from caloforge.models.flows.convflow import CELL_SCALES, ConvL2LFlow
from caloforge.preprocessing import VoxelTransform, group_occupancy_cuts, hit_rate_groups

SIDE, CELL_MM, CUT_MEV = 30, 5.0, 0.075


def layer_slice(path: str, first: int, layers: int, n: int) -> ShowerData:
    """Layers ``first .. first + layers - 1`` of the first ``n`` showers of an ild-ecal file."""
    data = read_showers(path)
    cells = SIDE * SIDE
    showers = data.showers[:n, first * cells:(first + layers) * cells]
    return ShowerData(data.incident_energies[:n], showers, {}, {})


def ring_hits(showers: np.ndarray, layers: int) -> dict[str, list[float]]:
    """Hits per shower and layer within radius rings around the axis (cells)."""
    images = showers.reshape(len(showers), layers, SIDE, SIDE)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    radius = np.sqrt(xx ** 2 + yy ** 2)
    rings = {"r<1.5": radius < 1.5, "1.5-3": (radius >= 1.5) & (radius < 3),
             "3-6": (radius >= 3) & (radius < 6), ">=6": radius >= 6}
    return {name: np.round((images[:, :, ring] > 0).sum(-1).mean(0), 2).tolist()
            for name, ring in rings.items()}


def radial_widths(showers: np.ndarray, layers: int) -> np.ndarray:
    """Energy-weighted RMS distance from the axis ``(N, layers)`` in cells (0: empty)."""
    images = showers.reshape(len(showers), layers, SIDE * SIDE)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    squared = (xx ** 2 + yy ** 2).ravel()
    sums = images.sum(-1)
    return np.sqrt((images * squared).sum(-1) / np.where(sums > 0, sums, 1))


def centre_scatter(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Standard deviation over the showers of each layer's centre of energy ``(layers,)``
    (the evaluation's ``EC_x`` / ``EC_y`` features, mm), x and y pooled, empty layers left
    out."""
    features = high_level_features(showers, np.ones(len(showers)), geometry).values
    spreads = []
    for layer in geometry.layers:
        hit = features[f"E_L{layer.layer_id}"] > 0
        spreads.append(np.std(np.concatenate([features[f"EC_{axis}_L{layer.layer_id}"][hit]
                                              for axis in ("x", "y")])))
    return np.array(spreads)


def compare(real: np.ndarray, fake: np.ndarray, geometry: Geometry) -> dict:
    """Per layer, generated / reference: hits, hottest cell, radial width; rings, the
    spread of the core's split and the share of hits under 0.1 MeV."""
    layers = geometry.n_layers
    per_layer = (len(real), layers, -1)

    def ratio(values_fake: np.ndarray, values_real: np.ndarray) -> list[float]:
        mean_fake = values_fake.mean(0, dtype=np.float64)
        return np.round(mean_fake / values_real.mean(0, dtype=np.float64), 3).tolist()

    def faint_share(showers: np.ndarray) -> float:
        return round(float(((showers > 0) & (showers < 0.1)).sum()
                           / max((showers > 0).sum(), 1)), 4)

    return {
        "hits_per_layer_generated_over_reference": ratio(
            (fake.reshape(per_layer) > 0).sum(-1), (real.reshape(per_layer) > 0).sum(-1)),
        "hottest_cell_generated_over_reference": ratio(fake.reshape(per_layer).max(-1),
                                                       real.reshape(per_layer).max(-1)),
        "radial_width_generated_over_reference": ratio(radial_widths(fake, layers),
                                                       radial_widths(real, layers)),
        "centre_scatter_generated_over_reference": np.round(
            centre_scatter(fake, geometry) / centre_scatter(real, geometry), 3).tolist(),
        "ring_hits_generated": ring_hits(fake, layers),
        "core_share_spread_reference_generated": [
            np.round(core_share_spread(showers.reshape(len(showers), layers, SIDE, SIDE)),
                     3).tolist() for showers in (real, fake)],
        "faint_share_reference_generated": [faint_share(real), faint_share(fake)],
    }


def cut_groups(kind: str, layers: int, reference: np.ndarray) -> np.ndarray:
    """Each voxel's calibration group ``(layers * SIDE * SIDE,)``: its layer, its layer and
    radial ring (one cell wide, around the axis), the voxel itself, or its layer and how
    often the ``reference`` showers ``(N, n_voxels)`` hit it (``hit_rate_groups``)."""
    cells = SIDE * SIDE
    if kind == "cell":
        return np.arange(layers * cells)
    layer = np.repeat(np.arange(layers), cells)
    if kind == "layer":
        return layer
    if kind == "occupancy":
        return hit_rate_groups(reference, [cells] * layers)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    rings = np.floor(np.sqrt(xx ** 2 + yy ** 2)).astype(int).ravel()
    n_rings = int(rings.max()) + 1
    return layer * n_rings + np.tile(rings, layers)


def main() -> int:
    parser = toy_experiment_parser(__doc__.splitlines()[0], n_train=20_000, epochs=4)
    parser.add_argument("--train", required=True, help="ild-ecal training file")
    parser.add_argument("--test", required=True, help="ild-ecal held-out file")
    parser.add_argument("--first", type=int, default=8, help="first layer of the slice")
    parser.add_argument("--layers", type=int, default=6, help="layers in the slice")
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--noise-per-threshold", type=float, default=None,
                        help="dequantisation noise / the cut (default: the family's)")
    parser.add_argument("--standardise-cells", choices=["on", "off"], default="on")
    parser.add_argument("--calibrate-hits", type=int, default=0, metavar="N",
                        help="after training, cut each layer so that the model makes the "
                             "hits per layer of the first N training showers (iCaloFlow's "
                             "hit calibration, applied here to the generated showers)")
    parser.add_argument("--cut-groups", default="layer",
                        help="with --calibrate-hits: comma list of layer (one cut per "
                             "layer), ring (per layer and radial ring, one cell wide), cell "
                             "(per cell), occupancy (per layer and training hit rate); "
                             "each is reported")
    parser.add_argument("--save-generated", default=None, metavar="FILE.npz",
                        help="keep the held-out and every variant's generated showers")
    parser.add_argument("--normalise-by", choices=["energy", "max", "fixed"], default=None,
                        help="the convflow normalise_by (default: the family's)")
    parser.add_argument("--layer-energy", choices=["noisy", "deposited"], default=None,
                        help="the convflow layer_energy (default: the family's)")
    parser.add_argument("--cell-scale", choices=list(CELL_SCALES), default="layer",
                        help="convflow cell_scale (the divisor of the cell standardisation)")
    parser.add_argument("--temperatures", default="1",
                        help="comma list of sampling temperatures (the voxel flows' base "
                             "noise scale); each is generated and reported")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    unknown = set(args.cut_groups.split(",")) - {"layer", "ring", "cell", "occupancy"}
    if unknown:
        parser.error(f"--cut-groups: unknown {', '.join(sorted(unknown))} "
                     f"(layer, ring, cell or occupancy)")
    torch.set_num_threads(1)
    geometry = Geometry("ild-slice", tuple(CartesianLayer(i, nx=SIDE, ny=SIDE, dx=CELL_MM,
                                                          dy=CELL_MM)
                                           for i in range(args.layers)), threshold_mev=CUT_MEV)
    train = layer_slice(args.train, args.first, args.layers, args.n_train)
    heldout = layer_slice(args.test, args.first, args.layers, args.n_test)
    config = ConvL2LFlow.preset("cpu")
    config.layers_per_step = 0
    config.standardise_cells = args.standardise_cells == "on"
    config.cell_scale = args.cell_scale
    if args.normalise_by is not None:
        config.normalise_by = args.normalise_by
    if args.layer_energy is not None:
        config.layer_energy = args.layer_energy
    if args.noise_per_threshold is not None:
        config.noise_mev = CUT_MEV * args.noise_per_threshold
    config.training.epochs, config.training.time_budget_s = args.epochs, None
    config.training.seed = args.seed
    model = ConvL2LFlow(geometry, config)
    start = time.perf_counter()
    model.fit(train, tempfile.mkdtemp())
    seconds = time.perf_counter() - start
    real = heldout.showers
    variants = {}
    layers = VoxelTransform(layer_sizes=[SIDE * SIDE] * args.layers)
    for temperature in temperatures:
        model.config.temperature = temperature
        suffix = "" if temperatures == [1.0] else f", T={temperature:g}"
        generated = model.sample(heldout.incident_energies, seed=1).showers
        variants[f"threshold only{suffix}"] = generated
        if not args.calibrate_hits:
            continue
        calibration = train.select(slice(0, args.calibrate_hits))
        calibration_sample = model.sample(calibration.incident_energies, seed=3).showers
        voxels = torch.as_tensor(generated, dtype=torch.float64)
        for kind in args.cut_groups.split(","):
            groups = cut_groups(kind, args.layers, calibration.showers)
            cuts = group_occupancy_cuts(calibration.showers, calibration_sample, groups,
                                        CUT_MEV)
            variants[f"cuts per {kind}{suffix}"] = layers.cut_voxels(
                voxels, torch.as_tensor(cuts[groups])).numpy()
    if args.save_generated:
        np.savez_compressed(args.save_generated, reference=real, energies=heldout.incident_energies,
                            **{name.replace(" ", "_"): fake for name, fake in variants.items()})
    report_figures({
        "first_layer": args.first, "layers": args.layers, "epochs": args.epochs,
        "seed": args.seed, "standardise_cells": config.standardise_cells,
        "cell_scale": config.cell_scale,
        "normalise_by": config.normalise_by, "layer_energy": config.layer_energy,
        "temperatures": temperatures,
        "noise_mev": model.voxel_transform.noise_mev,
        "train_seconds": round(seconds, 1),
        "best_val_loss": model.training_summary["best_val_loss"],
        "hits_per_layer_reference": np.round(
            (real.reshape(len(real), args.layers, -1) > 0).sum(-1).mean(0), 1).tolist(),
        "ring_hits_reference": ring_hits(real, args.layers),
        **{name: compare(real, fake, geometry) for name, fake in variants.items()},
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
