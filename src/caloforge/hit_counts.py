"""How many cells of each layer a shower hits, drawn given its energies.

A calorimeter shower's number of hit cells per layer (cells at or above the readout
threshold), and per radial band of a layer, follows its energies closely: on the ild-ecal
reference the halo's hits at fixed E_inc correlate 0.82-0.88 with the deposit, and
neighbouring layers' counts with each other. Generative models that draw every cell
independently of a count get the mean right after calibration but not these correlations;
the classifier reads them from the sparsity, the widths and the radial centres
(docs/convflow.md "Hits per layer").

:class:`HitCountModel` is fitted on data alone, then draws a count per group of cells
(each group within one layer ``l(g)``: a layer, or a radial band of it) for any conditions:

* ``t_g = log(1 + n_g) - log(1 + S_g - n_g)`` (``S_g`` the group's cells; ``log(1 + n_g)``
  for models fitted before the sizes were kept) is regressed, group by group, on
  ``[1, u, u^2, v_0 .. v_{L-1}, log(1 + sum_j D_j), v_l(g)^2, u v_l(g)]`` with
  ``u = log(E_inc / GeV)`` and ``v_j = log(1 + D_j / MeV)`` (``D_j`` the layer deposits):
  every layer's deposit, because a layer's count also follows its neighbours';
* each group's residual is drawn from its empirical quantiles within ``n_bins`` bins of
  the prediction (the spread shrinks as the count grows);
* the groups' residuals are tied by a Gaussian copula: the correlation of their normal
  scores (ranks within each bin).

On 5,000 ild-ecal showers, counts drawn for 3,000 held-out showers' energies were told
from the real ones with AUC 0.61 (gradient-boosted trees on E_inc, the 30 deposits and the
30 counts; 0.83 with the own layer's deposit alone and 0.93 with Gaussian residuals).

All drawing is torch (exported graphs draw the same counts from the same noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import ndtri

from .errors import CaloforgeError, OptionError
from .geometry import Geometry
from .preprocessing import lowest_hit

GEV_MEV = 1000.0
HIT_COUNTS = ("none", "layer", "band", "core-band")
# hit_counts: band / core-band: the inner edges of the radial bands, in cells from the
# layer's centre (square images) or in radial rows (cylinders). core-band splits the first
# band at 1 cell: on ild-ecal the flows put the first band's hits in its outer ring, not in
# the 4 central cells (layer 3: 2.79 of those hit against 3.51 in the data, none of them in
# 7.8 % of showers against 0.8 %), and the layer's hottest cell then holds too much of it
COUNT_BAND_EDGES = {"band": (2, 4, 6, 9, 14), "core-band": (1, 2, 4, 6, 9, 14)}


def check_count_options(kind: str, showers: int) -> None:
    """Refuse (OptionError) a family's ``hit_counts`` option not in :data:`HIT_COUNTS` or
    ``hit_count_showers`` under 200 (the count model needs 20 showers per bin)."""
    if kind not in HIT_COUNTS:
        raise OptionError(f"hit_counts must be one of {', '.join(HIT_COUNTS)}, got {kind!r}")
    if showers < 200:
        raise OptionError(f"hit_count_showers must be >= 200, got {showers}")


def count_bands(geometry: Geometry, kind: str) -> np.ndarray:
    """Each cell's count group within a layer ``(S,)`` for ``hit_counts`` ``kind``: all 0
    for ``layer``; for ``band`` / ``core-band`` its radial band (:data:`COUNT_BAND_EDGES`;
    the cell centre's distance in cells from a square image's centre, or the radial row of a
    cylinder), numbered from the centre out, without empty bands. The geometry's layers
    must share one image (:attr:`Geometry.uniform_layer_image`)."""
    image = geometry.uniform_layer_image
    if image is None:
        raise OptionError(f"{geometry.name}: hit counts need layers of one image shape")
    layer_kind, (height, width) = image
    if kind not in COUNT_BAND_EDGES:
        return np.zeros(height * width, dtype=np.int64)
    rows, columns = np.divmod(np.arange(height * width), width)
    if layer_kind == "cylindrical":  # (angular bin, radial bin), the radial index fastest
        rings = columns.astype(np.float64)
    else:
        rings = np.hypot(rows - (height - 1) / 2, columns - (width - 1) / 2)
    return np.unique(np.digitize(rings, COUNT_BAND_EDGES[kind]), return_inverse=True)[1].ravel()


def fit_layer_counts(showers: np.ndarray, incident_energies: np.ndarray, bands: np.ndarray,
                     threshold_mev: float) -> HitCountModel:
    """The count model of ``showers`` ``(N, L, S)`` MeV: hits per layer and band (``bands``
    ``(S,)``, :func:`count_bands`; the innermost band of a layer with a deposit has at
    least one), given the layer deposits (cells at or above ``threshold_mev``) and E_inc
    ``(N,)`` MeV."""
    n_showers, n_layers = showers.shape[:2]
    hits = showers >= threshold_mev
    n_bands = int(bands.max()) + 1
    counts = np.stack([hits[:, :, bands == band].sum(-1) for band in range(n_bands)],
                      axis=-1)  # (N, L, n_bands)
    return HitCountModel.fit(
        counts.reshape(n_showers, -1), np.where(hits, showers, 0).sum(-1, dtype=np.float64),
        np.asarray(incident_energies, dtype=np.float64).reshape(-1),
        group_layers=np.repeat(np.arange(n_layers), n_bands).tolist(),
        at_least_one=np.tile(np.arange(n_bands) == 0, n_layers).tolist(),
        group_sizes=np.tile(np.bincount(bands, minlength=n_bands), n_layers).tolist())


def counted_cells(cells: torch.Tensor, cuts: torch.Tensor, counts: torch.Tensor,
                  bands: np.ndarray, threshold_mev: float) -> torch.Tensor:
    """One layer's cells ``(B, S)`` MeV (those under the readout threshold with their
    values) with ``counts`` ``(B, n_bands)`` hits in each band (``bands`` ``(S,)``, see
    :func:`count_bands`): the cells of the band with the highest cell / cut (``cuts``
    ``(S,)`` or ``(B, S)`` MeV), none for a count of 0; the layer keeps its deposit (the
    energy of its cells at or above the threshold), in proportion.

    Cells under the threshold are candidates too, ranked by the same cell / cut: where the
    model drew fewer hits in a band than the count, its highest faint cells become hits, at
    the threshold plus a tenth of their value (their order kept for a spline after)."""
    scores = cells.clamp(min=0) / cuts
    kept_scores = torch.zeros_like(cells)
    for band in range(counts.shape[1]):
        members = torch.as_tensor(np.flatnonzero(bands == band), device=cells.device)
        ranked = scores[:, members].sort(dim=1, descending=True).values
        count = counts[:, band]
        last = (count.long() - 1).clamp(min=0, max=len(members) - 1)
        kept = ranked.gather(1, last[:, None])  # (B, 1): the band's lowest score kept
        kept = torch.where(count[:, None] > 0, kept, torch.full_like(kept, float("inf")))
        kept_scores[:, members] = kept.expand(-1, len(members))
    # just under the kept score: cells / cuts * cuts can round above the cell
    keep = (scores >= kept_scores * (1 - 1e-6)) & (cells > 0)
    values = torch.where(cells >= threshold_mev, cells, threshold_mev + 0.1 * cells.clamp(min=0))
    kept_cells = torch.where(keep, values, torch.zeros_like(values))
    deposit = torch.where(cells >= threshold_mev, cells, torch.zeros_like(cells)).sum(1)
    total = kept_cells.sum(1)
    scale = torch.where(total > 0, deposit / total.clamp(min=torch.finfo(total.dtype).tiny),
                        torch.zeros_like(total))
    kept_cells = kept_cells * scale[:, None]
    return torch.where(kept_cells > 0, kept_cells.clamp(min=lowest_hit(threshold_mev)),
                       kept_cells)


def count_features(incident_energies: torch.Tensor, deposits: torch.Tensor,
                   group_layers: list[int]) -> torch.Tensor:
    """Regressors ``(B, G, L + 6)`` of every group's count from E_inc ``(B,)`` MeV and the
    layer deposits ``(B, L)`` MeV, group g lying in layer ``group_layers[g]`` (order in the
    module docstring)."""
    u = torch.log(incident_energies.to(deposits.dtype) / GEV_MEV)[:, None]
    # log(1 + x), not log1p: ONNX has no log1p or expm1 (exported graphs draw the counts)
    v = torch.log(1 + deposits.clamp(min=0))
    total = torch.log(1 + deposits.clamp(min=0).sum(1, keepdim=True))
    shared = torch.cat([torch.ones_like(u), u, u * u, v, total], dim=1)  # (B, L + 4)
    own = v[:, group_layers]  # (B, G)
    own = torch.stack([own * own, u * own], dim=-1)  # (B, G, 2)
    return torch.cat([shared[:, None].expand(-1, len(group_layers), -1), own], dim=-1)


@dataclass
class HitCountModel:
    """The fitted count model (module docstring); plain lists, saved as JSON.

    ``group_layers`` ``(G,)``: each group's layer; ``at_least_one`` ``(G,)``: groups that
    have a hit whenever their layer has a deposit (a whole layer; a layer's innermost
    band); ``coefficients`` ``(G, L + 6)``; ``bin_edges`` ``(G, n_bins - 1)`` inner edges
    of the predicted ``log(1 + n)``; ``residual_quantiles`` ``(G, n_bins, n_quantiles)``
    at evenly spaced levels 0..1; ``copula_factor`` ``(G, G)`` with ``F F^T`` the normal
    scores' correlation; ``group_sizes`` ``(G,)`` the cells of each group, or None (models
    fitted before it): with sizes S the target is ``log(1 + n) - log(1 + S - n)``, bounded
    at both ends, so a group that is nearly full (calochallenge-2's middle layers at high
    energy: 143 of 144 cells, spread 1) is drawn nearly full, not spread by a residual
    fitted where the count still grows."""

    group_layers: list[int]
    at_least_one: list[bool]
    coefficients: list[list[float]]
    bin_edges: list[list[float]]
    residual_quantiles: list[list[list[float]]]
    copula_factor: list[list[float]]
    group_sizes: list[int] | None = None
    # the lists above as float64 arrays, made on the first draw (a draw per layer step of
    # an exported graph would otherwise convert ~60,000 numbers each time)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False,
                                           compare=False)

    FIELDS = ("group_layers", "at_least_one", "coefficients", "bin_edges",
              "residual_quantiles", "copula_factor")

    @property
    def n_groups(self) -> int:
        return len(self.group_layers)

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*self.FIELDS, "group_sizes")}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HitCountModel:
        try:
            model = cls(**{key: state[key] for key in cls.FIELDS},
                        group_sizes=None if state.get("group_sizes") is None
                        else [int(v) for v in state["group_sizes"]])
            shapes = [np.asarray(getattr(model, name), dtype=np.float64).shape
                      for name in cls.FIELDS]
            layers = np.asarray(model.group_layers, dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise CaloforgeError(f"hit count model state is malformed ({error})") from None
        g = model.n_groups
        n_features = shapes[2][1] if len(shapes[2]) == 2 else -1
        if (g == 0 or shapes[0] != (g,) or shapes[1] != (g,) or shapes[2] != (g, n_features)
                or len(shapes[3]) != 2 or shapes[3][0] != g or len(shapes[4]) != 3
                or shapes[4][:2] != (g, shapes[3][1] + 1) or shapes[5] != (g, g)
                or layers.min() < 0 or layers.max() >= n_features - 6):
            raise CaloforgeError(f"hit count model state has inconsistent shapes {shapes}")
        sizes = model.group_sizes
        if sizes is not None and (len(sizes) != g or min(sizes) < 1):
            raise CaloforgeError(f"hit count model state has {len(sizes)} group sizes "
                                 f"(min {min(sizes, default=0)}) for {g} groups")
        return model

    @classmethod
    def fit(cls, counts: np.ndarray, deposits: np.ndarray, incident_energies: np.ndarray,
            group_layers: list[int] | None = None, at_least_one: list[bool] | None = None,
            n_bins: int = 10, n_quantiles: int = 33, seed: int = 0,
            group_sizes: list[int] | None = None) -> HitCountModel:
        """Fit on data: hit counts ``(N, G)`` per group, layer deposits ``(N, L)`` MeV (cells
        at or above the threshold) and E_inc ``(N,)`` MeV; group g in layer
        ``group_layers[g]`` (default: the groups are the layers) and, where
        ``at_least_one[g]`` (default: all), never empty in a layer with a deposit; with
        ``group_sizes`` (cells per group) the bounded target (class docstring). Needs at
        least ``20 * n_bins`` showers."""
        counts = np.asarray(counts, dtype=np.float64)
        n, n_groups = counts.shape
        if n < 20 * n_bins:
            raise CaloforgeError(f"the hit count model needs at least {20 * n_bins} showers, "
                                 f"got {n}")
        layers = list(range(n_groups)) if group_layers is None else [int(g) for g in
                                                                      group_layers]
        features = count_features(torch.as_tensor(np.asarray(incident_energies).reshape(-1),
                                                  dtype=torch.float64),
                                  torch.as_tensor(deposits, dtype=torch.float64),
                                  layers).numpy()
        targets = np.log1p(counts)
        if group_sizes is not None:
            sizes = np.asarray(group_sizes, dtype=np.float64)
            if sizes.shape != (n_groups,) or (counts > sizes).any():
                raise CaloforgeError(f"{len(sizes)} group sizes for {n_groups} groups, or a "
                                     "count above its group's size")
            targets = targets - np.log1p(sizes - counts)
        coefficients, predictions = [], np.empty_like(targets)
        for group in range(n_groups):
            x = features[:, group]
            # a small ridge: a layer empty in every shower has a constant deposit column
            gram = x.T @ x + 1e-6 * n * np.eye(x.shape[1])
            w = np.linalg.solve(gram, x.T @ targets[:, group])
            coefficients.append(w)
            predictions[:, group] = x @ w
        residuals = targets - predictions
        levels = np.linspace(0, 1, n_quantiles)
        rng = np.random.default_rng(seed)
        edges, quantiles = [], []
        scores = np.zeros_like(residuals)
        for group in range(n_groups):
            group_edges = np.quantile(predictions[:, group], np.linspace(0, 1, n_bins + 1)[1:-1])
            bins = np.digitize(predictions[:, group], group_edges)
            rows = []
            for b in range(n_bins):
                members = residuals[bins == b, group]
                if len(members) < 2:  # tied edges leave a bin empty: the group's residuals
                    rows.append(np.quantile(residuals[:, group], levels))
                    continue
                rows.append(np.quantile(members, levels))
                # ranks with ties broken at random (counts are integers), as normal scores
                order = np.argsort(members + 1e-9 * rng.standard_normal(len(members)))
                ranks = np.empty(len(members))
                ranks[order] = np.arange(len(members))
                scores[bins == b, group] = ndtri((ranks + 0.5) / len(members))
            edges.append(group_edges)
            quantiles.append(rows)
        correlation = np.nan_to_num(np.corrcoef(scores.T)) if n_groups > 1 else np.ones((1, 1))
        np.fill_diagonal(correlation, 1.0)
        values, vectors = np.linalg.eigh(correlation)
        factor = vectors * np.sqrt(np.clip(values, 1e-9, None))
        return cls(group_layers=layers,
                   at_least_one=[True] * n_groups if at_least_one is None
                   else [bool(a) for a in at_least_one],
                   coefficients=np.asarray(coefficients).tolist(),
                   bin_edges=np.asarray(edges).tolist(),
                   residual_quantiles=np.asarray(quantiles).tolist(),
                   copula_factor=factor.tolist(),
                   group_sizes=None if group_sizes is None else [int(v) for v in group_sizes])

    def draw(self, incident_energies: torch.Tensor, deposits: torch.Tensor,
             noise: torch.Tensor, max_count: float = 1e6) -> torch.Tensor:
        """Hit counts ``(B, G)`` (whole numbers, as floats) from E_inc ``(B,)`` MeV, the layer
        deposits ``(B, L)`` MeV and standard normal noise ``(B, G)``: 0 where the group's
        layer has no deposit, at least 1 where it has and ``at_least_one``, at most
        ``max_count`` (a group's cells)."""
        dtype, device = deposits.dtype, deposits.device

        def tensor(name: str) -> torch.Tensor:
            if name not in self._arrays:
                self._arrays[name] = np.asarray(getattr(self, name), dtype=np.float64)
            return torch.as_tensor(self._arrays[name], dtype=dtype, device=device)

        features = count_features(incident_energies, deposits, self.group_layers)
        predicted = (features * tensor("coefficients")).sum(-1)  # (B, G)
        edges = tensor("bin_edges")  # (G, K - 1)
        bins = (predicted[..., None] >= edges).sum(-1)  # (B, G), as np.digitize
        table = tensor("residual_quantiles")  # (G, K, Q)
        n_levels = table.shape[-1]
        rows = table[torch.arange(self.n_groups, device=device), bins]  # (B, G, Q)
        levels = 0.5 * (1 + torch.erf((noise.to(dtype) @ tensor("copula_factor").T)
                                      / math.sqrt(2)))
        position = levels.clamp(0, 1) * (n_levels - 1)
        below = position.floor().clamp(max=n_levels - 2).long()
        low = rows.gather(-1, below[..., None])[..., 0]
        high = rows.gather(-1, (below + 1)[..., None])[..., 0]
        residual = low + (position - below.to(dtype)) * (high - low)
        target = predicted + residual
        if self.group_sizes is None:
            # clamped before exp: far outside the fitted range the regression can overflow
            counts = torch.exp(target.clamp(max=math.log1p(max_count))) - 1
        else:  # n = (S + 2) sigmoid(t) - 1 inverts t = log(1 + n) - log(1 + S - n)
            sizes = tensor("group_sizes")
            counts = (sizes + 2) * torch.sigmoid(target) - 1
            counts = torch.minimum(counts, sizes)
        counts = torch.round(counts).clamp(min=0, max=max_count)
        at_least_one = torch.as_tensor(self.at_least_one, device=device)
        counts = torch.where(at_least_one, counts.clamp(min=1), counts)
        has_deposit = deposits[:, self.group_layers] > 0
        return torch.where(has_deposit, counts, torch.zeros_like(counts))
