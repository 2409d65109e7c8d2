"""The reference shower simulator: GFLASH-parameterised showers for every built-in geometry.

Electromagnetic showers follow the Grindhammer-Peters parameterisation (hep-ex/0001020) in
the form Geant4's ``parameterisations/gflash`` uses (formulas and sources in
``docs/simulator.md``):

1. each shower draws its own longitudinal gamma profile from correlated (ln T, ln alpha)
   (photons first travel an exponential conversion depth);
2. the energy it deposits in each voxel's region is integrated, not sampled: the gamma
   profile over depth slices of at most 1 X0, and in each slice the two-component
   (core/tail) radial profile at the slice's shower age tau over the voxel (cylindrical
   bins: the closed-form radial CDF; Cartesian cells: the closed-form rectangle integral
   of the 2-D profile, the axis moving with depth for inclined tracks);
3. the readout response (:mod:`caloforge.response`) turns that expected deposit into what
   the active layers see: Poisson numbers of charged-track crossings, each a Moyal (Landau)
   deposit with the MIP peak of the active layer, plus soft Compton/photo-electrons with a
   continuous spectrum reaching below the threshold, their share growing outside the core
   and past the maximum; cluster fluctuations complete the stochastic term c / sqrt(E);
   then the detector's calibration and readout threshold.

Pions go through the same two steps: their MIP track up to the first interaction (on the
axis), the EM part (a GFLASH shower from the interaction) and the hadronic part (gamma
profile in lambda_I, core/tail radial profile in units of the local lambda_I) are integrated
per voxel, then drawn through the readout (the hadronic part with the hadronic stochastic
term). Showers off the axis in cylindrical binnings (entry points or angles given for
calochallenge-*) keep the earlier model: equal-energy spots drawn from the same profiles,
binned into voxels, each voxel a Gamma variate with mean E and variance c^2 E.

Choices where the sources leave room (documented, tested in ``tests/test_simulator.py``):

* Spot count (spot path only): GFLASH's sampling form N = (10.3 / c) E^0.959 (E in GeV),
  capped at the detector's ``max_spots`` (default 4000) for speed.
* Spot depths follow the shower's own profile (not GFLASH's separate spot profile), so the
  mean longitudinal profile is exactly the drawn gamma distribution.
* Photons first travel an exponential conversion depth with mean 9/7 X0.
* Pions (not covered by GFLASH) use a simple documented hadronic model:
  a minimum-ionising track up to the first interaction (exponential, mean 1 lambda_I); at the
  interaction an electromagnetic fraction f_em ~ Beta with mean 1 - (E / 1 GeV)^(0.82 - 1)
  (Groom's power law) and width 0.12 goes into a GFLASH shower; the rest, scaled by
  h/e = 0.65 (non-compensation), into a hadronic component with a gamma depth profile in
  lambda_I (mean 0.9 + 0.25 ln(E/GeV) lambda_I, shape 2.2, per-shower log-normal spread of
  25 %), a wider core/tail radial profile in units of the local lambda_I that broadens with
  depth, and a stochastic term of 50 %/sqrt(E). Its limits: no explicit pi0 sub-showers,
  no nuclear binding-energy fluctuations beyond f_em, no backscatter.

Energies are calibrated deposited energies in MeV (see :mod:`caloforge.detectors`).
Everything is vectorised over spots and showers; showers are produced in chunks, each from
its own random stream (seed, chunk), so output is identical whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import re
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._version import __version__
from .data import ShowerData, ShowerWriter
from .detectors import CONDITION_GENERATORS, Detector, SamplingStructure, get_detector
from .errors import OptionError
from .geometry import CylindricalLayer, Geometry, get_geometry
from .runtime import get_logger, make_rng

log = get_logger("simulator")

PARTICLES = ("electron", "photon", "pion")
SPECTRA = ("log-uniform", "uniform", "inverse", "discrete")
PHOTON_CONVERSION_X0 = 9.0 / 7.0
HADRONIC_H_OVER_E = 0.65
MIN_SPOTS = 16
SLICE_X0 = 1.0  # depth slices of the expected-deposit path, at most this thick (X0)
# recorded in every simulated file: which voxel response made it (files from before the
# readout response have no such entry)
RESPONSE_MODEL = "readout-1: expected deposits per voxel, MIP crossings (Moyal) + soft electrons"


# --------------------------------------------------------------------------------------
# GFLASH parameterisation
# --------------------------------------------------------------------------------------
@dataclass
class LongitudinalProfile:
    """Per-shower gamma profiles: depth of maximum ``T`` (X0) and shape ``alpha``, ``(n,)``.

    ``mean_alpha`` is exp<ln alpha> at the shower's energy, used by the shower age tau.
    """

    T: np.ndarray
    alpha: np.ndarray
    mean_alpha: np.ndarray

    @property
    def beta(self) -> np.ndarray:
        return (self.alpha - 1.0) / self.T


def mean_longitudinal_parameters(energy_mev: np.ndarray, structure: SamplingStructure
                                 ) -> dict[str, np.ndarray]:
    """<ln T>, <ln alpha>, their widths and correlation for a sampling calorimeter.

    Also returns ``T_average`` (X0), the depth of maximum of the *average* profile.
    """
    ln_y = np.log(np.asarray(energy_mev, dtype=np.float64) / structure.critical_energy_mev)
    z, fs, e_hat = structure.z_eff, structure.sampling_frequency, structure.e_hat
    t_hom = np.exp(np.log(np.maximum(ln_y - 0.812, 0.1)))
    a_hom = np.exp(np.log(np.maximum(0.81 + (0.458 + 2.26 / z) * ln_y, 0.1)))
    ln_t = np.log(np.maximum(t_hom - 0.55 / fs - 0.69 * (1 - e_hat), 0.1))
    ln_a = np.log(np.maximum(a_hom - 0.476 / fs, 0.1))

    def width(denominator: np.ndarray) -> np.ndarray:
        # Geant4 caps the widths at 0.5 (and they diverge at very low energy)
        return np.where(denominator > 2.0, 1.0 / np.maximum(denominator, 1e-9), 0.5)

    t_average = (ln_y - 0.858) - 0.59 / fs - 0.53 * (1 - e_hat)
    return {"ln_T": ln_t, "ln_alpha": ln_a,
            "sigma_ln_T": width(-2.5 + 1.25 * ln_y), "sigma_ln_alpha": width(-0.82 + 0.79 * ln_y),
            "rho": 0.784 - 0.023 * ln_y, "T_average": t_average}


def draw_longitudinal(energy_mev: np.ndarray, structure: SamplingStructure,
                      rng: np.random.Generator, spread: float = 1.0) -> LongitudinalProfile:
    """Correlated per-shower (ln T, ln alpha) draws with Geant4's guards (T >= 1, alpha >= 1.1).

    ``spread`` scales GFLASH's widths of ln T and ln alpha (a detector's measured value,
    :attr:`caloforge.detectors.Detector.longitudinal_spread`; 1: GFLASH's own).
    """
    p = mean_longitudinal_parameters(energy_mev, structure)
    z1, z2 = rng.standard_normal((2, len(p["ln_T"])))
    rho = np.clip(p["rho"], -1.0, 1.0)
    common, opposite = np.sqrt((1 + rho) / 2) * z1, np.sqrt((1 - rho) / 2) * z2
    ln_t = p["ln_T"] + spread * p["sigma_ln_T"] * (common + opposite)
    ln_a = p["ln_alpha"] + spread * p["sigma_ln_alpha"] * (common - opposite)
    return LongitudinalProfile(T=np.maximum(np.exp(ln_t), 1.0),
                               alpha=np.maximum(np.exp(ln_a), 1.1),
                               mean_alpha=np.maximum(np.exp(p["ln_alpha"]), 1.1))


def radial_parameters(tau: np.ndarray, energy_gev: np.ndarray, structure: SamplingStructure,
                      scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core radius R_C, tail radius R_T (in R_M) and core probability p at shower age tau.

    ``scales``: factors on R_C, R_T and p (a detector's measured values,
    :attr:`caloforge.detectors.Detector.radial_scales`; 1: GFLASH's own).
    """
    z, fs, e_hat = structure.z_eff, structure.sampling_frequency, structure.e_hat
    ln_e = np.log(energy_gev)
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k1, k2, k3, k4 = 0.659 - 0.00309 * z, 0.645, -2.59, 0.3585 + 0.0412 * ln_e
    r_tail = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2)))
    p1, p2, p3 = 2.632 - 0.00094 * z, 0.401 + 0.00187 * z, 1.313 - 0.0686 * ln_e
    arg = (p2 - tau) / p3
    p_core = p1 * np.exp(arg - np.exp(arg))
    # sampling-calorimeter corrections
    r_core = r_core - 0.0203 * (1 - e_hat) + 0.0397 / fs * np.exp(-tau)
    r_tail = r_tail - 0.14 * (1 - e_hat) - 0.495 / fs * np.exp(-tau)
    p_core = p_core + (1 - e_hat) * (0.348 - 0.642 / fs * np.exp(-((tau - 1) ** 2)))
    return (scales[0] * np.maximum(r_core, 1e-3), scales[1] * np.maximum(r_tail, 1e-3),
            np.clip(scales[2] * p_core, 0.0, 1.0))


