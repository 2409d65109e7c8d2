"""Where the low-level classifier tells generated from reference showers on a cylinder
geometry: its AUC on subsets of the voxels (issue 28).

    python bench/check_voxel_subsets.py --reference TEST.h5 --generated GEN.h5 [GEN2.h5 ...] \
        [--geometry calochallenge-3] [--repeats 2] [--threads 1]

The official low-level input (log10 E_inc and voxels / E_inc; the fast classifier preset)
restricted to groups of rings (0-1, 2-5, 6-11, 12+) and of layers (first 10, 10-24, 25+),
and all voxels for comparison. Several generated files are joined in order. A subset
alone can score higher than all voxels: fewer inputs, less for the classifier to overfit.
Prints one line per subset, then JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from caloforge.data import read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.evaluation.features import classifier_low_level_inputs
from caloforge.geometry import get_geometry
from caloforge.ring_spread import cylinder_shape

RING_GROUPS = ((0, 2), (2, 6), (6, 12), (12, None))
LAYER_GROUPS = ((0, 10), (10, 25), (25, None))


def voxel_subsets(n_layers: int, n_angular: int, n_radial: int) -> dict[str, np.ndarray]:
    """Named voxel index sets (layer, angular bin, radial bin; radial fastest)."""
    index = np.arange(n_layers * n_angular * n_radial).reshape(n_layers, n_angular, n_radial)
    subsets = {"all": index.ravel()}
    for first, last in RING_GROUPS:
        if first < n_radial:
            subsets[f"rings {first}-{(last or n_radial) - 1}"] = index[:, :, first:last].ravel()
    for first, last in LAYER_GROUPS:
        if first < n_layers:
            subsets[f"layers {first}-{(last or n_layers) - 1}"] = index[first:last].ravel()
    return subsets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--generated", required=True, nargs="+")
    parser.add_argument("--geometry", default="calochallenge-3")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    geometry = get_geometry(args.geometry)
    reference = read_showers(args.reference, geometry)
    generated = [read_showers(path, geometry) for path in args.generated]
    real = classifier_low_level_inputs(reference.showers, reference.incident_energies)
    fake = classifier_low_level_inputs(
        np.concatenate([g.showers for g in generated]),
        np.concatenate([g.incident_energies for g in generated]))
    preset = get_preset("fast")
    results = {}
    for name, voxels in voxel_subsets(geometry.n_layers, *cylinder_shape(geometry)).items():
        columns = np.r_[0, 1 + voxels]  # log10 E_inc first
        run = repeated_classifier_test(real[:, columns], fake[:, columns], preset,
                                       repeats=args.repeats)
        results[name] = {"auc_mean": round(run["auc_mean"], 3),
                         "auc_std": round(run["auc_std"], 3), "n_inputs": len(columns)}
        print(name, results[name], flush=True)
    print(json.dumps({"reference": args.reference, "generated": args.generated,
                      "showers": [len(real), len(fake)], "repeats": args.repeats,
                      "subsets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
