"""How much of each layer's energy a shower puts in its core, calibrated shower by shower.

A shower's core fraction in a layer (the share of the layer's energy in the cells within a
few cells of the axis) fluctuates from shower to shower; the radial centre of energy and
the radial width follow it. Generative models can get the layer energies, the hit counts
and the mean profile right and still fluctuate the core too little or too much (ild-ecal,
convolutional flows: the spread of the 12-cell core fraction 0.6-0.7x the data's in layers
0 and 15-18), and the high-level classifier reads that from the radial centres
(docs/convflow.md "The core's share of the layer").

:class:`CoreFractionMap` is fitted on data and on the model's own showers for the same
conditions: per layer and per bin of the layer's energy (the data's quantiles), the
piecewise-linear map from the model's quantiles of the core fraction to the data's.
Applied to a generated layer it moves energy between the core and the rest (each scaled by
one factor, hits kept at or above the readout threshold), so the layer keeps its energy,
its hits and, within the core and within the rest, its pattern; the map is monotone, so a
shower keeps its rank among the model's showers and the fractions' correlations across
layers stay the model's.

All applying is torch operations that export to ONNX (no ``searchsorted``: the interval of
a fraction is the count of nodes at or below it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CaloforgeError

MIN_SHOWERS_PER_BIN = 20


@dataclass
class CoreFractionMap:
    """The fitted maps (module docstring); plain lists, saved as JSON.

    ``core``: the voxel indices within a layer of the core cells; ``threshold_mev``: the
    readout threshold (hits stay at or above it); ``energy_edges`` ``(L, n_bins - 1)``:
    inner edges of log(layer energy / MeV); ``nodes`` ``(L, n_bins)``: per bin the pair
    (model quantiles, data quantiles) of the core fraction ``(n_quantiles,)`` each, model's
    strictly increasing, or None where either had fewer than 20 showers (identity)."""

    core: list[int]
    threshold_mev: float
    energy_edges: list[list[float]]
    nodes: list[list[list[list[float]] | None]]

    FIELDS = ("core", "threshold_mev", "energy_edges", "nodes")

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CoreFractionMap:
        try:
            out = cls(core=[int(i) for i in state["core"]],
                      threshold_mev=float(state["threshold_mev"]),
                      energy_edges=[[float(e) for e in edges] for edges in state["energy_edges"]],
                      nodes=[[None if pair is None else [[float(v) for v in pair[0]],
                                                          [float(v) for v in pair[1]]]
                              for pair in layer] for layer in state["nodes"]])
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise CaloforgeError(f"core fraction map state is malformed ({error})") from None
        bins = len(out.energy_edges[0]) + 1 if out.energy_edges else 0
        if (not out.core or min(out.core) < 0 or len(out.nodes) != len(out.energy_edges)
                or any(len(edges) + 1 != bins for edges in out.energy_edges)):
            raise CaloforgeError("core fraction map state has inconsistent shapes")
        for layer in out.nodes:
            if len(layer) != bins:
                raise CaloforgeError("core fraction map state has inconsistent shapes")
            for pair in layer:
                if pair is not None and (len(pair[0]) != len(pair[1]) or len(pair[0]) < 2
                                         or np.any(np.diff(pair[0]) <= 0)):
                    raise CaloforgeError("core fraction map state has a map whose model "
                                         "quantiles are not strictly increasing")
        return out

    @classmethod
    def fit(cls, real: np.ndarray, generated: np.ndarray, core: np.ndarray,
            threshold_mev: float, n_bins: int = 5, n_quantiles: int = 21) -> CoreFractionMap:
        """Fit from ``real`` ``(N, L, S)`` and ``generated`` ``(M, L, S)`` layers (MeV, cells
        in the same order; generated for the same conditions as the real) and the core's
        voxel indices ``core`` within a layer. Only showers with hits in both the core and
        the rest of a layer count (the others are left as they are when applied)."""
        core_mask = np.zeros(real.shape[-1], dtype=bool)
        core_mask[np.asarray(core)] = True
        levels = np.linspace(0, 1, n_quantiles)
        edges_out: list[list[float]] = []
        nodes_out: list[list[list[list[float]] | None]] = []
        real_parts = _fractions(real, core_mask, threshold_mev)
        generated_parts = _fractions(generated, core_mask, threshold_mev)
        for layer in range(real.shape[1]):
            (real_energy, real_fraction, real_ok), (gen_energy, gen_fraction, gen_ok) = (
                [part[:, layer] for part in parts] for parts in (real_parts, generated_parts))
            if real_ok.sum() >= MIN_SHOWERS_PER_BIN * n_bins:
                edges = np.quantile(np.log(real_energy[real_ok]), np.arange(1, n_bins) / n_bins)
            else:
                edges = np.full(n_bins - 1, np.inf)  # everything in bin 0
            real_bin = np.digitize(np.log(np.maximum(real_energy, 1e-30)), edges)
            gen_bin = np.digitize(np.log(np.maximum(gen_energy, 1e-30)), edges)
            layer_nodes: list[list[list[float]] | None] = []
            for number in range(n_bins):
                fake = gen_fraction[gen_ok & (gen_bin == number)]
                true = real_fraction[real_ok & (real_bin == number)]
                if len(fake) < MIN_SHOWERS_PER_BIN or len(true) < MIN_SHOWERS_PER_BIN:
                    layer_nodes.append(None)
                    continue
                model_q = np.quantile(fake, levels)
                # ties (many equal fractions) would make the map a step: nudge them apart
                model_q = np.maximum.accumulate(model_q + 1e-9 * np.arange(n_quantiles))
                layer_nodes.append([model_q.tolist(), np.quantile(true, levels).tolist()])
            edges_out.append(edges.tolist())
            nodes_out.append(layer_nodes)
        return cls(core=[int(i) for i in np.asarray(core)], threshold_mev=float(threshold_mev),
                   energy_edges=edges_out, nodes=nodes_out)

    def apply(self, cells: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV with each shower's core fraction mapped (where
        the shower has hits in both the core and the rest; others unchanged); the layer's
        energy and hits are kept."""
        pairs = self.nodes[layer]
        if all(pair is None for pair in pairs):
            return cells
        dtype, device = cells.dtype, cells.device
        n_quantiles = len(next(pair for pair in pairs if pair is not None)[0])
        identity = np.linspace(0, 1, n_quantiles).tolist()
        xs = torch.tensor([identity if pair is None else pair[0] for pair in pairs],
                          dtype=dtype, device=device)  # (n_bins, Q)
        ys = torch.tensor([identity if pair is None else pair[1] for pair in pairs],
                          dtype=dtype, device=device)
        edges = torch.tensor(self.energy_edges[layer], dtype=dtype, device=device)
        core = torch.zeros(cells.shape[1], dtype=torch.bool, device=device)
        core[torch.as_tensor(self.core, device=device)] = True
        hits = cells > 0
        core_energy = torch.where(core, cells, torch.zeros_like(cells)).sum(1)
        energy = cells.sum(1)
        core_hits = (hits & core).sum(1)
        rest_hits = (hits & ~core).sum(1)
        tiny = torch.finfo(dtype).tiny
        fraction = core_energy / energy.clamp(min=tiny)
        bins = (torch.log(energy.clamp(min=tiny))[:, None] > edges).sum(1)
        target = _piecewise_linear(fraction, xs[bins], ys[bins])
        lowest = self.threshold_mev * (1 + 1e-6)
        # each part keeps its hits at or above the threshold
        target = torch.minimum(torch.maximum(target, core_hits * lowest / energy.clamp(min=tiny)),
                               1 - rest_hits * lowest / energy.clamp(min=tiny))
        movable = (core_hits > 0) & (rest_hits > 0)
        target = torch.where(movable, target, fraction)
        new_core = _rescaled(cells, core, target * energy, lowest)
        # the rest takes what the core did not (the core's hits may be held at the threshold)
        core_now = torch.where(core, new_core, torch.zeros_like(new_core)).sum(1)
        new_rest = _rescaled(cells, ~core, energy - core_now, lowest)
        return torch.where(movable[:, None], torch.where(core, new_core, new_rest), cells)


