"""The classifier inputs of the CaloChallenge evaluation, from the high-level features of
:mod:`caloforge.features` (re-exported here).

For each shower (after thresholding): E_tot, E_tot/E_inc, and per layer the energy, the
sparsity (fraction of voxels at zero), the centre of energy and width in r, and for layers
with angular bins (or Cartesian cells) in x and y: centre = sum(E x) / sum(E),
width = sqrt(max(<x^2> - <x>^2, 0)); empty layers get centre and width 0, as the official
code does. Coordinates are voxel centres in mm (``Geometry.voxel_centres``).
"""

from __future__ import annotations

import numpy as np

from ..features import FeatureSet, apply_threshold, high_level_features, layer_has_xy  # noqa: F401
from ..geometry import Geometry

ROWS_PER_BLOCK = 1000  # showers per block when building the low-level inputs


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
    """The official low-level classifier input ``(N, 1 + n_voxels)``:
    [log10 E_inc, voxels/E_inc]."""
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
    out = np.empty((len(e_inc), 1 + showers.shape[1]), dtype=np.float32)
    out[:, 0] = np.log10(e_inc[:, 0])
    # in float64 as before, a block of rows at a time: a whole float64 quotient of 20,000
    # calochallenge-3 showers would be another 6.5 GB
    for start in range(0, len(e_inc), ROWS_PER_BLOCK):
        stop = start + ROWS_PER_BLOCK
        out[start:stop, 1:] = showers[start:stop] / e_inc[start:stop]
    return out


class LowLevelInputs:
    """:func:`classifier_low_level_inputs` of showers ``(N, n_voxels)`` MeV and E_inc
    ``(N,)`` MeV, built for the rows asked for (``inputs[rows]`` ``(len(rows), 1 +
    n_voxels)`` float32, the same values) instead of all at once: the classifier reads its
    training rows batch by batch, so the whole input (another 3.2 GB for 20,000
    calochallenge-3 showers) never exists."""

    dtype = np.dtype(np.float32)

    def __init__(self, showers: np.ndarray, incident_energies: np.ndarray) -> None:
        self.showers = showers
        self.incident_energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
        self.shape = (len(self.incident_energies), 1 + showers.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return classifier_low_level_inputs(self.showers[rows], self.incident_energies[rows])


def classifier_low_level_normed_inputs(showers: np.ndarray, incident_energies: np.ndarray,
                                       geometry: Geometry) -> np.ndarray:
    """The official ``cls-low_normed`` input ``(N, 1 + n_voxels + n_layers)``:
    [log10 E_inc, voxels / (their layer energy + 1e-16), log10(E_layer + 1e-8)...]."""
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    layer_energies = geometry.layer_energies(showers, dtype=np.float64)
    out = np.empty((len(e_inc), 1 + showers.shape[1] + geometry.n_layers), dtype=np.float32)
    out[:, 0] = np.log10(e_inc)
    for start in range(0, len(e_inc), ROWS_PER_BLOCK):
        stop = start + ROWS_PER_BLOCK
        per_voxel = np.repeat(layer_energies[start:stop], geometry.layer_sizes, axis=1)
        out[start:stop, 1:1 + showers.shape[1]] = showers[start:stop] / (per_voxel + 1e-16)
    out[:, 1 + showers.shape[1]:] = np.log10(layer_energies + 1e-8)
    return out
