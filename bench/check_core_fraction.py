"""Issue 28: how each layer's core share follows the shower's development, data against model.

    python bench/check_core_fraction.py GENERATED.h5 --reference TEST.h5 --geometry ild-ecal \\
        [--radius 2] [--fit-generated FIT.h5 --fit-reference TRAIN.h5 -o MAPPED.h5]

Per shown layer, for the reference and the generated showers (and, with the fit options, the
generated showers mapped by a :class:`~caloforge.core_fraction.CoreFractionMap` fitted on
FIT.h5 — the model's showers for TRAIN.h5's first energies — against TRAIN.h5, then written
to MAPPED.h5 for ``caloforge evaluate``): the core fraction (energy within --radius cells of
the axis over the layer's) — its spread, and its partial correlation with the share of the
shower's energy deposited before the layer (after a linear fit on log E_layer and
log E_inc) — and the correlation of the radial centre of energy with the next layer's.
Prints JSON. Layers of one image shape: Cartesian squares (ild-ecal; the core = cells whose
centre lies within --radius cells of the axis) or cylinders (calochallenge-2/3; the core = the
first --radius radial rows, as ``convflow``'s ``core_fraction_radius``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from caloforge.core_fraction import CoreFractionMap, core_cells
from caloforge.data import ShowerData, read_showers, write_showers
from caloforge.geometry import get_geometry

ILD_SHOWN = (5, 10, 14, 17, 20, 23, 26)


def shown_layers(n_layers: int) -> tuple[int, ...]:
    """The layers reported: ild-ecal's usual seven, else seven spread over the middle."""
    if n_layers == 30:
        return ILD_SHOWN
    return tuple(int(v) for v in np.linspace(n_layers // 8, n_layers - n_layers // 8 - 2, 7))


def cell_radii(geometry: Any) -> np.ndarray:
    """Each voxel of a layer's distance from the axis in cells ``(voxels per layer,)``: the
    radial row + 0.5 for cylinders, the centre's distance from the image centre otherwise."""
    image = geometry.uniform_layer_image
    if image is None:
        raise SystemExit(f"{geometry.name}: the layers differ in shape; one image shape needed")
    kind, (height, width) = image
    rows, columns = np.divmod(np.arange(height * width), width)
    if kind == "cylindrical":
        return columns + 0.5  # (angular bin, radial bin), the radial index fastest
    return np.hypot(rows - (height - 1) / 2, columns - (width - 1) / 2)


def figures(data: ShowerData, n_layers: int, radius: np.ndarray, core: np.ndarray,
            threshold: float) -> dict[str, list[float]]:
    layers = data.showers.reshape(len(data), n_layers, len(radius)).astype(np.float64)
    layers = np.where(layers >= threshold, layers, 0)
    energy = layers.sum(-1)
    fraction = layers[..., core].sum(-1) / np.maximum(energy, 1e-300)
    centre = (layers * radius).sum(-1) / np.maximum(energy, 1e-300)
    before = (np.cumsum(energy, 1) - energy) / np.maximum(energy.sum(1, keepdims=True), 1e-300)
    incident = np.log(np.asarray(data.incident_energies, dtype=np.float64).reshape(-1))
    out: dict[str, list[float]] = {"fraction_spread": [], "fraction_vs_share_before": [],
                                   "centre_r_next_layer_correlation": []}
    for layer in shown_layers(n_layers):
        hit = (energy[:, layer] > 0) & (energy[:, layer + 1] > 0)
        x = np.c_[np.ones(hit.sum()), np.log(energy[hit, layer]), incident[hit]]
        residual = fraction[hit, layer] - x @ np.linalg.lstsq(x, fraction[hit, layer],
                                                              rcond=None)[0]
        out["fraction_spread"].append(round(float(fraction[hit, layer].std()), 4))
        out["fraction_vs_share_before"].append(
            round(float(np.corrcoef(residual, before[hit, layer])[0, 1]), 3))
        out["centre_r_next_layer_correlation"].append(
            round(float(np.corrcoef(centre[hit, layer], centre[hit, layer + 1])[0, 1]), 3))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--geometry", default="ild-ecal")
    parser.add_argument("--radius", type=float, default=2.0, help="core radius (cells)")
    parser.add_argument("--fit-generated", help="the model's showers for TRAIN's energies")
    parser.add_argument("--fit-reference", help="TRAIN.h5 (its first showers, as many)")
    parser.add_argument("-o", "--output", help="write the mapped generated showers here")
    args = parser.parse_args()
    geometry = get_geometry(args.geometry)
    n_layers = geometry.n_layers
    radius = cell_radii(geometry)
    core = core_cells(geometry, args.radius)
    threshold = geometry.threshold_mev or 0.0
    reference = read_showers(args.reference, geometry)
    generated = read_showers(args.generated, geometry)
    samples = {"reference": reference, "generated": generated}
    if args.fit_generated and args.fit_reference:
        fit = read_showers(args.fit_generated, geometry)
        train = read_showers(args.fit_reference, geometry, max_showers=len(fit))
        fitted = CoreFractionMap.fit(
            train.showers.reshape(len(train), n_layers, -1), train.incident_energies,
            fit.showers.reshape(len(fit), n_layers, -1), train.incident_energies, core,
            threshold)
        cells = torch.as_tensor(generated.showers.reshape(len(generated), n_layers, -1))
        incident = torch.as_tensor(generated.incident_energies)
        energies = cells.double().sum(-1)
        mapped = torch.stack([fitted.apply(cells[:, layer], layer, incident, energies)
                              for layer in range(n_layers)], 1)
        samples["mapped"] = ShowerData(incident_energies=generated.incident_energies,
                                       showers=mapped.reshape(len(generated), -1).numpy())
        if args.output:
            write_showers(args.output, samples["mapped"], geometry)
    print(json.dumps({"layers": shown_layers(n_layers), "core_radius_cells": args.radius,
                      **{name: figures(data, n_layers, radius, core, threshold)
                         for name, data in samples.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
