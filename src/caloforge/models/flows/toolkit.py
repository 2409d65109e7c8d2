"""Shared flow machinery: MADE-RQS masked autoregressive flows (zuko) and their configs.

Used by every flow family (CaloFlow, iCaloFlow, the convolutional L2LFlows) and by the
distillation of students. zuko's ``MaskedAutoregressiveTransform`` with a monotonic
rational-quadratic spline (:class:`RQSpline`) and an explicit tail bound (the spline is the
identity outside [-bound, bound]; zuko's NSF would fix it at 5 while logit(1e-6) = -13.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from zuko.distributions import DiagNormal
from zuko.flows import Flow, UnconditionalDistribution
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import LazyInverse
from zuko.transforms import MonotonicRQSTransform
from zuko.utils import broadcast, unpack

from .grouped_made import grouped_head


@dataclass
class FlowConfig:
    """One MAF: ``blocks`` MADE-RQS transforms with ``hidden`` layer widths."""

    blocks: int = 6
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    bins: int = 8
    bound: float = 14.0
    # Sequential passes per block when sampling. None: fully autoregressive (one pass per
    # feature, the published MAF). k: features split into k groups in autoregressive order,
    # each group conditioned on the previous ones (block-autoregressive, k passes).
    passes: int | None = None


def layer_orders(layer_sizes: list[int], blocks: int, seed: int) -> list[torch.Tensor]:
    """Autoregressive orders for Flow II: layers in sequence (reversed every other block),
    a random permutation of the voxels within each layer. Returns each voxel's rank."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(layer_sizes)])
    orders = []
    for block in range(blocks):
        layers = range(len(layer_sizes)) if block % 2 == 0 else reversed(range(len(layer_sizes)))
        sequence = np.concatenate([offsets[i] + rng.permutation(layer_sizes[i]) for i in layers])
        rank = np.empty_like(sequence)
        rank[sequence] = np.arange(len(sequence))
        orders.append(torch.as_tensor(rank, dtype=torch.long))
    return orders