def gflash_spot_count(energy_mev: np.ndarray, stochastic_term: float, max_spots: int
                      ) -> np.ndarray:
    """N = (10.3 / c) E^0.959 (E in GeV), clipped to [MIN_SPOTS, max_spots]."""
    n = np.ceil(10.3 / stochastic_term * (np.asarray(energy_mev) / 1000.0) ** 0.959)
    return np.clip(n, MIN_SPOTS, max(max_spots, MIN_SPOTS)).astype(np.int64)


def _radius_from_profile(scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Invert F(r) = r^2 / (r^2 + R^2): r = R sqrt(u / (1 - u))."""
    u = np.minimum(rng.random(len(scale)), 1.0 - 1e-7)
    return scale * np.sqrt(u / (1.0 - u))


HADRONIC_DEPTH_SHAPE = 2.2  # gamma shape of the hadronic depth profile (lambda_I)
HADRONIC_CORE_SHARE = 0.65  # share of the hadronic energy in the narrow radial core


def hadronic_mean_depth(energy_mev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per shower mean depth (lambda_I after the interaction) of hadronic components of
    ``energy_mev``: 0.9 + 0.25 ln(E/GeV), at least 0.4, with a 25 % log-normal spread."""
    mean = np.maximum(0.9 + 0.25 * np.log(np.maximum(energy_mev / 1000.0, 1e-3)), 0.4)
    return mean * np.exp(0.25 * rng.standard_normal(len(mean)))


def hadronic_radii(depth_lambda: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Core and tail radii (in local lambda_I) of the hadronic radial profile at
    ``depth_lambda`` after the interaction: both widen with depth."""
    return 0.05 * (1 + 0.5 * depth_lambda), 0.25 * (1 + 0.3 * depth_lambda)


def radial_cdf(radius: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """F(r) = r^2 / (r^2 + R^2): share of the profile 2 r R^2 / (r^2 + R^2)^2 within r."""
    r2 = radius * radius
    return r2 / (r2 + scale * scale)


def quadrant_integral(x: np.ndarray, y: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Integral of the 2-D density R^2 / (pi (x^2 + y^2 + R^2)^2) over [0, x] x [0, y].

    Closed form (odd in x and in y, so differences of it give any rectangle):
    (x / a) atan(y / a) + (y / b) atan(x / b), a = sqrt(x^2 + R^2), b = sqrt(y^2 + R^2),
    divided by 2 pi. Its radial form is ``radial_cdf``.
    """
    a = np.sqrt(x * x + scale * scale)
    b = np.sqrt(y * y + scale * scale)
    return (x / a * np.arctan(y / a) + y / b * np.arctan(x / b)) / (2 * math.pi)


def rectangle_shares(x_edges: np.ndarray, y_edges: np.ndarray, scale: np.ndarray
                     ) -> np.ndarray:
    """Share of the density (``quadrant_integral``) in each cell of a grid.

    ``x_edges`` ``(n, nx + 1)``, ``y_edges`` ``(n, ny + 1)`` relative to the shower axis
    (mm or any unit of ``scale`` ``(n,)``). Returns ``(n, ny, nx)``, rows (y) slow.
    """
    corner = quadrant_integral(x_edges[:, None, :], y_edges[:, :, None], scale[:, None, None])
    return corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]


@dataclass
class PionStart:
    """Where pions first interact and how their energy splits, each ``(n,)``.

    ``interaction_lambda``: depth of the first interaction (lambda_I, capped at the back);
    ``track_end_mm``: the MIP track's length and ``track_energy`` its calibrated MeV;
    ``em_energy`` / ``hadronic_energy``: the EM part and the hadronic part (x h/e), MeV;
    ``em_start_x0``: where the EM part starts, X0.
    """

    interaction_lambda: np.ndarray
    track_end_mm: np.ndarray
    track_energy: np.ndarray
    em_energy: np.ndarray
    hadronic_energy: np.ndarray
    em_start_x0: np.ndarray


# --------------------------------------------------------------------------------------
# Spots
# --------------------------------------------------------------------------------------
@dataclass
class Spots:
    """Energy spots of a chunk of showers, flat over (shower, spot).

    Attributes: ``shower`` (index in chunk), ``path_mm`` (distance along the shower axis from
    the calorimeter front), ``dx``/``dy`` (transverse offset from the axis, mm), ``energy``
    (calibrated MeV).
    """

    shower: np.ndarray
    path_mm: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    energy: np.ndarray

    @staticmethod
    def empty() -> Spots:
        z = np.zeros(0)
        return Spots(np.zeros(0, dtype=np.int64), z, z, z, z)


class ReferenceSimulator:
    """GFLASH-based shower simulator for one built-in geometry.

    Args:
        geometry: a built-in geometry name or Geometry (its detector must be known).
        detector: override the built-in detector description.
        max_spots: override the detector's cap on spots per shower component.

    Example::

        sim = ReferenceSimulator("calochallenge-2")
        data = sim.simulate(np.full(10, 50_000.0), "electron", rng=np.random.default_rng(1))
        data.showers.shape  # (10, 6480), MeV
    """

    def __init__(self, geometry: str | Geometry, detector: Detector | None = None,
                 max_spots: int | None = None) -> None:
        self.geometry = get_geometry(geometry) if isinstance(geometry, str) else geometry
        self.detector = detector or get_detector(self.geometry.name)
        if max_spots is not None:
            if max_spots < 1:
                raise OptionError(f"max_spots must be >= 1, got {max_spots}")
            self.max_spots = max_spots
        else:
            self.max_spots = self.detector.max_spots
        if max(s.layer for s in self.detector.slabs) >= self.geometry.n_layers:
            raise OptionError(f"detector {self.detector.geometry_name!r} reads out more layers "
                              f"than geometry {self.geometry.name!r} has")
        self._binning_groups = self._group_layers_by_binning()
        self._slices = self._depth_slices()
        self._relative_fraction = self._layer_visible_fractions()
        # each readout layer's back (X0) and middle (perpendicular mm): the incident track
        self._layer_backs_x0 = self.detector.layer_depths_x0(self.geometry.n_layers)[:, 1]
        self._layer_mids_mm = np.array([
            0.5 * (self._slices["front_mm"][self._slices["layer"] == p].min(initial=np.inf)
                   + self._slices["back_mm"][self._slices["layer"] == p].max(initial=-np.inf))
            for p in range(self.geometry.n_layers)])

    # --- depth conversions ----------------------------------------------------------------
    def _to_mm(self, depth: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
        """Depth in X0 or lambda_I (``boundaries`` in those units) to mm, extrapolating."""
        mm = self.detector.boundaries_mm
        inside = np.interp(depth, boundaries, mm)
        last_scale = (mm[-1] - mm[-2]) / (boundaries[-1] - boundaries[-2])
        return np.where(depth > boundaries[-1], mm[-1] + (depth - boundaries[-1]) * last_scale,
                        inside)

    def _from_mm(self, mm_depth: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
        mm = self.detector.boundaries_mm
        return np.interp(mm_depth, mm, boundaries)

    # --- shower components ----------------------------------------------------------------
    def _em_spots(self, energy: np.ndarray, start_x0: np.ndarray, rng: np.random.Generator,
                  index: np.ndarray | None = None) -> Spots:
        """GFLASH spots for EM showers of ``energy`` (MeV) starting at depth ``start_x0``."""
        if index is None:
            index = np.arange(len(energy))
        keep = energy > 0
        energy, start_x0, index = energy[keep], start_x0[keep], index[keep]
        if len(energy) == 0:
            return Spots.empty()
        structure = self.detector.em_structure
        profile = draw_longitudinal(energy, structure, rng, self.detector.longitudinal_spread)
        counts = gflash_spot_count(energy, self.detector.stochastic_term, self.max_spots)
        owner = np.repeat(np.arange(len(energy)), counts)
        alpha, beta = profile.alpha[owner], profile.beta[owner]
        depth_rel = rng.gamma(alpha, 1.0 / beta)  # X0 after the shower start
        # shower age (Geant4 form), capped at 10 as CMS does
        mean_alpha = profile.mean_alpha[owner]
        tau = np.minimum(depth_rel / profile.T[owner] * ((alpha - 1) / alpha)
                         * (mean_alpha / (mean_alpha - 1)), 10.0)
        r_core, r_tail, p_core = radial_parameters(tau, energy[owner] / 1000.0, structure,
                                                   self.detector.radial_scales)
        scale = np.where(rng.random(len(tau)) < p_core, r_core, r_tail)
        radius = structure.moliere_radius_mm * _radius_from_profile(scale, rng)
        phi = rng.uniform(-math.pi, math.pi, len(tau))
        path = self._to_mm(start_x0[owner] + depth_rel, self.detector.boundaries_x0)
        return Spots(index[owner], path, radius * np.cos(phi), radius * np.sin(phi),
                     (energy / counts)[owner])

    def _hadronic_spots(self, energy: np.ndarray, start_lambda: np.ndarray,
                        rng: np.random.Generator, index: np.ndarray) -> Spots:
        """Hadronic component (documented model) of ``energy`` MeV from ``start_lambda``."""
        keep = energy > 0
        energy, start_lambda, index = energy[keep], start_lambda[keep], index[keep]
        if len(energy) == 0:
            return Spots.empty()
        mean_depth = hadronic_mean_depth(energy, rng)
        counts = gflash_spot_count(energy, self.detector.hadronic_stochastic_term, self.max_spots)
        owner = np.repeat(np.arange(len(energy)), counts)
        shape = HADRONIC_DEPTH_SHAPE
        depth_rel = rng.gamma(shape, (mean_depth / shape)[owner])  # lambda_I after interaction
        depth = start_lambda[owner] + depth_rel
        path = self._to_mm(depth, self.detector.boundaries_lambda)
        slab = np.searchsorted(self.detector.boundaries_mm, path, side="right") - 1
        local_lambda = self.detector.slab_lambda_mm[np.clip(slab, 0, len(self.detector.slabs))]
        core = rng.random(len(owner)) < HADRONIC_CORE_SHARE
        scale = np.where(core, *hadronic_radii(depth_rel))
        radius = local_lambda * _radius_from_profile(scale, rng)
        phi = rng.uniform(-math.pi, math.pi, len(owner))
        return Spots(index[owner], path, radius * np.cos(phi), radius * np.sin(phi),
                     (energy / counts)[owner])

    def _pion_start(self, energy: np.ndarray, rng: np.random.Generator) -> PionStart:
        """The first interaction of pions of ``energy`` (MeV) and how their energy splits."""
        n = len(energy)
        total_lambda = self.detector.boundaries_lambda[-1]
        interaction = rng.exponential(1.0, n)  # lambda_I
        interacts = interaction < total_lambda
        interaction = np.minimum(interaction, total_lambda)
        track_end = self._to_mm(interaction, self.detector.boundaries_lambda)
        mip_per_mm = self.detector.em_structure.mip_mev_per_mm
        track_energy = np.minimum(mip_per_mm * track_end, 0.5 * energy)
        available = np.where(interacts, energy - track_energy, 0.0)
        e_gev = np.maximum(energy / 1000.0, 1.0)
        mean_fem = np.clip(1.0 - e_gev ** (0.82 - 1.0), 0.05, 0.95)
        sigma = 0.12
        concentration = np.maximum(mean_fem * (1 - mean_fem) / sigma ** 2 - 1.0, 1.0)
        f_em = rng.beta(mean_fem * concentration, (1 - mean_fem) * concentration)
        return PionStart(interaction, track_end, track_energy, f_em * available,
                         (1 - f_em) * available * HADRONIC_H_OVER_E,
                         self._from_mm(track_end, self.detector.boundaries_x0))

    def _pion_components(self, energy: np.ndarray, rng: np.random.Generator
                         ) -> tuple[Spots, Spots, Spots]:
        """(MIP track, EM part, hadronic part) spots of pion showers."""
        n = len(energy)
        index = np.arange(n)
        start = self._pion_start(energy, rng)
        n_track = 8
        owner = np.repeat(index, n_track)
        track = Spots(owner, rng.random(n * n_track) * start.track_end_mm[owner],
                      np.zeros(n * n_track), np.zeros(n * n_track),
                      (start.track_energy / n_track)[owner])
        em = self._em_spots(start.em_energy, start.em_start_x0, rng, index)
        hadronic = self._hadronic_spots(start.hadronic_energy, start.interaction_lambda, rng,
                                        index)
        return track, em, hadronic

    # --- expected deposits and the readout response ---------------------------------------
    def _depth_slices(self) -> dict[str, np.ndarray]:
        """Read-out slabs cut into slices of at most SLICE_X0: ``front``/``back`` in X0,
        ``front_lambda``/``back_lambda`` in lambda_I, ``front_mm``/``back_mm``/``mid_mm``
        (perpendicular depth), the slab's ``lambda_mm`` and ``layer`` (position) of each."""
        columns: dict[str, list[np.ndarray]] = {key: [] for key in (
            "front", "back", "front_lambda", "back_lambda", "front_mm", "back_mm", "lambda_mm",
            "layer")}
        detector = self.detector
        x0, lam, mm = detector.boundaries_x0, detector.boundaries_lambda, detector.boundaries_mm
        for i, slab in enumerate(detector.slabs):
            if slab.layer < 0:
                continue
            pieces = max(1, math.ceil((x0[i + 1] - x0[i]) / SLICE_X0 - 1e-9))
            for key, bounds in (("", x0), ("_lambda", lam), ("_mm", mm)):
                edges = np.linspace(bounds[i], bounds[i + 1], pieces + 1)
                columns["front" + key].append(edges[:-1])
                columns["back" + key].append(edges[1:])
            columns["lambda_mm"].append(np.full(pieces, slab.structure.lambda_mm))
            columns["layer"].append(np.full(pieces, slab.layer))
        slices = {key: np.concatenate(values) for key, values in columns.items()}
        slices["mid_mm"] = 0.5 * (slices["front_mm"] + slices["back_mm"])
        return slices

    def _layer_visible_fractions(self) -> np.ndarray:
        """Each voxel's MIP sampling fraction relative to the EM structure's, ``(n_voxels,)``
        (1 everywhere but ILD's thick-tungsten layers)."""
        nominal = self.detector.em_structure.mip_sampling_fraction
        per_layer = np.ones(self.geometry.n_layers)
        for slab in self.detector.slabs:
            if slab.layer >= 0:
                per_layer[slab.layer] = slab.structure.mip_sampling_fraction / nominal
        return np.repeat(per_layer, self.geometry.layer_sizes)

    def _uses_expected_field(self, axis: dict[str, np.ndarray]) -> bool:
        """Whether EM showers take the expected-deposit path: a readout is described, and
        the axis is the geometry's own (cylindrical binnings are centred on it) or the
        layers are Cartesian (cells shift with the axis)."""
        if self.detector.readout is None:
            return False
        on_axis = not (np.any(axis["x0"]) or np.any(axis["y0"]) or np.any(axis["unit"][:, :2]))
        return on_axis or not any(isinstance(layer, CylindricalLayer)
                                  for layer in self.geometry.layers)

    def _lateral_shares(self, s: int, p_core: np.ndarray, r_core_mm: np.ndarray,
                        r_tail_mm: np.ndarray, axis: dict[str, np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Share of a core/tail radial profile (p R_C^2/(r^2+R_C^2)^2 + ...) in each voxel of
        slice ``s``'s layer, and each voxel's distance from the axis (mm); ``(n, voxels)``.

        Cylindrical bins (centred on the axis): the closed-form radial CDF; Cartesian cells:
        the closed-form rectangle integral about the axis, which moves with depth for
        inclined tracks."""
        layer = self.geometry.layers[self._slices["layer"][s]]
        n = len(p_core)
        if isinstance(layer, CylindricalLayer):
            edges = np.asarray(layer.r_edges)[None, :]
            cdf = (p_core[:, None] * radial_cdf(edges, r_core_mm[:, None])
                   + (1 - p_core[:, None]) * radial_cdf(edges, r_tail_mm[:, None]))
            shares = np.tile(np.diff(cdf, axis=1) / layer.n_alpha, layer.n_alpha)
            return shares, np.broadcast_to(layer.voxel_radii()[None, :], shares.shape)
        along = self._slices["mid_mm"][s] / axis["unit"][:, 2]
        shift_x = axis["x0"] + along * axis["unit"][:, 0]
        shift_y = axis["y0"] + along * axis["unit"][:, 1]
        x_edges = layer.x_edges()[None, :] - shift_x[:, None]
        y_edges = layer.y_edges()[None, :] - shift_y[:, None]
        shares = (p_core[:, None, None] * rectangle_shares(x_edges, y_edges, r_core_mm)
                  + (1 - p_core[:, None, None]) * rectangle_shares(x_edges, y_edges, r_tail_mm)
                  ).reshape(n, -1)
        centres = layer.voxel_centres()
        return shares, np.hypot(centres[None, :, 0] - shift_x[:, None],
                                centres[None, :, 1] - shift_y[:, None])

    def _add_to_layer(self, target: np.ndarray, s: int, values: np.ndarray) -> None:
        position = self._slices["layer"][s]
        offsets = self.geometry.layer_offsets
        target[:, int(offsets[position]):int(offsets[position + 1])] += values

    def _expected_em_deposits(self, energy: np.ndarray, start_x0: np.ndarray,
                              axis: dict[str, np.ndarray], rng: np.random.Generator,
                              profile: LongitudinalProfile | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Expected (track, soft) deposited energy per voxel of EM showers, ``(n, n_voxels)``
        MeV each: the shower's own gamma profile (``profile``, else drawn) integrated over
        each depth slice, its core/tail radial profile at the slice's age integrated over
        each voxel, split by the readout's soft share at the voxel's radius and the slice's
        age."""
        from scipy.special import gammainc

        readout = self.detector.readout
        assert readout is not None
        structure = self.detector.em_structure
        n = len(energy)
        track = np.zeros((n, self.geometry.n_voxels))
        soft = np.zeros((n, self.geometry.n_voxels))
        if n == 0:
            return track, soft
        if profile is None:
            profile = self._draw_profile(energy, rng)
        alpha, beta = profile.alpha[:, None], profile.beta[:, None]
        front = np.maximum(self._slices["front"][None, :] - start_x0[:, None], 0.0)
        back = np.maximum(self._slices["back"][None, :] - start_x0[:, None], 0.0)
        share = gammainc(alpha, beta * back) - gammainc(alpha, beta * front)  # (n, slices)
        depth = np.maximum(0.5 * (front + back), 1e-3)
        mean_alpha = profile.mean_alpha[:, None]
        tau = np.minimum(depth / profile.T[:, None] * ((alpha - 1) / alpha)
                         * (mean_alpha / (mean_alpha - 1)), 10.0)
        r_core, r_tail, p_core = radial_parameters(
            tau, np.maximum(energy / 1000.0, 1e-6)[:, None], structure, self.detector.radial_scales)
        moliere = structure.moliere_radius_mm
        for s in range(len(self._slices["layer"])):
            slice_energy = energy * share[:, s]
            if not np.any(slice_energy > 0):
                continue
            voxel_share, radius = self._lateral_shares(
                s, p_core[:, s], r_core[:, s] * moliere, r_tail[:, s] * moliere, axis)
            deposit = slice_energy[:, None] * voxel_share
            soft_share = readout.soft_share(radius / moliere, tau[:, s, None])
            self._add_to_layer(track, s, deposit * (1 - soft_share))
            self._add_to_layer(soft, s, deposit * soft_share)
        return track, soft

    def _expected_pion_deposits(self, energy: np.ndarray, axis: dict[str, np.ndarray],
                                rng: np.random.Generator
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Expected (EM track, EM soft, hadronic track, hadronic soft) deposits of pion
        showers, ``(n, n_voxels)`` MeV each: the model of ``_pion_components`` (MIP track to
        the first interaction, EM fraction f_em, hadronic rest x h/e) integrated per voxel
        instead of sampled with spots. The MIP track counts as EM track energy."""
        from scipy.special import gammainc

        readout = self.detector.readout
        assert readout is not None
        detector, slices = self.detector, self._slices
        n = len(energy)
        start = self._pion_start(energy, rng)
        track_end, track_energy = start.track_end_mm, start.track_energy
        em_track, em_soft = self._expected_em_deposits(start.em_energy, start.em_start_x0,
                                                       axis, rng)
        hadronic = start.hadronic_energy
        # hadronic depth profile: gamma in lambda_I after the interaction (shape 2.2)
        mean_depth = hadronic_mean_depth(hadronic, rng)
        shape = HADRONIC_DEPTH_SHAPE
        scale = (mean_depth / shape)[:, None]
        interaction = start.interaction_lambda[:, None]
        front = np.maximum(slices["front_lambda"][None, :] - interaction, 0.0)
        back = np.maximum(slices["back_lambda"][None, :] - interaction, 0.0)
        share = gammainc(shape, back / scale) - gammainc(shape, front / scale)
        depth = 0.5 * (front + back)  # lambda_I after the interaction
        had_track = np.zeros((n, self.geometry.n_voxels))
        had_soft = np.zeros((n, self.geometry.n_voxels))
        moliere = detector.em_structure.moliere_radius_mm
        axis_only = (np.ones(n), np.full(n, 1e-3), np.full(n, 1e-3))  # all within 1 um
        per_mm = np.where(track_end > 0, track_energy / np.maximum(track_end, 1e-9), 0.0)
        for s in range(len(slices["layer"])):
            crossed = np.clip(np.minimum(slices["back_mm"][s], track_end)
                              - slices["front_mm"][s], 0.0, None)
            if np.any(crossed > 0):
                on_axis, _ = self._lateral_shares(s, *axis_only, axis)
                self._add_to_layer(em_track, s, (per_mm * crossed)[:, None] * on_axis)
            slice_energy = hadronic * share[:, s]
            if not np.any(slice_energy > 0):
                continue
            lam = slices["lambda_mm"][s]
            r_core, r_tail = hadronic_radii(depth[:, s])
            voxel_share, radius = self._lateral_shares(
                s, np.full(n, HADRONIC_CORE_SHARE), r_core * lam, r_tail * lam, axis)
            deposit = slice_energy[:, None] * voxel_share
            age = (1.0 + 2.0 * depth[:, s] / mean_depth)[:, None]
            soft_share = readout.soft_share(radius / moliere, age)
            self._add_to_layer(had_track, s, deposit * (1 - soft_share))
            self._add_to_layer(had_soft, s, deposit * soft_share)
        return em_track, em_soft, had_track, had_soft

    def _pion_response(self, energy: np.ndarray, axis: dict[str, np.ndarray],
                       rng: np.random.Generator) -> np.ndarray:
        """Stored values of pion showers: the EM part and MIP track through the EM readout,
        the hadronic part through the same readout with the hadronic stochastic term."""
        readout = self.detector.readout
        assert readout is not None
        em_track, em_soft, had_track, had_soft = self._expected_pion_deposits(energy, axis, rng)
        hadronic_readout = replace(readout,
                                   stochastic_term=self.detector.hadronic_stochastic_term)
        fraction = self._relative_fraction[None, :]
        offsets = self.geometry.layer_offsets
        return (readout.draw(em_track, em_soft, rng, offsets, fraction)
                + hadronic_readout.draw(had_track, had_soft, rng, offsets, fraction))

    def _em_response(self, energy: np.ndarray, start_x0: np.ndarray,
                     axis: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Stored values of EM showers: expected deposits, then the readout response."""
        readout = self.detector.readout
        assert readout is not None
        profile = self._draw_profile(energy, rng)
        track, soft = self._expected_em_deposits(energy, start_x0, axis, rng, profile)
        crossed = None
        if self.detector.incident_track:
            crossed = self._incident_track_voxels(profile.T, start_x0, axis, rng)
            keep = self._share_left_by_the_track(track, soft, crossed)
            track, soft = track * keep, soft * keep
        return readout.draw(track, soft, rng, self.geometry.layer_offsets,
                            self._relative_fraction[None, :], at_least_one=crossed)

    def _draw_profile(self, energy: np.ndarray, rng: np.random.Generator
                      ) -> LongitudinalProfile:
        """Each EM shower's longitudinal profile, with the detector's measured spread."""
        return draw_longitudinal(np.maximum(energy, 1e-3), self.detector.em_structure, rng,
                                 self.detector.longitudinal_spread)

    def _share_left_by_the_track(self, track: np.ndarray, soft: np.ndarray,
                                 crossed: np.ndarray) -> np.ndarray:
        """Energy conservation, ``(n, 1)``: the share of each shower's expected deposits
        that stays with the shower once the incident track's forced crossings (expected
        exp(-lambda) of them per crossed voxel, where the Poisson draw gives none) are
        taken off."""
        readout = self.detector.readout
        assert readout is not None
        visible = readout.visible_fraction * self._relative_fraction[None, :]
        expected = track * visible / readout.crossing_mean_mev
        added = (np.exp(-expected) * crossed * readout.crossing_mean_mev / visible).sum(1)
        total = track.sum(1) + soft.sum(1)
        return np.clip(1.0 - added / np.maximum(total, 1e-12), 0.0, 1.0)[:, None]

    def _incident_track_voxels(self, depth_of_maximum_x0: np.ndarray, start_x0: np.ndarray,
                               axis: dict[str, np.ndarray], rng: np.random.Generator
                               ) -> np.ndarray:
        """Where the incident charged track crosses the layers in front of the shower
        maximum, ``(n, n_voxels)`` bool: in each such layer the voxel holding the axis (for
        a cylindrical binning the innermost ring, at a random angle: the track's multiple
        scattering). Electrons only (``start_x0`` 0; a photon has no track before it
        converts)."""
        n = len(start_x0)
        crossed = np.zeros((n, self.geometry.n_voxels), dtype=bool)
        offsets = self.geometry.layer_offsets
        electron = start_x0 <= 0
        for position, layer in enumerate(self.geometry.layers):
            rows = np.flatnonzero(electron & (self._layer_backs_x0[position]
                                              < depth_of_maximum_x0))
            if len(rows) == 0:
                continue
            along = self._layer_mids_mm[position] / axis["unit"][rows, 2]
            phi = rng.uniform(-math.pi, math.pi, len(rows))
            x = axis["x0"][rows] + along * axis["unit"][rows, 0] + 1e-3 * np.cos(phi)
            y = axis["y0"][rows] + along * axis["unit"][rows, 1] + 1e-3 * np.sin(phi)
            voxel = layer.bin_points(x, y)
            inside = voxel >= 0
            crossed[rows[inside], int(offsets[position]) + voxel[inside]] = True
        return crossed

    # --- binning ----------------------------------------------------------------------
    def _group_layers_by_binning(self) -> list[tuple[Any, np.ndarray]]:
        groups: dict[Any, list[int]] = {}
        representative: dict[Any, Any] = {}
        for position, layer in enumerate(self.geometry.layers):
            spec = {k: v for k, v in layer.to_dict().items() if k != "layer_id"}
            key = json.dumps(spec, sort_keys=True)
            groups.setdefault(key, []).append(position)
            representative.setdefault(key, layer)
        return [(representative[k], np.array(v)) for k, v in groups.items()]

    def _deposit(self, spots: Spots, axis: dict[str, np.ndarray], n_showers: int) -> np.ndarray:
        """Bin spots into a dense ``(n_showers, n_voxels)`` float64 array of MeV."""
        n_voxels = self.geometry.n_voxels
        if len(spots.energy) == 0:
            return np.zeros((n_showers, n_voxels))
        owner = spots.shower
        direction = axis["unit"][owner]  # (n_spots, 3)
        depth = spots.path_mm * direction[:, 2]
        x = axis["x0"][owner] + spots.path_mm * direction[:, 0] + spots.dx
        y = axis["y0"][owner] + spots.path_mm * direction[:, 1] + spots.dy
        slab = np.searchsorted(self.detector.boundaries_mm, depth, side="right") - 1
        layer = self.detector.slab_layer[np.clip(slab, 0, len(self.detector.slabs))]
        flat = np.full(len(owner), -1, dtype=np.int64)
        offsets = self.geometry.layer_offsets
        for binning, positions in self._binning_groups:
            in_group = np.isin(layer, positions)
            if not in_group.any():
                continue
            local = binning.bin_points(x[in_group], y[in_group])
            voxel = np.where(local >= 0, offsets[layer[in_group]] + local, -1)
            flat[in_group] = np.where(voxel >= 0, owner[in_group] * n_voxels + voxel, -1)
        hit = flat >= 0
        dense = np.bincount(flat[hit], weights=spots.energy[hit], minlength=n_showers * n_voxels)
        return dense.reshape(n_showers, n_voxels)

    def _sampling_fluctuation(self, deposit: np.ndarray, stochastic_term: float,
                              rng: np.random.Generator) -> np.ndarray:
        """Gamma-distributed visible energy with mean E and variance c^2 E (E in GeV)."""
        out = np.zeros_like(deposit)
        nonzero = deposit > 0
        scale = stochastic_term ** 2 * 1000.0  # MeV
        out[nonzero] = rng.gamma(deposit[nonzero] / scale, scale)
        return out

    # --- public API -------------------------------------------------------------------
    def simulate(self, energies_mev: np.ndarray, particle: str = "electron",
                 conditions: dict[str, np.ndarray] | None = None,
                 condition_units: dict[str, str] | None = None,
                 rng: np.random.Generator | None = None) -> ShowerData:
        """Simulate one shower per incident energy.

        Args:
            energies_mev: ``(n,)`` incident energies in MeV.
            particle: ``electron`` (also for positrons), ``photon`` or ``pion``.
            conditions: optional ``entry_point`` ``(n, 2)`` mm and ``direction`` ``(n, 2)``
                rad (track angles in xz and yz); missing ones default to 0 (on axis, normal).
            rng: numpy Generator (a fresh unseeded one if None).

        Returns:
            ShowerData with ``(n, n_voxels)`` float32 voxel energies in MeV.
        """
        if particle not in PARTICLES:
            raise OptionError(f"unknown particle {particle!r}; choose from {', '.join(PARTICLES)}")
        rng = rng or np.random.default_rng()
        energies = np.asarray(energies_mev, dtype=np.float64).reshape(-1)
        if energies.size and (not np.all(np.isfinite(energies)) or energies.min() <= 0):
            raise OptionError("incident energies must be finite and positive (MeV)")
        n = len(energies)
        conditions = dict(conditions or {})
        axis = self._axis(conditions, n)
        if particle == "pion" and self._uses_expected_field(axis):
            visible = self._pion_response(energies, axis, rng)
        elif particle == "pion":
            track, em, hadronic = self._pion_components(energies, rng)
            visible = self._sampling_fluctuation(
                self._deposit(track, axis, n) + self._deposit(em, axis, n),
                self.detector.stochastic_term, rng)
            visible += self._sampling_fluctuation(self._deposit(hadronic, axis, n),
                                                  self.detector.hadronic_stochastic_term, rng)
        else:
            start = (rng.exponential(PHOTON_CONVERSION_X0, n) if particle == "photon"
                     else np.zeros(n))
            if self._uses_expected_field(axis):
                visible = self._em_response(energies, start, axis, rng)
            else:
                visible = self._sampling_fluctuation(
                    self._deposit(self._em_spots(energies, start, rng), axis, n),
                    self.detector.stochastic_term, rng)
        visible[visible < self.detector.threshold_mev] = 0.0
        return ShowerData(energies, visible.astype(np.float32), conditions,
                          dict(condition_units or {}))

    @staticmethod
    def _axis(conditions: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        entry = np.asarray(conditions.get("entry_point", np.zeros((n, 2))), dtype=np.float64)
        angles = np.asarray(conditions.get("direction", np.zeros((n, 2))), dtype=np.float64)
        tangent = np.tan(angles.reshape(n, 2))
        unit = np.concatenate([tangent, np.ones((n, 1))], axis=1)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        entry = entry.reshape(n, 2)
        return {"x0": entry[:, 0], "y0": entry[:, 1], "unit": unit}


# --------------------------------------------------------------------------------------
# Incident energies
# --------------------------------------------------------------------------------------
_UNITS = {"ev": 1e-6, "kev": 1e-3, "mev": 1.0, "gev": 1e3, "tev": 1e6}


def parse_energy(text: str | float) -> float:
    """An energy in MeV from ``"5000"``, ``"5GeV"``, ``"1 TeV"`` (case-insensitive)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", text)
        unit = (match.group(2) if match else "").lower() or "mev"
        if not match or unit not in _UNITS:
            raise OptionError(f"cannot read energy {text!r}: use a number in MeV or a unit "
                              f"(eV, keV, MeV, GeV, TeV), e.g. 10GeV")
        try:
            value = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise OptionError(f"cannot read energy {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"energies must be positive and finite, got {text!r}")
    return value


def sample_energies(n: int, spectrum: str, energy_range_mev: Sequence[float] = (),
                    energies_mev: Sequence[float] = (), weights: Sequence[float] = (),
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Incident energies ``(n,)`` in MeV.

    Spectra: ``log-uniform`` and ``inverse`` (dN/dE ~ 1/E, the same distribution),
    ``uniform``, or ``discrete`` (the listed energies in proportion to ``weights``; the counts
    are exact up to rounding and the order is shuffled).
    """
    rng = rng or np.random.default_rng()
    if spectrum not in SPECTRA:
        raise OptionError(f"unknown spectrum {spectrum!r}; choose from {', '.join(SPECTRA)}")
    if spectrum == "discrete":
        values = np.asarray(energies_mev, dtype=np.float64)
        if values.size == 0:
            raise OptionError("the discrete spectrum needs a list of energies")
        w = np.asarray(weights if len(weights) else np.ones(len(values)), dtype=np.float64)
        if len(w) != len(values) or np.any(w < 0) or w.sum() <= 0:
            raise OptionError("energy weights must be non-negative, one per energy")
        counts = np.floor(n * w / w.sum()).astype(np.int64)
        remainder = n - counts.sum()
        order = np.argsort(-(n * w / w.sum() - counts), kind="stable")
        counts[order[:remainder]] += 1
        out = np.repeat(values, counts)
        rng.shuffle(out)
        return out
    if len(energy_range_mev) != 2:
        raise OptionError("a continuous spectrum needs an energy range LO HI")
    lo, hi = float(energy_range_mev[0]), float(energy_range_mev[1])
    if not (0 < lo < hi and math.isfinite(hi)):
        raise OptionError(f"energy range must satisfy 0 < LO < HI, got {lo:g} {hi:g} MeV")
    if spectrum == "uniform":
        return rng.uniform(lo, hi, n)
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


# --------------------------------------------------------------------------------------
# Streaming to a file
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationPlan:
    """Everything that determines a simulated file (recorded in its attributes)."""

    geometry: str
    n: int
    particle: str
    spectrum: str
    energy_range_mev: tuple[float, ...]
    energies_mev: tuple[float, ...]
    energy_weights: tuple[float, ...]
    conditions: str
    seed: int
    chunk_size: int
    max_spots: int

    @classmethod
    def from_options(cls, geometry: str, n: int, particle: str | None = None,
                     spectrum: str | None = None,
                     energy_range_mev: Sequence[float] | None = None,
                     energies_mev: Sequence[float] | None = None,
                     seed: int | None = None, chunk_size: int | None = None,
                     max_spots: int | None = None) -> SimulationPlan:
        """Fill unspecified options from the geometry's published-dataset defaults."""
        detector = get_detector(geometry)
        defaults = detector.defaults
        if n < 1:
            raise OptionError(f"number of showers must be >= 1, got {n}")
        weights: tuple[float, ...] = ()
        if energies_mev:
            spectrum, energies = "discrete", tuple(float(e) for e in energies_mev)
        elif spectrum is None and energy_range_mev is None:
            spectrum, energies = defaults.spectrum, defaults.energies_mev
            weights = defaults.energy_weights
        else:
            spectrum = spectrum or ("log-uniform" if defaults.spectrum == "discrete"
                                    else defaults.spectrum)
            energies = ()
            if spectrum == "discrete":
                raise OptionError("the discrete spectrum needs --energies")
        if energy_range_mev is None:
            energy_range_mev = defaults.energy_range_mev
        particle = particle or defaults.particle
        if particle not in PARTICLES:
            raise OptionError(f"unknown particle {particle!r}; choose from {', '.join(PARTICLES)}")
        if spectrum not in SPECTRA:
            raise OptionError(f"unknown spectrum {spectrum!r}; choose from {', '.join(SPECTRA)}")
        if spectrum != "discrete":
            lo, hi = (float(v) for v in energy_range_mev)
            if not (0 < lo < hi and math.isfinite(hi)):
                raise OptionError(f"energy range must satisfy 0 < LO < HI, got {lo:g} {hi:g} MeV")
        max_spots = max_spots or detector.max_spots
        if chunk_size is None:
            n_voxels = get_geometry(geometry).n_voxels
            chunk_size = int(np.clip(min(3_000_000 // n_voxels, 1_500_000 // max_spots), 8, 4096))
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            log.info("no --seed given: using seed %d", seed)
        return cls(geometry, n, particle, spectrum, tuple(float(e) for e in energy_range_mev),
                   energies, weights, defaults.conditions, seed, chunk_size, max_spots)

    def draw_inputs(self) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
        """All incident energies (MeV) and extra conditions, from stream (seed, 0)."""
        rng = make_rng(self.seed, 0)
        energies = sample_energies(self.n, self.spectrum, self.energy_range_mev,
                                   self.energies_mev, self.energy_weights, rng)
        if self.conditions == "none":
            return energies, {}, {}
        conditions, units = CONDITION_GENERATORS[self.conditions](self.n, rng)
        return energies, conditions, units


_WORKER_SIMULATORS: dict[tuple[str, int], ReferenceSimulator] = {}


def _simulate_chunk(task: tuple[SimulationPlan, int, np.ndarray, dict[str, np.ndarray],
                                dict[str, str]]) -> ShowerData:
    """Simulate chunk ``index`` of a plan from its own random stream (seed, index + 1)."""
    plan, index, energies, conditions, units = task
    key = (plan.geometry, plan.max_spots)
    if key not in _WORKER_SIMULATORS:  # one simulator per worker process
        _WORKER_SIMULATORS[key] = ReferenceSimulator(plan.geometry, max_spots=plan.max_spots)
    simulator = _WORKER_SIMULATORS[key]
    return simulator.simulate(energies, plan.particle, conditions, units,
                              rng=make_rng(plan.seed, index + 1))


def _die_with_parent(parent_pid: int) -> None:
    """In a worker (Linux): ask the kernel to kill this process when its parent dies, even
    by SIGKILL, so that no orphan keeps simulating and holding memory."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def iter_simulated_chunks(plan: SimulationPlan, workers: int = 1) -> Iterator[ShowerData]:
    """Yield the plan's showers chunk by chunk, in order, with at most 2 x workers in flight."""
    energies, conditions, units = plan.draw_inputs()
    tasks = ((plan, i, energies[start:start + plan.chunk_size],
              {k: v[start:start + plan.chunk_size] for k, v in conditions.items()}, units)
             for i, start in enumerate(range(0, plan.n, plan.chunk_size)))
    if workers <= 1:
        for task in tasks:
            yield _simulate_chunk(task)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[Future[ShowerData]] = deque()
        for task in tasks:
            pending.append(pool.submit(_simulate_chunk, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def simulate_to_file(path: str | os.PathLike[str], plan: SimulationPlan, workers: int = 1,
                     file_format: str = "calochallenge",
                     progress: Callable[..., Any] | None = None) -> int:
    """Simulate ``plan`` into ``path`` (written atomically); returns the number of showers."""
    geometry = get_geometry(plan.geometry)
    chunks = iter_simulated_chunks(plan, workers)
    if progress is not None:
        chunks = _count_showers(chunks, progress(total=plan.n, desc=f"simulate {plan.geometry}",
                                                 unit="shower"))
    with ShowerWriter(path, geometry, file_format) as writer:
        for chunk in chunks:
            writer.write(chunk)
        writer.annotate("simulation", json.dumps(
            {**plan.__dict__, "simulator": "caloforge GFLASH reference",
             "response": RESPONSE_MODEL, "version": __version__,
             "detector": get_detector(plan.geometry).describe()}))
    return writer.n_written


def _count_showers(chunks: Iterator[ShowerData], bar: Any) -> Iterator[ShowerData]:
    with bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk
