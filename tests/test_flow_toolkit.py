"""The shared MADE machinery: the pass-by-pass inverse is zuko's inverse."""

from __future__ import annotations

import pytest
import torch
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

from caloforge.models.flows.grouped_made import grouped_head
from caloforge.models.flows.toolkit import FlowConfig, build_maf, flow_inverse, layer_orders


@pytest.mark.parametrize("passes,context,inverse", [
    (None, 5, False),   # fully autoregressive (Flow I / Flow-1)
    (4, 5, False),      # block-autoregressive (Flow II / Flow-3)
    (None, 0, False),   # no context
    (3, 5, True),       # a student's inverse-autoregressive blocks (grouped_head)
    (None, 0, True),    # a student without context: the first outputs read no hidden unit
])
@pytest.mark.parametrize("hidden", [[32, 32], [24]])
def test_flow_inverse_is_zukos_inverse(passes, context, inverse, hidden):
    torch.manual_seed(0)
    features = 11
    flow = build_maf(features, context, FlowConfig(blocks=3, hidden=hidden, passes=passes),
                     inverse=inverse).double()  # float64: a tight round trip
    with torch.no_grad():  # away from the identity the untrained blocks start at
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    c = torch.randn(64, context, dtype=torch.float64) if context else None
    z = 2 * torch.randn(64, features, dtype=torch.float64)
    with torch.inference_mode():
        expected = flow(c).transform.inv(z)
        got = flow_inverse(flow, c, z)
        back = flow(c).transform(got)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back, z, rtol=1e-8, atol=1e-8)


def test_flow_inverse_with_layer_orders():
    """Flow II's orders (layers in sequence, voxels permuted within each)."""
    torch.manual_seed(1)
    orders = layer_orders([4, 6, 3], blocks=2, seed=3)
    flow = build_maf(13, 2, FlowConfig(blocks=2, hidden=[16], passes=5), orders=orders)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    c, z = torch.randn(32, 2), torch.randn(32, 13)
    with torch.inference_mode():
        torch.testing.assert_close(flow_inverse(flow, c, z), flow(c).transform.inv(z),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("passes,context,hidden", [(4, 3, [20]), (None, 0, [16, 16]),
                                                    (16, 7, [64])])
def test_grouped_head_is_the_masked_network(passes, context, hidden):
    """Every output of the grouped form equals the masked dense network's (features in the
    groups' order), and the form follows the weights when they change in place."""
    torch.manual_seed(2)
    features = 19
    block = MaskedAutoregressiveTransform(features=features, context=context, passes=passes,
                                          shapes=[(3,), (2,)], hidden_features=hidden)
    x = torch.randn(40, features + context)
    with torch.no_grad():
        for _ in range(2):  # the second round after an in-place change of every weight
            head = grouped_head(block)
            assert head is not None
            dense = block.hyper(x).unflatten(-1, (features, 5))
            grouped = head.outputs_by_group(x).unflatten(-1, (features, 5))
            torch.testing.assert_close(grouped, dense[:, head.order], rtol=1e-5, atol=1e-5)
            assert sorted(head.order.tolist()) == list(range(features))
            # about half the last layer's products are left out: the masks zero them
            used = sum(w.numel() for _, w, _, _ in head.groups)
            assert used < 0.75 * block.hyper[-1].weight.numel()
            for parameter in block.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
        assert grouped_head(block) is not head


def test_grouped_head_leaves_other_networks_to_zuko():
    block = MaskedAutoregressiveTransform(features=6, context=2, passes=3, residual=True,
                                          hidden_features=[8, 8])
    assert grouped_head(block) is None
