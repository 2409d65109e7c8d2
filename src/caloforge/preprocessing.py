"""Invertible preprocessing between physical showers and the spaces flows work in.

Every transform is fitted on training data (``fit``), maps forward and back exactly
(``forward`` / ``inverse``, torch tensors, float32 or float64) and saves its fitted state as
plain JSON (``state`` / ``from_state``) that travels with the model.

* :class:`LogitTransform`: [0, 1] <-> R, ``logit(alpha + (1 - 2 alpha) x)``.
* :class:`ConditionTransform`: incident energy (MeV) and extra conditions -> standardised
  context ``[ (log10 E_inc - m) / s, (c - m_c) / s_c ... ]``; remembers the training range.
* :class:`LayerEnergyTransform`: layer energies (MeV) <-> CaloFlow's "u-space"
  u_0 = sum_i E_i / (k E_inc), u_i = E_i / sum_{j >= i} E_j (i < L - 1), then logit.
* :class:`VoxelTransform`: voxel energies <-> per-layer-normalised voxels in logit space,
  with uniform dequantisation noise on the way in and renormalisation plus threshold on the
  way out.
* :class:`BoxCoxTransform`: cell energies <-> standardised Box-Cox values (the LHCb
  WGAN's preprocessing), elementwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CaloforgeError


def cut_below(values: torch.Tensor, threshold_mev: float) -> torch.Tensor:
    """``values`` (MeV) with everything below the readout threshold set to 0."""
    return torch.where(values < threshold_mev, torch.zeros_like(values), values)


class JsonState:
    """Fitted state as plain JSON: ``state()`` and ``from_state()`` (dataclass fields)."""

    def state(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Any:
        return cls(**state)


@dataclass
class LogitTransform:
    """x in [0, 1] -> logit(alpha + (1 - 2 alpha) x); the inverse clips back into [0, 1]."""

    alpha: float = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.alpha + (1 - 2 * self.alpha) * x.clamp(0.0, 1.0)
        return torch.log(p) - torch.log1p(-p)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # sigmoid written as 1 / (1 + exp(-y)): near the floor, sigmoid(y) - alpha cancels
        # to a few ulps, and onnxruntime's Sigmoid kernel is less exact there than its Exp
        # (an exported flow then zeroed layers the torch model kept at ~1e-2 MeV)
        sigmoid = torch.reciprocal(1.0 + torch.exp(-y))
        return ((sigmoid - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)


@dataclass
class ConditionTransform(JsonState):
    """Incident energy and extra conditions -> standardised context vector.

    Attributes (fitted): ``log_e_mean``/``log_e_std`` of log10(E_inc / MeV); per extra
    condition its column means and stds; the training range of every input.
    """

    names: list[str] = field(default_factory=list)  # extra conditions, in order
    log_e_mean: float = 0.0
    log_e_std: float = 1.0
    condition_mean: dict[str, list[float]] = field(default_factory=dict)
    condition_std: dict[str, list[float]] = field(default_factory=dict)
    energy_range: list[float] = field(default_factory=lambda: [0.0, float("inf")])
    condition_range: dict[str, list[list[float]]] = field(default_factory=dict)
    energy_quantiles: list[float] = field(default_factory=list)  # of log10 E_inc, for sampling
    units: dict[str, str] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return 1 + sum(len(self.condition_mean[n]) for n in self.names)

    def fit(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray],
            units: dict[str, str] | None = None) -> ConditionTransform:
        log_e = np.log10(incident_energies)
        self.log_e_mean = float(log_e.mean())
        self.log_e_std = float(max(log_e.std(), 1e-3))
        self.energy_range = [float(incident_energies.min()), float(incident_energies.max())]
        self.energy_quantiles = np.quantile(log_e, np.linspace(0, 1, 1001)).tolist()
        self.names = sorted(conditions)
        self.units = {name: (units or {}).get(name, "") for name in self.names}
        for name in self.names:
            values = np.asarray(conditions[name], dtype=np.float64)
            self.condition_mean[name] = values.mean(0).tolist()
            self.condition_std[name] = np.maximum(values.std(0), 1e-6).tolist()
            self.condition_range[name] = [values.min(0).tolist(), values.max(0).tolist()]
        return self

    def forward(self, incident_energies: torch.Tensor, conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """Context ``(N, n_features)`` from E_inc ``(N,)`` MeV and conditions ``(N, k)``."""
        columns = [((torch.log10(incident_energies) - self.log_e_mean) / self.log_e_std)[:, None]]
        for name in self.names:
            mean = torch.as_tensor(self.condition_mean[name], dtype=incident_energies.dtype,
                                   device=incident_energies.device)
            std = torch.as_tensor(self.condition_std[name], dtype=incident_energies.dtype,
                                  device=incident_energies.device)
            columns.append((conditions[name].reshape(incident_energies.shape[0], -1) - mean) / std)
        return torch.cat(columns, dim=1)

    def check_range(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray],
                    source: str) -> None:
        """Raise if inputs leave the training range (or a required condition is missing).

        A margin (1 % of the energy, 2 % of a condition's span) absorbs the edges of
        continuous spectra: an independent sample of the training distribution has extremes
        slightly beyond the training sample's."""
        lo, hi = self.energy_range
        if incident_energies.min() < lo * 0.99 or incident_energies.max() > hi * 1.01:
            raise CaloforgeError(
                f"{source}: incident energies {incident_energies.min():.6g}-"
                f"{incident_energies.max():.6g} MeV leave the model's training range "
                f"{lo:.6g}-{hi:.6g} MeV (use --allow-extrapolation to generate anyway)")
        for name in self.names:
            if name not in conditions:
                raise CaloforgeError(f"{source}: the model needs condition {name!r}")
            values = np.asarray(conditions[name]).reshape(len(incident_energies), -1)
            lo_c, hi_c = (np.asarray(v) for v in self.condition_range[name])
            span = np.maximum(hi_c - lo_c, 1e-9)
            if (values < lo_c - 0.02 * span).any() or (values > hi_c + 0.02 * span).any():
                raise CaloforgeError(
                    f"{source}: condition {name!r} leaves the training range "
                    f"{lo_c.tolist()}-{hi_c.tolist()} (use --allow-extrapolation)")

    def sample_energies(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Incident energies ``(n,)`` MeV drawn from the training distribution (quantiles)."""
        quantiles = np.asarray(self.energy_quantiles)
        return 10 ** np.interp(rng.random(n), np.linspace(0, 1, len(quantiles)), quantiles)



# how far beyond the training showers' extremes of each u's logit a flow may draw: enough
# for an independent sample's slightly wider extremes, not for a flow's far tail
LOGIT_MARGIN = 0.5


@dataclass
class LayerEnergyTransform(JsonState):
    """Layer energies (MeV) <-> logit of CaloFlow's u-space, ``(N, L)`` both ways.

    ``scale`` (k) is fitted so that u_0 = E_tot / (k E_inc) stays below 1. ``logit_min``,
    ``logit_max`` ``(L,)``: the smallest and largest logit of each u the training showers
    have, widened by ``LOGIT_MARGIN``; the inverse clamps a flow's draws into them. Why: a
    flow's tail draw of one u near 1 hands one layer the whole remaining shower (on ild-ecal
    1,533 MeV in layer 3 against a training largest of 79 MeV), one near 0 hands it on to
    the next layers. ``None`` (files saved before it): no clamp.
    """

    n_layers: int
    scale: float = 1.0
    alpha: float = 1e-6
    logit_min: list[float] | None = None
    logit_max: list[float] | None = None

    def fit(self, layer_energies: np.ndarray, incident_energies: np.ndarray
            ) -> LayerEnergyTransform:
        """``layer_energies`` ``(N, L)`` MeV, ``incident_energies`` ``(N,)`` MeV."""
        ratio = layer_energies.sum(axis=1) / incident_energies
        self.scale = float(max(1.1 * ratio.max(), 1e-6))
        return self.fit_range(layer_energies, incident_energies)

    def fit_range(self, layer_energies: np.ndarray, incident_energies: np.ndarray
                  ) -> LayerEnergyTransform:
        """``logit_min`` / ``logit_max`` from the training showers (``scale`` kept): also
        for a model saved before them."""
        x = self.forward(torch.as_tensor(layer_energies, dtype=torch.float64),
                         torch.as_tensor(incident_energies, dtype=torch.float64)).numpy()
        self.logit_min = (x.min(axis=0) - LOGIT_MARGIN).tolist()
        self.logit_max = (x.max(axis=0) + LOGIT_MARGIN).tolist()
        return self

    def forward(self, layer_energies: torch.Tensor, incident_energies: torch.Tensor
                ) -> torch.Tensor:
        energies = layer_energies.clamp(min=0.0)
        remaining = torch.flip(torch.cumsum(torch.flip(energies, [1]), 1), [1])  # sum_{j>=i}
        u0 = remaining[:, :1] / (self.scale * incident_energies[:, None])
        ratios = torch.where(remaining[:, :-1] > 0, energies[:, :-1] / remaining[:, :-1].clamp(
            min=torch.finfo(energies.dtype).tiny), torch.zeros_like(energies[:, :-1]))
        return LogitTransform(self.alpha).forward(torch.cat([u0, ratios], dim=1))

    def inverse(self, x: torch.Tensor, incident_energies: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, L)`` logit u-space (clamped into ``logit_min`` .. ``logit_max``) and
        E_inc ``(N,)`` MeV -> layer energies ``(N, L)`` MeV."""
        if self.logit_min is not None and self.logit_max is not None:
            x = torch.maximum(torch.minimum(x, torch.as_tensor(
                self.logit_max, dtype=x.dtype, device=x.device)), torch.as_tensor(
                self.logit_min, dtype=x.dtype, device=x.device))
        logit = LogitTransform(self.alpha)
        u, one_minus_u = logit.inverse(x), logit.inverse(-x)
        remaining = u[:, 0] * self.scale * incident_energies
        layers = []
        for i in range(self.n_layers - 1):
            layers.append(u[:, i + 1] * remaining)
            # remaining * (1 - u) with 1 - u from the logit itself: `remaining - layer`
            # cancels when u ~ 1 and left the last layers a few float32 ulps of the shower,
            # whose relative error then reached the next flow through log(layer energy)
            remaining = remaining * one_minus_u[:, i + 1]
        layers.append(remaining)
        return torch.stack(layers, dim=1).clamp(min=0.0)



def uniform_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(0, 1) noise shaped like ``like`` on its device; drawn on the CPU from ``generator``
    when one is given (a CPU generator keeps runs reproducible whatever the device)."""
    noise = torch.rand(like.shape, generator=generator, dtype=like.dtype,
                       device="cpu" if generator is not None else like.device)
    return noise.to(like.device)


@dataclass
class VoxelTransform(JsonState):
    """Voxels (MeV) <-> per-layer-normalised voxels in logit space, ``(N, n_voxels)``.

    Forward: add U(0, noise_mev) to every voxel (dequantisation, no exact zeros), divide each
    layer by its energy, logit. Inverse: sigmoid, renormalise each layer to sum 1, multiply by
    the requested layer energies, zero voxels below ``threshold_mev``.
    """

    layer_sizes: list[int]
    noise_mev: float = 1e-3
    threshold_mev: float = 0.01
    alpha: float = 1e-6

    def _index(self, device: torch.device) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.layer_sizes), device=device),
                                       torch.as_tensor(self.layer_sizes, device=device))

    def layer_sums(self, voxels: torch.Tensor) -> torch.Tensor:
        """Per-layer sums ``(N, L)`` of ``(N, n_voxels)``."""
        if len(self.layer_sizes) == 1:  # one layer: no scatter in an exported graph
            return voxels.sum(-1, keepdim=True)
        index = self._index(voxels.device).expand(voxels.shape[0], -1)
        out = torch.zeros(voxels.shape[0], len(self.layer_sizes), dtype=voxels.dtype,
                          device=voxels.device)
        return out.scatter_add_(1, index, voxels)

    def add_noise(self, voxels: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        return voxels + self.noise_mev * uniform_noise(voxels, generator)

    def forward(self, noisy_voxels: torch.Tensor, layer_energies: torch.Tensor) -> torch.Tensor:
        per_voxel_energy = layer_energies[:, self._index(noisy_voxels.device)]
        normalised = noisy_voxels / per_voxel_energy.clamp(min=torch.finfo(noisy_voxels.dtype).tiny)
        return LogitTransform(self.alpha).forward(normalised)

    def inverse(self, x: torch.Tensor, layer_energies: torch.Tensor,
                layer_cuts: torch.Tensor | None = None, keep_below: bool = False
                ) -> torch.Tensor:
        """``x`` ``(B, n_voxels)`` logit space and ``layer_energies`` ``(B, L)`` MeV ->
        voxels ``(B, n_voxels)`` MeV.

        ``layer_cuts`` ``(L,)`` MeV (each >= the threshold; see :func:`occupancy_cuts`):
        voxels below their layer's cut are emptied and the layer's other voxels scaled up
        to keep its energy above the threshold (:meth:`cut_voxels`). ``keep_below``: no
        cut at all, the voxels under the threshold keep their values (candidate hits for a
        count, :func:`~caloforge.hit_counts.counted_cells`)."""
        shares = LogitTransform(self.alpha).inverse(x)
        sums = self.layer_sums(shares)
        index = self._index(x.device)
        shares = shares / sums[:, index].clamp(min=torch.finfo(x.dtype).tiny)
        voxels = shares * layer_energies[:, index]
        if keep_below:
            return voxels
        voxels = cut_below(voxels, self.threshold_mev)
        return voxels if layer_cuts is None else self.cut_layers(voxels, layer_cuts)

    def cut_layers(self, voxels: torch.Tensor, layer_cuts: torch.Tensor) -> torch.Tensor:
        """:meth:`cut_voxels` with one cut per layer ``(L,)`` MeV."""
        return self.cut_voxels(voxels, layer_cuts[self._index(voxels.device)])

    def cut_voxels(self, voxels: torch.Tensor, voxel_cuts: torch.Tensor,
                   groups: torch.Tensor | None = None) -> torch.Tensor:
        """Voxels ``(B, n_voxels)`` MeV under their own cut (``(n_voxels,)`` MeV) emptied,
        each layer's other voxels scaled up so that the layer keeps the energy it had.
        ``groups``: a one-hot membership ``(n_voxels, G)``; each group's kept voxels then
        first take back the group's own cut energy (groups left empty hand theirs to the
        layer), so that energy cut from the halo stays in the halo instead of going, in
        proportion, mostly to the core.

        Why keep it: the layer energy is the better-modelled quantity, the cut only says
        which faint voxels are not hits. The energy kept is the one the voxels carry (above
        the readout threshold), not the flows' layer energy: that one includes the
        dequantisation noise of the empty voxels, which must not come back as signal."""
        index = self._index(voxels.device)
        kept = torch.where(voxels >= voxel_cuts, voxels, torch.zeros_like(voxels))
        if groups is not None:
            groups = groups.to(voxels.dtype)
            kept = kept * (_kept_scale(voxels @ groups, kept @ groups) @ groups.T)
        return kept * _kept_scale(self.layer_sums(voxels), self.layer_sums(kept))[:, index]


def _kept_scale(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """before / after, 0 where nothing is left (0 x an infinite scale would be NaN)."""
    return torch.where(after > 0, before / after.clamp(min=torch.finfo(after.dtype).tiny),
                       torch.zeros_like(after))


def occupancy_cuts(reference: np.ndarray, generated: np.ndarray, layer_sizes: list[int],
                   threshold_mev: float) -> list[float]:
    """Per layer, the lowest cut (MeV, >= ``threshold_mev``) that leaves the ``generated``
    showers ``(N_g, n_voxels)`` no more hits per shower on average than the ``reference``
    showers ``(N_r, n_voxels)`` have (the same incident energies): a hit/no-hit boundary
    calibrated on training data, for models that make too many faint voxels."""
    layers = np.repeat(np.arange(len(layer_sizes)), layer_sizes)
    return group_occupancy_cuts(reference, generated, layers, threshold_mev).tolist()


def group_occupancy_cuts(reference: np.ndarray, generated: np.ndarray, groups: np.ndarray,
                         threshold_mev: float) -> np.ndarray:
    """:func:`occupancy_cuts` for any grouping of the voxels: ``groups`` ``(n_voxels,)``
    holds each voxel's group (0 .. G-1, e.g. layer x radial ring); one cut per group
    ``(G,)`` MeV, each >= ``threshold_mev``, that leaves the generated showers the
    reference's hits per shower in that group (fewer if the model makes fewer)."""
    n_groups = int(groups.max()) + 1
    cuts = np.full(n_groups, threshold_mev, dtype=np.float64)
    scale = len(generated) / max(len(reference), 1)
    for group in range(n_groups):
        members = groups == group
        wanted = int(np.count_nonzero(reference[:, members] > 0) * scale)
        fake = generated[:, members]
        hits = np.sort(fake[fake >= threshold_mev])[::-1]
        if wanted >= len(hits):
            continue
        # keep the `wanted` largest: the cut lies just above the largest value that goes
        largest_removed = np.float32(hits[wanted])
        cuts[group] = max(threshold_mev,
                          float(np.nextafter(largest_removed, np.float32(np.inf))))
    return cuts


HIT_RATE_EDGES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)


def hit_rate_groups(showers: np.ndarray, layer_sizes: list[int],
                    edges: tuple[float, ...] = HIT_RATE_EDGES) -> np.ndarray:
    """Each voxel's group ``(n_voxels,)`` for :func:`group_occupancy_cuts`: its layer and
    the bin (``edges``) of how often ``showers`` ``(N, n_voxels)`` hit it. No geometry
    assumed: in a shower's halo, cells hit about as often lie about as far from the axis."""
    layers = np.repeat(np.arange(len(layer_sizes)), layer_sizes)
    return layers * (len(edges) + 1) + np.digitize((showers > 0).mean(0), edges)


def scale_to_deposit(shares: torch.Tensor, deposited: torch.Tensor, threshold_mev: float,
                     keep_below: bool = False) -> torch.Tensor:
    """One layer's relative cell values ``(B, S)`` (>= 0, any scale) and its deposited
    energy ``(B,)`` MeV -> cells ``(B, S)`` MeV whose hits carry exactly the deposit
    (``keep_below``: the other cells at the same scale, under the threshold, instead of 0).

    The layer image is scaled so that its hits (cells >= ``threshold_mev``) sum to the
    deposit: with the k hottest cells as the hits the scale is deposit / (their shares' sum),
    and k is the largest count whose coldest member still reaches the threshold at its
    scale (that coldest cell times the scale falls as k grows, so the valid counts are a
    prefix). The other cells are empty, and so is a layer whose deposit is below the
    threshold. Why: a flow for the layer energies with the empty cells' dequantisation noise
    in them (hundreds of cells x noise near the cut) has to resolve the deposit as a small
    difference of large numbers; this way it learns the deposit itself."""
    tiny = torch.finfo(shares.dtype).tiny
    ordered = torch.sort(shares, dim=-1, descending=True).values
    scales = deposited[:, None] / ordered.cumsum(-1).clamp(min=tiny)
    hits = (ordered * scales >= threshold_mev).sum(-1, keepdim=True)
    last = (hits - 1).clamp(min=0)
    coldest_hit = torch.gather(ordered, -1, last)
    scale = torch.where(hits > 0, torch.gather(scales, -1, last), torch.zeros_like(coldest_hit))
    if keep_below:
        return torch.where(shares >= coldest_hit, shares * scale,
                           (shares * scale).clamp(max=threshold_mev * (1 - 1e-6)))
    return torch.where(shares >= coldest_hit, shares * scale, torch.zeros_like(shares))