def _rescaled(cells: torch.Tensor, part: torch.Tensor, goal: torch.Tensor, lowest: float
              ) -> torch.Tensor:
    """``cells`` ``(B, S)`` of ``part`` ``(S,)`` scaled by the one factor f that makes
    ``sum(max(f c, lowest))`` over the part's hits equal ``goal`` ``(B,)`` (hits held at
    ``lowest`` where scaling would put them under it; all at ``lowest`` where the goal is
    below that); other cells as given.

    Exact: with the hits sorted largest first, the k largest scale and the rest are held,
    ``f_k = (goal - (n - k) lowest) / (sum of the k largest)``; the k-th largest stays at or
    above ``lowest`` (``c_k f_k >= lowest``) exactly for k up to the solution's (the sum is
    increasing in f), so the largest such k is the solution. The test allows 1e-6 of
    ``lowest`` for rounding: hits already at it would otherwise fail it both ways."""
    hits = part & (cells > 0)
    values = torch.where(hits, cells, torch.zeros_like(cells))
    ordered = values.sort(dim=1, descending=True).values  # (B, S)
    n = hits.sum(1, keepdim=True)  # (B, 1)
    k = torch.arange(1, cells.shape[1] + 1, device=cells.device)[None]  # (1, S)
    factor = (goal[:, None] - (n - k) * lowest) / ordered.cumsum(1).clamp(
        min=torch.finfo(cells.dtype).tiny)
    free = (k <= n) & (ordered * factor >= lowest * (1 - 1e-6))
    chosen = (free * k).argmax(1, keepdim=True)  # the largest such k (index k - 1)
    f = torch.where(free.any(1, keepdim=True), factor.gather(1, chosen),
                    torch.zeros_like(goal[:, None]))
    return torch.where(hits, (cells * f).clamp(min=lowest), cells)


def _piecewise_linear(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor
                      ) -> torch.Tensor:
    """``values`` ``(B,)`` through the piecewise-linear map of each row's nodes ``xs``,
    ``ys`` ``(B, Q)`` (``xs`` strictly increasing), constant beyond the ends."""
    interval = (xs[:, 1:-1] <= values[:, None]).sum(1, keepdim=True)  # (B, 1) in 0 .. Q-2
    x0, x1 = xs.gather(1, interval)[:, 0], xs.gather(1, interval + 1)[:, 0]
    y0, y1 = ys.gather(1, interval)[:, 0], ys.gather(1, interval + 1)[:, 0]
    t = ((values - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + t * (y1 - y0)


def _fractions(layers: np.ndarray, core: np.ndarray, threshold_mev: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per shower and layer ``(N, L)``: the layer energy (MeV, hits only), the core's share
    of it, and whether the core and the rest both have hits."""
    hits = np.where(layers >= threshold_mev, layers, 0).astype(np.float64)
    energy = hits.sum(-1)
    core_energy = hits[..., core].sum(-1)
    ok = np.asarray((hits[..., core] > 0).any(-1) & (hits[..., ~core] > 0).any(-1))
    return energy, core_energy / np.maximum(energy, 1e-300), ok


__all__ = ["CoreFractionMap"]
