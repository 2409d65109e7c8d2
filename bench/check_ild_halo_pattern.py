"""Issue 28: where generated ild-ecal showers put the hits of their halo.

    python bench/check_ild_halo_pattern.py GENERATED.h5 [...] --reference TEST.h5 [--n 3000]

After the readout threshold, for the hits 4 or more cells from the grid's axis ("halo") and
those 2-4 cells out ("near"):

* ``place_over_reference``: hits by the cell's place in its 2 x 2 block (row parity x 2 +
  column parity: the channel of the flows' squeeze), generated over reference;
* ``by_e_inc_fifth``: per fifth of the incident energies, the halo hits per shower (mean,
  spread) and their correlation with the shower's total energy at that E_inc;
* ``layer_count_correlation``: the mean correlation between the halo hit counts of two
  layers of a shower (layers 5-24).

Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from check_ild_rings import SIDE, read_ild_images


def pattern(images: np.ndarray, incident_energies: np.ndarray) -> dict:
    """The figures of the module docstring for ``images`` ``(N, 30, 30, 30)`` MeV."""
    hits = images > 0
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    radius = np.hypot(rows - (SIDE - 1) / 2, columns - (SIDE - 1) / 2)
    place = (rows % 2) * 2 + columns % 2
    regions = {"near": (radius >= 2) & (radius < 4), "halo": radius >= 4}
    out: dict = {"places": {name: [int(hits[:, :, region & (place == p)].sum())
                                   for p in range(4)] for name, region in regions.items()}}
    halo_counts = hits[:, :, regions["halo"]].sum(2)  # (N, L)
    per_shower = halo_counts.sum(1)
    total = images.sum((1, 2, 3), dtype=np.float64)
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    fifth = np.digitize(energies, np.quantile(energies, [0.2, 0.4, 0.6, 0.8]))
    out["by_e_inc_fifth"] = [
        {"e_inc_median_mev": round(float(np.median(energies[fifth == k])), 0),
         "halo_hits_mean": round(float(per_shower[fifth == k].mean()), 1),
         "halo_hits_std": round(float(per_shower[fifth == k].std()), 1),
         "correlation_with_e_tot": round(float(np.corrcoef(per_shower[fifth == k],
                                                           total[fifth == k])[0, 1]), 3)}
        for k in range(5)]
    middle = halo_counts[:, 5:25].T.astype(np.float64)
    correlations = np.corrcoef(middle)[np.triu_indices(len(middle), 1)]
    out["layer_count_correlation"] = round(float(np.nanmean(correlations)), 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", nargs="+")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()

    def figures(path: str) -> dict:
        return pattern(*read_ild_images(path, args.n))

    reference = figures(args.reference)
    out: dict = {"reference": reference, "generated": {}}
    for path in args.generated:
        generated = figures(path)
        generated["place_over_reference"] = {
            name: [round(g / max(r, 1), 3) for g, r in zip(counts, reference["places"][name])]
            for name, counts in generated["places"].items()}
        out["generated"][path] = generated
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
