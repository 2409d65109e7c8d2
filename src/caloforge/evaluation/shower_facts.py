"""Physics facts of a sample of showers in a cylindrical binning, per incident-energy bin.

The numbers a calorimeter physicist checks first when two shower samples are held against
each other (e.g. the reference simulator against G4HepEm): the visible fraction of the
incident energy and its spread (the resolution), the longitudinal centre of gravity and how
it moves with ln E, the share in the last layer (leakage), the share of voxels hit, the
spectrum of hit-voxel energies with its MIP peak, and the radial containment.

Every fact is computed from the voxels above a threshold, identically for both samples, so
that they compare; they are not the detector's "true" deposits (energy outside the binning
is not in a file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..geometry import CylindricalLayer, Geometry

DEFAULT_ENERGY_EDGES_MEV = tuple(float(e) for e in np.geomspace(1e3, 1e5, 9))
HIT_PERCENTILES = (1.0, 10.0, 50.0, 90.0, 99.0)
MIP_BINS_MEV = np.linspace(0.0, 4.0, 41)  # 0.1 MeV bins
MIP_MIN_MEV = 0.5  # the peak is looked for above this (below: soft electrons)


def _radial_layers(geometry: Geometry) -> tuple[int, int]:
    """(n_alpha, n_radial) of a geometry whose layers all share one cylindrical binning."""
    first = geometry.layers[0]
    if not isinstance(first, CylindricalLayer) or any(
            not isinstance(layer, CylindricalLayer) or layer.r_edges != first.r_edges
            or layer.n_alpha != first.n_alpha for layer in geometry.layers):
        raise ValueError(f"{geometry.name}: shower facts need one cylindrical binning for all "
                         "layers")
    return first.n_alpha, first.n_radial


def bin_facts(cut_showers: np.ndarray, incident_energies: np.ndarray, geometry: Geometry
              ) -> dict[str, Any]:
    """Facts of one group of showers.

    Args:
        cut_showers: ``(n, n_voxels)`` voxel energies, MeV, already cut at the threshold
            (0: no hit).
        incident_energies: ``(n,)`` MeV.

    Returns:
        ``visible_fraction`` (mean of sum / E_inc), ``resolution`` (its rms / mean),
        ``cog_layer`` (mean energy-weighted layer index + 0.5, in layers),
        ``cog_layer_rms``, ``last_layer_share`` (of the mean longitudinal profile),
        ``occupancy`` (share of voxels hit), ``n`` and ``mean_energy_mev``.
    """
    n = len(cut_showers)
    layers = cut_showers.reshape(n, geometry.n_layers, -1).sum(2, dtype=np.float64)
    total = layers.sum(1)
    fraction = total / incident_energies
    depth = np.arange(geometry.n_layers) + 0.5
    cog = (layers * depth).sum(1) / np.maximum(total, 1e-12)
    profile = layers.mean(0)
    return {"n": int(n), "mean_energy_mev": float(incident_energies.mean()),
            "visible_fraction": float(fraction.mean()),
            "resolution": float(fraction.std() / fraction.mean()),
            "cog_layer": float(cog.mean()), "cog_layer_rms": float(cog.std()),
            "last_layer_share": float(profile[-1] / profile.sum()),
            "occupancy": float((cut_showers > 0).mean())}


def shower_facts(showers: np.ndarray, incident_energies: np.ndarray, geometry: Geometry,
                 threshold_mev: float | None = None,
                 energy_edges_mev: Sequence[float] = DEFAULT_ENERGY_EDGES_MEV,
                 mip_layers: int = 4, mip_radial_bins: int = 2) -> dict[str, Any]:
    """All facts of a sample: per energy bin, the centre-of-gravity fit and the spectra.

    ``mip_layers`` / ``mip_radial_bins``: where the MIP peak is read (the first layers near
    the axis, where the incident electron crosses before the shower develops).
    """
    threshold = geometry.threshold_mev if threshold_mev is None else threshold_mev
    n_alpha, n_radial = _radial_layers(geometry)
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    cut = np.where(showers >= threshold, showers, 0).astype(np.float32, copy=False)
    bins = []
    for lo, hi in zip(energy_edges_mev[:-1], energy_edges_mev[1:]):
        chosen = (energies >= lo) & (energies < hi)
        if chosen.sum() >= 10:
            bins.append({"e_lo_mev": float(lo), "e_hi_mev": float(hi),
                         **bin_facts(cut[chosen], energies[chosen], geometry)})
    facts: dict[str, Any] = {"threshold_mev": threshold, "energy_bins": bins}
    if len(bins) >= 2:
        ln_e = np.log([b["mean_energy_mev"] / 1000.0 for b in bins])
        slope, offset = np.polyfit(ln_e, [b["cog_layer"] for b in bins], 1)
        facts["cog_vs_ln_e_gev"] = {"offset_layers": float(offset),
                                    "slope_layers": float(slope)}
    hits = cut[cut > 0].astype(np.float64)
    facts["hit_percentiles_mev"] = {f"{q:g}": float(v) for q, v in
                                    zip(HIT_PERCENTILES, np.percentile(hits, HIT_PERCENTILES))}
    facts["hits_below_0.1_mev"] = float((hits < 0.1).mean())
    grid = cut.reshape(len(cut), geometry.n_layers, n_alpha, n_radial)
    core = grid[:, :mip_layers, :, :mip_radial_bins].ravel()
    counts, _ = np.histogram(core[core > 0], MIP_BINS_MEV)
    first = int(np.searchsorted(MIP_BINS_MEV, MIP_MIN_MEV))
    peak = first + int(np.argmax(counts[first:]))
    facts["mip_peak_mev"] = float(0.5 * (MIP_BINS_MEV[peak] + MIP_BINS_MEV[peak + 1]))
    radial = grid.sum((0, 1, 2), dtype=np.float64)
    edges = np.asarray(geometry.layers[0].r_edges)  # type: ignore[union-attr]
    facts["radial_containment"] = {f"{r:g}": float(c) for r, c in
                                   zip(edges[1:], np.cumsum(radial) / radial.sum())}
    return facts


def compare_facts(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How far ``other``'s facts lie from ``reference``'s (the targets' measures).

    Per energy bin: relative difference of the visible fraction and of the resolution,
    centre of gravity and last-layer share differences, occupancy ratio; overall: the hit
    median's and MIP peak's relative differences, the largest of each per-bin measure.
    """
    rows = []
    for ref, gen in zip(reference["energy_bins"], other["energy_bins"]):
        rows.append({"e_lo_mev": ref["e_lo_mev"], "e_hi_mev": ref["e_hi_mev"],
                     "visible_fraction_rel": gen["visible_fraction"] / ref["visible_fraction"] - 1,
                     "resolution_rel": gen["resolution"] / ref["resolution"] - 1,
                     "cog_layers": gen["cog_layer"] - ref["cog_layer"],
                     "last_layer_share_diff": gen["last_layer_share"] - ref["last_layer_share"],
                     "occupancy_ratio": gen["occupancy"] / ref["occupancy"]})
    median_ref = reference["hit_percentiles_mev"]["50"]
    return {"energy_bins": rows,
            "worst_visible_fraction_rel": max(abs(r["visible_fraction_rel"]) for r in rows),
            "worst_resolution_rel": max(abs(r["resolution_rel"]) for r in rows),
            "worst_cog_layers": max(abs(r["cog_layers"]) for r in rows),
            "hit_median_rel": other["hit_percentiles_mev"]["50"] / median_ref - 1,
            "mip_peak_rel": other["mip_peak_mev"] / reference["mip_peak_mev"] - 1}


__all__ = ["shower_facts", "bin_facts", "compare_facts"]
