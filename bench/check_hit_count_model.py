"""Issue 28: can a classifier tell the hit count model's counts from the data's?

    python bench/check_hit_count_model.py TRAIN.h5 --reference TEST.h5 --geometry ild-ecal \\
        [--fit 5000] [--n 3000] [--groups layer|band] [--repeats 3]

Fits :class:`~caloforge.hit_counts.HitCountModel` on the first ``--fit`` showers of TRAIN
(hits per layer, or per radial band of each layer as the families' ``hit_counts: band``
counts them), draws counts for the first ``--n`` showers of TEST given their own E_inc and
layer deposits, and trains gradient-boosted trees (scikit-learn, 3-fold) to tell
``[log E_inc, log(1 + deposits), log(1 + counts)]`` of the real showers from the same with
the drawn counts. AUC 0.5: the drawn counts follow the energies as the data's do. Also the
same without the copula (the groups' residuals drawn independently) and with the unbounded
target ``log(1 + n)`` of models fitted before the group sizes: what each buys. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import cross_val_score

from caloforge.data import read_showers
from caloforge.geometry import get_geometry
from caloforge.hit_counts import HitCountModel, count_bands


def counts_and_deposits(path: str, geometry, n: int, bands: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E_inc ``(N,)`` MeV, layer deposits ``(N, L)`` MeV and hits per group ``(N, L x B)``."""
    data = read_showers(path, geometry, max_showers=n)
    threshold = geometry.threshold_mev or 0.0
    showers = data.showers.reshape(len(data), geometry.n_layers, -1)
    hits = showers >= threshold
    counts = np.stack([hits[:, :, bands == b].sum(-1) for b in range(bands.max() + 1)], -1)
    deposits = np.where(hits, showers, 0).sum(-1, dtype=np.float64)
    return (np.asarray(data.incident_energies, dtype=np.float64).reshape(-1), deposits,
            counts.reshape(len(data), -1))


def auc(energies: np.ndarray, deposits: np.ndarray, real: np.ndarray, drawn: np.ndarray,
        repeats: int) -> float:
    def rows(counts: np.ndarray) -> np.ndarray:
        return np.c_[np.log(energies), np.log1p(deposits), np.log1p(counts)]

    x = np.concatenate([rows(real), rows(drawn)])
    y = np.r_[np.zeros(len(real)), np.ones(len(drawn))]
    scores = [cross_val_score(HistGradientBoostingClassifier(max_iter=200, random_state=seed),
                              x, y, cv=3, scoring="roc_auc").mean() for seed in range(repeats)]
    return round(float(np.mean(scores)), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--geometry", required=True)
    parser.add_argument("--fit", type=int, default=5000)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--groups", choices=["layer", "band"], default="band")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    geometry = get_geometry(args.geometry)
    bands = count_bands(geometry, args.groups)
    n_bands = int(bands.max()) + 1
    group_layers = np.repeat(np.arange(geometry.n_layers), n_bands).tolist()
    at_least_one = np.tile(np.arange(n_bands) == 0, geometry.n_layers).tolist()
    fit_energies, fit_deposits, fit_counts = counts_and_deposits(args.train, geometry,
                                                                 args.fit, bands)
    energies, deposits, counts = counts_and_deposits(args.reference, geometry, args.n, bands)
    sizes = np.tile(np.bincount(bands, minlength=n_bands), geometry.n_layers).tolist()
    model = HitCountModel.fit(fit_counts, fit_deposits, fit_energies, group_layers,
                              at_least_one, group_sizes=sizes)
    unbounded = HitCountModel.fit(fit_counts, fit_deposits, fit_energies, group_layers,
                                  at_least_one)
    noise = torch.randn(len(energies), model.n_groups, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))

    def drawn(m: HitCountModel) -> np.ndarray:
        return m.draw(torch.as_tensor(energies), torch.as_tensor(deposits), noise).numpy()

    independent = HitCountModel(**{**model.state(),
                                   "copula_factor": np.eye(model.n_groups).tolist()})
    out = {"train": args.train, "reference": args.reference, "groups": args.groups,
           "n_groups": model.n_groups, "fitted_on": len(fit_energies), "n": len(energies),
           "auc": {"count_model": auc(energies, deposits, counts, drawn(model), args.repeats),
                   "without_copula": auc(energies, deposits, counts, drawn(independent),
                                         args.repeats),
                   "unbounded_log_count": auc(energies, deposits, counts, drawn(unbounded),
                                              args.repeats)},
           "mean_hits_real_drawn": [round(float(counts.sum(1).mean()), 1),
                                    round(float(drawn(model).sum(1).mean()), 1)]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
