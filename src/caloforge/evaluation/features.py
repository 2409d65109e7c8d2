"""High-level shower features, CaloChallenge definitions.

For each shower (after thresholding): E_tot, E_tot/E_inc, and per layer the energy, the
sparsity (fraction of voxels at zero), the centre of energy and width in r, and for layers
with angular bins (or Cartesian cells) in x and y: centre = sum(E x) / sum(E),
width = sqrt(max(<x^2> - <x>^2, 0)); empty layers get centre and width 0, as the official
code does. Coordinates are voxel centres in mm (``Geometry.voxel_centres``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import CylindricalLayer, Geometry


def apply_threshold(showers: np.ndarray, threshold_mev: float) -> np.ndarray:
    """Voxels below ``threshold_mev`` set to 0 (a copy), ``(N, n_voxels)``."""
    return np.where(showers < threshold_mev, 0.0, showers).astype(showers.dtype, copy=False)


def layer_has_xy(layer) -> bool:
    """Whether x/y centres and widths are meaningful for a layer (angular bins or cells)."""
    return not (isinstance(layer, CylindricalLayer) and layer.n_alpha == 1)


@dataclass
class FeatureSet:
    """Named per-shower features, each ``(N,)``, plus their kind for binning and plotting."""

    values: dict[str, np.ndarray]
    kinds: dict[str, str]  # "energy" (positive, log-binned), "fraction", "position", "width"

    def names(self) -> list[str]:
        return list(self.values)


def high_level_features(showers: np.ndarray, incident_energies: np.ndarray,
                        geometry: Geometry) -> FeatureSet:
    """Features of thresholded showers ``(N, n_voxels)`` MeV with E_inc ``(N,)`` MeV."""
    showers = np.asarray(showers, dtype=np.float64)
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    values: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    total = showers.sum(axis=1)
    values["E_tot"], kinds["E_tot"] = total, "energy"
    values["E_tot/E_inc"], kinds["E_tot/E_inc"] = total / e_inc, "fraction"
    centres = geometry.voxel_centres
    radii = geometry.voxel_radii
    for position, (sl, layer) in enumerate(zip(geometry.layer_slices, geometry.layers)):
        block = showers[:, sl]
        energy = block.sum(axis=1)
        tag = f"L{layer.layer_id}"
        values[f"E_{tag}"], kinds[f"E_{tag}"] = energy, "energy"
        values[f"sparsity_{tag}"] = (block == 0).mean(axis=1)
        kinds[f"sparsity_{tag}"] = "fraction"
        coordinates = {"r": radii[sl]}
        if layer_has_xy(layer):
            coordinates["x"], coordinates["y"] = centres[sl, 0], centres[sl, 1]
        safe = np.where(energy > 0, energy, 1.0)
        for axis, coordinate in coordinates.items():
            mean = block @ coordinate / safe
            second = block @ (coordinate ** 2) / safe
            width = np.sqrt(np.maximum(second - mean ** 2, 0.0))
            values[f"EC_{axis}_{tag}"] = np.where(energy > 0, mean, 0.0)
            values[f"width_{axis}_{tag}"] = np.where(energy > 0, width, 0.0)
            kinds[f"EC_{axis}_{tag}"] = "position"
            kinds[f"width_{axis}_{tag}"] = "width"
    return FeatureSet(values, kinds)


def classifier_high_level_inputs(features: FeatureSet, incident_energies: np.ndarray,
                                 geometry: Geometry) -> np.ndarray:
    """The official high-level classifier (and FPD/KPD) input ``(N, d)``, in its order:

    [log10 E_inc, log10(E_layer + 1e-8)..., centres in x..., centres in y..., widths in x...,
    widths in y... (layers with angular bins or cells, mm / 100), log10(E_tot + 1e-8),
    sparsity..., centres in r..., widths in r... (mm / 100)].
    """
    v = features.values
    tags = [f"L{layer.layer_id}" for layer in geometry.layers]
    xy_tags = [t for t, layer in zip(tags, geometry.layers) if layer_has_xy(layer)]
    columns = [np.log10(np.asarray(incident_energies, dtype=np.float64).reshape(-1))]
    columns += [np.log10(v[f"E_{t}"] + 1e-8) for t in tags]
    for quantity in ("EC_x", "EC_y", "width_x", "width_y"):
        columns += [v[f"{quantity}_{t}"] / 100.0 for t in xy_tags]
    columns.append(np.log10(v["E_tot"] + 1e-8))
    columns += [v[f"sparsity_{t}"] for t in tags]
    for quantity in ("EC_r", "width_r"):
        columns += [v[f"{quantity}_{t}"] / 100.0 for t in tags]
    return np.stack(columns, axis=1)


def classifier_low_level_inputs(showers: np.ndarray, incident_energies: np.ndarray
                                ) -> np.ndarray:
    """The official low-level classifier input ``(N, 1 + n_voxels)``: [log10 E_inc, voxels/E_inc]."""
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
    out = np.empty((len(e_inc), 1 + showers.shape[1]), dtype=np.float32)
    out[:, 0] = np.log10(e_inc[:, 0])
    out[:, 1:] = showers / e_inc
    return out


def classifier_low_level_normed_inputs(showers: np.ndarray, incident_energies: np.ndarray,
                                       geometry: Geometry) -> np.ndarray:
    """The official ``cls-low_normed`` input ``(N, 1 + n_voxels + n_layers)``:
    [log10 E_inc, voxels / (their layer energy + 1e-16), log10(E_layer + 1e-8)...]."""
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    layer_energies = geometry.layer_energies(showers, dtype=np.float64)
    per_voxel = np.repeat(layer_energies, geometry.layer_sizes, axis=1)
    out = np.empty((len(e_inc), 1 + showers.shape[1] + geometry.n_layers), dtype=np.float32)
    out[:, 0] = np.log10(e_inc)
    out[:, 1:1 + showers.shape[1]] = showers / (per_voxel + 1e-16)
    out[:, 1 + showers.shape[1]:] = np.log10(layer_energies + 1e-8)
    return out