@dataclass
class MaxLogTransform(JsonState):
    """Layer images (MeV) <-> logit space, the convolutional L2LFlows preprocessing.

    Works on the last axis of ``(..., S)`` tensors (S = one layer's cells). Forward: every
    exactly-zero cell gets U(0, ``noise_mev``) (dequantisation of empty cells, below the
    readout threshold), the layer is divided by its maximum (``normalise_by="max"``, as
    published), by its energy (``"energy"``) or by one fixed ``scale_mev`` (``"fixed"``:
    twice the hottest training cell, so that the readout threshold sits at the same value
    in every image instead of moving with the layer's energy),
    ``y = log10(x + offset) / decades + 1`` maps
    [0, 1] onto about [0, 1] (10^-7 of the scale -> 0), then logit with ``alpha`` (1e-2 as
    published). Inverse: sigmoid, undo the log, clip at zero, rescale the layer so that it
    sums to the requested layer energy (so the inverse is the same for both scales), zero
    the cells below ``threshold_mev``.

    Dividing by the maximum puts one cell of every image at exactly 1: a point mass at the
    top of the range that a flow's likelihood can exploit (docs/convflow.md, issue 28);
    dividing by the energy leaves every cell a continuous share below 1.
    """

    noise_mev: float = 5e-3
    threshold_mev: float = 0.01515
    alpha: float = 1e-2
    offset: float = 1e-7
    decades: float = 7.0
    # "max" is the default of the saved state: models saved before the option load as
    # they were trained
    normalise_by: str = "max"
    scale_mev: float = 1.0  # normalise_by="fixed" only

    def __post_init__(self) -> None:
        if self.normalise_by not in ("max", "energy", "fixed"):
            raise ValueError(f"normalise_by must be max, energy or fixed, got "
                             f"{self.normalise_by!r}")

    def fit_scale(self, showers: np.ndarray) -> None:
        """``normalise_by="fixed"``: the scale from the training cells ``(N, n_voxels)`` MeV
        (twice the hottest: a hotter cell than any seen stays inside the range)."""
        if self.normalise_by == "fixed":
            self.scale_mev = 2.0 * float(np.max(showers))

    def add_noise(self, images: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        return torch.where(images > 0, images, self.noise_mev * uniform_noise(images, generator))

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """``(..., S)`` MeV, no zeros -> ``(..., S)`` logit values."""
        if self.normalise_by == "fixed":
            # a cell hotter than the scale (never in the training data) reads as the top
            shares = (noisy / self.scale_mev).clamp(max=1.0)
        else:
            scale = (noisy.sum(dim=-1, keepdim=True) if self.normalise_by == "energy"
                     else noisy.amax(dim=-1, keepdim=True))
            shares = noisy / scale.clamp(min=torch.finfo(noisy.dtype).tiny)
        y = torch.log10(shares + self.offset) / self.decades + 1
        return LogitTransform(self.alpha).forward(y)

    def shares(self, x: torch.Tensor) -> torch.Tensor:
        """Logit values ``(B, S)`` -> the cells' relative values ``(B, S)`` (>= 0, the
        normalisation undone up to one factor per layer)."""
        y = LogitTransform(self.alpha).inverse(x)
        return (torch.pow(10.0, (y - 1) * self.decades) - self.offset).clamp(min=0)

    def inverse(self, x: torch.Tensor, layer_energies: torch.Tensor) -> torch.Tensor:
        """Logit values ``(B, S)`` and layer energies ``(B,)`` MeV -> cells ``(B, S)`` MeV."""
        shares = self.shares(x)
        total = shares.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        cells = shares * (layer_energies[:, None] / total)
        return cut_below(cells, self.threshold_mev)

    def inverse_deposited(self, x: torch.Tensor, deposited: torch.Tensor,
                          keep_below: bool = False) -> torch.Tensor:
        """Logit values ``(B, S)`` and the layers' deposited energies ``(B,)`` MeV (the sum
        of the cells above the threshold, without dequantisation noise) -> cells ``(B, S)``
        MeV whose hits sum to it (:func:`scale_to_deposit`; ``keep_below``: the others
        under the threshold, not 0)."""
        return scale_to_deposit(self.shares(x), deposited, self.threshold_mev, keep_below)


@dataclass
class BoxCoxTransform(JsonState):
    """Cell energies <-> standardised Box-Cox values, elementwise, any shape.

    Energies may be in MeV or in any other unit (e.g. fractions of E_inc): ``threshold_mev``
    is then in that unit too.

    ``y = (bc(E + shift) - mean) / std`` with ``bc(v) = (v^lam - 1) / lam`` (``log v`` at
    lam = 0). Fitted: ``lam`` by maximum likelihood (``scipy.stats.boxcox``) on the cells at
    or above the threshold, limited to ``lam_range`` (default [0, 1]: a negative lam squeezes
    high energies against the asymptote -1/lam, where a generator's small errors become
    large energy errors; shower cells, heavy-tailed, fit lam < 0), ``mean``/``std`` over all
    cells. ``shift`` = the threshold, so empty cells map to one finite value. The inverse
    clamps into the transform's range and zeroes energies below the threshold.
    """

    threshold_mev: float = 0.1
    lam: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    max_mev: float = 1e7  # inverse clamp: twice the largest training cell

    def fit(self, energies: np.ndarray, max_values: int = 500_000, seed: int = 0,
            lam_range: tuple[float, float] = (0.0, 1.0)) -> BoxCoxTransform:
        from scipy import stats

        values = np.asarray(energies, dtype=np.float64).ravel()
        largest = float(values.max()) if values.size else 0.0
        rng = np.random.default_rng(seed)
        if values.size > max_values:
            values = rng.choice(values, max_values, replace=False)
        above = values[values >= self.threshold_mev]
        if above.size < 10:
            raise CaloforgeError("too few cells above the threshold to fit the Box-Cox transform")
        _, lam = stats.boxcox(above + self.threshold_mev)
        self.lam = float(np.clip(lam, *lam_range))
        self.max_mev = float(2 * largest)
        transformed = self._boxcox(torch.as_tensor(values + self.threshold_mev)).numpy()
        self.mean = float(transformed.mean())
        self.std = float(max(transformed.std(), 1e-6))
        return self

    def _boxcox(self, v: torch.Tensor) -> torch.Tensor:
        if abs(self.lam) < 1e-8:
            return torch.log(v)
        return (v ** self.lam - 1.0) / self.lam

    def forward(self, energies: torch.Tensor) -> torch.Tensor:
        return (self._boxcox(energies.clamp(min=0.0) + self.threshold_mev) - self.mean) / self.std

    def inverse_soft(self, y: torch.Tensor) -> torch.Tensor:
        """Energies without the threshold cut (differentiable; >= 0)."""
        s = y * self.std + self.mean
        if abs(self.lam) < 1e-8:
            v = torch.exp(s.clamp(max=math.log(self.max_mev + self.threshold_mev)))
        else:
            base = (self.lam * s + 1.0).clamp(min=torch.finfo(y.dtype).tiny)
            v = base ** (1.0 / self.lam)
        return (v - self.threshold_mev).clamp(min=0.0, max=self.max_mev)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        energies = self.inverse_soft(y)
        return cut_below(energies, self.threshold_mev)


def quantile_map_nodes(reference: np.ndarray, generated: np.ndarray, nodes: int = 128
                       ) -> list[list[float]]:
    """Nodes ``[x, y]`` (log10 MeV, ``x`` strictly increasing) of the monotone map that
    takes the quantiles of the ``generated`` cells above threshold to the ``reference``
    cells' (any shapes; zeros ignored), for :func:`monotone_log_map`."""
    real = reference[reference > 0]
    fake = generated[generated > 0]
    if real.size < nodes or fake.size < nodes:
        raise CaloforgeError("too few cells above threshold to fit the post-processing spline")
    levels = np.linspace(0.0, 1.0, nodes)
    x = np.quantile(np.log10(fake.astype(np.float64)), levels)
    y = np.quantile(np.log10(real.astype(np.float64)), levels)
    keep = np.concatenate([[True], np.diff(x) > 1e-9])
    return [x[keep].tolist(), y[keep].tolist()]


def layer_quantile_map_nodes(reference: np.ndarray, generated: np.ndarray,
                             layer_sizes: list[int], nodes: int = 64
                             ) -> list[list[list[float]] | None]:
    """:func:`quantile_map_nodes` for each layer of ``(N, n_voxels)`` showers (layers
    contiguous, ``layer_sizes`` voxels each): one ``[x, y]`` per layer, or None for a layer
    with fewer than ``nodes`` hits in either set (its spectrum then stays as it is)."""
    out: list[list[list[float]] | None] = []
    start = 0
    for size in layer_sizes:
        real, fake = reference[:, start:start + size], generated[:, start:start + size]
        start += size
        enough = min(np.count_nonzero(real > 0), np.count_nonzero(fake > 0)) >= nodes
        out.append(quantile_map_nodes(real, fake, nodes) if enough else None)
    return out


def group_quantile_map_nodes(reference: np.ndarray, generated: np.ndarray, groups: np.ndarray,
                             nodes: int = 32) -> list[list[list[float]] | None]:
    """:func:`quantile_map_nodes` for each group of voxels of ``(N, n_voxels)`` showers:
    ``groups`` ``(n_voxels,)`` holds each voxel's group (0 .. G-1, as for
    :func:`group_occupancy_cuts`); one ``[x, y]`` per group, or None for a group with fewer
    than ``nodes`` hits in either set (its spectrum then stays as it is)."""
    out: list[list[list[float]] | None] = []
    for group in range(int(groups.max()) + 1):
        members = groups == group
        real, fake = reference[:, members], generated[:, members]
        enough = min(np.count_nonzero(real > 0), np.count_nonzero(fake > 0)) >= nodes
        out.append(quantile_map_nodes(real, fake, nodes) if enough else None)
    return out


def lowest_hit(threshold_mev: float) -> float:
    """The least energy (MeV) a cell made a hit gets: just above the threshold, so that it
    stays a hit in float32 (float32(0.075) < 0.075) and under ``cells < threshold`` cuts."""
    return threshold_mev * (1 + 1e-6)


def rescale_hits(cells: torch.Tensor, goal: torch.Tensor, lowest: float) -> torch.Tensor:
    """``cells`` ``(..., K)`` (one part of a layer) with the hits along the last axis scaled
    by the one factor f that makes ``sum(max(f c, lowest))`` over them equal ``goal``
    ``(...)`` (hits held at ``lowest`` where scaling would put them under it; all at
    ``lowest`` where the goal is below that); empty cells stay empty.

    Exact: with the hits sorted largest first, the k largest scale and the rest are held,
    ``f_k = (goal - (n - k) lowest) / (sum of the k largest)``; the k-th largest stays at or
    above ``lowest`` (``c_k f_k >= lowest``) exactly for k up to the solution's (the sum is
    increasing in f), so the largest such k is the solution. The test allows 1e-6 of
    ``lowest`` for rounding: hits already at it would otherwise fail it both ways."""
    hits = cells > 0
    values = torch.where(hits, cells, torch.zeros_like(cells))
    ordered = values.sort(dim=-1, descending=True).values  # (..., K)
    n = hits.sum(-1, keepdim=True)  # (..., 1)
    k = torch.arange(1, cells.shape[-1] + 1, device=cells.device)  # (K,)
    factor = (goal[..., None] - (n - k) * lowest) / ordered.cumsum(-1).clamp(
        min=torch.finfo(cells.dtype).tiny)
    free = (k <= n) & (ordered * factor >= lowest * (1 - 1e-6))
    chosen = (free * k).argmax(-1, keepdim=True)  # the largest such k (index k - 1)
    f = torch.where(free.any(-1, keepdim=True), factor.gather(-1, chosen),
                    torch.zeros_like(goal[..., None]))
    return torch.where(hits, (cells * f).clamp(min=lowest), cells)


def piecewise_linear(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor
                     ) -> torch.Tensor:
    """``values`` ``(B, *G)`` through piecewise-linear maps of the nodes ``xs`` (strictly
    increasing), ``ys`` ``(*G, Q)`` (one map per trailing index ``G``, e.g. none or one per
    ring), constant beyond the ends. Torch operations that export to ONNX (no
    ``searchsorted``: the interval of a value is the count of nodes at or below it)."""
    interval = (xs[..., 1:-1] <= values[..., None]).sum(-1, keepdim=True)  # (B, *G, 1)
    def node(table: torch.Tensor, offset: int) -> torch.Tensor:
        return table.expand(*values.shape, table.shape[-1]).gather(-1, interval + offset)[..., 0]
    x0, x1, y0, y1 = node(xs, 0), node(xs, 1), node(ys, 0), node(ys, 1)
    width = x1 - x0
    # nodes a hair apart in float64 can meet in float32: such an interval is a step
    t = torch.where(width > 0, (values - x0) / torch.where(width > 0, width,
                                                           torch.ones_like(width)),
                    torch.zeros_like(values)).clamp(0, 1)
    return y0 + t * (y1 - y0)


def monotone_log_map(cells: torch.Tensor, x: list[float], y: list[float]) -> torch.Tensor:
    """Cells ``(...)`` MeV mapped through the monotone PCHIP interpolant of the nodes
    (``x``, ``y``) in log10 MeV (strictly increasing ``x``), linear with slope 1 beyond the
    ends; cells <= 0 stay as they are.

    Evaluated in torch operations that export to ONNX: the node slopes come from scipy's
    PCHIP (constants), the interval of each value from a binary search of log2(nodes)
    comparisons (ONNX has no ``searchsorted``), then the cubic Hermite polynomial."""
    slopes = _pchip_slopes(tuple(x), tuple(y))
    xs, ys, ds = (torch.tensor(values, dtype=cells.dtype, device=cells.device)
                  for values in (x, y, slopes))
    above = cells > 0
    logs = torch.log10(torch.where(above, cells, torch.ones_like(cells)))
    m = len(x) - 2  # interior nodes: the interval is the count of those <= the value
    interval = torch.zeros_like(logs, dtype=torch.long)
    step = 1 << max(m.bit_length() - 1, 0)
    while step >= 1 and m > 0:
        probe = interval + step
        inside = probe <= m
        fits = xs[1:-1][(probe - 1).clamp(0, m - 1)] <= logs
        interval = torch.where(inside & fits, probe, interval)
        step //= 2
    x0, x1 = xs[interval], xs[interval + 1]
    width = x1 - x0
    t = (logs - x0) / width
    t2, t3 = t * t, t * t * t
    hermite = ((2 * t3 - 3 * t2 + 1) * ys[interval] + (t3 - 2 * t2 + t) * width * ds[interval]
               + (3 * t2 - 2 * t3) * ys[interval + 1] + (t3 - t2) * width * ds[interval + 1])
    mapped = torch.where(logs < xs[0], logs + (ys[0] - xs[0]),
                         torch.where(logs > xs[-1], logs + (ys[-1] - xs[-1]), hermite))
    return torch.where(above, torch.pow(10.0, mapped), cells)


@functools.lru_cache(maxsize=8)
def _pchip_slopes(x: tuple[float, ...], y: tuple[float, ...]) -> list[float]:
    """scipy's PCHIP slopes at the nodes (once per node set: sampling calls the map for
    every layer of every shard)."""
    from scipy.interpolate import PchipInterpolator

    nodes = np.asarray(x, dtype=np.float64)
    return PchipInterpolator(nodes, np.asarray(y, dtype=np.float64)).derivative()(nodes).tolist()