def _records_graph(values: torch.Tensor) -> bool:
    """True where ``values`` take part in a gradient or an exported graph (no in-place or
    ``out=`` arithmetic then)."""
    return ((values.requires_grad and torch.is_grad_enabled()) or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def _soft_clip_exp(values: torch.Tensor, log_slope: float) -> torch.Tensor:
    """``exp(v / (1 + |2 v / log_slope|))`` (zuko's soft clipping, then exp), in one buffer
    where no gradient is recorded (the same arithmetic, element for element); out of place
    while a graph is traced (the ONNX exporter has no ``div(..., out=)``)."""
    if _records_graph(values):
        return torch.exp(values / (1 + abs(2 * values / log_slope)))
    scale = values * 2
    scale.div_(log_slope).abs_().add_(1)
    return torch.div(values, scale, out=scale).exp_()


def _padded_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``(*, K) -> (*, K + 1)``: 0, then the cumulative sums. Where no graph is recorded
    the sums are written straight into the padded buffer (the same values; a cumsum over 8
    bins and a pad were ~3x the cost of one product over the same tensor)."""
    if _records_graph(values):
        return F.pad(torch.cumsum(values, dim=-1), (1, 0), value=0)
    padded = values.new_empty(*values.shape[:-1], values.shape[-1] + 1)
    padded[..., 0] = 0
    torch.cumsum(values, dim=-1, out=padded[..., 1:])
    return padded


class RQSpline(MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline with a faster constructor and inverse.

    Same maths as :class:`zuko.transforms.MonotonicRQSTransform` (whose ``_call`` and
    Jacobian it uses unchanged): the soft clipping bounds the unconstrained widths and
    heights by |log slope| / 2, so the softmax over the bins can be taken as exp / sum
    without subtracting the maximum. ``torch.softmax`` over a last dimension of 8 bins is
    the single most expensive step of sampling on a CPU (about 30 ns per element); this is
    2-3x cheaper. The knots' x positions and slopes are only built for every bin when the
    forward direction asks for them: the inverse (every sampling pass) searches the y
    knots and then needs x positions and slopes at two knots per value, so it gathers the
    unnormalised cumulative widths and raw slopes there first and transforms only those,
    element for element the same arithmetic (identical results). Parameter shapes: widths,
    heights ``(*, K)``; derivatives ``(*, K - 1)``.
    """

    def __init__(self, widths: torch.Tensor, heights: torch.Tensor,
                 derivatives: torch.Tensor, bound: float = 5.0, slope: float = 1e-3) -> None:
        torch.distributions.Transform.__init__(self)
        self.bound = bound
        self._log_slope = log_slope = math.log(slope)
        # cumulative sums normalised by their last entry = cumsum of the softmax
        self._widths = _padded_cumsum(_soft_clip_exp(widths, log_slope))
        heights = _padded_cumsum(_soft_clip_exp(heights, log_slope))
        self.vertical = bound * (2 * heights / heights[..., -1:] - 1)
        self._raw_derivatives = derivatives
        self._horizontal: torch.Tensor | None = None
        self._derivatives: torch.Tensor | None = None

    @property
    def horizontal(self) -> torch.Tensor:
        """x positions of the K + 1 knots ``(*, K + 1)``."""
        if self._horizontal is None:
            self._horizontal = self._x_knots(self._widths, self._widths[..., -1:])
        return self._horizontal

    @property
    def derivatives(self) -> torch.Tensor:
        """Slopes at the K + 1 knots ``(*, K + 1)`` (1 at both ends)."""
        if self._derivatives is None:
            self._derivatives = self._slopes(F.pad(self._raw_derivatives, (1, 1), value=0))
        return self._derivatives

    def _x_knots(self, cumulative: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return self.bound * (2 * cumulative / total - 1)

    def _slopes(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(raw / (1 + abs(raw / self._log_slope)))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        """zuko's inverse with the knots gathered before they are transformed."""
        bins = self.vertical.shape[-1] - 1
        if _records_graph(y) or self.vertical.shape[:-1] != y.shape:
            k = torch.sum(self.vertical < y[..., None], dim=-1) - 1
        else:  # the knots are increasing: a binary search counts those below y
            k = torch.searchsorted(self.vertical, y.contiguous()[..., None]).squeeze(-1) - 1
        mask = (0 <= k) & (k < bins)
        k = k % bins
        k0_k1 = torch.stack((k, k + 1), dim=-1)  # (*, 2), * = y's and the knots' broadcast
        shape = k.shape
        widths = self._widths.expand(*shape, bins + 1)
        vertical = self.vertical.expand(*shape, bins + 1)
        x0, x1 = self._x_knots(widths.gather(-1, k0_k1), widths[..., -1:]).unbind(-1)
        y0, y1 = vertical.gather(-1, k0_k1).unbind(-1)
        # the raw slopes without zuko's padding: knot j is raw[j - 1], knots 0 and K are 0
        raw = self._raw_derivatives.expand(*shape, bins - 1)
        inner = (k0_k1 > 0) & (k0_k1 < bins)
        picked = (raw.gather(-1, (k0_k1 - 1).clamp(0, bins - 2)) if bins > 1
                  else torch.zeros_like(y0.unsqueeze(-1).expand(*y0.shape, 2)))
        d0, d1 = self._slopes(torch.where(inner, picked, torch.zeros_like(picked))).unbind(-1)
        s = (y1 - y0) / (x1 - x0)
        y_ = mask * (y - y0)
        a = (y1 - y0) * (s - d0) + y_ * (d0 + d1 - 2 * s)
        b = (y1 - y0) * d0 - y_ * (d0 + d1 - 2 * s)
        c = -s * y_
        z = 2 * c / (-b - (b**2 - 4 * a * c).sqrt())
        x = x0 + z * (x1 - x0)
        return torch.where(mask, x, y)

    @property
    def inv(self) -> torch.distributions.Transform:
        """The inverse, not cached. torch's ``Transform.inv`` keeps the inverse in
        ``self._inv`` while the inverse refers back to ``self``: a reference cycle that
        only the garbage collector frees, so every spline's parameters (B, S, K) stayed
        alive for many layers of sampling (measured: 1.9 GB extra at 400 showers of
        calochallenge-3 with a student, 0.1 GB without the cycle)."""
        return torch.distributions.transforms._InverseTransform(self)


def inverse_spline(widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor,
                   bound: float) -> torch.distributions.Transform:
    """The inverse of :class:`RQSpline` (the univariate transform of a student's block)."""
    return RQSpline(widths, heights, derivatives, bound=bound).inv


def build_maf(features: int, context: int, config: FlowConfig,
              orders: list[torch.Tensor] | None = None, inverse: bool = False) -> Flow:
    """A conditional MAF of ``config.blocks`` MADE-RQS transforms (zuko).

    ``inverse=True`` builds the inverse-autoregressive twin used as a distillation student:
    block i maps z-side values to x-side values in ONE network pass, ``h_{i-1} =
    spline(h_i; theta(h_{i,<j}))^-1``, with the same spline parametrisation and the same
    autoregressive order as the teacher's block i, so that every block output and spline
    parameter can be matched to the teacher's. Its density (x -> z) is the slow,
    sequential direction.
    """
    if orders is None:
        ascending = torch.arange(features)
        orders = [ascending if i % 2 == 0 else torch.flipud(ascending)
                  for i in range(config.blocks)]
    univariate = partial(inverse_spline if inverse else RQSpline, bound=config.bound)
    transforms = [
        MaskedAutoregressiveTransform(
            features=features, context=context, order=orders[i], passes=config.passes,
            univariate=univariate,
            shapes=[(config.bins,), (config.bins,), (config.bins - 1,)],
            hidden_features=list(config.hidden))
        for i in range(config.blocks)]
    if inverse:
        transforms = [t.inv for t in transforms]
    base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(features),
                                     scale=torch.ones(features), buffer=True)
    return Flow(transforms, base)


def flow_inverse(flow: Flow, context: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """``flow(context).transform.inv(z)``: base-space values ``(B, D)`` -> data space
    ``(B, D)``, each MADE block inverted by :func:`made_inverse`, each inverse-autoregressive
    block (a student's) by :func:`iaf_block` where no gradient is recorded (other
    transforms by their own ``inv``). While a graph is being exported the blocks keep
    zuko's inverse (the exported graphs are built and checked with it)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return flow(context).transform.inv(z)
    transforms = getattr(flow.transform, "transforms", [flow.transform])
    h = z
    for lazy in reversed(list(transforms)):
        if isinstance(lazy, MaskedAutoregressiveTransform) and lazy.order is not None:
            h = made_inverse(lazy, context, h)
        elif (isinstance(lazy, LazyInverse) and not torch.is_grad_enabled()
              and isinstance(lazy.transform, MaskedAutoregressiveTransform)
              and lazy.transform.order is not None):
            h = iaf_block(lazy.transform, context, h)
        else:
            h = lazy(context).inv(h)
    return h


def _hyper_inputs(x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return torch.cat(broadcast(x, context, ignore=1), dim=-1) if context is not None else x


def iaf_block(block: MaskedAutoregressiveTransform, context: torch.Tensor | None,
              h: torch.Tensor) -> torch.Tensor:
    """One inverse-autoregressive step of a student ``(B, D) -> (B, D)``: the hyper network
    on ``h`` in one pass (:func:`~.grouped_made.grouped_head`, without the products its
    masks zero), then every feature's univariate transform (``block.univariate``, the
    inverse spline). Equals ``LazyInverse(block)(context).inv(h)`` up to the order of float
    additions."""
    head = grouped_head(block) if h.dim() == 2 else None
    if head is None:
        return block(context)(h)
    phi = head.outputs_by_group(_hyper_inputs(h, context)).unflatten(-1, (-1, block.total))
    transform = block.univariate(*unpack(phi, block.shapes))
    x = transform(h[..., head.order])
    return torch.empty_like(h).index_copy_(-1, head.order, x.to(h.dtype))


def made_inverse(block: MaskedAutoregressiveTransform, context: torch.Tensor | None,
                 y: torch.Tensor) -> torch.Tensor:
    """The inverse of one MADE block ``(B, D) -> (B, D)``, pass by pass, computing in each
    pass only the spline parameters of the features that pass determines.

    zuko inverts by ``passes`` fixed-point sweeps, each evaluating the whole hyper network
    and every feature's spline; the last layer (D x parameters per feature outputs) and the
    splines dominate, and a sweep only settles the features of one autoregressive group.
    Here pass p takes the last layer's rows of group p only: a fully autoregressive block of
    45 features (Flow-1 of calochallenge-2) costs ~6x less. The result is zuko's: the masks
    make the unsettled features' weights exactly zero. Where no gradient is recorded the
    rows also read only the hidden units their masks let through
    (:func:`~.grouped_made.grouped_head`)."""
    head = None if torch.is_grad_enabled() else grouped_head(block)
    hidden, last = list(block.hyper)[:-1], block.hyper[-1]
    weight, bias = (last.mask * last.weight, last.bias) if head is None else (head.weight,
                                                                               head.bias)
    total = block.total
    x = torch.zeros_like(y)
    for group in range(block.passes):
        features = (block.order == group).nonzero().squeeze(-1)
        if features.numel() == 0:
            continue
        rows = (features[:, None] * total + torch.arange(total, device=y.device)).flatten()
        inputs = _hyper_inputs(x, context)
        if head is None:
            h = inputs
            for layer in hidden:
                h = layer(h)
            phi = F.linear(h, weight[rows], bias[rows])
        else:
            n = max(int(head.prefix[features].max()), 1)
            phi = F.linear(head.hidden_units(inputs)[..., :n], weight[rows, :n], bias[rows])
        spline = block.univariate(*unpack(phi.unflatten(-1, (-1, total)), block.shapes))
        x = x.index_copy(-1, features, spline.inv(y[..., features]).to(x.dtype))
    return x
