"""High-level shower features (CaloChallenge definitions) and their separation power.

Shared by the evaluation and by models that validate on physics features (the GANs).

For each shower (after thresholding): E_tot, E_tot/E_inc, and per layer the energy, the
sparsity (fraction of voxels at zero), the centre of energy and width in r, and for layers
with angular bins (or Cartesian cells) in x and y: centre = sum(E x) / sum(E),
width = sqrt(max(<x^2> - <x>^2, 0)); empty layers get centre and width 0, as the official
code does. Coordinates are voxel centres in mm (``Geometry.voxel_centres``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import CylindricalLayer, Geometry


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
                        geometry: Geometry, rows_per_block: int = 2000) -> FeatureSet:
    """Features of thresholded showers ``(N, n_voxels)`` MeV with E_inc ``(N,)`` MeV.

    Computed in float64 ``rows_per_block`` showers at a time (every feature is one
    shower's): a float64 copy of 20,000 calochallenge-3 showers would be 6.5 GB."""
    e_inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    blocks = [_block_features(showers[start:start + rows_per_block],
                              e_inc[start:start + rows_per_block], geometry)
              for start in range(0, max(len(e_inc), 1), rows_per_block)]
    if len(blocks) == 1:
        return blocks[0]
    return FeatureSet({name: np.concatenate([block.values[name] for block in blocks])
                       for name in blocks[0].values}, blocks[0].kinds)


def _block_features(showers: np.ndarray, e_inc: np.ndarray, geometry: Geometry
                    ) -> FeatureSet:
    """:func:`high_level_features` of one block of showers (E_inc ``(N,)`` float64)."""
    showers = np.asarray(showers, dtype=np.float64)
    values: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    total = showers.sum(axis=1)
    values["E_tot"], kinds["E_tot"] = total, "energy"
    values["E_tot/E_inc"], kinds["E_tot/E_inc"] = total / e_inc, "fraction"
    centres = geometry.voxel_centres
    radii = geometry.voxel_radii
    for sl, layer in zip(geometry.layer_slices, geometry.layers):
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


def separation_power(reference: np.ndarray, generated: np.ndarray, bins: np.ndarray,
                     clip: bool = True) -> float:
    """S = 1/2 sum (h1 - h2)^2 / (h1 + h2) of the two normalised histograms (0 = same,
    1 = disjoint).

    ``clip``: values outside ``bins`` count in the first/last bin, so that a shift out of
    range is not hidden (caloforge's quantile binning); without it they are dropped and each
    histogram is normalised over its entries in range, as the official ``evaluate.py`` does
    (``plt.hist(density=True)``) with its fixed ranges.
    """
    h1 = _histogram(reference, bins, clip)
    h2 = _histogram(generated, bins, clip)
    total = h1 + h2
    nonzero = total > 0
    return float(0.5 * np.sum((h1[nonzero] - h2[nonzero]) ** 2 / total[nonzero]))


def _histogram(values: np.ndarray, bins: np.ndarray, clip: bool = True) -> np.ndarray:
    if clip:
        values = np.clip(values, bins[0], bins[-1])
    counts, _ = np.histogram(values, bins=bins)
    return counts / max(counts.sum(), 1)


def feature_bins(reference: np.ndarray, generated: np.ndarray, kind: str, n_bins: int = 50
                 ) -> np.ndarray:
    """Bin edges from the reference's 0.1-99.9 % range (log-spaced for energies)."""
    if kind == "fraction" and reference.min() >= 0 and reference.max() <= 1:
        lo, hi = 0.0, 1.0
        if np.quantile(reference, 0.999) - np.quantile(reference, 0.001) < 0.5:
            lo, hi = np.quantile(np.concatenate([reference, generated]), [0.001, 0.999])
    else:
        lo, hi = np.quantile(reference, [0.001, 0.999])
    if kind == "energy" and hi > 0:
        positive = reference[reference > 0]
        lo = float(np.quantile(positive, 0.001)) if positive.size else hi / 1e3
        if hi / max(lo, 1e-12) > 20:
            return np.geomspace(lo, hi * 1.05, n_bins + 1)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        centre = float(np.median(reference)) if reference.size else 0.0
        lo, hi = centre - 0.5, centre + 0.5
    pad = 0.05 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n_bins + 1)
