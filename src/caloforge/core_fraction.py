"""How much of each layer's energy a shower puts in its core, calibrated shower by shower.

A shower's core fraction in a layer (the share of the layer's energy in the cells within a
few cells of the axis) fluctuates from shower to shower, and it follows the shower's
development: on the ild-ecal reference, at fixed layer energy, a shower that has already
deposited more of its energy before the layer is broader there (correlation -0.5 to -0.6
in layers 14-17). The radial centre and width follow the core fraction, and so do their
correlations across layers (0.5-0.6 between neighbours in the data). Generative models can
get the layer energies, hit counts and mean profile right and still get this dependence
too weak (convolutional flows: -0.3 to -0.4; neighbours' radial centres 0.3); the
high-level classifier reads it (docs/convflow.md "The core's share of the layer").

:class:`CoreFractionMap` is fitted on data and on the model's own showers for the same
conditions. Per layer, ``t = logit(core fraction)`` is regressed on
``[1, v, v^2, F, F^2, u, u v]`` (``v = log(E_layer / MeV)``, ``F`` the share of the
shower's energy deposited before the layer, ``u = log(E_inc / GeV)``) in each of the two,
with the quantiles of the residuals; with ``hit_regressors``: ``layer`` also on ``[h,
h v]`` (``h = log(1 + n)``, ``n`` the layer's hits), ``parts`` on ``[h_c, h_r, h_c v, h_r
v]`` (the hits of the map's core and of the rest of its cells). Why the hits: at fixed
layer energy a shower with more hits is broader, and on the ild-ecal reference the layer's
hit count explains most of the core fraction's spread that the energies leave (R^2 of
logit(core fraction), the core within 2 cells: 0.28-0.63 -> 0.77-0.89 in layers 5-20); the
hit count is drawn before the maps (``hit_counts``) without seeing the profile, so without
this the maps leave the two independent (docs/convflow.md "Hits and the radial profile").
The parts' hits say more about a ring's split than the layer's (the data, layers 12-20,
each ring of ``profile`` out to 5 cells: R^2 0.35-0.71 with the layer's hits, 0.82-0.88
with the parts'): the energy then follows where the hits are. A generated layer's
residual under the model's regression is mapped, quantile to quantile (piecewise linear),
to a residual of the data's, and added to the data's prediction: the conditional
distribution becomes the data's, and a shower keeps its rank given its conditions. The
energy then moves between the core and the rest (each scaled by one factor, hits kept at
or above the readout threshold): the layer keeps its energy, its hits and, within the core
and within the rest, its pattern.

All applying is torch operations that export to ONNX (no ``searchsorted``: the interval of
a residual is the count of nodes at or below it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CaloforgeError, OptionError
from .geometry import Geometry
from .preprocessing import lowest_hit, piecewise_linear, rescale_hits

GEV_MEV = 1000.0
# the families' ``core_fraction`` option
CORE_FRACTIONS = ("none", "calibrated", "rings", "profile")
# the families' ``core_fraction_hits`` option: which hit counts the maps regress on, and
# how many regressors each adds to the energies' N_FEATURES
HIT_REGRESSORS = {"none": 0, "layer": 2, "parts": 4}
N_FEATURES = 7
MIN_SHOWERS_PER_LAYER = 50
LOGIT_CLIP = 1e-6  # fractions kept within [1e-6, 1 - 1e-6] before the logit


def core_cells(geometry: Geometry, radius: float) -> np.ndarray:
    """The voxel indices within a layer ``(K,)`` of the core: for square Cartesian images
    the cells whose centre lies within ``radius`` cells of the image's centre, for cylinders
    the first ``radius`` radial rows (every angular bin; ring ``i`` counts as ``i + 0.5``).
    The geometry's layers must share one image (:attr:`Geometry.uniform_layer_image`)."""
    image = geometry.uniform_layer_image
    if image is None:
        raise OptionError(f"{geometry.name}: a core needs layers of one image shape")
    kind, (height, width) = image
    rows, columns = np.divmod(np.arange(height * width), width)
    if kind == "cylindrical":  # (angular bin, radial bin), the radial index fastest
        distance = columns + 0.5
    else:
        distance = np.hypot(rows - (height - 1) / 2, columns - (width - 1) / 2)
    return np.flatnonzero(distance < radius)


