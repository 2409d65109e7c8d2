"""A MADE hyper network evaluated group by group, without the products its masks zero.

zuko's ``MaskedLinear`` multiplies the whole weight matrix by its mask and then by the
input on every call. In a MADE the last layer's mask is nested: the outputs of a feature
of autoregressive degree ``d`` read the hidden units of degree ``< d``. With the hidden
units sorted by degree, each feature's outputs read a *prefix* of the hidden layer, so the
last layer splits into one dense product per degree, ``W_g (rows_g, n_g) @ h[:, :n_g]``,
about half the multiply-adds of the masked dense product (the last layer of an iCaloFlow
block, 3,312 outputs from 256 hidden units, is most of a student's sampling time).

:func:`grouped_head` builds that form once per weight version (it is cached and rebuilt
when the weights change: an optimiser step or a loaded state bumps the tensors' version);
it is used only where no gradient is recorded (sampling). The results equal the masked
dense product up to the order of float additions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.nn import MaskedLinear


@dataclass
class GroupedHead:
    """A MADE hyper network ``(B, D + C) -> (B, D x P)`` in grouped form.

    ``hidden``: the layers before the last as (masked weight, bias, activation), the last
    hidden layer's units sorted by how many outputs read them (most first); ``weight``
    ``(D x P, H)``: the last layer's masked weight, its columns in that order; ``prefix``
    ``(D,)``: how many hidden units (a prefix) each feature's P outputs read. ``groups``:
    features of equal prefix, in increasing prefix, as (feature indices ``(G,)``, weight
    ``(G x P, n)``, bias ``(G x P, 1)``, n); ``order`` ``(D,)``: the features in the order
    the groups produce them."""

    hidden: list[tuple[torch.Tensor, torch.Tensor, torch.nn.Module]]
    weight: torch.Tensor
    bias: torch.Tensor
    prefix: torch.Tensor
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
    order: torch.Tensor

    def hidden_units(self, inputs: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``(B, H)``, units in sorted order."""
        h = inputs
        for weight, bias, activation in self.hidden:
            h = activation(F.linear(h, weight, bias))
        return h

    def outputs_by_group(self, inputs: torch.Tensor) -> torch.Tensor:
        """All outputs ``(B, D x P)`` with the features in :attr:`order`, P outputs each
        (a transposed view: the groups' products fill contiguous rows of one buffer)."""
        hidden = self.hidden_units(inputs).t()
        out = torch.empty(self.weight.shape[0], inputs.shape[0], dtype=hidden.dtype,
                          device=hidden.device)
        row = 0
        for _features, weight, bias, n in self.groups:
            torch.addmm(bias, weight, hidden[:n], out=out[row:row + len(weight)])
            row += len(weight)
        return out.t()


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, ...], GroupedHead | None]] \
    = weakref.WeakKeyDictionary()


def _version(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(v for t in tensors for v in (t._version, t.data_ptr()))


def grouped_head(block: MaskedAutoregressiveTransform) -> GroupedHead | None:
    """The grouped form of ``block.hyper`` (cached per weight version); None where the
    network is not a plain MADE (a residual block, masks without nested prefixes)."""
    layers = list(block.hyper)
    tensors = [t for layer in layers for t in layer.parameters()]
    key = _version(tensors)
    cached = _CACHE.get(block)
    if cached is not None and cached[0] == key:
        return cached[1]
    head = _build(layers, block.total)
    _CACHE[block] = (key, head)
    return head


def _masked(layer: MaskedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked weight, mask) of a zuko ``MaskedLinear``."""
    mask = cast(torch.Tensor, layer.mask)
    return mask * layer.weight, mask


def _build(layers: list[torch.nn.Module], outputs_per_feature: int) -> GroupedHead | None:
    # linear, activation, ..., linear: at least one hidden layer, nothing nested
    if (len(layers) < 3 or not isinstance(layers[-1], MaskedLinear)
            or any(isinstance(layer, MaskedLinear) == (i % 2 == 1) for i, layer in
                   enumerate(layers))
            or any(list(layer.children()) for layer in layers)):
        return None
    with torch.no_grad():
        last = cast(MaskedLinear, layers[-1])
        mask = _masked(last)[1]
        sort = torch.argsort(mask.sum(0), descending=True, stable=True)
        mask = mask[:, sort]
        prefix_rows = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)
                           < prefix_rows[:, None]):
            return None
        rows = prefix_rows.unflatten(0, (-1, outputs_per_feature))
        if not torch.equal(rows, rows[:, :1].expand_as(rows)):
            return None
        prefix = rows[:, 0]
        hidden = []
        for i in range(0, len(layers) - 1, 2):
            weight, _ = _masked(cast(MaskedLinear, layers[i]))
            bias = cast(MaskedLinear, layers[i]).bias
            if i == len(layers) - 3:  # the last hidden layer: its units in sorted order
                weight, bias = weight[sort], bias[sort]
            hidden.append((weight.detach(), bias.detach(), layers[i + 1]))
        weight = _masked(last)[0][:, sort].detach()
        bias = last.bias.detach()
        order = torch.argsort(prefix, stable=True)
        groups = []
        for n in torch.unique(prefix).tolist():
            features = order[prefix[order] == n]
            rows_of = (features[:, None] * outputs_per_feature
                       + torch.arange(outputs_per_feature, device=features.device)).flatten()
            groups.append((features, weight[rows_of, :max(n, 1)].contiguous(),
                           bias[rows_of, None].clone(), max(n, 1)))
        return GroupedHead(hidden, weight, bias, prefix, groups, order)
