"""Issue 28: which high-level features give generated showers away.

    python bench/check_feature_groups.py GENERATED.h5 --reference TEST.h5 \\
        --geometry ild-ecal [--n 3000] [--repeats 1] [--threads 2] [--layer L]

The official high-level classifier input (``classifier_high_level_inputs``) cut into
groups of columns — layer energies (with E_inc and E_tot), sparsity, centres in x/y,
widths in x/y, centres in r, widths in r, and per block of layers — and the fast
classifier trained on each group alone (same splits and rules as ``caloforge evaluate``).
A group whose AUC alone is near the full one is what the full classifier uses; a group
near 0.5 is modelled. ``--layer L``: instead, layer L's own columns (energy, sparsity,
radial centre and width, and x/y where it has them) together, each alone and every pair of
its energy, sparsity, radial centre and radial width, each with E_inc: what within one
layer gives it away.
Prints JSON: AUC per group, and of all columns.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from caloforge.data import read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.evaluation.features import classifier_high_level_inputs
from caloforge.features import apply_threshold, high_level_features, layer_has_xy
from caloforge.geometry import get_geometry


def column_groups(n_layers: int, n_xy: int) -> dict[str, np.ndarray]:
    """Column indices of the high-level input per feature kind (its documented order)."""
    start = 0
    spans: dict[str, np.ndarray] = {}
    for name, width in (("E_inc", 1), ("E_layer", n_layers), ("EC_x", n_xy), ("EC_y", n_xy),
                        ("width_x", n_xy), ("width_y", n_xy), ("E_tot", 1),
                        ("sparsity", n_layers), ("EC_r", n_layers), ("width_r", n_layers)):
        spans[name] = np.arange(start, start + width)
        start += width
    return {
        "energies": np.concatenate([spans["E_inc"], spans["E_layer"], spans["E_tot"]]),
        "sparsity": spans["sparsity"],
        "centres_xy": np.concatenate([spans["EC_x"], spans["EC_y"]]),
        "widths_xy": np.concatenate([spans["width_x"], spans["width_y"]]),
        "centres_r": spans["EC_r"],
        "widths_r": spans["width_r"],
        "all": np.arange(start),
    }


def layer_block_columns(groups: dict[str, np.ndarray], n_layers: int, n_xy: int, first: int,
                        last: int) -> np.ndarray:
    """Every per-layer column (of ``column_groups``) of layers first..last-1 (xy columns
    only where every layer has them)."""
    out = []
    for kind in ("energies", "sparsity", "centres_r", "widths_r"):
        columns = groups[kind] if kind != "energies" else groups[kind][1:1 + n_layers]
        out.append(columns[first:last])
    if n_xy == n_layers:
        for kind in ("centres_xy", "widths_xy"):
            columns = groups[kind]
            out += [columns[first:last], columns[n_layers + first:n_layers + last]]
    return np.concatenate(out)


def layer_columns(groups: dict[str, np.ndarray], n_layers: int, n_xy: int, layer: int
                  ) -> dict[str, np.ndarray]:
    """Layer ``layer``'s columns of ``column_groups``: alone, every pair of its energy,
    sparsity, radial centre and width, those four together (``radial``), its x/y centres
    and widths (where every layer has them) together and with the radial one, and all of
    them; each with the E_inc column."""
    own = {"energy": groups["energies"][1 + layer:2 + layer],
           "sparsity": groups["sparsity"][layer:layer + 1],
           "centre_r": groups["centres_r"][layer:layer + 1],
           "width_r": groups["widths_r"][layer:layer + 1]}
    out = dict(own)
    names = list(own)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            out[f"{first}+{second}"] = np.concatenate([own[first], own[second]])
    out["radial"] = np.concatenate(list(own.values()))
    if n_xy == n_layers:
        centres, widths = groups["centres_xy"], groups["widths_xy"]
        xy = {"centre_x": centres[layer:layer + 1], "centre_y": centres[n_layers + layer:][:1],
              "width_x": widths[layer:layer + 1], "width_y": widths[n_layers + layer:][:1]}
        out["xy"] = np.concatenate(list(xy.values()))
        out["widths_x,y,r"] = np.concatenate([xy["width_x"], xy["width_y"], own["width_r"]])
        out["centres_x,y,r"] = np.concatenate([xy["centre_x"], xy["centre_y"],
                                               own["centre_r"]])
    out[f"layer_{layer}"] = layer_block_columns(groups, n_layers, n_xy, layer, layer + 1)
    # each with log10 E_inc: what a layer does at a given incident energy
    e_inc = groups["energies"][:1]
    return {name: np.concatenate([e_inc, columns]) for name, columns in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--geometry", required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layer-blocks", type=int, default=5,
                        help="also every per-layer column of this many blocks of layers")
    parser.add_argument("--only", nargs="+", default=None, help="just these groups")
    parser.add_argument("--layer", type=int, default=None,
                        help="score this layer's own columns and their pairs instead")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    geometry = get_geometry(args.geometry)
    inputs = []
    for path in (args.reference, args.generated):
        data = read_showers(path, geometry, max_showers=args.n)
        showers = apply_threshold(data.showers, geometry.threshold_mev or 0.0)
        features = high_level_features(showers, data.incident_energies, geometry)
        inputs.append(classifier_high_level_inputs(features, data.incident_energies, geometry))
    n_layers = geometry.n_layers
    n_xy = sum(layer_has_xy(layer) for layer in geometry.layers)
    groups = column_groups(n_layers, n_xy)
    if args.layer is not None:
        if not 0 <= args.layer < n_layers:
            parser.error(f"--layer must be in 0..{n_layers - 1}")
        groups = layer_columns(groups, n_layers, n_xy, args.layer)
        args.layer_blocks = 0
    edges = np.linspace(0, n_layers, args.layer_blocks + 1).round().astype(int)
    for first, last in zip(edges[:-1], edges[1:]) if args.layer_blocks else ():
        groups[f"layers_{first}-{last - 1}"] = layer_block_columns(groups, n_layers, n_xy,
                                                                   first, last)
    preset = get_preset("fast")
    out = {"generated": args.generated, "reference": args.reference, "n": args.n,
           "repeats": args.repeats, "auc": {}}
    for name, columns in groups.items():
        if args.only and name not in args.only:
            continue
        result = repeated_classifier_test(inputs[0][:, columns], inputs[1][:, columns], preset,
                                          repeats=args.repeats)
        out["auc"][name] = round(result["auc_mean"], 4)
        print(f"{name:14s} {len(columns):4d} columns  AUC {result['auc_mean']:.4f}", flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
