"""The core fraction map: each layer's core share moved to the data's distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from caloforge.core_fraction import CoreFractionMap
from caloforge.errors import CaloforgeError

SIDE, N_LAYERS, THRESHOLD = 6, 2, 0.01
CORE = np.flatnonzero(np.pad(np.ones((2, 2)), 2).ravel())  # the central 2 x 2 of 6 x 6


def _layers(n: int, spread: float, seed: int) -> np.ndarray:
    """Showers ``(n, 2, 36)`` MeV: per layer an energy log-uniform in 1..100 MeV, a core
    fraction logistic(N(m(E), spread)) with m rising with the energy, the core's and the
    rest's energy spread over their cells at random; cells under the threshold empty."""
    rng = np.random.default_rng(seed)
    energy = np.exp(rng.uniform(0, np.log(100), (n, N_LAYERS)))
    fraction = 1 / (1 + np.exp(-(np.log(energy) / 2 - 1 + rng.normal(0, spread, energy.shape))))
    rest = np.setdiff1d(np.arange(SIDE * SIDE), CORE)
    cells = np.zeros((n, N_LAYERS, SIDE * SIDE))
    cells[..., CORE] = rng.dirichlet(np.full(len(CORE), 3.0), (n, N_LAYERS)) * (
        fraction * energy)[..., None]
    cells[..., rest] = rng.dirichlet(np.full(len(rest), 1.0), (n, N_LAYERS)) * (
        (1 - fraction) * energy)[..., None]
    return np.where(cells >= THRESHOLD, cells, 0)


def _fraction(cells: np.ndarray) -> np.ndarray:
    return cells[..., CORE].sum(-1) / cells.sum(-1)


def _applied(model: CoreFractionMap, layers: np.ndarray) -> np.ndarray:
    cells = torch.as_tensor(layers)
    return torch.stack([model.apply(cells[:, layer], layer) for layer in range(N_LAYERS)],
                       1).numpy()


@pytest.fixture(scope="module")
def fitted() -> CoreFractionMap:
    """Fitted with data spread 1.0 against a model spread 0.4 (too even a core)."""
    return CoreFractionMap.fit(_layers(3000, 1.0, seed=1), _layers(3000, 0.4, seed=2), CORE,
                               THRESHOLD)


def test_mapped_fractions_spread_as_the_data_and_keep_energy_hits_and_ranks(fitted):
    """Applied to a fresh model sample: per fifth of the layer energies the core fraction's
    mean within 0.03 and spread within 10 % of the data's (it was 0.4x); every layer's
    energy and hits kept, hits at or above the threshold, the showers' order kept."""
    real = _layers(6000, 1.0, seed=3)
    generated = _layers(6000, 0.4, seed=4)
    mapped = _applied(fitted, generated)
    np.testing.assert_allclose(mapped.sum(-1), generated.sum(-1), rtol=1e-7)
    assert np.array_equal(mapped > 0, generated > 0)
    assert (mapped[mapped > 0] >= THRESHOLD).all()
    for layer in range(N_LAYERS):
        edges = np.asarray(fitted.energy_edges[layer])  # the data's fifths, log MeV
        energy = real[:, layer].sum(-1)
        real_bin = np.digitize(np.log(energy), edges)
        fake_bin = np.digitize(np.log(generated[:, layer].sum(-1)), edges)
        for number in range(5):
            true = _fraction(real[real_bin == number, layer])
            before = _fraction(generated[fake_bin == number, layer])
            after = _fraction(mapped[fake_bin == number, layer])
            assert before.std() < 0.7 * true.std()  # the defect is there to fix
            assert abs(after.mean() - true.mean()) < 0.03, (layer, number)
            assert abs(after.std() / true.std() - 1) < 0.1, (layer, number)
            # a monotone map (up to the bounds that keep every hit above the threshold)
            ranks = [np.argsort(np.argsort(values)) for values in (before, after)]
            assert np.corrcoef(*ranks)[0, 1] > 0.99


