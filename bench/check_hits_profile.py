"""Issue 28: does a layer's hit count go with its radial profile as in the data?

    python bench/check_hits_profile.py GENERATED.h5 [MORE.h5 ...] --reference TEST.h5 \\
        --geometry ild-ecal [--n 20000] [--layers 3,8,12,16,20,24,28]

At a given layer energy a shower with more hits is broader. Per layer, each of log(hits),
the radial centre, the radial width and logit(core fraction) (the two-cell core of
``core_fraction``) is regressed on the core maps' regressors ``[1, v, v^2, F, F^2, u, u v]``
(``v``: log layer energy, ``F``: the share of the shower deposited before the layer, ``u``:
log E_inc; :func:`caloforge.core_fraction.fraction_features`), and the residuals'
correlations with the hit count's are printed for the reference and each generated file:
what the two share beyond the energies. Showers with fewer than two hits in the layer are
left out. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from caloforge.core_fraction import core_cells, fraction_features, shares_before
from caloforge.data import read_showers
from caloforge.features import apply_threshold, high_level_features
from caloforge.geometry import get_geometry


def residual_correlations(path: str, geometry_name: str, n: int, layers: list[int],
                          core_radius: float) -> dict[str, dict[str, float]]:
    """Per layer: the correlation of the hit count's residual with the radial centre's,
    the radial width's and logit(core fraction)'s, the hit residual's spread and the count
    of showers used."""
    geometry = get_geometry(geometry_name)
    data = read_showers(path, geometry, max_showers=n)
    showers = apply_threshold(data.showers, geometry.threshold_mev or 0.0)
    features = high_level_features(showers, data.incident_energies, geometry).values
    cells = showers.reshape(len(showers), geometry.n_layers, -1)
    energies = torch.as_tensor(cells.sum(-1), dtype=torch.float64)
    before = shares_before(energies)
    incident = torch.as_tensor(np.asarray(data.incident_energies, dtype=np.float64))
    core = core_cells(geometry, core_radius)
    out = {}
    for layer in layers:
        tag = f"L{geometry.layers[layer].layer_id}"
        hits = (cells[:, layer] > 0).sum(-1)
        keep = hits > 1
        x = fraction_features(energies[:, layer], before[:, layer], incident).numpy()[keep]
        fraction = np.clip(cells[:, layer, core].sum(-1) / np.maximum(
            energies[:, layer].numpy(), 1e-300), 1e-6, 1 - 1e-6)
        targets = {"hits": np.log(hits), "centre_r": features[f"EC_r_{tag}"],
                   "width_r": features[f"width_r_{tag}"],
                   "core_logit": np.log(fraction / (1 - fraction))}
        residuals = {}
        for name, values in targets.items():
            y = values[keep]
            residuals[name] = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        out[str(layer)] = {
            **{name: round(float(np.corrcoef(residuals["hits"], residuals[name])[0, 1]), 3)
               for name in ("centre_r", "width_r", "core_logit")},
            "hits_spread": round(float(residuals["hits"].std()), 3), "showers": int(keep.sum())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", nargs="+")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--geometry", required=True)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--layers", default="3,8,12,16,20,24,28")
    parser.add_argument("--core-radius", type=float, default=2.0,
                        help="the core of the core fraction (cells)")
    args = parser.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    result = {path: residual_correlations(path, args.geometry, args.n, layers,
                                          args.core_radius)
              for path in [args.reference, *args.generated]}
    print(json.dumps({"reference": args.reference, "showers": args.n,
                      "correlation_with_hit_count_residual": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
