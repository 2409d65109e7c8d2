"""Issue 28, convflow's missing core: does dividing each layer by its maximum hurt?

The hypothesis: the published preprocessing divides every layer by its maximum, which puts
one cell of every image at exactly 1 (a point mass at logit 4.6) that the flow's
likelihood can exploit; the hottest cells then sit far out in the flow's base space, and
sampling rarely makes them. The experiment trains the same small convflow on the same
structured toy showers (Gaussian cores on 5 layers of 12 x 12 cells, gamma-fluctuating
cells, a readout cut) once per normalisation and reports:

* where the hottest cell of each held-out image lands in the base space: the mean z^2 of
  its 2 x 2 block against the mean over all blocks (1 for a well-modelled cell);
* the hottest cell per layer, generated over reference (1 = the core is right);
* hits per shower, the share of hits within 3x the cut (the faint halo), the radial centre
  and width of each layer, generated against reference.

    python bench/check_convflow_core.py --normalise-by max --out r-max.json
    python bench/check_convflow_core.py --normalise-by energy --out r-energy.json

Each takes a few minutes on one thread.
"""

from __future__ import annotations

import numpy as np
import torch
from pipeline import (
    core_share_spread,
    fit_and_generate,
    report_figures,
    square_layers,
    toy_experiment_parser,
)

from caloforge.data import ShowerData
from caloforge.models.flows.convflow import CELL_SCALES, ConvL2LFlow

SIDE, LAYERS, CUT_MEV = 12, 5, 0.5


def core_showers(n: int, seed: int, side: int = SIDE, jitter: float = 0.6) -> ShowerData:
    """Sharp Gaussian cores (0.6-1.1 cells wide, widening with depth) at the image centre
    jittered by ``jitter`` cells (0: every core in the same central 2 x 2 cells, as on the
    ILD ECAL), cell energies gamma-fluctuated, cells below the cut zeroed."""
    rng = np.random.default_rng(seed)
    energies = rng.uniform(1e3, 1e4, n)
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    centre = rng.normal(0, jitter, (n, 2))
    layers = []
    for layer in range(LAYERS):
        width = rng.uniform(0.6, 1.1, n)[:, None, None] * (1 + 0.25 * layer)
        distance2 = (xx[None] - centre[:, 0, None, None]) ** 2 + \
            (yy[None] - centre[:, 1, None, None]) ** 2
        share = np.exp(-distance2 / (2 * width ** 2)) + 0.02 * np.exp(-np.sqrt(distance2))
        image = share / share.sum((1, 2), keepdims=True) * energies[:, None, None] * 0.15
        image *= rng.gamma(8, 1 / 8, image.shape)
        image[image < CUT_MEV] = 0
        layers.append(image.reshape(n, -1))
    return ShowerData(energies, np.concatenate(layers, 1).astype(np.float32), {}, {})


def layer_figures(showers: np.ndarray, side: int = SIDE) -> dict[str, np.ndarray]:
    images = showers.reshape(len(showers), LAYERS, side * side).astype(np.float64)
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    radius = np.sqrt(xx ** 2 + yy ** 2).ravel()
    total = np.maximum(images.sum(-1), 1e-9)
    centre = (images * radius).sum(-1) / total
    width = np.sqrt(np.maximum((images * radius ** 2).sum(-1) / total - centre ** 2, 0))
    hits = images > 0
    # spread of the centre of energy along x (cells): how far the showers wander
    x = np.broadcast_to(xx, (side, side)).ravel()
    centre_x = (images * x).sum(-1) / total
    # where the hottest cell is: its mean distance from the image centre (cells)
    hottest_distance = radius[images.argmax(-1)]
    # how the central 2 x 2 cells share their energy: the spread of each one's share (the
    # ILD core's split, docs/convflow.md "What the hot core is"), over images with energy there
    squares = images.reshape(len(images), LAYERS, side, side)
    middle = side // 2
    core_sum = squares[:, :, middle - 1:middle + 1, middle - 1:middle + 1].sum((2, 3))
    return {"core_share_spread": core_share_spread(squares),
            "core_sum_share": (core_sum / total).mean(0),
            "hottest_cell_mev": images.max(-1).mean(0), "radial_centre": centre.mean(0),
            "hottest_cell_distance": hottest_distance.mean(0),
            "centre_x_spread": centre_x.std(0),
            "radial_width": width.mean(0), "hits_per_shower": hits.sum((1, 2)).mean(),
            "halo_share": float(((images > 0) & (images < 3 * CUT_MEV)).sum() / hits.sum())}


def base_space_of_hottest(model: ConvL2LFlow, data: ShowerData) -> dict[str, float]:
    """Mean z^2 of the 2 x 2 block holding each image's hottest cell, and of all blocks."""
    generator = torch.Generator().manual_seed(5)
    batch = model.to_tensors(data)
    with torch.no_grad():
        images = model._images(batch["voxels"])
        noisy = model.voxel_transform.add_noise(images, generator)
        y = model.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape)
        context = model._context(batch)
        log_energies = model._layer_context(noisy.sum(dim=(-2, -1)))
        hottest, everywhere = [], []
        for layer in range(LAYERS):
            condition = model._layer_condition(model._previous(y, layer), context,
                                               log_energies[:, layer], None)
            z, _ = model._flow(layer)(model._standardised(y[:, layer:layer + 1], layer),
                                      condition)
            block_z2 = (z ** 2).mean(1)  # (B, H/2, W/2)
            flat = noisy[:, layer].flatten(1).argmax(1)
            side = model.image_shape[1]
            rows, columns = flat // side // 2, flat % side // 2
            hottest.append(block_z2[torch.arange(len(z)), rows, columns].mean())
            everywhere.append(block_z2.mean())
    return {"hottest_block_z2": float(torch.stack(hottest).mean()),
            "all_blocks_z2": float(torch.stack(everywhere).mean()),
            "hottest_logit_value": float(y.flatten(2).amax(-1).mean()),
            "hottest_logit_spread": float(y.flatten(2).amax(-1).std())}


def main() -> int:
    parser = toy_experiment_parser(__doc__.splitlines()[0], n_train=4000, epochs=6)
    parser.add_argument("--normalise-by", choices=["max", "energy"], default="max")
    parser.add_argument("--position-channels", action="store_true",
                        help="the cell coordinates as condition channels")
    parser.add_argument("--standardise-cells", choices=["on", "off"], default="on",
                        help="cell-by-cell standardisation (off: as before issue 28's "
                             "ild-ecal fix)")
    parser.add_argument("--cell-scale", choices=list(CELL_SCALES), default="layer",
                        help="the standardisation's divisor: the layer's pooled spread or "
                             "each cell's own")
    parser.add_argument("--side", type=int, default=SIDE, help="image side (cells, even)")
    parser.add_argument("--jitter", type=float, default=0.6,
                        help="spread of the shower centre (cells); 0: fixed, as on ild-ecal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    geometry = square_layers("cores", args.side, LAYERS, CUT_MEV)
    train = core_showers(args.n_train, seed=1, side=args.side, jitter=args.jitter)
    heldout = core_showers(1000, seed=2, side=args.side, jitter=args.jitter)
    config = ConvL2LFlow.preset("tiny")
    config.width, config.blocks, config.bins, config.embedding = 16, 4, 8, 8
    config.previous_layers, config.normalise_by = 2, args.normalise_by
    config.position_channels = args.position_channels
    config.standardise_cells = args.standardise_cells == "on"
    config.cell_scale = args.cell_scale
    config.training.epochs, config.training.batch_size = args.epochs, 64
    config.training.seed = args.seed
    model = ConvL2LFlow(geometry, config)
    seconds, generated = fit_and_generate(model, train, heldout)
    real = layer_figures(heldout.showers, args.side)
    fake = layer_figures(generated, args.side)
    figures = {
        "normalise_by": args.normalise_by, "seed": args.seed,
        "standardise_cells": config.standardise_cells, "side": args.side,
        "jitter": args.jitter, "cell_scale": args.cell_scale,
        "train_seconds": round(seconds, 1),
        "best_val_loss": model.training_summary["best_val_loss"],
        **base_space_of_hottest(model, heldout),
        "hottest_cell_generated_over_reference": np.round(
            fake["hottest_cell_mev"] / real["hottest_cell_mev"], 3).tolist(),
        "hits_per_shower": [round(float(real["hits_per_shower"]), 1),
                            round(float(fake["hits_per_shower"]), 1)],
        "halo_share": [round(real["halo_share"], 3), round(fake["halo_share"], 3)],
        "position_channels": args.position_channels,
        "centre_x_spread_reference": np.round(real["centre_x_spread"], 3).tolist(),
        "centre_x_spread_generated": np.round(fake["centre_x_spread"], 3).tolist(),
        "core_share_spread_reference": np.round(real["core_share_spread"], 3).tolist(),
        "core_share_spread_generated": np.round(fake["core_share_spread"], 3).tolist(),
        "core_sum_share_reference": np.round(real["core_sum_share"], 3).tolist(),
        "core_sum_share_generated": np.round(fake["core_sum_share"], 3).tolist(),
        "hottest_cell_distance_reference": np.round(real["hottest_cell_distance"], 2).tolist(),
        "hottest_cell_distance_generated": np.round(fake["hottest_cell_distance"], 2).tolist(),
        "radial_centre_generated_over_reference": np.round(
            fake["radial_centre"] / real["radial_centre"], 3).tolist(),
        "radial_width_generated_over_reference": np.round(
            fake["radial_width"] / real["radial_width"], 3).tolist(),
    }
    report_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
