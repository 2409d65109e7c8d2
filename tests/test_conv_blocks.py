"""Invertible convolutional blocks: x -> y -> x, log-determinants, circular padding."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from caloforge.models.flows.conv_blocks import (
    ActNorm,
    ConvFlow,
    InvertibleConv1x1,
    PaddedConv2d,
    SplineCoupling,
    UNet,
    squeeze,
    unsqueeze,
)

SHAPE = (4, 3, 5)  # channels, height, width: odd sizes on purpose


def _blocks() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    coupling = SplineCoupling(4, 2, width=8, bins=5, bound=3.0, circular=True)
    for parameter in coupling.net.out.parameters():  # leave the zero (identity) start
        torch.nn.init.normal_(parameter, std=0.3)
    return [ActNorm(4), InvertibleConv1x1(4, seed=1), coupling]


@pytest.mark.parametrize("index", range(3))
def test_block_inverts_and_log_determinant_matches_jacobian(index):
    block = _blocks()[index].double()
    generator = torch.Generator().manual_seed(index)
    x = 2 * torch.randn(3, *SHAPE, generator=generator, dtype=torch.float64)
    condition = torch.randn(3, 2, *SHAPE[1:], generator=generator, dtype=torch.float64)
    block.train()
    block(x, condition)  # ActNorm initialises from its first training batch
    block.eval()
    y, ladj = block(x, condition)
    torch.testing.assert_close(block.inverse(y, condition), x, rtol=0, atol=1e-10)
    assert ladj.shape == (3,)
    for i in range(3):
        def f(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return block(v.reshape(1, *SHAPE), condition[i:i + 1])[0].reshape(-1)

        numerical = torch.linalg.slogdet(jacobian(f, x[i].reshape(-1)))[1]
        torch.testing.assert_close(ladj[i], numerical, rtol=1e-8, atol=1e-8)


def test_actnorm_initialises_to_unit_variance():
    x = 3 + 5 * torch.randn(64, 4, 6, 6)
    norm = ActNorm(4).train()
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)
    assert bool(norm.initialised)  # saved with the weights: a resumed run keeps it


def test_squeeze_round_trip_and_patches():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 3)
    torch.testing.assert_close(unsqueeze(s), x)
    # the four channels of one output pixel are one 2x2 patch of the input
    assert sorted(s[0, :4, 0, 0].tolist()) == sorted(x[0, 0, :2, :2].reshape(-1).tolist())


def test_circular_padding_wraps_the_angular_axis_only():
    conv = PaddedConv2d(1, 1, 3, circular=True)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 0, 1, 0] = 1.0  # output(h, w) = input(h, w - 1)
        conv.conv.bias.zero_()
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    torch.testing.assert_close(conv(x), torch.roll(x, 1, dims=3))
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 0, 0, 1] = 1.0  # output(h, w) = input(h - 1, w): zero at h = 0
    shifted = conv(x)
    assert shifted[0, 0, 0].abs().sum() == 0
    torch.testing.assert_close(shifted[0, 0, 1:], x[0, 0, :-1])
    # a rotation of a cylindrical input rotates a circular U-Net's output the same way
    net = UNet(1, 2, width=4, circular=True)
    torch.nn.init.normal_(net.out.conv.weight, std=0.3)
    image = torch.randn(1, 1, 4, 6)
    torch.testing.assert_close(net(torch.roll(image, 2, dims=3)),
                               torch.roll(net(image), 2, dims=3), atol=1e-6, rtol=1e-5)


def test_coupling_starts_as_identity():
    coupling = SplineCoupling(4, 3, width=8)
    x = torch.randn(2, 4, 5, 5)
    y, ladj = coupling(x, torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(2), atol=1e-5, rtol=0)


def test_conv_flow_inverts_and_is_a_density():
    torch.manual_seed(0)
    flow = ConvFlow(condition_channels=3, blocks=2, width=8, bins=4, embedding=4,
                    circular=True).double()
    for module in flow.modules():
        if isinstance(module, UNet):
            torch.nn.init.normal_(module.out.conv.weight, std=0.2)
    x = torch.randn(16, 1, 4, 6, dtype=torch.float64)
    condition = torch.randn(16, 3, 4, 6, dtype=torch.float64)
    flow.train()
    flow(x, condition)
    flow.eval()
    z, ladj = flow(x, condition)
    assert z.shape == (16, 4, 2, 3)
    torch.testing.assert_close(flow.inverse(z, condition), x, rtol=0, atol=1e-9)

    def f(v: torch.Tensor) -> torch.Tensor:
        return flow(v.reshape(1, 1, 4, 6), condition[:1])[0].reshape(-1)

    numerical = torch.linalg.slogdet(jacobian(f, x[0].reshape(-1)))[1]
    torch.testing.assert_close(ladj[0], numerical, rtol=1e-8, atol=1e-8)
    log_p = flow.log_prob(x, condition)
    assert log_p.shape == (16,) and torch.isfinite(log_p).all()


def test_spline_inverse_leaves_no_reference_cycle():
    """torch's cached ``Transform.inv`` forms a cycle that kept every layer's spline
    parameters alive until the garbage collector ran (GBs while sampling dataset 3)."""
    import gc
    import weakref

    from caloforge.models.flows.toolkit import RQSpline, inverse_spline
    from caloforge.runtime import tune_allocator

    gc.disable()
    try:
        params = [torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 7)]
        spline = RQSpline(*params)
        inverse = spline.inv
        x = torch.randn(3, 5)
        torch.testing.assert_close(inverse(spline(x)), x, atol=1e-4, rtol=1e-4)
        alive = weakref.ref(spline)
        del spline, inverse
        assert alive() is None
        student_spline = inverse_spline(*params, bound=5.0)
        alive = weakref.ref(student_spline)
        del student_spline
        assert alive() is None
    finally:
        gc.enable()
    # glibc's mallopt is reachable on Linux (elsewhere the tuning is skipped)
    import sys
    assert tune_allocator() is sys.platform.startswith("linux")


def test_the_cached_inverse_follows_the_weight():
    """Sampling reuses the 1x1 convolution's inverse while its weight is unchanged; an
    optimiser step or a loaded state dict changes the weight and the next inverse with it
    (inference mode and no_grad alike); with gradients on it is computed afresh."""
    block = InvertibleConv1x1(4, seed=1)
    x = torch.randn(2, 4, 3, 5)
    optimiser = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(2):
        for context in (torch.inference_mode, torch.no_grad):
            with context():
                y, _ = block(x)
                torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-5)
                again, _ = block(x)
                torch.testing.assert_close(block.inverse(again), x, rtol=0, atol=1e-5)
        y, _ = block(x)
        y.square().sum().backward()  # gradients flow through forward; the step moves W
        optimiser.step()
        optimiser.zero_grad()
    other = InvertibleConv1x1(4, seed=7)
    block.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(block.inverse(other(x)[0]), x, rtol=0, atol=1e-5)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    block.inverse(z).sum().backward()
    assert block.weight.grad is not None and block.weight.grad.abs().sum() > 0


def test_zero_padded_convolutions_and_channels_last_u_nets_keep_their_values():
    """The Cartesian convolution pads inside ``conv2d`` and the U-Net runs channels-last
    on a CPU: the same values as padding first and running contiguous (float rounding)."""
    torch.manual_seed(3)
    net = UNet(3, 5, width=8)
    torch.nn.init.normal_(net.out.conv.weight, std=0.3)
    x = torch.randn(4, 3, 7, 9)

    def reference(image: torch.Tensor) -> torch.Tensor:
        def conv(layer: PaddedConv2d, value: torch.Tensor) -> torch.Tensor:
            return layer.conv(torch.nn.functional.pad(value, (1, 1, 1, 1)))

        for layer in net.encode:
            image = torch.nn.functional.silu(conv(layer, image))
        skip = image
        low = torch.nn.functional.avg_pool2d(image, 2, ceil_mode=True)
        for layer in net.down:
            low = torch.nn.functional.silu(conv(layer, low))
        up = torch.nn.functional.interpolate(low, size=skip.shape[-2:], mode="nearest")
        image = torch.cat([skip, up], dim=1)
        for layer in net.decode:
            image = torch.nn.functional.silu(conv(layer, image))
        return conv(net.out, image)

    with torch.no_grad():
        out = net(x)
        assert out.is_contiguous()
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