def hit_regressors_option(value: Any) -> Any:
    """``core_fraction_hits`` as saved before it named its counts (true / false, the
    layer's hits or none) -> ``layer`` / ``none``; anything else as it is."""
    if isinstance(value, bool):
        return "layer" if value else "none"
    return value


def check_core_fraction_options(kind: str, radius: float, hits: str = "none") -> None:
    """Refuse (OptionError) a family's ``core_fraction`` option not in
    :data:`CORE_FRACTIONS`, a ``core_fraction_radius`` (cells) that is not positive, or a
    ``core_fraction_hits`` not in :data:`HIT_REGRESSORS` or without maps."""
    if kind not in CORE_FRACTIONS:
        raise OptionError(f"core_fraction must be one of {', '.join(CORE_FRACTIONS)}, got "
                          f"{kind!r}")
    if not radius > 0:
        raise OptionError(f"core_fraction_radius must be > 0 (cells), got {radius}")
    if hits not in HIT_REGRESSORS:
        raise OptionError(f"core_fraction_hits must be one of {', '.join(HIT_REGRESSORS)}, "
                          f"got {hits!r}")
    if hits != "none" and kind == "none":
        raise OptionError("core_fraction_hits needs core_fraction maps (calibrated, rings or "
                          "profile), got core_fraction: none")


def profile_radii(geometry: Geometry) -> list[float]:
    """The radii (cells) of ``core_fraction: profile``: 1, 2, ... up to the last that
    leaves a cell outside (cylinders: each radial row; square images: the bands one cell
    wide out to the corners)."""
    image = geometry.uniform_layer_image
    if image is None:
        raise OptionError(f"{geometry.name}: a core needs layers of one image shape")
    kind, (height, width) = image
    if kind == "cylindrical":
        outermost = width
    else:
        outermost = int(np.ceil(np.hypot((height - 1) / 2, (width - 1) / 2)))
    return [float(r) for r in range(1, outermost)
            if 0 < len(core_cells(geometry, r)) < height * width]


def ring_radii(radius: float) -> list[float]:
    """The cores of ``core_fraction: rings`` out to ``radius`` (cells): 1, 2, ... below it,
    then ``radius`` itself (2 -> [1, 2]; 2.5 -> [1, 2, 2.5])."""
    return [float(r) for r in range(1, int(np.ceil(radius)))] + [float(radius)]


def fit_core_fraction_maps(real: np.ndarray, real_incident: np.ndarray, generated: np.ndarray,
                           generated_incident: np.ndarray, cores: list[np.ndarray],
                           threshold_mev: float,
                           withins: list[np.ndarray | None] | None = None,
                           hit_regressors: str = "none"
                           ) -> tuple[list[CoreFractionMap], np.ndarray]:
    """One :class:`CoreFractionMap` per core in ``cores`` (voxel indices within a layer),
    applied in that order: each fitted on ``generated`` ``(M, L, S)`` MeV as the maps before
    it leave them, against ``real`` ``(N, L, S)`` MeV (E_inc ``(N,)``, ``(M,)`` MeV).
    Returns the maps and ``generated`` with all of them applied.

    Why a chain (``core_fraction: rings``): one map sets the share of one core and scales
    the cells inside it by one factor; a second map for a wider core then sets that share
    and scales the first core with its ring, keeping their ratio, so the innermost share
    and the next ring's both follow the data, nearly: the second map rescales what the first
    set. ``withins`` (one per core; None: the whole layer) confine each map to those cells,
    the rest of the layer untouched: ``profile`` passes the cores from the outside in, each
    within the next ring, so that no map undoes another. ``hit_regressors``: every map
    also regresses on hit counts (``layer`` / ``parts``, module docstring)."""
    maps: list[CoreFractionMap] = []
    mapped = generated
    for core, within in zip(cores, withins or [None] * len(cores)):
        fraction_map = CoreFractionMap.fit(real, real_incident, mapped, generated_incident,
                                           core, threshold_mev, within=within,
                                           hit_regressors=hit_regressors)
        maps.append(fraction_map)
        # as generation will apply them: a nested chain all over again (it differs from one
        # map after the other), any other chain one map more
        mapped = (apply_maps_to_layers(maps, generated, generated_incident)
                  if is_nested_chain(maps) else fraction_map.apply_layers(mapped,
                                                                          generated_incident))
    return maps, mapped


