"""The layer hit map: which layers have a hit at all, calibrated on an energy flow's draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caloforge.errors import CaloforgeError
from caloforge.layer_hits import LayerHitMap

THRESHOLD, EMPTY = 0.075, 0.00375


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """E_inc ``(n,)`` MeV and deposits ``(n, 3)`` MeV: layer 0 hit in 10 % of the showers
    (log-normal above the threshold, as a first layer), layer 1 always, layer 2 in 60 %."""
    rng = np.random.default_rng(seed)
    energies = rng.uniform(1e4, 1e5, n)
    deposits = np.zeros((n, 3))
    hit0 = rng.random(n) < 0.10
    deposits[hit0, 0] = THRESHOLD * np.exp(rng.exponential(1.2, hit0.sum()))
    deposits[:, 1] = energies * 1e-3 * rng.lognormal(0, 0.3, n)
    hit2 = rng.random(n) < 0.6
    deposits[hit2, 2] = THRESHOLD * np.exp(rng.exponential(2.0, hit2.sum()))
    return energies, deposits


def _flow_draws(energies: np.ndarray, deposits: np.ndarray, seed: int) -> np.ndarray:
    """What a smooth flow makes of ``deposits``: empty layers dequantised under a tenth of
    the threshold, and the hits' lower edge smeared down into the gap (layer 0: 10 % ->
    ~4 % above the threshold); layer 2 with too many hits (every draw at least 2x the
    threshold where the data's layer has one, and a fifth of the empties lifted)."""
    rng = np.random.default_rng(seed)
    drawn = deposits.copy()
    empty = drawn == 0
    drawn[empty] = rng.uniform(0, 0.1 * THRESHOLD, empty.sum())
    hit0 = deposits[:, 0] > 0
    drawn[hit0, 0] *= np.exp(rng.normal(-1.0, 0.8, hit0.sum()))
    lifted = empty[:, 2] & (rng.random(len(drawn)) < 0.2)
    drawn[lifted, 2] = 2 * THRESHOLD
    return drawn


def test_a_rarely_hit_layer_is_hit_as_often_as_in_the_data():
    """Fitted on one sample, applied to another's draws: the rarely hit layer is hit as
    often as the data's (from ~4 %) with the data's deposits (quantiles within 10 %), the
    layer always hit and the layer with too many hits are left as drawn, and the showers'
    order within a layer is kept."""
    energies, deposits = _data(20_000, seed=1)
    hit_map = LayerHitMap.fit(deposits, energies, _flow_draws(energies, deposits, 2),
                              energies, THRESHOLD, EMPTY)
    assert [row for row in hit_map.active] == [[True, False, False]]
    energies, deposits = _data(20_000, seed=3)
    drawn = _flow_draws(energies, deposits, 4)
    assert (drawn[:, 0] >= THRESHOLD).mean() < 0.06  # the defect the map is for
    mapped = hit_map.apply(torch.as_tensor(drawn), torch.as_tensor(energies)).numpy()
    assert (mapped[:, 0] >= THRESHOLD).mean() == pytest.approx(0.10, abs=0.01)
    real_hits, mapped_hits = deposits[deposits[:, 0] > 0, 0], mapped[mapped[:, 0] >= THRESHOLD, 0]
    levels = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(mapped_hits, levels), np.quantile(real_hits, levels),
                               rtol=0.1)
    assert (mapped[mapped[:, 0] < THRESHOLD, 0] <= EMPTY).all()
    np.testing.assert_array_equal(mapped[:, 1:], drawn[:, 1:])
    order = np.argsort(drawn[:, 0], kind="stable")
    assert (np.diff(mapped[order, 0]) >= -1e-12).all()