def test_layers_without_hits_in_core_or_rest_are_left_alone(fitted):
    generated = _layers(50, 0.4, seed=5)
    generated[:10, :, CORE] = 0
    rest = np.setdiff1d(np.arange(SIDE * SIDE), CORE)
    generated[10:20, :, rest] = 0
    generated[20:25] = 0
    mapped = _applied(fitted, generated)
    np.testing.assert_array_equal(mapped[:25], generated[:25])
    assert not np.allclose(mapped[25:], generated[25:])


def test_the_state_round_trips_through_json_and_malformed_states_are_refused(fitted):
    state = json.loads(json.dumps(fitted.state()))
    again = CoreFractionMap.from_state(state)
    generated = torch.as_tensor(_layers(200, 0.4, seed=6)[:, 1])
    assert torch.equal(again.apply(generated, 1), fitted.apply(generated, 1))
    broken_nodes = json.loads(json.dumps(state))
    first = next(i for i, pair in enumerate(broken_nodes["nodes"][0]) if pair is not None)
    broken_nodes["nodes"][0][first][0] = broken_nodes["nodes"][0][first][0][::-1]
    for broken, words in (({k: v for k, v in state.items() if k != "nodes"}, "malformed"),
                          ({**state, "energy_edges": [[1.0], [1.0, 2.0]]}, "inconsistent"),
                          ({**state, "nodes": state["nodes"][:1]}, "inconsistent"),
                          ({**state, "core": []}, "inconsistent"),
                          ({**state, "threshold_mev": "x"}, "malformed"),
                          (broken_nodes, "not strictly increasing")):
        with pytest.raises(CaloforgeError, match=words):
            CoreFractionMap.from_state(broken)


@settings(max_examples=40, deadline=None)
@given(cells=arrays(np.float64, (3, SIDE * SIDE),
                    elements=st.one_of(st.just(0.0), st.just(THRESHOLD * (1 + 1e-6)),
                                       st.floats(THRESHOLD, 1e3))),
       float32=st.booleans())
def test_any_layer_keeps_its_energy_and_hits(fitted, cells, float32):
    """Whatever hits a layer has (zeros, hits held just above the threshold as the models
    leave them, or anything up to 1 GeV a cell), in float64 or float32: finite cells, the
    same hits, none under the threshold, the energy kept (float32: to 1e-5). Hits at the
    held value once made a float32 layer lose its energy (no scale factor passed the
    rounding)."""
    cells = cells.astype(np.float32) if float32 else cells
    mapped = fitted.apply(torch.as_tensor(cells), 0).numpy()
    assert np.isfinite(mapped).all()
    assert np.array_equal(mapped > 0, cells > 0)
    assert (mapped[mapped > 0] >= np.float32(THRESHOLD)).all()
    np.testing.assert_allclose(mapped.sum(1), cells.sum(1), rtol=1e-5 if float32 else 1e-6)


def test_an_identity_map_leaves_float32_layers_with_held_hits_as_they_are():
    """Regression: hits held just above the threshold (as the models leave them) once made
    every scale factor fail its float32 rounding test, and the layer collapsed to held
    hits. An identity map must leave such a layer (a tiny model's, 4 x 4 cells) as it is."""
    levels = np.linspace(0, 1, 5).tolist()
    identity = CoreFractionMap(core=[5, 6, 9, 10], threshold_mev=THRESHOLD, energy_edges=[[]],
                               nodes=[[[levels, levels]]])
    held = 1.000001e-02
    cells = np.array([[0.0, 33.920956, 1.0299017e-02, 1.0028442e-02, held, 1.0016817e-02,
                       held, held, held, held, held, 0.12960446, held, 2.2833292, 4.1626573,
                       held]], dtype=np.float32)
    mapped = identity.apply(torch.as_tensor(cells), 0).numpy()
    np.testing.assert_allclose(mapped, cells, rtol=1e-5)