def fit_option_maps(geometry: Geometry, kind: str, radius: float, real: np.ndarray,
                    real_incident: np.ndarray, generated: np.ndarray,
                    generated_incident: np.ndarray, threshold_mev: float,
                    hit_regressors: str = "none"
                    ) -> tuple[list[CoreFractionMap], np.ndarray]:
    """The maps of a family's ``core_fraction`` option ``kind`` (``calibrated``: one core of
    ``radius`` cells; ``rings``: :func:`ring_radii`; ``profile``: the whole radial profile,
    each core of :func:`profile_radii` within the next, from the outside in; ``radius`` not
    used) fitted as in :func:`fit_core_fraction_maps` on layers ``(N, L, S)`` / ``(M, L,
    S)`` MeV; a radius that leaves no cell in the core, or none outside it, is refused
    (OptionError). ``hit_regressors``: the option ``core_fraction_hits`` (module
    docstring)."""
    if kind == "profile":
        radii = profile_radii(geometry)
        outer = [core_cells(geometry, r) for r in radii[1:]] + [None]
        cores = [core_cells(geometry, r) for r in radii]
        return fit_core_fraction_maps(real, real_incident, generated, generated_incident,
                                      cores[::-1], threshold_mev, withins=outer[::-1],
                                      hit_regressors=hit_regressors)
    radii = ring_radii(radius) if kind == "rings" else [radius]
    cores = [core_cells(geometry, r) for r in radii]
    for r, core in zip(radii, cores):
        if not len(core) or len(core) == real.shape[-1]:
            raise OptionError(f"core_fraction_radius {r:g} leaves "
                              f"{'no' if not len(core) else 'every'} cell in the core")
    return fit_core_fraction_maps(real, real_incident, generated, generated_incident, cores,
                                  threshold_mev, hit_regressors=hit_regressors)


def core_fraction_maps_from_state(state: dict[str, Any]) -> list[CoreFractionMap] | None:
    """A family's saved maps: ``state["core_fraction_maps"]`` (a list of map states), or a
    single ``"core_fraction_map"`` (convflow files saved before ``rings``); None when the
    state has neither (saved before ``core_fraction``)."""
    if "core_fraction_map" in state and "core_fraction_maps" not in state:
        single = state["core_fraction_map"]
        return None if single is None else [CoreFractionMap.from_state(single)]
    maps = state.get("core_fraction_maps")
    if maps is None:
        return None
    if not isinstance(maps, list):
        raise CaloforgeError("core fraction maps state is not a list")
    return [CoreFractionMap.from_state(fraction) for fraction in maps]


