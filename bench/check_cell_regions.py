"""Issue 28: which cells give generated ild-ecal showers away to the low-level classifier.

    python bench/check_cell_regions.py GENERATED.h5 [...] --reference TEST.h5 [--n 3000] \\
        [--repeats 1] [--threads 1] [--only core far] [--binary]

The official low-level input ([log10 E_inc, voxels / E_inc], after the readout threshold)
cut into regions of cells by their distance from the grid's axis (cells: core < 2, near
2-4, mid 4-9, far >= 9; every layer) and the fast classifier trained on each region alone
(with log10 E_inc; same splits and rules as ``caloforge evaluate``). A region whose AUC
alone is near the full one is what the low-level classifier uses. Also, per region: the
mean hits per shower and the mean hit energy (MeV), generated over reference. With
``--binary`` each cell enters as hit / no hit (1 / 0) instead of its energy: what the hit
pattern alone gives away. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from caloforge.data import read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.evaluation.features import classifier_low_level_inputs
from caloforge.features import apply_threshold
from caloforge.geometry import get_geometry

SIDE, LAYERS = 30, 30
REGION_EDGES = {"core": (0.0, 2.0), "near": (2.0, 4.0), "mid": (4.0, 9.0), "far": (9.0, 99.0)}


def region_columns() -> dict[str, np.ndarray]:
    """Voxel indices (flattened layer-major ``(30, 30, 30)``) of every region."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    radius = np.broadcast_to(np.hypot(xx, yy), (LAYERS, SIDE, SIDE)).reshape(-1)
    return {name: np.flatnonzero((radius >= low) & (radius < high))
            for name, (low, high) in REGION_EDGES.items()}


def hit_figures(showers: np.ndarray, columns: np.ndarray) -> tuple[float, float]:
    """Mean hits per shower and mean energy of a hit (MeV) in ``columns``."""
    cells = showers[:, columns]
    hits = cells > 0
    return float(hits.sum(1).mean()), float(cells[hits].mean()) if hits.any() else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", nargs="+")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, choices=[*REGION_EDGES, "all"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--binary", action="store_true", help="cells as hit / no hit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    geometry = get_geometry("ild-ecal")
    preset = get_preset("fast")
    regions = region_columns()
    regions["all"] = np.arange(LAYERS * SIDE * SIDE)

    def load(path: str) -> tuple[np.ndarray, np.ndarray]:
        data = read_showers(path, geometry, max_showers=args.n)
        showers = apply_threshold(data.showers, geometry.threshold_mev or 0.0)
        inputs = classifier_low_level_inputs(showers, data.incident_energies)
        if args.binary:
            inputs[:, 1:] = showers > 0
        return showers, inputs

    reference_showers, reference_inputs = load(args.reference)
    out: dict = {"reference": args.reference, "n": args.n, "repeats": args.repeats,
                 "binary": args.binary,
                 "region_edges_cells": REGION_EDGES, "generated": {}}
    for path in args.generated:
        showers, inputs = load(path)
        result: dict = {}
        for name, columns in regions.items():
            if args.only and name not in args.only:
                continue
            chosen = np.concatenate([[0], 1 + columns])  # log10 E_inc, then the cells
            auc = repeated_classifier_test(reference_inputs[:, chosen], inputs[:, chosen],
                                           preset, repeats=args.repeats)["auc_mean"]
            hits, mev = hit_figures(showers, columns)
            ref_hits, ref_mev = hit_figures(reference_showers, columns)
            result[name] = {"auc": round(auc, 4), "cells": int(len(columns)),
                            "hits_over_reference": round(hits / max(ref_hits, 1e-12), 3),
                            "hit_mev_over_reference": round(mev / max(ref_mev, 1e-12), 3)}
            print(f"{path}: {name:5s} {len(columns):6d} cells  AUC {auc:.4f}  hits "
                  f"{hits:8.1f} (ref {ref_hits:8.1f})  mean hit {mev:.3f} MeV "
                  f"(ref {ref_mev:.3f})", flush=True)
        out["generated"][path] = result
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
