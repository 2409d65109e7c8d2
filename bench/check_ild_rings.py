"""Issue 28: where generated ild-ecal showers put their energy around the axis, ring by ring.

    python bench/check_ild_rings.py GENERATED.h5 [...] --reference TEST.h5 [--n 3000] \\
        [--layers 6 12 18 24]

Rings around the grid's axis (cells; edges 0 1 2 3 4 6 9 13 30). For each listed layer and
each file, after the 0.075 MeV readout threshold: the mean share of the layer's energy in
every ring (generated over reference), and in the four outer rings the hits per shower, the
mean energy of a hit and its 99th percentile (MeV); the centre of energy and width in r
(mm, mean and spread over showers). The radial width weighs energy by r^2, so a few
energetic far hits move it most. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from caloforge.data import read_showers
from caloforge.features import apply_threshold
from caloforge.geometry import get_geometry

SIDE, LAYERS, CELL_MM = 30, 30, 5.0
RING_EDGES = (0, 1, 2, 3, 4, 6, 9, 13, 30)


def ring_figures(images: np.ndarray, layers: list[int]) -> dict:
    """``images`` ``(N, 30, 30, 30)`` MeV -> the per-layer figures of the module docstring."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    radius = np.hypot(xx, yy)
    ring = np.digitize(radius, RING_EDGES) - 1
    r_mm = radius * CELL_MM
    out: dict = {}
    for layer in layers:
        image = images[:, layer]
        energy = np.maximum(image.sum((1, 2)), 1e-9)
        centre = (image * r_mm).sum((1, 2)) / energy
        width = np.sqrt(np.maximum((image * r_mm ** 2).sum((1, 2)) / energy - centre ** 2, 0))
        shares, hits, mean_hit, p99_hit = [], [], [], []
        for k in range(len(RING_EDGES) - 1):
            cells = image[:, ring == k]
            shares.append(float((cells.sum(1) / energy).mean()))
            if k >= len(RING_EDGES) - 5:
                positive = cells[cells > 0]
                hits.append(round(float((cells > 0).sum(1).mean()), 3))
                mean_hit.append(round(float(positive.mean()) if positive.size else 0.0, 3))
                p99_hit.append(round(float(np.percentile(positive, 99))
                                     if positive.size else 0.0, 3))
        out[str(layer)] = {"ring_share": shares, "outer_hits_per_shower": hits,
                           "outer_hit_mev_mean": mean_hit, "outer_hit_mev_p99": p99_hit,
                           "centre_r_mm": [round(float(centre.mean()), 2),
                                           round(float(centre.std()), 2)],
                           "width_r_mm": [round(float(width.mean()), 2),
                                          round(float(width.std()), 2)]}
    return out


def read_ild_images(path: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` showers of an ild-ecal file after the readout threshold, as images
    ``(N, 30, 30, 30)`` MeV (float64), and their incident energies ``(N,)`` MeV."""
    geometry = get_geometry("ild-ecal")
    data = read_showers(path, geometry, max_showers=n)
    showers = apply_threshold(data.showers, geometry.threshold_mev).astype(np.float64)
    return (showers.reshape(-1, LAYERS, SIDE, SIDE),
            np.asarray(data.incident_energies, dtype=np.float64).reshape(-1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", nargs="+")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24])
    args = parser.parse_args()

    def images(path: str) -> np.ndarray:
        return read_ild_images(path, args.n)[0]

    reference = ring_figures(images(args.reference), args.layers)
    out: dict = {"ring_edges_cells": list(RING_EDGES), "reference": reference}
    for path in args.generated:
        figures = ring_figures(images(path), args.layers)
        for layer, values in figures.items():
            values["ring_share_over_reference"] = [
                round(g / max(r, 1e-12), 2)
                for g, r in zip(values.pop("ring_share"), reference[layer]["ring_share"])]
        out[path] = figures
    for values in reference.values():
        values["ring_share"] = [round(s, 4) for s in values["ring_share"]]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
