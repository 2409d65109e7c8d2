"""The readout response of a sampling calorimeter's active layers.

A shower deposits energy all along its path, but the readout only sees what happens in the
thin active layers (silicon, liquid argon, scintillator), and it sees it in quanta:

(a) **charged-track crossings.** Each crossing of an active layer by a charged track leaves
    a Landau-distributed deposit; it is drawn from a Moyal distribution (a Landau with a
    finite mean: X = MPV - sigma ln Z^2, Z ~ N(0, 1)) with the most probable value of a
    minimum-ionising particle in that layer. The number of crossings in a voxel is Poisson
    with mean (visible track energy) / (mean deposit per crossing). Tracks come in
    clusters (one electron crosses several layers, a pair two tracks at once): the track
    energy first fluctuates by Gamma factors whose variance c_cluster^2 E (E in GeV) makes
    up, with the crossing and soft fluctuations, the detector's stochastic term
    c / sqrt(E): one factor per voxel holding at least one cluster (c_cluster^2 x 1 GeV),
    one shared by the sparser voxels of a layer (so that a peripheral voxel's crossings
    stay single). A voxel with few crossings shows the MIP peak; one with many, a narrow
    Gaussian.
(b) **a soft component**: Compton and photo-electrons of the shower's many low-energy
    photons, which stop inside the active layer and deposit anything from far below the
    threshold to about a MIP. Their share of a voxel's energy grows from ``soft_core_share``
    on the shower axis before the maximum to ``soft_halo_share`` far outside the core and
    in the tail (photons dominate there); their deposits follow dN/dE ~ E^-g between
    ``soft_min_mev`` and ``soft_max_mev`` (visible energy), g = ``soft_slope`` (1.5 unless a
    detector's active medium was measured otherwise). This fills the spectrum from the
    threshold up to the MIP peak continuously.

Sums of more than ``EXACT_SUM_LIMIT`` deposits are drawn as a Gaussian with the exact mean
and variance (central limit; their shape no longer matters), fewer one by one. Then the
stored value is the visible energy divided by the layer's visible fraction (calibrated:
CaloChallenge 2/3 divide by 0.033) or the visible energy itself (ILD), and the caller
applies the readout threshold. One readout per detector: layers of another structure
(ATLAS's Tile behind the LAr calorimeter) get its response scaled to their sampling fraction.

Limits: no delta-ray escape, no saturation, one Moyal width per active layer (the real
Landau of thin silicon is broader than the Landau-Vavilov form: the width here is 1.7 xi,
xi = 0.1535 MeV cm^2/g (Z/A) rho x, covering the atomic-binding broadening), the soft
share's dependence on radius and age is a smooth model with two parameters, not a fit to
Geant4 (none is available offline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

EULER_GAMMA = 0.5772156649015329
EXACT_SUM_LIMIT = 24  # deposits per voxel drawn one by one; more: Gaussian sum
LANDAU_XI_MEV_CM2_G = 0.1535  # xi = 0.1535 (Z/A) rho x MeV (x in cm)
MOYAL_WIDTH_PER_XI = 1.7
SOFT_SLOPE = 1.5  # dN/dE ~ E^-1.5 for the soft deposits


def landau_xi_mev(z_over_a: float, density: float, thickness_mm: float) -> float:
    """The Landau width parameter xi of a layer (PDG), MeV."""
    return LANDAU_XI_MEV_CM2_G * z_over_a * density * thickness_mm / 10.0


@dataclass(frozen=True)
class Readout:
    """How the active layers of one detector turn deposited energy into stored values.

    Attributes (energies in MeV):
        active: a label (``"Si 0.3 mm"``).
        mip_mpv_mev: most probable visible deposit of one crossing of one active layer.
        mip_width_mev: Moyal scale (sigma) of that deposit.
        visible_fraction: visible / deposited energy of an electromagnetic shower (the
            sampling fraction; CaloChallenge 2/3: 0.033).
        calibrated: stored values are deposited energies (visible / visible fraction of
            the voxel's layer); else visible energies (ILD).
        stochastic_term: c of sigma/E = c / sqrt(E / GeV) the whole response reproduces.
        soft_core_share, soft_halo_share: share of the visible energy carried by soft
            electrons on the axis before the shower maximum / far outside and in the tail.
        soft_min_mev, soft_max_mev: range of one soft deposit (visible).
        soft_slope: g of the soft deposits' spectrum dN/dE ~ E^-g (not 1).
    """

    active: str
    mip_mpv_mev: float
    mip_width_mev: float
    visible_fraction: float
    calibrated: bool
    stochastic_term: float
    soft_core_share: float = 0.1
    soft_halo_share: float = 0.6
    soft_min_mev: float = 1e-4
    soft_max_mev: float = 0.1
    soft_slope: float = SOFT_SLOPE

    # --- moments -----------------------------------------------------------------------
    @cached_property
    def crossing_mean_mev(self) -> float:
        """Mean of the Moyal deposit, MPV + sigma (gamma_E + ln 2)."""
        return self.mip_mpv_mev + self.mip_width_mev * (EULER_GAMMA + math.log(2.0))

    @cached_property
    def crossing_variance(self) -> float:
        return math.pi ** 2 * self.mip_width_mev ** 2 / 2.0

    def _soft_moment(self, k: int) -> float:
        a, b, g = self.soft_min_mev, self.soft_max_mev, self.soft_slope
        norm = (b ** (1 - g) - a ** (1 - g)) / (1 - g)
        return (b ** (k + 1 - g) - a ** (k + 1 - g)) / (k + 1 - g) / norm

    @cached_property
    def soft_mean_mev(self) -> float:
        return self._soft_moment(1)

    @cached_property
    def soft_variance(self) -> float:
        return self._soft_moment(2) - self.soft_mean_mev ** 2

    @cached_property
    def cluster_term(self) -> float:
        """c_cluster: the part of the stochastic term the quanta do not produce.

        In calibrated GeV units the crossings give a relative variance per unit energy of
        (m + v/m) / f / 1000 (m, v: mean and variance of one crossing; f: visible
        fraction), the soft deposits (m_s + v_s/m_s) / f / 1000, weighted by their shares
        (the core share, where most energy is).
        """
        share = self.soft_core_share
        quanta = ((1 - share) * (self.crossing_mean_mev
                                 + self.crossing_variance / self.crossing_mean_mev)
                  + share * (self.soft_mean_mev + self.soft_variance / self.soft_mean_mev))
        return math.sqrt(max(self.stochastic_term ** 2 - quanta / self.visible_fraction / 1e3,
                             0.0))

    @property
    def calibration(self) -> float:
        """Stored value / visible energy in a layer of the nominal structure."""
        return 1.0 / self.visible_fraction if self.calibrated else 1.0

    @property
    def mip_stored_mev(self) -> float:
        """Where one crossing's MIP peak sits in stored units."""
        return self.mip_mpv_mev * self.calibration

    # --- the response ------------------------------------------------------------------
    def soft_share(self, radius_rm: np.ndarray, age: np.ndarray) -> np.ndarray:
        """Share of visible energy in soft deposits at ``radius_rm`` (Moliere radii from
        the axis) and shower age ``age`` (tau: ~1 at the maximum), broadcast arrays."""
        outside = radius_rm ** 2 / (radius_rm ** 2 + 1.0)  # 0 on the axis, 1/2 at R_M
        late = np.clip((age - 1.0) / 2.0, 0.0, 1.0)  # 0 before the maximum, 1 from tau = 3
        weight = 1.0 - (1.0 - outside) * (1.0 - late)
        return self.soft_core_share + (self.soft_halo_share - self.soft_core_share) * weight

    def draw(self, track_mev: np.ndarray, soft_mev: np.ndarray, rng: np.random.Generator,
             layer_offsets: np.ndarray, relative_fraction: np.ndarray | float = 1.0,
             at_least_one: np.ndarray | None = None) -> np.ndarray:
        """Stored voxel values from expected deposited (calibrated) track and soft energy.

        ``track_mev`` and ``soft_mev``: ``(N, n_voxels)`` MeV of deposited energy;
        ``layer_offsets``: start of each layer in the voxel vector, ``(n_layers + 1,)``;
        ``relative_fraction``: the visible fraction of each voxel's layer relative to the
        nominal one, broadcast to them (ILD's thicker tungsten in layers 21-30, ATLAS's Tile
        layers); calibrated values divide it out again; ``at_least_one``: ``(N, n_voxels)``
        bool, voxels a known track crosses (the incident electron), which hold at least one
        crossing whatever the Poisson draw. Returns the stored values ``(N, n_voxels)``
        before the threshold.
        """
        track = self._clustered(np.asarray(track_mev, dtype=np.float64), layer_offsets, rng)
        relative = np.broadcast_to(np.asarray(relative_fraction, dtype=np.float64),
                                   track.shape)
        visible = self.visible_fraction * relative
        crossings = rng.poisson(track * visible / self.crossing_mean_mev)
        if at_least_one is not None:
            crossings = np.maximum(crossings, at_least_one)
        electrons = rng.poisson(np.asarray(soft_mev, dtype=np.float64) * visible
                                / self.soft_mean_mev)
        out = (self._sum_of(crossings.reshape(-1), self.crossing_mean_mev,
                            self.crossing_variance, self._moyal, rng)
               + self._sum_of(electrons.reshape(-1), self.soft_mean_mev, self.soft_variance,
                              self._soft, rng))
        out = out.reshape(track.shape)
        return out / visible if self.calibrated else out

    def _clustered(self, track: np.ndarray, layer_offsets: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
        """The track energy with the cluster fluctuation, variance c_cluster^2 E (GeV).

        A voxel holding at least one cluster's worth (c_cluster^2 x 1 GeV) fluctuates by
        itself (Gamma); the sparser voxels of a layer share one Gamma factor for their sum:
        the same variance, without lumping a peripheral voxel's single crossings into
        clusters (that would hide the MIP peak).
        """
        scale = self.cluster_term ** 2 * 1e3  # MeV (deposited)
        if scale <= 0:
            return track
        out = track.copy()
        dense = track >= scale
        out[dense] = rng.gamma(track[dense] / scale, scale)
        sparse = np.where(dense, 0.0, track)
        starts = np.asarray(layer_offsets[:-1], dtype=np.int64)
        sums = np.add.reduceat(sparse, starts, axis=-1)  # (N, n_layers)
        factor = np.ones_like(sums)
        filled = sums > 0
        factor[filled] = rng.gamma(sums[filled] / scale, scale) / sums[filled]
        sizes = np.diff(np.asarray(layer_offsets, dtype=np.int64))
        return np.where(dense, out, sparse * np.repeat(factor, sizes.tolist(), axis=-1))

    @staticmethod
    def _sum_of(counts: np.ndarray, mean: float, variance: float, draw_one, rng
                ) -> np.ndarray:
        """Per entry the sum of ``counts`` i.i.d. deposits: one by one for small counts, a
        Gaussian with the exact moments (clipped at 0) for large ones."""
        total = np.zeros(counts.shape)
        few = (counts > 0) & (counts <= EXACT_SUM_LIMIT)
        if few.any():
            index = np.flatnonzero(few)
            owner = np.repeat(index, counts[index])
            total += np.bincount(owner, weights=draw_one(len(owner), rng), minlength=len(counts))
        many = counts > EXACT_SUM_LIMIT
        if many.any():
            n = counts[many]
            total[many] = np.maximum(rng.normal(n * mean, np.sqrt(n * variance)), 0.0)
        return total

    def _moyal(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal(n)
        return np.maximum(self.mip_mpv_mev - self.mip_width_mev * np.log(z * z + 1e-300), 0.0)

    def _soft(self, n: int, rng: np.random.Generator) -> np.ndarray:
        a, b, g = self.soft_min_mev, self.soft_max_mev, self.soft_slope
        u = rng.random(n)
        return (a ** (1 - g) + u * (b ** (1 - g) - a ** (1 - g))) ** (1 / (1 - g))
