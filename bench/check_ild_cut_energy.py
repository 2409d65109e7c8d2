"""Issue 28, convflow on ild-ecal: where should the energy of calibrated-cut cells go?

The same uncut draws of a trained run (hit cuts set aside), then the run's calibrated cuts
applied under each rule: the energy dropped, kept by the layer (proportionally: the
default), kept by each calibration group (cells of one layer sharing a cut value:
`hit_calibration_energy: group`), or kept by the cells with a raised cut as a whole.

    python bench/check_ild_cut_energy.py RUN --train TRAIN.h5 --test TEST.h5 [--n 1000] \\
        [--out figures.json]

Per rule, against the held-out showers: the hottest cell generated / reference (mean over
the layers, range over layers 10-20, layers within 10 %), the layer energies and hits
generated / reference (range over the layers), and the spread of the centre of energy
along x generated / reference in layers 5, 10, 15, 20, 25.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pipeline import report_figures

from caloforge.data import ShowerData, read_showers
from caloforge.features import high_level_features
from caloforge.geometry import Geometry
from caloforge.models import load_model
from caloforge.preprocessing import (
    VoxelTransform,
    layer_quantile_map_nodes,
    monotone_log_map,
    quantile_map_nodes,
)

SIDE = 30


def centre_x(showers: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """Each layer's centre of energy along x ``(N, L)`` mm (the evaluation's ``EC_x``)."""
    features = high_level_features(showers.numpy(), np.ones(len(showers)), geometry).values
    return np.stack([features[f"EC_x_L{layer.layer_id}"] for layer in geometry.layers], 1)


def figures(generated: torch.Tensor, reference: torch.Tensor, geometry: Geometry) -> dict:
    n_layers = geometry.n_layers
    gen = generated.reshape(len(generated), n_layers, SIDE, SIDE)
    ref = reference.reshape(len(reference), n_layers, SIDE, SIDE)

    def ratio(values: torch.Tensor, wanted: torch.Tensor) -> np.ndarray:
        return (values.double().mean(0) / wanted.double().mean(0)).numpy()

    hottest = ratio(gen.flatten(2).max(-1).values, ref.flatten(2).max(-1).values)
    spread = centre_x(generated, geometry).std(0) / centre_x(reference, geometry).std(0)
    energy = ratio(gen.sum((2, 3)), ref.sum((2, 3)))
    hits = ratio((gen > 0).sum((2, 3)), (ref > 0).sum((2, 3)))
    return {"hottest_mean": round(float(hottest.mean()), 3),
            "hottest_layers_10_20": [round(float(hottest[10:21].min()), 3),
                                     round(float(hottest[10:21].max()), 3)],
            "layers_hottest_within_10_percent": int((abs(hottest - 1) <= 0.1).sum()),
            "layer_energy_range": [round(float(energy.min()), 3), round(float(energy.max()), 3)],
            "hits_range": [round(float(hits.min()), 2), round(float(hits.max()), 2)],
            "centre_x_spread_layers_5_10_15_20_25": [round(float(spread[i]), 2)
                                                     for i in (5, 10, 15, 20, 25)]}


def layer_spectrum_map(fit: torch.Tensor, wanted: np.ndarray, cells: torch.Tensor,
                       n_layers: int) -> torch.Tensor:
    """``cells`` ``(N, L * S)`` MeV with each layer's hit spectrum mapped (monotone, in
    log10 MeV) from that of ``fit`` onto that of ``wanted`` (other draws, their data): the
    convflow ``postprocess: layer-spline`` maps (layers with fewer than 64 hits keep theirs)."""
    size = SIDE * SIDE
    nodes = layer_quantile_map_nodes(wanted, fit.numpy(), [size] * n_layers, 64)
    return torch.cat([cells[:, layer * size:(layer + 1) * size] if pair is None
                      else monotone_log_map(cells[:, layer * size:(layer + 1) * size], *pair)
                      for layer, pair in enumerate(nodes)], dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained convflow ild-ecal run with hit cuts")
    parser.add_argument("--train", required=True, help="its training file (the groups)")
    parser.add_argument("--test", required=True, help="held-out reference showers")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--spline-showers", type=int, default=0,
                        help="also map the hit spectrum (global, per layer) fitted on draws "
                             "for this many training showers' conditions")
    parser.add_argument("--out", default=None, help="JSON file of the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.run_dir)
    if model.voxel_cuts_mev is None:
        parser.error(f"{args.run_dir}: has no calibrated cuts")
    n_layers = model.geometry.n_layers
    layers = VoxelTransform(layer_sizes=[SIDE * SIDE] * n_layers)
    cuts = torch.tensor(model.voxel_cuts_mev, dtype=torch.float64)
    reference = read_showers(args.test, model.geometry, max_showers=args.n)
    model.voxel_cuts_mev = None

    def cut_rules(raw: torch.Tensor) -> dict[str, torch.Tensor]:
        kept = torch.where(raw >= cuts, raw, torch.zeros_like(raw))
        one_hot = torch.nn.functional.one_hot
        layer_of = torch.arange(n_layers).repeat_interleave(SIDE * SIDE)
        _, by_cut = torch.unique(layer_of.double() * 1e6 + cuts, return_inverse=True)
        raised = (cuts > model.voxel_transform.threshold_mev * 1.0001).long()
        return {"threshold only": raw, "cut, energy dropped": kept,
                "cut, layer keeps energy (default)": layers.cut_voxels(raw, cuts),
                "cut, group keeps energy": layers.cut_voxels(raw, cuts, one_hot(by_cut)),
                "cut, raised-cut cells keep energy": layers.cut_voxels(
                    raw, cuts, one_hot(layer_of * 2 + raised))}

    def draws(showers: ShowerData, seed: int) -> torch.Tensor:
        return torch.as_tensor(model.sample(showers.incident_energies, seed=seed).showers,
                               dtype=torch.float64)

    rules = cut_rules(draws(reference, 1))
    if args.spline_showers:
        # spectrum maps fitted on other draws (training conditions), applied to these
        train = read_showers(args.train, model.geometry, max_showers=args.spline_showers)
        fit_rules = cut_rules(draws(train, 2))
        for base in ("cut, energy dropped", "cut, layer keeps energy (default)"):
            rules[f"{base} + layer spectrum map"] = layer_spectrum_map(
                fit_rules[base], train.showers, rules[base], n_layers)
            nodes = quantile_map_nodes(train.showers, fit_rules[base].numpy())
            rules[f"{base} + global spectrum map"] = monotone_log_map(rules[base], *nodes)
    real = torch.as_tensor(reference.showers, dtype=torch.float64)
    report_figures({name: figures(showers, real, model.geometry)
                    for name, showers in rules.items()},
                   args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
