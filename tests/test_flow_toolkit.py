"""The shared MADE machinery: the pass-by-pass inverse is zuko's inverse."""

from __future__ import annotations

import pytest
import torch

from caloforge.models.flows.toolkit import FlowConfig, build_maf, flow_inverse, layer_orders


@pytest.mark.parametrize("passes,context,inverse", [
    (None, 5, False),   # fully autoregressive (Flow I / Flow-1)
    (4, 5, False),      # block-autoregressive (Flow II / Flow-3)
    (None, 0, False),   # no context
    (3, 5, True),       # a student's inverse-autoregressive blocks: their own inv
])
def test_flow_inverse_is_zukos_inverse(passes, context, inverse):
    torch.manual_seed(0)
    features = 11
    flow = build_maf(features, context, FlowConfig(blocks=3, hidden=[32, 32], passes=passes),
                     inverse=inverse)
    with torch.no_grad():  # away from the identity the untrained blocks start at
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    c = torch.randn(64, context) if context else None
    z = 2 * torch.randn(64, features)
    with torch.inference_mode():
        expected = flow(c).transform.inv(z)
        got = flow_inverse(flow, c, z)
        back = flow(c).transform(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, z, rtol=1e-4, atol=1e-4)


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
