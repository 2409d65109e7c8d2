"""Property tests: every preprocessing transform inverts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from caloforge.preprocessing import (
    ConditionTransform,
    LayerEnergyTransform,
    LogitTransform,
    VoxelTransform,
    group_occupancy_cuts,
    occupancy_cuts,
    scale_to_deposit,
)

positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(arrays(np.float64, st.integers(1, 50), elements=st.floats(0.0, 1.0)))
def test_logit_round_trip(x):
    transform = LogitTransform(1e-6)
    back = transform.inverse(transform.forward(torch.as_tensor(x))).numpy()
    np.testing.assert_allclose(back, x, atol=1e-9)


@settings(max_examples=60)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    arrays(np.float64, (4, n), elements=st.one_of(st.just(0.0), positive)),
    arrays(np.float64, 4, elements=positive))))
def test_layer_energy_round_trip(case):
    layers, scale_inc = case
    incident = layers.sum(1) + scale_inc  # E_tot below E_inc
    transform = LayerEnergyTransform(layers.shape[1]).fit(layers, incident)
    x = transform.forward(torch.as_tensor(layers), torch.as_tensor(incident))
    assert torch.isfinite(x).all()
    back = transform.inverse(x, torch.as_tensor(incident)).numpy()
    np.testing.assert_allclose(back, layers, rtol=1e-5, atol=1e-5 * incident.max())


@settings(max_examples=60)
@given(arrays(np.float64, (3, 7), elements=st.one_of(st.just(0.0), positive)))
def test_voxel_round_trip(voxels):
    transform = VoxelTransform([2, 4, 1], noise_mev=1e-3, threshold_mev=0.0)
    noisy = transform.add_noise(torch.as_tensor(voxels), torch.Generator().manual_seed(0))
    assert (noisy > 0).all()
    layers = transform.layer_sums(noisy)
    back = transform.inverse(transform.forward(noisy, layers), layers)
    np.testing.assert_allclose(back.numpy(), noisy.numpy(), rtol=1e-4, atol=1e-9)


def test_voxel_threshold_and_state_round_trip():
    transform = VoxelTransform([2, 2], noise_mev=1e-3, threshold_mev=0.5)
    layers = torch.tensor([[1.0, 10.0]])
    x = transform.forward(torch.tensor([[0.2, 0.8, 5.0, 5.0]]), layers)
    np.testing.assert_allclose(transform.inverse(x, layers).numpy(), [[0.0, 0.8, 5.0, 5.0]],
                               rtol=1e-5)
    assert VoxelTransform.from_state(transform.state()) == transform


def test_layer_cuts_empty_faint_voxels_and_keep_the_layer_energy():
    transform = VoxelTransform([3, 2], noise_mev=1e-3, threshold_mev=0.01)
    layers = torch.tensor([[6.0, 2.0]])
    x = transform.forward(torch.tensor([[0.5, 1.5, 4.0, 0.02, 1.98]]), layers)
    voxels = transform.inverse(x, layers, torch.tensor([1.0, 0.01]))
    # a layer whose voxels are all under its cut is empty, not NaN
    assert transform.inverse(x, layers, torch.tensor([9.0, 0.01]))[0, :3].eq(0).all()
    # 0.5 MeV is below layer 0's cut of 1 MeV: emptied, its energy shared by the others
    np.testing.assert_allclose(voxels.numpy(), [[0.0, 1.5 * 6 / 5.5, 4.0 * 6 / 5.5, 0.02, 1.98]],
                               rtol=1e-5)
    np.testing.assert_allclose(transform.layer_sums(voxels).numpy(), layers.numpy(), rtol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.9), st.floats(0.0, 0.9))
def test_occupancy_cuts_leave_no_more_hits_than_the_reference(seed, real_empty, fake_empty):
    rng = np.random.default_rng(seed)
    sizes, threshold = [5, 3], 0.01
    real = rng.exponential(1.0, (40, 8)) * (rng.random((40, 8)) > real_empty)
    fake = rng.exponential(1.0, (60, 8)) * (rng.random((60, 8)) > fake_empty)
    real[real < threshold] = fake[fake < threshold] = 0.0
    cuts = occupancy_cuts(real, fake, sizes, threshold)
    start = 0
    for size, cut in zip(sizes, cuts):
        assert cut >= threshold
        wanted = np.count_nonzero(real[:, start:start + size]) * 60 / 40
        kept = np.count_nonzero(fake[:, start:start + size] >= cut)
        assert kept <= wanted
        if cut > threshold:  # only what had to go went (no ties in continuous draws)
            assert kept >= int(wanted)
        start += size


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.9), st.floats(0.0, 0.9))
def test_group_cuts_leave_each_group_no_more_hits_than_the_reference(seed, real_empty,
                                                                    fake_empty):
    """Groups need not be contiguous (rings of an image): each gets its own cut."""
    rng = np.random.default_rng(seed)
    threshold = 0.01
    groups = rng.integers(0, 3, 9)
    groups[:3] = [0, 1, 2]  # every group has a voxel
    real = rng.exponential(1.0, (40, 9)) * (rng.random((40, 9)) > real_empty)
    fake = rng.exponential(1.0, (60, 9)) * (rng.random((60, 9)) > fake_empty)
    real[real < threshold] = fake[fake < threshold] = 0.0
    cuts = group_occupancy_cuts(real, fake, groups, threshold)
    assert cuts.shape == (3,)
    kept = fake >= cuts[groups]
    for group in range(3):
        members = groups == group
        wanted = np.count_nonzero(real[:, members]) * 60 / 40
        assert cuts[group] >= threshold
        assert np.count_nonzero(kept[:, members]) <= wanted
        if cuts[group] > threshold:
            assert np.count_nonzero(kept[:, members]) >= int(wanted)


@pytest.mark.parametrize("layer_sizes", [[3, 2], [5]])
def test_cut_voxels_empties_each_voxel_under_its_own_cut_and_keeps_layer_energies(layer_sizes):
    transform = VoxelTransform(layer_sizes=layer_sizes)
    voxels = torch.tensor([[0.5, 1.5, 4.0, 0.02, 1.98], [0.1, 0.2, 0.3, 0.0, 0.0]],
                          dtype=torch.float64)
    cuts = torch.tensor([0.4, 2.0, 0.1, 0.01, 0.01], dtype=torch.float64)
    out = transform.cut_voxels(voxels, cuts)
    # 1.5 MeV is under its own cut of 2 MeV, 0.5 MeV is not under its 0.4; each layer keeps
    # the energy its voxels had (an emptied layer stays empty)
    scale = 6.0 / 4.5 if len(layer_sizes) == 2 else 8.0 / 6.5
    np.testing.assert_allclose(out[0, :3].numpy(), [0.5 * scale, 0.0, 4.0 * scale], rtol=1e-12)
    np.testing.assert_allclose(transform.layer_sums(out).numpy(),
                               transform.layer_sums(voxels).numpy(), rtol=1e-12)
    assert out[1, 3:].sum() == 0 and out[1, 2] == pytest.approx(0.6)


def test_cut_energy_stays_in_its_group_where_groups_are_given():
    """A core voxel (its own group) and a halo group whose faint voxels are cut: the halo's
    cut energy goes to the halo's kept voxel, not to the core; a group cut entirely hands
    its energy to the layer (second shower)."""
    transform = VoxelTransform(layer_sizes=[4])
    voxels = torch.tensor([[10.0, 0.5, 0.2, 0.2], [10.0, 0.0, 0.2, 0.2]], dtype=torch.float64)
    cuts = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    groups = torch.tensor([[1, 0], [0, 1], [0, 1], [0, 1]])
    by_layer = transform.cut_voxels(voxels, cuts)
    by_group = transform.cut_voxels(voxels, cuts, groups)
    np.testing.assert_allclose(by_layer[0].numpy(), [10.9 * 10 / 10.5, 10.9 * 0.5 / 10.5, 0, 0],
                               rtol=1e-12)
    np.testing.assert_allclose(by_group[0].numpy(), [10.0, 0.9, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(by_group[1].numpy(), [10.4, 0.0, 0.0, 0.0], rtol=1e-12)
    for out in (by_layer, by_group):
        np.testing.assert_allclose(transform.layer_sums(out).numpy(),
                                   transform.layer_sums(voxels).numpy(), rtol=1e-12)


def test_condition_transform_standardises_and_records_range():
    rng = np.random.default_rng(0)
    energies = 10 ** rng.uniform(3, 6, 1000)
    entry = rng.normal(2.0, 3.0, (1000, 2))
    transform = ConditionTransform().fit(energies, {"entry_point": entry})
    context = transform.forward(torch.as_tensor(energies), {"entry_point": torch.as_tensor(entry)})
    np.testing.assert_allclose(context.mean(0).numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(context.std(0, unbiased=False).numpy(), 1.0, atol=1e-9)
    again = ConditionTransform.from_state(transform.state())
    assert again == transform
    sampled = transform.sample_energies(5000, rng)
    assert energies.min() <= sampled.min() and sampled.max() <= energies.max()


def test_condition_range_check_has_a_margin():
    from caloforge.errors import CaloforgeError
    from caloforge.preprocessing import ConditionTransform

    transform = ConditionTransform()
    transform.fit(np.array([1000.0, 5e4, 1e5]), {}, {})
    # the edges of an independent sample of the same continuous spectrum
    transform.check_range(np.array([995.0, 100_500.0]), {}, "held-out.h5")
    with pytest.raises(CaloforgeError, match="held-out.h5.*training range"):
        transform.check_range(np.array([900.0]), {}, "held-out.h5")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 200.0), st.floats(0.01, 5.0))
def test_scaled_hits_carry_the_deposit(seed, deposited, threshold):
    """scale_to_deposit: every hit at or above the threshold, the hits summing to the
    deposit (none below the threshold: an empty layer), hotter shares never colder cells."""
    rng = np.random.default_rng(seed)
    shares = torch.as_tensor(rng.exponential(1.0, (3, 40)) ** 3, dtype=torch.float64)
    shares[1, ::2] = 0.0
    deposits = torch.tensor([deposited, deposited, 0.5 * threshold], dtype=torch.float64)
    cells = scale_to_deposit(shares, deposits, threshold)
    hits = cells > 0
    assert (cells[hits] >= threshold * (1 - 1e-12)).all()
    sums = cells.sum(-1)
    for row in range(3):
        if deposits[row] >= threshold * (1 + 1e-9):  # at the threshold: rounding decides
            assert sums[row] == pytest.approx(float(deposits[row]), rel=1e-9)
        elif deposits[row] < threshold:
            assert sums[row] == 0
        order = torch.argsort(shares[row], descending=True)
        assert (cells[row][order].diff() <= 1e-12).all()


def test_layer_energy_inverse_clamps_a_flows_far_tail_to_the_training_range():
    """Issue 28 (ild-ecal layer 3: one draw of 1,533 MeV against a training largest of
    79 MeV): a flow's heavy-tailed draws of one u near 1 hand one layer the whole remaining
    shower. Draws around the training showers' logits with Student-t(1.5) tails: without the
    clamp some layers get up to ~6 times their largest training share of E_inc; with it none
    gets twice, while the bulk (the median of every layer) stays where it was."""
    rng = np.random.default_rng(0)
    n, n_layers = 5000, 6
    incident = 10 ** rng.uniform(3, 5, n)
    profile = np.array([0.02, 0.15, 0.35, 0.3, 0.13, 0.05])
    shares = rng.dirichlet(60 * profile, n) * rng.uniform(0.9, 0.98, (n, 1))
    layers = shares * incident[:, None]
    transform = LayerEnergyTransform(n_layers).fit(layers, incident)
    x = transform.forward(torch.as_tensor(layers), torch.as_tensor(incident)).numpy()
    draws = np.median(x, 0) + x.std(0) * 0.5 * rng.standard_t(1.5, (n, n_layers))
    draws, e_inc = torch.as_tensor(draws), torch.as_tensor(incident)
    clamped = transform.inverse(draws, e_inc).numpy() / incident[:, None]
    transform.logit_min = transform.logit_max = None
    free = transform.inverse(draws, e_inc).numpy() / incident[:, None]
    largest = shares.max(0)
    assert (free > 2 * largest).any(axis=1).sum() >= 20
    assert (clamped > 2 * largest).sum() == 0
    np.testing.assert_allclose(np.median(clamped, 0), np.median(free, 0), rtol=0.02)


def test_layer_energy_state_without_the_range_loads_unclamped():
    state = LayerEnergyTransform(3, scale=1.2).state()
    for key in ("logit_min", "logit_max"):  # a file saved before the clamp
        state.pop(key)
    transform = LayerEnergyTransform.from_state(state)
    x = torch.full((2, 3), 30.0)
    assert transform.logit_min is None and transform.logit_max is None
    assert torch.isfinite(transform.inverse(x, torch.tensor([1.0, 2.0]))).all()