def test_bins_of_the_incident_energy_map_each_bin_on_its_own():
    """With 2 bins, a layer hit in 5 % of the low-energy showers and 20 % of the high-energy
    ones is hit that often in each bin after the map (one map for all energies would give
    both the mixture's share)."""
    rng = np.random.default_rng(5)
    n = 20_000
    energies = rng.uniform(1e4, 1e5, n)
    share = np.where(energies < 5.5e4, 0.05, 0.20)
    deposits = np.where(rng.random(n) < share, THRESHOLD * np.exp(rng.exponential(1.0, n)),
                        0.0)[:, None]
    drawn = np.where(deposits > 0, deposits * np.exp(rng.normal(-1.0, 0.8, (n, 1))),
                     rng.uniform(0, 0.1 * THRESHOLD, (n, 1)))
    hit_map = LayerHitMap.fit(deposits, energies, drawn, energies, THRESHOLD, EMPTY, bins=2)
    mapped = hit_map.apply(torch.as_tensor(drawn), torch.as_tensor(energies)).numpy()[:, 0]
    low = energies < hit_map.energy_edges[0]
    assert (mapped[low] >= THRESHOLD).mean() == pytest.approx(0.05, abs=0.01)
    assert (mapped[~low] >= THRESHOLD).mean() == pytest.approx(0.20, abs=0.015)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.02, 0.5))
def test_the_map_is_monotone_and_hits_stay_hits(seed, hit_share):
    """Whatever the sample: within a layer and bin the map keeps the order of the draws,
    every draw at or above the boundary becomes a hit (at least the threshold), every draw
    under it an empty layer (at most ``empty_mev``), and the state survives JSON."""
    rng = np.random.default_rng(seed)
    n = 1000
    energies = rng.uniform(1e3, 1e5, n)
    deposits = np.where(rng.random((n, 2)) < hit_share,
                        THRESHOLD * np.exp(rng.exponential(1.5, (n, 2))), 0.0)
    drawn = np.where(deposits > 0, deposits * np.exp(rng.normal(-0.5, 1.0, (n, 2))),
                     rng.uniform(0, 0.1 * THRESHOLD, (n, 2)))
    hit_map = LayerHitMap.fit(deposits, energies, drawn, energies, THRESHOLD, EMPTY)
    hit_map = LayerHitMap.from_state(json.loads(json.dumps(hit_map.state())))
    probe = np.exp(rng.uniform(np.log(1e-4), np.log(100), (4000, 2)))
    mapped = hit_map.apply(torch.as_tensor(probe), torch.full((4000,), 5e4,
                                                              dtype=torch.float64)).numpy()
    for layer in range(2):
        order = np.argsort(probe[:, layer])
        values = mapped[order, layer]
        if hit_map.active[0][layer]:
            assert (np.diff(values) >= -1e-9 * values[1:]).all()
            boundary = hit_map.x_nodes[0][layer][0]
            above = probe[:, layer] >= boundary
            assert (mapped[above, layer] >= THRESHOLD * (1 - 1e-9)).all()
            assert (mapped[~above, layer] <= EMPTY).all()
        else:
            np.testing.assert_array_equal(mapped[:, layer], probe[:, layer])


@pytest.mark.parametrize("change", [
    lambda s: s.pop("x_nodes"),
    lambda s: s.update(active=[[True]]),
    lambda s: s.update(x_nodes=[[list(reversed(row)) for row in rows] for rows in s["x_nodes"]]),
    lambda s: s.update(empty_mev=1.0),
    lambda s: s.update(energy_edges=[1.0]),
    lambda s: s.update(y_nodes="no"),
])
def test_a_malformed_state_is_refused(change):
    energies, deposits = _data(2000, seed=6)
    state = LayerHitMap.fit(deposits, energies, _flow_draws(energies, deposits, 7), energies,
                            THRESHOLD, EMPTY).state()
    change(state)
    with pytest.raises(CaloforgeError, match="layer hit map"):
        LayerHitMap.from_state(state)


def test_fit_refuses_mismatched_shapes():
    energies, deposits = _data(500, seed=8)
    with pytest.raises(CaloforgeError, match="do not match"):
        LayerHitMap.fit(deposits, energies, deposits[:, :2], energies, THRESHOLD, EMPTY)
    with pytest.raises(CaloforgeError, match="do not match"):
        LayerHitMap.fit(deposits, energies[:10], deposits, energies, THRESHOLD, EMPTY)
