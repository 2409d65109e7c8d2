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
left out. With ``--ring-radii``: for each ring split of ``core_fraction: profile`` (the
energy within r cells of the axis as a share of that within r + 1), the R^2 of its logit
with the maps' regressors for each ``core_fraction_hits`` (none, the layer's hits, the
parts' hits). Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from caloforge.core_fraction import (
    HIT_REGRESSORS,
    _masks,
    _regression_inputs,
    core_cells,
    fraction_features,
    shares_before,
)
from caloforge.data import ShowerData, read_showers
from caloforge.features import apply_threshold, high_level_features
from caloforge.geometry import Geometry, get_geometry


def residual_correlations(data: ShowerData, geometry: Geometry, layers: list[int],
                          core_radius: float) -> dict[str, dict[str, float]]:
    """Per layer: the correlation of the hit count's residual with the radial centre's,
    the radial width's and logit(core fraction)'s, the hit residual's spread and the count
    of showers used."""
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


def ring_split_r2(data: ShowerData, geometry: Geometry, layers: list[int],
                  radii: list[float]) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer and radius r: the R^2 of logit(energy within r / energy within r + 1)
    regressed on the core maps' regressors, for each hit-count choice (showers with hits
    both within r and in the ring, as the maps are fitted)."""
    cells = data.showers.reshape(len(data.showers), geometry.n_layers, -1).astype(np.float64)
    out: dict[str, dict[str, dict[str, float]]] = {str(layer): {} for layer in layers}
    for radius in radii:
        core, within = _masks(cells.shape[-1], core_cells(geometry, radius),
                              core_cells(geometry, radius + 1))
        for kind in HIT_REGRESSORS:
            features, logits, ok = _regression_inputs(cells, data.incident_energies, core,
                                                      within, geometry.threshold_mev or 0.0,
                                                      kind)
            for layer in layers:
                x, t = features[ok[:, layer], layer], logits[ok[:, layer], layer]
                residual = t - x @ np.linalg.lstsq(x, t, rcond=None)[0]
                out[str(layer)].setdefault(f"r{radius:g}", {})[kind] = round(
                    float(1 - residual.var() / t.var()), 3)
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
    parser.add_argument("--ring-radii", default=None,
                        help="e.g. 1,2,3,5,8: the R^2 of these ring splits (docstring)")
    args = parser.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    geometry = get_geometry(args.geometry)
    paths = [args.reference, *args.generated]
    result, ring_splits = {}, {}
    for path in paths:  # one file in memory at a time, read once
        data = read_showers(path, geometry, max_showers=args.n)
        result[path] = residual_correlations(data, geometry, layers, args.core_radius)
        if args.ring_radii:
            ring_splits[path] = ring_split_r2(data, geometry, layers,
                                              [float(v) for v in args.ring_radii.split(",")])
    out: dict[str, object] = {"reference": args.reference, "showers": args.n,
                              "correlation_with_hit_count_residual": result}
    if args.ring_radii:
        out["ring_split_r2"] = ring_splits
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
