"""How generated cylinder showers share each ring's energy among its angular cells, against
the reference (issue 28; calochallenge-2/3).

    python bench/check_cylinder_rings.py GENERATED.h5 --reference TEST.h5 \
        --geometry calochallenge-3 [--n 3000] [--layers 5 10 15 20 25 30]

For the shown layers of the first --n showers of each file: the mean share of the layer's
energy in each of the first five rings, the mean hits in each of the first four rings,
the mean over showers of the ring's hottest angular cell over its mean cell (first four
rings: how peaked a ring is), the hottest cell's quantiles (MeV: 50 %, 90 %, 99 %) and
its share of the layer; in every layer the mean hottest cell generated over reference
(and how many layers are within 10 %). The files must hold the same incident energies in
the same order for the shares to compare like with like (``generate --like``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from caloforge.data import read_showers
from caloforge.geometry import get_geometry
from caloforge.ring_spread import cylinder_shape


def ring_figures(showers: np.ndarray, n_angular: int, n_radial: int, layers: list[int]
                 ) -> dict:
    """The figures of the module docstring for ``showers`` ``(N, n_voxels)`` MeV."""
    images = showers.reshape(len(showers), -1, n_angular, n_radial)
    out: dict[str, dict] = {}
    for layer in layers:
        cells = images[:, layer].astype(np.float64)  # (N, A, R)
        energy = cells.sum((1, 2))
        hit = energy > 0
        cells, energy = cells[hit], energy[hit]
        rings = cells.sum(1)  # (n, R)
        peaked = []
        for ring in range(min(4, n_radial)):
            mean = cells[:, :, ring].mean(1)
            filled = mean > 0
            peaked.append(round(float((cells[filled, :, ring].max(1) / mean[filled]).mean()), 2))
        hottest = cells.reshape(len(cells), -1).max(1)
        out[str(layer)] = {
            "ring_energy_share": (rings / energy[:, None]).mean(0)[:5].round(3).tolist(),
            "ring_hits": (cells[:, :, :4] > 0).sum(1).mean(0).round(1).tolist(),
            "ring_hottest_over_mean_cell": peaked,
            "hottest_cell_mev_quantiles": np.quantile(hottest, [0.5, 0.9, 0.99]).round(1)
            .tolist(),
            "hottest_cell_share_of_layer": round(float((hottest / energy).mean()), 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--geometry", default="calochallenge-3")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30])
    args = parser.parse_args()
    geometry = get_geometry(args.geometry)
    n_angular, n_radial = cylinder_shape(geometry)
    samples = {name: read_showers(path, geometry).showers[:args.n]
               for name, path in (("reference", args.reference), ("generated", args.generated))}
    hottest = {name: showers.reshape(len(showers), geometry.n_layers, -1).max(-1)
               .astype(np.float64).mean(0) for name, showers in samples.items()}
    ratio = hottest["generated"] / np.maximum(hottest["reference"], 1e-9)
    print(json.dumps({
        **{name: ring_figures(showers, n_angular, n_radial, args.layers)
           for name, showers in samples.items()},
        "hottest_cell_generated_over_reference_mean": round(float(ratio.mean()), 3),
        "layers_with_hottest_cell_within_10_percent": int((np.abs(ratio - 1) < 0.1).sum()),
        "hottest_cell_ratio_per_layer": ratio.round(3).tolist()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