def fraction_features(layer_energy: torch.Tensor, before_share: torch.Tensor,
                      incident_energies: torch.Tensor,
                      hit_counts: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Regressors ``(B, 7)`` of a layer's core fraction: ``[1, v, v^2, F, F^2, u, u v]``
    from its energy ``(B,)`` MeV, the share ``F`` ``(B,)`` of the shower's energy before
    it, and E_inc ``(B,)`` MeV (module docstring); given hit counts (each ``(B,)``: the
    layer's, or the core's and the rest's), ``[h, h v]`` (``h = log(1 + hits)``) appended
    for each: ``(B, 7 + 2 len(hit_counts))`` ordered ``[.., h_1, h_2, .., h_1 v, h_2 v,
    ..]``."""
    v = torch.log(layer_energy.clamp(min=torch.finfo(layer_energy.dtype).tiny))
    u = torch.log(incident_energies.to(v.dtype) / GEV_MEV)
    f = before_share.to(v.dtype)
    columns = [torch.ones_like(v), v, v * v, f, f * f, u, u * v]
    # log(1 + x), not log1p: the maps run inside exported graphs
    hits = [torch.log(1 + counts.to(v.dtype)) for counts in hit_counts]
    columns += hits + [h * v for h in hits]
    return torch.stack(columns, dim=1)


def chosen_hit_counts(kind: str, layer_hits: torch.Tensor, core_hits: torch.Tensor,
                      rest_hits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The hit counts (each ``(B, ...)``) that ``hit_regressors`` ``kind`` regresses on:
    none, the layer's, or the core's and the rest's."""
    return {"none": (), "layer": (layer_hits,), "parts": (core_hits, rest_hits)}[kind]


def shares_before(layer_energies: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: each layer's share of the shower's energy deposited in the layers before
    it, from the layer energies ``(B, L)`` MeV (0 for an empty shower)."""
    before = layer_energies.cumsum(1) - layer_energies
    total = layer_energies.sum(1, keepdim=True)
    return before / total.clamp(min=torch.finfo(layer_energies.dtype).tiny)


@dataclass
class CoreFractionMap:
    """The fitted maps (module docstring); plain lists, saved as JSON.

    ``core``: the voxel indices within a layer of the core cells; ``within``: the cells the
    map acts on (the core among them; None: the whole layer, the fraction the core's share
    of the layer); ``threshold_mev``: the readout threshold (hits stay at or above it); per
    layer (None where either sample had
    fewer than 50 showers with hits in both the core and the rest: left as it is):
    ``model_coefficients`` / ``data_coefficients`` ``(7,)`` of the regressions and
    ``model_residuals`` / ``data_residuals`` ``(Q,)`` the residuals' quantiles at evenly
    spaced levels (the model's strictly increasing); ``hit_regressors``: the hit counts the
    regressions also take (:data:`HIT_REGRESSORS`: ``none``, the ``layer``'s (coefficients
    ``(9,)``), the ``parts``' (``(11,)``); maps saved before it: none, saved with a switch:
    true for the layer's)."""

    core: list[int]
    threshold_mev: float
    model_coefficients: list[list[float] | None]
    data_coefficients: list[list[float] | None]
    model_residuals: list[list[float] | None]
    data_residuals: list[list[float] | None]
    within: list[int] | None = None
    hit_regressors: str = "none"
    # per layer size: the column order (core, rest within, outside) and its two cut points;
    # apply runs per layer, map and batch, so it is worked out once
    _orders: dict[int, tuple[np.ndarray, int, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # per (layer, dtype, device): the coefficient and quantile tensors
    _tensors: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # nested chains starting with this map: per (maps, layer size) the parts' gather table
    _chains: dict[tuple[Any, int], tuple[Any, tuple[np.ndarray, np.ndarray] | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    FIELDS = ("core", "threshold_mev", "model_coefficients", "data_coefficients",
              "model_residuals", "data_residuals")

    def state(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.FIELDS}, "within": self.within,
                "hit_regressors": self.hit_regressors}

    @property
    def n_features(self) -> int:
        """The number of regressors (:func:`fraction_features`)."""
        return N_FEATURES + HIT_REGRESSORS[self.hit_regressors]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CoreFractionMap:
        def floats(rows: Any) -> list[list[float] | None]:
            return [None if row is None else [float(v) for v in row] for row in rows]

        try:
            within = state.get("within")  # saved before profile: absent (the whole layer)
            # absent: saved before it; true / false: saved when it was a switch
            hit_regressors = hit_regressors_option(state.get("hit_regressors", "none"))
            if hit_regressors not in HIT_REGRESSORS:
                raise TypeError(f"hit_regressors is {hit_regressors!r}, not one of "
                                f"{', '.join(HIT_REGRESSORS)}")
            out = cls(core=[int(i) for i in state["core"]],
                      threshold_mev=float(state["threshold_mev"]),
                      within=None if within is None else [int(i) for i in within],
                      hit_regressors=hit_regressors,
                      **{name: floats(state[name]) for name in cls.FIELDS[2:]})
        except (KeyError, TypeError, ValueError) as error:
            raise CaloforgeError(f"core fraction map state is malformed ({error})") from None
        rows = [getattr(out, name) for name in cls.FIELDS[2:]]
        if not out.core or min(out.core) < 0 or len({len(r) for r in rows}) != 1:
            raise CaloforgeError("core fraction map state has inconsistent shapes")
        if out.within is not None and not set(out.core) < set(out.within):
            raise CaloforgeError("core fraction map state has a core not inside its cells")
        for layer in zip(*rows):
            if all(row is None for row in layer):
                continue
            model_beta, data_beta, model_q, data_q = layer
            if (model_beta is None or data_beta is None or model_q is None or data_q is None
                    or len(model_beta) != out.n_features or len(data_beta) != out.n_features
                    or len(model_q) != len(data_q) or len(model_q) < 2):
                raise CaloforgeError("core fraction map state has inconsistent shapes")
            if np.any(np.diff(model_q) <= 0):
                raise CaloforgeError("core fraction map state has model residual quantiles "
                                     "that are not strictly increasing")
        return out

    @classmethod
    def fit(cls, real: np.ndarray, real_incident: np.ndarray, generated: np.ndarray,
            generated_incident: np.ndarray, core: np.ndarray, threshold_mev: float,
            n_quantiles: int = 21, within: np.ndarray | None = None,
            hit_regressors: str = "none") -> CoreFractionMap:
        """Fit from ``real`` ``(N, L, S)`` and ``generated`` ``(M, L, S)`` layers (MeV, cells
        in the same order; generated for comparable conditions) with their E_inc ``(N,)``,
        ``(M,)`` MeV and the core's voxel indices ``core`` within a layer. Only showers with
        hits in both the core and the rest of a layer count (the others are left as they
        are when applied). ``within``: the cells the map acts on; ``hit_regressors``: also
        regress on these hit counts (class docstring)."""
        core_mask, within_mask = _masks(real.shape[-1], core, within)
        levels = np.linspace(0, 1, n_quantiles)
        fitted: dict[str, list[list[float] | None]] = {name: [] for name in cls.FIELDS[2:]}
        samples = {"model": _regression_inputs(generated, generated_incident, core_mask,
                                               within_mask, threshold_mev, hit_regressors),
                   "data": _regression_inputs(real, real_incident, core_mask, within_mask,
                                              threshold_mev, hit_regressors)}
        for layer in range(real.shape[1]):
            results = {}
            for kind, (features, logits, ok) in samples.items():
                chosen = ok[:, layer]
                if chosen.sum() < MIN_SHOWERS_PER_LAYER:
                    break
                x, t = features[chosen, layer], logits[chosen, layer]
                beta = np.linalg.lstsq(x, t, rcond=None)[0]
                results[kind] = (beta, np.quantile(t - x @ beta, levels))
            if len(results) < 2:
                for name in fitted:
                    fitted[name].append(None)
                continue
            model_q = results["model"][1]
            # ties (many equal residuals) would make the map a step: nudge them apart
            model_q = np.maximum.accumulate(model_q + 1e-9 * np.arange(n_quantiles))
            fitted["model_coefficients"].append(results["model"][0].tolist())
            fitted["data_coefficients"].append(results["data"][0].tolist())
            fitted["model_residuals"].append(model_q.tolist())
            fitted["data_residuals"].append(results["data"][1].tolist())
        return cls(core=[int(i) for i in np.asarray(core)], threshold_mev=float(threshold_mev),
                   within=None if within is None else [int(i) for i in np.asarray(within)],
                   hit_regressors=hit_regressors, **fitted)

    def _column_order(self, n_cells: int) -> tuple[np.ndarray, int, int]:
        """The cells of a layer of ``n_cells`` ordered core, rest within, outside ``(S,)``,
        with the core's count and the within cells' count."""
        if n_cells not in self._orders:
            core_mask, within_mask = _masks(n_cells, self.core, self.within)
            order = np.r_[np.flatnonzero(core_mask), np.flatnonzero(within_mask & ~core_mask),
                          np.flatnonzero(~within_mask)]
            self._orders[n_cells] = (order, int(core_mask.sum()), int(within_mask.sum()))
        return self._orders[n_cells]

    def apply_layers(self, layers: np.ndarray, incident_energies: np.ndarray) -> np.ndarray:
        """Every layer of showers ``(N, L, S)`` MeV mapped (:meth:`apply`), with their E_inc
        ``(N,)`` MeV; the layer energies are their own sums (the map keeps them)."""
        return apply_maps_to_layers([self], layers, incident_energies)

    def apply(self, cells: torch.Tensor, layer: int, incident_energies: torch.Tensor,
              layer_energies: torch.Tensor) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV with each shower's core fraction mapped (where
        the shower has hits in both the core and the rest; others unchanged), given E_inc
        ``(B,)`` MeV and every layer's energy ``(B, L)`` MeV (for the share before this
        layer); the layer's energy and hits are kept, and the cells outside ``within``."""
        if self.model_coefficients[layer] is None:
            return cells
        device = cells.device
        # the core's and the rest's columns (constants: exported graphs gather them)
        order, n_core, n_within = self._column_order(cells.shape[1])
        core_cells_now = cells[:, torch.as_tensor(order[:n_core], device=device)]
        rest_cells_now = cells[:, torch.as_tensor(order[n_core:n_within], device=device)]
        outside_now = cells[:, torch.as_tensor(order[n_within:], device=device)]
        core_energy = core_cells_now.sum(1)
        energy = core_energy + rest_cells_now.sum(1)
        core_hits, rest_hits = (core_cells_now > 0).sum(1), (rest_cells_now > 0).sum(1)
        fraction = core_energy / energy.clamp(min=torch.finfo(cells.dtype).tiny)
        before = shares_before(layer_energies.to(cells.dtype))[:, layer]
        target, movable = self.core_share(energy, fraction, core_hits, rest_hits, layer,
                                          incident_energies, before, (cells > 0).sum(1))
        lowest = lowest_hit(self.threshold_mev)
        new_core = rescale_hits(core_cells_now, target * energy, lowest)
        # the rest takes what the core did not (the core's hits may be held at the threshold)
        new_rest = rescale_hits(rest_cells_now, energy - new_core.sum(1), lowest)
        back = torch.as_tensor(np.argsort(order), device=device)
        rescaled = torch.cat([new_core, new_rest, outside_now], dim=1)[:, back]
        return torch.where(movable[:, None], rescaled, cells)

    def core_share(self, energy: torch.Tensor, fraction: torch.Tensor, core_hits: torch.Tensor,
                   rest_hits: torch.Tensor, layer: int, incident_energies: torch.Tensor,
                   before_share: torch.Tensor, layer_hits: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mapped core fraction ``(B,)`` of the energy within the map's cells, given that
        energy ``(B,)`` MeV, its core fraction now ``(B,)``, the core's and the rest's hit
        counts ``(B,)``, E_inc ``(B,)`` MeV, the share of the shower's energy before the
        layer ``(B,)`` and the whole layer's hit count ``(B,)``; bounded so that each part
        keeps its hits at or above the threshold. With it, whether the shower is mapped at
        all ``(B,)`` (hits in both parts)."""
        dtype, device = energy.dtype, energy.device
        key = (layer, dtype, device)
        if key not in self._tensors:
            self._tensors[key] = tuple(
                torch.tensor(getattr(self, name)[layer], dtype=dtype, device=device)
                for name in self.FIELDS[2:])
        model_beta, data_beta, model_q, data_q = self._tensors[key]
        tiny = torch.finfo(dtype).tiny
        features = fraction_features(energy, before_share, incident_energies,
                                     chosen_hit_counts(self.hit_regressors, layer_hits,
                                                       core_hits, rest_hits))
        clipped = fraction.clamp(LOGIT_CLIP, 1 - LOGIT_CLIP)
        residual = torch.log(clipped / (1 - clipped)) - features @ model_beta
        target = torch.sigmoid(features @ data_beta + piecewise_linear(residual, model_q, data_q))
        lowest = lowest_hit(self.threshold_mev)
        target = torch.minimum(torch.maximum(target, core_hits * lowest / energy.clamp(min=tiny)),
                               1 - rest_hits * lowest / energy.clamp(min=tiny))
        return target, (core_hits > 0) & (rest_hits > 0)


def is_nested_chain(maps: list[CoreFractionMap]) -> bool:
    """Whether each map acts within the previous map's core (``core_fraction: profile``:
    the cores from the outside in), so that :func:`apply_core_fraction_maps` can set every
    ring's energy first and rescale each ring once."""
    return len(maps) > 1 and all(
        inner.within is not None and sorted(inner.within) == sorted(outer.core)
        for outer, inner in zip(maps, maps[1:]))


def apply_core_fraction_maps(maps: list[CoreFractionMap], cells: torch.Tensor, layer: int,
                             incident_energies: torch.Tensor, layer_energies: torch.Tensor
                             ) -> torch.Tensor:
    """One layer's cells ``(B, S)`` MeV through ``maps`` in order (E_inc ``(B,)`` MeV, every
    layer's energy ``(B, L)`` MeV), as the families apply them at generation.

    A nested chain (:func:`is_nested_chain`) is applied ring by ring: each map, from the
    outside in, splits the energy its predecessor gave its cells between its core and its
    ring (the core fraction is the cells' own, which a common scale of the core leaves as it
    is), and at the end every ring, and the innermost core, is rescaled once to its energy.
    One map after the other would sort each core again at every map inside it (20 maps on
    ild-ecal at batch 100: 17.6 against 5.2 ms per shower, bench/time_core_fraction_maps.py).
    The two agree wherever no hit is held at the threshold by an intermediate scale (test)."""
    chain = _nested_parts(maps, cells.shape[1]) if maps else None
    if chain is None:
        for fraction_map in maps:
            cells = fraction_map.apply(cells, layer, incident_energies, layer_energies)
        return cells
    table, back = chain
    device, dtype = cells.device, cells.dtype
    # every part as one row of a padded table (B, n + 1, K): the pad is an empty cell,
    # which the sums, the hit counts and rescale_hits all pass over
    padded = torch.cat([cells, torch.zeros_like(cells[:, :1])], dim=1)[
        :, torch.as_tensor(table, device=device)]
    sums, hits = padded.sum(-1), (padded > 0).sum(-1)  # (B, n + 1)
    # within map i's core: the parts after its ring (a reversed cumulative sum)
    core_sums = sums.flip(1).cumsum(1).flip(1)[:, 1:]  # (B, n)
    core_hits = hits.flip(1).cumsum(1).flip(1)[:, 1:]
    before = shares_before(layer_energies.to(dtype))[:, layer]
    layer_hits = (cells > 0).sum(1)
    tiny = torch.finfo(dtype).tiny
    energy = sums[:, 0] + core_sums[:, 0]  # what the first map acts on
    goals = []
    for i, fraction_map in enumerate(maps):
        fraction = core_sums[:, i] / (sums[:, i] + core_sums[:, i]).clamp(min=tiny)
        core_energy = fraction * energy  # a common scale keeps the fraction
        if fraction_map.model_coefficients[layer] is not None:
            target, movable = fraction_map.core_share(
                energy, fraction, core_hits[:, i], hits[:, i], layer, incident_energies, before,
                layer_hits)
            core_energy = torch.where(movable, target * energy, core_energy)
        goals.append(energy - core_energy)
        energy = core_energy
    goals.append(energy)
    rescaled = rescale_hits(padded, torch.stack(goals, dim=1), lowest_hit(maps[0].threshold_mev))
    # one gather puts every cell back in its place (the cells outside the first map's stay)
    return torch.cat([rescaled.flatten(1), cells], dim=1)[:, torch.as_tensor(back, device=device)]


def _nested_parts(maps: list[CoreFractionMap], n_cells: int
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """For a nested chain (:func:`is_nested_chain`; else None) on layers of ``n_cells``: the
    gather table ``(n + 1, K)`` of each map's ring (its cells less its core, from the
    outside in) and of the innermost core, padded with ``n_cells`` (an appended empty cell);
    and for each cell its place ``(S,)`` in the rows of the table flattened and followed by
    the layer (the outside cells'). Worked out once per list of maps and layer size (it
    runs per layer and batch)."""
    # keyed by identity; the entry holds the maps, so that no id is reused while it lives
    key = (tuple(id(fraction_map) for fraction_map in maps), n_cells)
    if key in maps[0]._chains:
        return maps[0]._chains[key][1]
    chain = None
    if is_nested_chain(maps):
        parts = []
        for fraction_map in maps:
            core_mask, within_mask = _masks(n_cells, fraction_map.core, fraction_map.within)
            parts.append(np.flatnonzero(within_mask & ~core_mask))
        parts.append(np.asarray(maps[-1].core))
        width = max(len(part) for part in parts)
        table = np.full((len(parts), width), n_cells)
        back = np.arange(n_cells) + table.size  # outside the chain: the cell itself
        for row, part in enumerate(parts):
            table[row, :len(part)] = part
            back[part] = row * width + np.arange(len(part))
        chain = (table, back)
    maps[0]._chains[key] = (tuple(maps), chain)
    return chain


def apply_maps_to_layers(maps: list[CoreFractionMap], layers: np.ndarray,
                         incident_energies: np.ndarray) -> np.ndarray:
    """Every layer of showers ``(N, L, S)`` MeV through ``maps``
    (:func:`apply_core_fraction_maps`), with their E_inc ``(N,)`` MeV; the layer energies
    are their own sums (the maps keep them)."""
    cells = torch.from_numpy(np.ascontiguousarray(layers))
    incident = torch.as_tensor(np.asarray(incident_energies).reshape(-1), dtype=cells.dtype)
    energies = cells.sum(-1)
    return torch.stack([apply_core_fraction_maps(maps, cells[:, layer], layer, incident,
                                                 energies)
                        for layer in range(cells.shape[1])], dim=1).numpy()


def _masks(n_cells: int, core: Any, within: Any) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(S,)`` of the core's cells and of the cells a map acts on (every
    cell where ``within`` is None)."""
    core_mask = np.zeros(n_cells, dtype=bool)
    core_mask[np.asarray(core)] = True
    within_mask = np.ones(n_cells, dtype=bool)
    if within is not None:
        within_mask = np.zeros(n_cells, dtype=bool)
        within_mask[np.asarray(within)] = True
    return core_mask, within_mask


def _regression_inputs(layers: np.ndarray, incident_energies: np.ndarray, core: np.ndarray,
                       within: np.ndarray, threshold_mev: float, hit_regressors: str = "none"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For showers ``(N, L, S)`` MeV and their E_inc ``(N,)`` MeV: the regressors
    ``(N, L, 7 + k)`` (of the energy within ``within``; ``k`` for the hit counts
    ``hit_regressors`` names, :data:`HIT_REGRESSORS`), the logits of the core fractions of
    that energy ``(N, L)`` and whether the core and the rest of ``within`` both have hits
    ``(N, L)``; ``core`` and ``within`` are boolean masks ``(S,)``."""
    hits = np.where(layers >= threshold_mev, layers, 0).astype(np.float64)
    layer_energies = torch.as_tensor(hits.sum(-1))
    before = shares_before(layer_energies)
    energy = hits[..., within].sum(-1)
    fraction = hits[..., core].sum(-1) / np.maximum(energy, 1e-300)
    core_hits = torch.as_tensor((hits[..., core] > 0).sum(-1))
    rest_hits = torch.as_tensor((hits[..., within & ~core] > 0).sum(-1))
    ok = np.asarray((core_hits > 0) & (rest_hits > 0))
    energies = torch.as_tensor(energy)
    incident = torch.as_tensor(np.asarray(incident_energies, dtype=np.float64).reshape(-1))
    counts = chosen_hit_counts(hit_regressors, torch.as_tensor((hits > 0).sum(-1)), core_hits,
                               rest_hits)
    features = torch.stack([fraction_features(energies[:, layer], before[:, layer], incident,
                                              tuple(c[:, layer] for c in counts))
                            for layer in range(layers.shape[1])], dim=1).numpy()
    clipped = np.clip(fraction, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return features, np.log(clipped / (1 - clipped)), ok


__all__ = ["CoreFractionMap", "apply_core_fraction_maps", "apply_maps_to_layers",
           "fraction_features", "shares_before"]
