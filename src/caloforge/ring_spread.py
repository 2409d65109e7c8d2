"""How unevenly each ring of a cylinder shares its energy among its angular cells,
calibrated shower by shower.

On calochallenge-3 the convolutional flows, with every layer's and every ring's energy and
hits mapped to the data's (``core_fraction: rings``), still put the ring's energy into too
few of its angular cells: the hottest cell is 1.5-3x the data's in every layer from 5 to
30 (docs/convflow.md "The rings' angular spread"). The spread that measures it is
``s = std over the ring's hits of log(cell energy)``: raising a ring's cells to a power
``gamma`` multiplies ``s`` by exactly ``gamma``, so one power per ring and shower sets it.

:class:`RingSpreadMap` is fitted on data and on the model's own showers for the same
conditions. Per layer and radial ring, ``log s`` is regressed on ``[1, v, v^2, h]``
(``v = log(ring energy / MeV)``, ``h = log(hits in the ring)``) in each of the two, with
the quantiles of the residuals. A generated ring's residual under the model's regression
is mapped, quantile to quantile, to a residual of the data's and added to the data's
prediction; ``gamma`` is the ratio of that spread to the ring's own. The cells are then
raised to ``gamma`` and scaled back to the ring's energy, hits kept at or above the readout
threshold: the ring keeps its energy and hits, its cells their order.

Rings with fewer than three hits are left as they are, and so are rings with fewer than
50 such showers in either sample. All applying is torch operations that export to ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CaloforgeError, OptionError
from .geometry import Geometry
from .preprocessing import lowest_hit, piecewise_linear, rescale_hits

RING_SPREADS = ("none", "calibrated")  # the families' ``ring_spread`` option
N_FEATURES = 4
MIN_HITS = 3
MIN_SHOWERS = 50
GAMMA_RANGE = (0.1, 10.0)  # a ring's power stays within these (a guard, not a fit)


def cylinder_shape(geometry: Geometry) -> tuple[int, int]:
    """``(n_angular, n_radial)`` of a geometry whose layers share one cylindrical image;
    OptionError otherwise (``ring_spread`` is about the angular cells of a ring)."""
    image = geometry.uniform_layer_image
    if image is None or image[0] != "cylindrical":
        raise OptionError(f"ring_spread needs layers of one cylindrical image; "
                          f"{geometry.name} has none")
    return image[1]


def ring_statistics(rings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """For rings ``(B, R, A)`` MeV (A angular cells each): the regressors ``(B, R, 4)``,
    ``log s`` ``(B, R)`` (module docstring), each hit's log energy less the ring's mean
    ``(B, R, A)`` (0 for empty cells) and whether the ring has at least three hits and a
    spread ``(B, R)``."""
    hits = rings > 0
    n = hits.sum(-1)
    tiny = torch.finfo(rings.dtype).tiny
    logs = torch.log(torch.where(hits, rings, torch.ones_like(rings)))
    count = n.clamp(min=1).to(rings.dtype)
    mean = (logs * hits).sum(-1) / count
    centred = (logs - mean[..., None]) * hits
    variance = (centred ** 2).sum(-1) / count
    spread = variance.sqrt()
    v = torch.log(rings.sum(-1).clamp(min=tiny))
    h = torch.log(count)
    features = torch.stack([torch.ones_like(v), v, v * v, h], dim=-1)
    ok = (n >= MIN_HITS) & (spread > 1e-6)
    return features, torch.log(spread.clamp(min=tiny)), centred, ok


@dataclass
class RingSpreadMap:
    """The fitted maps (module docstring); plain lists, saved as JSON.

    ``n_angular``, ``n_radial``: the layer image (angular bin, radial bin; radial fastest);
    ``threshold_mev``: the readout threshold; per layer (None where no ring was fitted):
    ``model_coefficients`` / ``data_coefficients`` ``(R, 4)``, ``model_residuals`` /
    ``data_residuals`` ``(R, Q)`` (the model's strictly increasing per ring) and
    ``fitted`` ``(R,)`` (rings not fitted are left as they are; their rows are filler)."""

    n_angular: int
    n_radial: int
    threshold_mev: float
    model_coefficients: list[list[list[float]] | None]
    data_coefficients: list[list[list[float]] | None]
    model_residuals: list[list[list[float]] | None]
    data_residuals: list[list[list[float]] | None]
    fitted: list[list[bool] | None]

    TABLES = ("model_coefficients", "data_coefficients", "model_residuals", "data_residuals")

    def state(self) -> dict[str, Any]:
        return {"n_angular": self.n_angular, "n_radial": self.n_radial,
                "threshold_mev": self.threshold_mev, "fitted": self.fitted,
                **{name: getattr(self, name) for name in self.TABLES}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RingSpreadMap:
        try:
            n_angular, n_radial = int(state["n_angular"]), int(state["n_radial"])
            tables = {name: [None if layer is None else np.asarray(layer, dtype=np.float64)
                             for layer in state[name]] for name in cls.TABLES}
            fitted = [None if layer is None else [bool(f) for f in layer]
                      for layer in state["fitted"]]
            threshold = float(state["threshold_mev"])
        except (KeyError, TypeError, ValueError) as error:
            raise CaloforgeError(f"ring spread map state is malformed ({error})") from None
        n_layers = len(fitted)
        if n_angular < 1 or n_radial < 1 or any(len(t) != n_layers for t in tables.values()):
            raise CaloforgeError("ring spread map state has inconsistent shapes")
        for layer in range(n_layers):
            rows = [tables[name][layer] for name in cls.TABLES]
            if fitted[layer] is None:
                if any(row is not None for row in rows):
                    raise CaloforgeError("ring spread map state has inconsistent shapes")
                continue
            model_beta, data_beta, model_q, data_q = rows
            flags = fitted[layer]
            if (flags is None or model_beta is None or data_beta is None or model_q is None
                    or data_q is None
                    or len(flags) != n_radial
                    or model_beta.shape != (n_radial, N_FEATURES)
                    or data_beta.shape != model_beta.shape or model_q.ndim != 2
                    or model_q.shape != data_q.shape or model_q.shape[0] != n_radial
                    or model_q.shape[1] < 2):
                raise CaloforgeError("ring spread map state has inconsistent shapes")
            if np.any(np.diff(model_q, axis=1) <= 0):
                raise CaloforgeError("ring spread map state has model residual quantiles "
                                     "that are not strictly increasing")
        return cls(n_angular, n_radial, threshold, fitted=fitted,
                   **{name: [None if t is None else t.tolist() for t in tables[name]]
                      for name in cls.TABLES})

    @classmethod
    def fit(cls, real: np.ndarray, generated: np.ndarray, n_angular: int, n_radial: int,
            threshold_mev: float, n_quantiles: int = 21) -> RingSpreadMap:
        """Fit from ``real`` ``(N, L, S)`` and ``generated`` ``(M, L, S)`` layers (MeV; the
        model's showers for comparable conditions), ``S = n_angular * n_radial`` cells in
        the layer's order (radial index fastest)."""
        levels = np.linspace(0, 1, n_quantiles)
        samples = [_ring_inputs(showers, n_angular, n_radial, threshold_mev)
                   for showers in (real, generated)]
        tables: dict[str, list[Any]] = {name: [] for name in cls.TABLES}
        fitted: list[list[bool] | None] = []
        for layer in range(real.shape[1]):
            rows: dict[str, list[Any]] = {name: [] for name in cls.TABLES}
            flags = []
            for ring in range(n_radial):
                results = []
                for features, logs, ok in samples:
                    chosen = ok[:, layer, ring]
                    if chosen.sum() < MIN_SHOWERS:
                        break
                    x, t = features[chosen, layer, ring], logs[chosen, layer, ring]
                    beta = np.linalg.lstsq(x, t, rcond=None)[0]
                    results.append((beta, np.quantile(t - x @ beta, levels)))
                flags.append(len(results) == 2)
                if len(results) < 2:  # filler: left as it is when applied
                    results = [(np.zeros(N_FEATURES), levels)] * 2
                (data_beta, data_q), (model_beta, model_q) = results
                # ties (many equal residuals) would make the map a step: nudge them apart
                model_q = np.maximum.accumulate(model_q + 1e-9 * np.arange(n_quantiles))
                for name, value in zip(cls.TABLES, (model_beta, data_beta, model_q, data_q)):
                    rows[name].append(np.asarray(value, dtype=np.float64).tolist())
            any_fitted = any(flags)
            fitted.append(flags if any_fitted else None)
            for name in cls.TABLES:
                tables[name].append(rows[name] if any_fitted else None)
        return cls(n_angular, n_radial, float(threshold_mev), fitted=fitted, **tables)

    def apply_layers(self, layers: np.ndarray) -> np.ndarray:
        """Every layer of showers ``(N, L, S)`` MeV mapped (:meth:`apply`)."""
        cells = torch.from_numpy(np.ascontiguousarray(layers))
        return torch.stack([self.apply(cells[:, layer], layer)
                            for layer in range(cells.shape[1])], dim=1).numpy()

    def apply(self, cells: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV with each fitted ring's angular spread mapped
        (rings with three hits or more); every ring keeps its energy and hits."""
        flags = self.fitted[layer]
        if flags is None:
            return cells
        dtype, device = cells.dtype, cells.device

        def table(name: str) -> torch.Tensor:
            return torch.tensor(getattr(self, name)[layer], dtype=dtype, device=device)

        rings = cells.reshape(-1, self.n_angular, self.n_radial).transpose(1, 2)  # (B, R, A)
        features, log_spread, centred, ok = ring_statistics(rings)
        residual = log_spread - (features * table("model_coefficients")).sum(-1)
        mapped = piecewise_linear(residual, table("model_residuals"), table("data_residuals"))
        target = (features * table("data_coefficients")).sum(-1) + mapped
        gamma = torch.exp(target - log_spread).clamp(*GAMMA_RANGE)
        movable = ok & torch.tensor(flags, device=device)  # (B, R)
        hits = rings > 0
        # relative to the ring's mean log energy: the powers stay in float range
        powered = torch.where(hits, torch.exp(gamma[..., None] * centred),
                              torch.zeros_like(rings))
        rescaled = rescale_hits(powered, rings.sum(-1), lowest_hit(self.threshold_mev))
        out = torch.where(movable[..., None], rescaled, rings)
        return out.transpose(1, 2).reshape(cells.shape)


def fit_ring_spread(geometry: Geometry, real: np.ndarray, generated: np.ndarray,
                    threshold_mev: float) -> tuple[RingSpreadMap, np.ndarray]:
    """A :class:`RingSpreadMap` fitted on ``generated`` ``(M, L, S)`` MeV against ``real``
    ``(N, L, S)`` MeV, and ``generated`` with it applied."""
    n_angular, n_radial = cylinder_shape(geometry)
    spread_map = RingSpreadMap.fit(real, generated, n_angular, n_radial, threshold_mev)
    return spread_map, spread_map.apply_layers(generated)


def check_ring_spread_option(kind: str) -> None:
    """Refuse (OptionError) a family's ``ring_spread`` option not in :data:`RING_SPREADS`."""
    if kind not in RING_SPREADS:
        raise OptionError(f"ring_spread must be one of {', '.join(RING_SPREADS)}, got "
                          f"{kind!r}")


def _ring_inputs(showers: np.ndarray, n_angular: int, n_radial: int, threshold_mev: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For showers ``(N, L, S)`` MeV: the regressors ``(N, L, R, 4)``, ``log s``
    ``(N, L, R)`` and whether each ring counts ``(N, L, R)`` (cells under the threshold
    are not hits); one layer at a time in float64."""
    outputs: list[list[np.ndarray]] = [[], [], []]
    for layer in range(showers.shape[1]):
        cells = np.asarray(showers[:, layer], dtype=np.float64)
        cells = np.where(cells >= threshold_mev, cells, 0.0)
        rings = torch.from_numpy(cells).reshape(-1, n_angular, n_radial).transpose(1, 2)
        features, log_spread, _, ok = ring_statistics(rings)
        for out, value in zip(outputs, (features, log_spread, ok)):
            out.append(value.numpy())
    return (np.stack(outputs[0], axis=1), np.stack(outputs[1], axis=1),
            np.stack(outputs[2], axis=1))


__all__ = ["RING_SPREADS", "RingSpreadMap", "check_ring_spread_option", "cylinder_shape",
           "fit_ring_spread", "ring_statistics"]
