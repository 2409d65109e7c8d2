"""Convolutional L2LFlows: the options that act after training — spectrum maps, the
square symmetry, hit counts, the layer energy after the maps, the core's split, block
groupings, and their ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caloforge.data import ShowerData
from caloforge.errors import OptionError
from caloforge.models import load_model
from caloforge.models.base import shard_generator
from caloforge.models.flows.convflow import ConvL2LFlow
from caloforge.preprocessing import group_quantile_map_nodes, hit_rate_groups, monotone_log_map
from convflow_cases import CARTESIAN, CORES, CYLINDER, trained_model, training_showers
from convflow_cases import tiny as _tiny

from conftest import random_showers, showers_from_drawn_noise


@pytest.fixture(scope="module")
def data():
    return training_showers()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return trained_model(data, str(tmp_path_factory.mktemp("convflow")))


def test_postprocess_spline_moves_cell_spectrum_towards_reference(trained, data):
    model, _ = trained
    reference = data.select(slice(0, 120))
    before = model.sample(reference.incident_energies, seed=7).showers
    model.fit_postprocess(reference, seed=1)
    try:
        after = model.sample(reference.incident_energies, seed=7).showers
        x, y = (np.asarray(v) for v in model.postprocess_nodes)
        assert (np.diff(x) > 0).all() and (np.diff(y) >= 0).all()
        real = np.log10(reference.showers[reference.showers > 0])
        levels = np.linspace(0.05, 0.95, 19)

        def distance(showers):
            cells = np.log10(showers[showers > 0])
            return np.abs(np.quantile(cells, levels) - np.quantile(real, levels)).mean()

        assert distance(after) < distance(before)
        # zero cells stay zero
        assert np.array_equal(after == 0, before == 0)
    finally:
        model.postprocess_nodes = None


def test_layer_splines_map_each_layer_and_round_trip(trained, data, tmp_path):
    """``postprocess: layer-spline``: one monotone map per layer, each fitted to that layer's
    spectrum (a layer with too few hits keeps its own), saved and loaded with the model."""
    model, _ = trained
    reference = data.select(slice(0, 120))
    size = 16
    before = model.sample(reference.incident_energies, seed=7).showers
    model.config.postprocess = "layer-spline"
    try:
        model.fit_postprocess(reference, nodes=32, seed=1)
        assert model.postprocess_nodes is None
        assert len(model.layer_postprocess_nodes) == CARTESIAN.n_layers
        after = model.sample(reference.incident_energies, seed=7).showers
        levels = np.linspace(0.05, 0.95, 19)

        def distance(showers, layer):
            part = slice(layer * size, (layer + 1) * size)
            cells, real = showers[:, part], reference.showers[:, part]
            return np.abs(np.quantile(np.log10(cells[cells > 0]), levels)
                          - np.quantile(np.log10(real[real > 0]), levels)).mean()

        for layer in range(CARTESIAN.n_layers):
            assert model.layer_postprocess_nodes[layer] is not None
            assert distance(after, layer) < distance(before, layer)
        assert np.array_equal(after == 0, before == 0)
        model.layer_postprocess_nodes[1] = None  # a layer left as generated
        model.save(str(tmp_path / "layered"))
        loaded = load_model(str(tmp_path / "layered"))
        assert loaded.layer_postprocess_nodes[1] is None
        again = loaded.sample(reference.incident_energies, seed=7).showers
        np.testing.assert_array_equal(again[:, size:2 * size], before[:, size:2 * size])
        np.testing.assert_array_equal(again[:, :size], after[:, :size])
    finally:
        model.config.postprocess = "none"
        model.layer_postprocess_nodes = None


def test_group_splines_give_each_calibration_group_its_spectrum(trained, data, tmp_path):
    """``postprocess: group-spline``: one monotone map per calibration group (here one
    ring of cells around the image centre per layer), each taking that group's hits to the
    reference's spectrum of the group; empty cells stay empty, hits stay hits; saved and
    loaded with the model."""
    model, _ = trained
    reference = data.select(slice(0, 120))
    before = model.sample(reference.incident_energies, seed=7).showers
    model.config.postprocess, model.config.hit_calibration_groups = "group-spline", "ring"
    try:
        model.fit_postprocess(reference, nodes=64, seed=1)
        assert model.postprocess_nodes is None and model.layer_postprocess_nodes is None
        groups = np.asarray(model.postprocess_groups)
        assert groups.shape == (CARTESIAN.n_voxels,)
        fitted = [g for g, nodes in enumerate(model.group_postprocess_nodes) if nodes]
        assert len(fitted) >= 2
        after = model.sample(reference.incident_energies, seed=7).showers
        levels = np.linspace(0.05, 0.95, 19)

        def distance(showers, group):
            cells, real = showers[:, groups == group], reference.showers[:, groups == group]
            return np.abs(np.quantile(np.log10(cells[cells > 0]), levels)
                          - np.quantile(np.log10(real[real > 0]), levels)).mean()

        for group in fitted:
            assert distance(after, group) < distance(before, group)
        assert np.array_equal(after == 0, before == 0)
        assert after[after > 0].min() >= model.voxel_transform.threshold_mev
        model.save(str(tmp_path / "grouped"))
        loaded = load_model(str(tmp_path / "grouped"))
        assert loaded.postprocess_groups == model.postprocess_groups
        np.testing.assert_array_equal(loaded.sample(reference.incident_energies, seed=7).showers,
                                      after)
    finally:
        model.config.postprocess, model.config.hit_calibration_groups = "none", "hit-rate"
        model.postprocess_groups = model.group_postprocess_nodes = None


def _square_symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The 8 images of ``image`` ``(..., H, H)`` under the square's symmetries."""
    out = []
    for turned in (image, np.swapaxes(image, -1, -2)):
        out += [turned, turned[..., ::-1], turned[..., ::-1, :], turned[..., ::-1, ::-1]]
    return out


def _symmetry_elements(turned: np.ndarray, plain: np.ndarray, symmetries) -> set[int]:
    """Which element of ``symmetries(shower)`` (a list of images) each of ``turned`` is of
    the same-seed ``plain`` shower; asserts every one is some element."""
    elements = set()
    for shower, original in zip(turned, plain):
        matches = [k for k, image in enumerate(symmetries(original))
                   if np.array_equal(image, shower)]
        assert matches, "not a symmetry of the unsymmetrised shower"
        elements.add(matches[0])
    return elements


def test_symmetrise_turns_each_shower_by_one_square_symmetry(trained, data, tmp_path):
    """``symmetrise: d4``: each shower is the unsymmetrised one (same seed) under one of the
    8 symmetries of the square, all layers alike, every element drawn; a model whose hits
    all lie on one place of the 2 x 2 squeeze blocks (the far-halo defect, exaggerated)
    then puts them evenly on the four places; saved with the model; the exported function
    (``showers_from_noise`` on ``draw_noise``) gives what ``sample`` gives (its ONNX graph:
    the hit-count test's model is symmetrised too)."""
    model, _ = trained
    energies = data.incident_energies[:120]
    side = 4
    plain = model.sample(energies, seed=4).showers.reshape(-1, CARTESIAN.n_layers, side, side)
    model.config.symmetrise = "d4"
    try:
        turned = model.sample(energies, seed=4).showers.reshape(plain.shape)
        assert len(_symmetry_elements(turned, plain, _square_symmetries)) == 8
        traced = showers_from_drawn_noise(model, energies, seed=4)
        np.testing.assert_allclose(traced, turned.reshape(len(energies), -1),
                                   rtol=1e-4, atol=1e-5)
        # only place (0, 1) of each squeeze block keeps hits: symmetrised, a quarter each
        places = np.tile(model._block_places().ravel() % 4, CARTESIAN.n_layers)
        model.voxel_cuts_mev = np.where(places == 1, 0.0, 1e9).tolist()
        biased = model.sample(energies, seed=4).showers
        share = np.array([(biased[:, places == p] > 0).sum() for p in range(4)])
        assert share.sum() > 0 and np.abs(share / share.sum() - 0.25).max() < 0.06, share
        model.config.symmetrise = "none"
        unturned = model.sample(energies, seed=4).showers
        assert (unturned[:, places != 1] > 0).sum() == 0
        model.voxel_cuts_mev = None
        model.config.symmetrise = "d4"
        model.save(str(tmp_path / "d4"))
        assert load_model(str(tmp_path / "d4")).config.symmetrise == "d4"
        # the model is also conditioned on more than the incident energy: refused
        conditions = model.conditions
        model.conditions = type("Conditions", (), {"names": ["theta"]})()  # type: ignore
        with pytest.raises(OptionError, match="incident energy alone"):
            model.sample(energies, seed=4)
        model.conditions = conditions
    finally:
        model.config.symmetrise = "none"
        model.voxel_cuts_mev = None


def _cylinder_symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The 2 n_alpha images of ``image`` ``(..., n_alpha, n_radial)`` under the turns by
    whole angular bins and the reflection in the angle."""
    n_alpha = image.shape[-2]
    return [np.roll(mirrored, -k, axis=-2) for mirrored in (image, image[..., ::-1, :])
            for k in range(n_alpha)]


def test_symmetrise_rotations_turns_each_cylinder_shower_by_one_angular_symmetry(tmp_path):
    """``symmetrise: rotations`` (cylinders): each shower is the unsymmetrised one (same
    seed) turned by whole angular bins and maybe reflected, all layers alike, every one of
    the 2 n_alpha elements drawn; the exported function gives what ``sample`` gives; saved
    with the model; refused on Cartesian layers (and ``d4`` on cylinders)."""
    data = random_showers(CYLINDER, 160, seed=5)
    model = ConvL2LFlow(CYLINDER, _tiny(1))
    model.fit(data, str(tmp_path / "run"))
    energies = data.incident_energies[:150]
    n_alpha, n_radial = 6, 4
    shape = (-1, CYLINDER.n_layers, n_alpha, n_radial)
    plain = model.sample(energies, seed=4).showers.reshape(shape)
    model.config.symmetrise = "rotations"
    turned = model.sample(energies, seed=4).showers.reshape(shape)
    assert len(_symmetry_elements(turned, plain, _cylinder_symmetries)) == 2 * n_alpha
    traced = showers_from_drawn_noise(model, energies, seed=4)
    np.testing.assert_allclose(traced, turned.reshape(len(energies), -1), rtol=1e-4, atol=1e-5)
    model.save(str(tmp_path / "turned"))
    assert load_model(str(tmp_path / "turned")).config.symmetrise == "rotations"
    with pytest.raises(OptionError, match="rotations needs cylindrical layers"):
        ConvL2LFlow(CARTESIAN, _tiny(1, symmetrise="rotations"))
    with pytest.raises(OptionError, match="d4 needs square Cartesian layers"):
        ConvL2LFlow(CYLINDER, _tiny(1, symmetrise="d4"))
    with pytest.raises(OptionError, match="ring_spread needs cylindrical layers"):
        ConvL2LFlow(CARTESIAN, _tiny(1, ring_spread="calibrated"))
    with pytest.raises(OptionError, match="ring_spread must be one of"):
        type(model.config).from_dict({"ring_spread": "yes"})


def test_hit_counts_keep_that_many_of_the_highest_cells(trained, data, tmp_path, monkeypatch):
    """``hit_counts: layer`` / ``band``: each layer (each radial band of it) keeps the drawn
    number of hits, the cells furthest above their cut (no cuts fitted: the highest
    cells), every hit where it has fewer, and the layer its energy; the layers' own draws
    are those without counts (the counts' noise comes after them). The fitted count model
    is saved with the model, and the exported function and ONNX graph give what
    ``sample`` gives."""
    model, _ = trained
    energies = data.incident_energies[:60]
    n_layers, size = CARTESIAN.n_layers, 16
    plain = model.sample(energies, seed=5).showers.reshape(-1, n_layers, size)
    # 4 x 4 cells: the inner 2 x 2 within 2 cells of the centre, the rest the second band
    rows, columns = np.divmod(np.arange(size), 4)
    outer = np.hypot(rows - 1.5, columns - 1.5) >= 2
    try:
        for kind, bands in (("layer", np.zeros(size, dtype=int)), ("band", outer.astype(int))):
            model.config.hit_counts = kind
            model.fit_hit_counts(data)
            n_bands = bands.max() + 1
            assert model.n_hit_counts == n_layers * n_bands
            np.testing.assert_array_equal(model._count_bands(), bands)
            wanted = torch.as_tensor(1.0 + np.add.outer(np.arange(len(energies)),
                                                        np.arange(n_layers * n_bands)) % 4)
            wanted[::7, n_bands:2 * n_bands] = 0  # layer 1 of every 7th shower: no hits
            monkeypatch.setattr(model, "_hit_counts", lambda *_, w=wanted: w)
            kept = model.sample(energies, seed=5).showers.reshape(plain.shape)
            for shower, layer, band in np.ndindex(len(energies), n_layers, n_bands):
                members = bands == band
                before = plain[shower, layer, members]
                after = kept[shower, layer, members]
                n = min(int(wanted[shower, layer * n_bands + band]), int((before > 0).sum()))
                # the band's n highest cells (and any tied with the n-th)
                lowest_kept = np.sort(before)[::-1][n - 1] if n else np.inf
                np.testing.assert_array_equal(after > 0, before >= lowest_kept)
            for shower, layer in np.ndindex(len(energies), n_layers):
                if kept[shower, layer].any():  # the layer's energy kept
                    assert kept[shower, layer].sum() == pytest.approx(
                        plain[shower, layer].sum(), rel=1e-5)
            assert (kept[::7, 1] == 0).all()
            monkeypatch.undo()
    finally:
        model.config.hit_counts = "none"
        model.hit_count_model = None
    # trained with the option (and, for one ONNX export covering them too, the symmetry
    # and per-layer spectrum maps): the count model fitted after training, saved and
    # loaded; the exported function and its ONNX graph draw what sample draws
    counting = ConvL2LFlow(CARTESIAN, _tiny(1, layer_energy="deposited", hit_counts="band",
                                            hit_count_showers=len(data), symmetrise="d4",
                                            postprocess="layer-spline",
                                            postprocess_showers=len(data),
                                            core_fraction="calibrated",
                                            core_fraction_radius=1.0,
                                            core_fraction_hits="layer",
                                            core_split="calibrated"))
    counting.fit(data, str(tmp_path / "counts"))
    assert counting.hit_count_model is not None and counting.core_fraction_maps is not None
    assert counting.core_split_factors is not None  # fitted on the core map's showers
    counted = counting.sample(energies, seed=5).showers
    noise = counting.draw_noise(len(energies), shard_generator(5, 0))
    assert noise.shape[1] == counting.noise_features() == n_layers * (1 + size + 2) + 3
    assert counting.layer_postprocess_nodes is not None
    np.testing.assert_allclose(showers_from_drawn_noise(counting, energies, seed=5), counted,
                               rtol=1e-4, atol=1e-5)
    from caloforge.export import export_model

    description = export_model(counting, str(tmp_path / "counts.onnx"))
    assert description["check"]["max_relative_deviation"] <= 1e-4
    loaded = load_model(str(tmp_path / "counts"))
    assert loaded.hit_count_model == counting.hit_count_model
    assert loaded.core_fraction_maps == counting.core_fraction_maps
    assert loaded.core_split_factors == counting.core_split_factors
    np.testing.assert_array_equal(loaded.sample(energies, seed=5).showers, counted)
    # faint cells are candidates: a count above the flows' hits makes the highest of them
    # hits (>= the threshold), the layer keeping its deposit
    counting.layer_postprocess_nodes = None  # the maps would move the layer energies
    fitted, counting.hit_count_model = counting.hit_count_model, None
    plain = counting.sample(energies, seed=5).showers.reshape(-1, n_layers, size)
    counting.hit_count_model = fitted
    monkeypatch.setattr(counting, "_hit_counts",
                        lambda *_: torch.full((len(energies), n_layers * 2), float(size)))
    every = counting.sample(energies, seed=5).showers.reshape(plain.shape)
    has_hits = plain.sum(-1) > 0
    hits_before, hits_after = (plain > 0).sum(-1), (every > 0).sum(-1)
    assert (hits_after >= hits_before).all()
    assert hits_after.sum() > 1.5 * hits_before.sum()  # the flows' faint cells made hits
    assert (every[every > 0] >= CARTESIAN.threshold_mev).all()
    # (to within the faint hits scaled under the threshold and lifted back to it)
    np.testing.assert_allclose(every.sum(-1)[has_hits], plain.sum(-1)[has_hits], rtol=1e-2)
    with pytest.raises(OptionError, match="hit_counts needs layer_energy"):
        type(model.config).from_dict({"hit_counts": "band"})
    with pytest.raises(OptionError, match="hit_counts must be one of"):
        type(model.config).from_dict({"hit_counts": "poisson", "layer_energy": "deposited"})


def test_postprocess_energy_restored_keeps_each_layers_energy(trained, data):
    """``postprocess_energy: restored``: after a spline that doubles every hit, each layer
    is scaled back to its energy before the spline (``kept``: twice it); the hits stay the
    same cells."""
    model, _ = trained
    energies = data.incident_energies[:60]
    before = model.sample(energies, seed=6).showers.reshape(len(energies), 4, 16)
    try:
        model.postprocess_nodes = [[-6.0, 6.0], [-6.0 + np.log10(2), 6.0 + np.log10(2)]]
        kept = model.sample(energies, seed=6).showers.reshape(before.shape)
        np.testing.assert_allclose(kept.sum(-1), 2 * before.sum(-1), rtol=1e-4)
        model.config.postprocess_energy = "restored"
        restored = model.sample(energies, seed=6).showers.reshape(before.shape)
        np.testing.assert_allclose(restored.sum(-1), before.sum(-1), rtol=1e-4)
        np.testing.assert_array_equal(restored > 0, before > 0)
    finally:
        model.postprocess_nodes = None
        model.config.postprocess_energy = "kept"
    with pytest.raises(OptionError, match="postprocess_energy must be"):
        type(model.config).from_dict({"postprocess_energy": "scaled"})


def test_postprocess_energy_drawn_hands_on_the_energy_flows_draws(data, tmp_path):
    """``postprocess_energy: drawn`` (issue 28: on ild-ecal the cuts and maps move each
    layer's sum shower by shower and loosen the layers' correlations): each layer's hits
    sum to the deposit the energy flow drew for it, also after a spline that doubles every
    hit; the hit pattern is that of ``kept``; needs ``layer_energy: deposited``."""
    model = ConvL2LFlow(CARTESIAN, _tiny(1, layer_energy="deposited"))
    model.fit(data, str(tmp_path))
    energies = data.incident_energies[:60]
    n_layers = CARTESIAN.n_layers
    with torch.inference_mode():
        drawn = model._start_layer_sampling(energies, {}, 6, 0, 10_000, "cpu")[3].numpy()
    kept = model.sample(energies, seed=6).showers.reshape(len(energies), n_layers, -1)
    lowest = CARTESIAN.threshold_mev
    try:
        for nodes in (None, [[-6.0, 6.0], [-6.0 + np.log10(2), 6.0 + np.log10(2)]]):
            model.postprocess_nodes = nodes
            model.config.postprocess_energy = "drawn"
            out = model.sample(energies, seed=6).showers.reshape(kept.shape)
            np.testing.assert_array_equal(out > 0, kept > 0)
            hits = (out > 0).sum(-1)
            reachable = (hits > 0) & (drawn >= hits * lowest * 1.01)
            assert reachable.mean() > 0.5
            np.testing.assert_allclose(out.sum(-1)[reachable], drawn[reachable], rtol=1e-4)
            assert (out[out > 0] >= lowest).all()
            model.config.postprocess_energy = "kept"
        doubled = model.sample(energies, seed=6).showers.reshape(kept.shape)
        np.testing.assert_allclose(doubled.sum(-1), 2 * kept.sum(-1), rtol=1e-4)
    finally:
        model.postprocess_nodes = None
        model.config.postprocess_energy = "kept"
    with pytest.raises(OptionError, match="postprocess_energy: drawn needs layer_energy"):
        type(model.config).from_dict({"postprocess_energy": "drawn"})


def test_core_split_calibrated_spreads_the_core_as_the_data(trained, data, monkeypatch):
    """``core_split: calibrated``: reference showers whose four central cells share their
    energy half as unevenly as the model's (the ild-ecal hot core, exaggerated) give
    factors near 1/2, and the model's cores then spread as the reference's; the four
    keep their sum, every other cell stays as it was. Here the model's draws are given."""
    model, _ = trained
    rng = np.random.default_rng(8)
    n, core = 2000, np.array([5, 6, 9, 10])  # the 2 x 2 centre of a 4 x 4 layer
    np.testing.assert_array_equal(model._core_cells(), core)
    generated = rng.uniform(0.02, 0.05, (n, 4, 16))
    shares = rng.dirichlet([3, 3, 3, 3], (n, 4))
    generated[:, :, core] = 10 * shares
    reference = generated.copy()
    reference[:, :, core] = 10 * (0.25 + 0.5 * (shares - 0.25))
    generated, reference = (x.reshape(n, -1).astype(np.float32) for x in (generated, reference))
    try:
        model.config.core_split = "calibrated"
        monkeypatch.setattr(model, "_sample_in_flow_frame", lambda *_: generated)
        model.fit_core_split(ShowerData(data.incident_energies[:1].repeat(n), reference, {}, {}))
        np.testing.assert_allclose(model.core_split_factors, 0.5, atol=0.02)
        split = np.concatenate([model._split_core(torch.as_tensor(
            generated[:, layer * 16:(layer + 1) * 16]), layer).numpy() for layer in range(4)],
            axis=1)
        for real, fake in zip(model._core_share_deviations(reference),
                              model._core_share_deviations(split)):
            assert fake.std() == pytest.approx(real.std(), rel=0.05)
        shaped = [x.reshape(n, 4, 16) for x in (generated, split)]
        np.testing.assert_allclose(shaped[1][:, :, core].sum(-1), shaped[0][:, :, core].sum(-1),
                                   rtol=1e-5)
        others = np.setdiff1d(np.arange(16), core)
        np.testing.assert_array_equal(shaped[1][:, :, others], shaped[0][:, :, others])
        # in sampling: only the core's cells of full cores move
        monkeypatch.undo()
        model.config.core_split = "none"
        before = model.sample(data.incident_energies[:60], seed=7).showers.reshape(-1, 4, 16)
        model.config.core_split = "calibrated"
        after = model.sample(data.incident_energies[:60], seed=7).showers.reshape(-1, 4, 16)
        np.testing.assert_array_equal(after[:, :, others], before[:, :, others])
    finally:
        model.config.core_split = "none"
        model.core_split_factors = None
    with pytest.raises(OptionError, match="core_split must be one of"):
        type(model.config).from_dict({"core_split": "even"})
    with pytest.raises(OptionError, match="core_split needs Cartesian layers"):
        ConvL2LFlow(CYLINDER, _tiny(1, core_split="calibrated"))


def test_core_fraction_calibrated_moves_energy_between_core_and_rest(trained, data):
    """``core_fraction: calibrated``: the core is the cells within the radius of the axis
    (the first rows of a cylinder); fitted on the model's own draws, sampling then moves
    energy between each layer's core and the rest and keeps every layer's energy and hits
    (the same seed with and without the map); a radius that leaves no cell outside the
    core, or none in it, is refused."""
    model, _ = trained
    rows, columns = np.divmod(np.arange(16), 4)
    distance = np.hypot(rows - 1.5, columns - 1.5)
    energies = data.incident_energies[:80]
    try:
        for radius in (1.0, 2.0):
            model.config.core_fraction_radius = radius
            np.testing.assert_array_equal(model._core_fraction_cells(),
                                          np.flatnonzero(distance < radius))
        model.config.core_fraction_radius = 1.0
        model.config.core_fraction = "calibrated"
        before = model.sample(energies, seed=7).showers.reshape(-1, 4, 16)
        model.fit_core_fraction(data)
        assert model.core_fraction_maps is not None and len(model.core_fraction_maps) == 1
        after = model.sample(energies, seed=7).showers.reshape(-1, 4, 16)
        np.testing.assert_allclose(after.sum(-1), before.sum(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(after > 0, before > 0)
        core = np.flatnonzero(distance < 1)
        assert not np.allclose(after[:, :, core].sum(-1), before[:, :, core].sum(-1))
        # rings: cores of 1 and 2 cells (4 and 12 of 4 x 4), one map after the other
        model.config.core_fraction, model.config.core_fraction_radius = "rings", 2.0
        model.fit_core_fraction(data)
        assert [len(m.core) for m in model.core_fraction_maps] == [4, 12]
        ringed = model.sample(energies, seed=7).showers.reshape(-1, 4, 16)
        np.testing.assert_allclose(ringed.sum(-1), before.sum(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ringed > 0, before > 0)
        model.config.core_fraction_radius = 3.0
        with pytest.raises(OptionError, match="leaves every cell in the core"):
            model.fit_core_fraction(data)
    finally:
        model.config.core_fraction, model.config.core_fraction_radius = "none", 2.0
        model.core_fraction_maps = None
    cylinder = ConvL2LFlow(CYLINDER, _tiny(1, core_fraction="calibrated",
                                           core_fraction_radius=1.0))
    assert len(cylinder._core_fraction_cells()) == CYLINDER.layers[0].n_alpha  # radial bin 0
    for bad, words in (({"core_fraction": "even"}, "core_fraction must be one of"),
                       ({"core_fraction_radius": 0}, "core_fraction_radius must be > 0"),
                       ({"core_fraction_hits": "parts"}, "core_fraction_hits needs"),
                       ({"core_fraction": "profile", "core_fraction_hits": "false"},
                        "core_fraction_hits must be one of")):
        with pytest.raises(OptionError, match=words):
            type(model.config).from_dict(bad)
    # files saved when the option was a switch: true was the layer's hits
    for saved, now in ((True, "layer"), (False, "none"), ("parts", "parts")):
        assert type(model.config).from_dict({"core_fraction": "profile",
                                             "core_fraction_hits": saved}
                                            ).core_fraction_hits == now


def test_block_groups_split_each_group_by_squeeze_place(trained, data):
    """``hit_calibration_groups: hit-rate-block`` / ``ring-block``: the hit-rate bins or
    rings, each split by the cell's place in its 2 x 2 squeeze block (the flow channel that
    draws it) and by whether the block lies on the zero-padded border (the 8 x 8 case:
    the outer ring of blocks)."""
    model, _ = trained
    rows, columns = np.divmod(np.arange(16), 4)
    places = np.tile(rows % 2 * 2 + columns % 2, 4)
    try:
        for kind in ("hit-rate", "ring"):
            model.config.hit_calibration_groups = kind
            plain = model._cut_groups(data.showers)
            model.config.hit_calibration_groups = f"{kind}-block"
            groups = model._cut_groups(data.showers)
            np.testing.assert_array_equal(groups // 8, plain)
            np.testing.assert_array_equal(model._cut_groups(data.showers, split_blocks=False),
                                          plain)  # what group-spline maps
            np.testing.assert_array_equal(groups % 4, places)
            # a 4 x 4 image is all border blocks (each block touches the zero padding)
            assert ((groups // 4) % 2 == 1).all()
    finally:
        model.config.hit_calibration_groups = "hit-rate"
    np.testing.assert_array_equal(plain[:16], np.floor(np.hypot(rows - 1.5, columns - 1.5)))
    model.config.hit_calibration_groups = "hit-rate-block"
    try:
        hit_rate = model._cut_groups(data.showers) // 8
    finally:
        model.config.hit_calibration_groups = "hit-rate"
    np.testing.assert_array_equal(hit_rate, hit_rate_groups(data.showers, [16] * 4))
    border = ConvL2LFlow(CORES, _tiny(1))._block_places() >= 4  # 8 x 8: the outer blocks
    inner = np.zeros((8, 8), dtype=bool)
    inner[2:6, 2:6] = True
    np.testing.assert_array_equal(border, ~inner)


def test_group_quantile_maps_skip_groups_with_too_few_hits():
    """A group with fewer hits than nodes in either set keeps its spectrum (None)."""
    rng = np.random.default_rng(0)
    reference = rng.lognormal(0.0, 1.0, (200, 4)) * (rng.random((200, 4)) < [1, 1, 0.05, 1])
    generated = rng.lognormal(0.5, 1.5, (200, 4))
    nodes = group_quantile_map_nodes(reference, generated, np.array([0, 0, 1, 2]), nodes=16)
    assert nodes[0] is not None and nodes[1] is None and nodes[2] is not None
    x, y = nodes[2]
    assert np.all(np.diff(x) > 0)
    real = np.log10(reference[:, 3][reference[:, 3] > 0])
    np.testing.assert_allclose([y[0], y[-1]], [real.min(), real.max()])


def _scipy_log_map(cells: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The post-processing as it was first written (scipy, float64): the reference."""
    from scipy.interpolate import PchipInterpolator

    spline = PchipInterpolator(x, y, extrapolate=True)
    out = cells.astype(np.float64).copy()
    above = cells > 0
    logs = np.log10(out[above])
    out[above] = 10.0 ** np.where(logs < x[0], logs + (y[0] - x[0]), np.where(
        logs > x[-1], logs + (y[-1] - x[-1]), spline(logs)))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 130), st.integers(0, 10_000))
def test_the_exportable_spline_is_scipys_pchip(nodes, seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-3, 3, nodes))
    x = x[np.concatenate([[True], np.diff(x) > 1e-3])]
    y = np.sort(rng.uniform(-3, 3, len(x)))
    if len(x) < 2:
        return
    cells = 10.0 ** rng.uniform(-4, 4, 2000)  # inside and beyond both ends
    cells[rng.random(2000) < 0.3] = 0.0
    cells[:len(x)] = 10.0 ** x  # exactly on the nodes
    produced = monotone_log_map(torch.tensor(cells, dtype=torch.float64), x.tolist(),
                                y.tolist()).numpy()
    np.testing.assert_allclose(produced, _scipy_log_map(cells, x, y), rtol=1e-9)
    single = monotone_log_map(torch.tensor(cells, dtype=torch.float32), x.tolist(), y.tolist())
    # float32 (what export runs): log10 to ~1e-7 of its value, amplified by the steepest
    # segment (PCHIP's slopes stay within 3x the secants'); ln 10 from log10 to the value
    steepest = 3 * float(np.abs(np.diff(y) / np.diff(x)).max())
    rtol = 1e-4 + 4e-7 * 4 * np.log(10) * steepest
    np.testing.assert_allclose(single.numpy(), _scipy_log_map(cells, x, y), rtol=rtol)
    assert np.array_equal(produced == 0, cells == 0)


def test_a_cylinder_with_the_spline_exports_to_onnx(tmp_path):
    """Circular padding, a shared flow with position channels, 2x2 blocks whitened
    (``cell_scale: block``), deposited layer energies, hit cuts per radial bin and bin of
    the deposit keeping their energy per group, a sampling temperature and the
    post-processing splines per calibration group and the angular symmetry (``symmetrise:
    rotations``), each layer scaled to the energy flow's draw (``postprocess_energy:
    drawn``), the radial profile given the hit counts (``core_fraction: profile``,
    ``core_fraction_hits``) and the rings' angular
    spread (``ring_spread``): onnxruntime gives the
    showers ``sample`` gives for the same noise. (Per-layer splines: the hit-count test's
    export.)"""
    from caloforge.core_fraction import is_nested_chain
    from caloforge.export import export_model, relative_deviation, run_onnx

    data = random_showers(CYLINDER, 160, seed=5)
    model = ConvL2LFlow(CYLINDER, _tiny(1, shared=True, position_channels=True,
                                        noise_mev=0.009, hit_calibration_showers=100,
                                        hit_calibration_groups="ring",
                                        hit_calibration_energy="group", temperature=0.9,
                                        layer_energy="deposited", cell_scale="block",
                                        hit_calibration_bins=2,
                                        postprocess="group-spline", postprocess_showers=100,
                                        symmetrise="rotations", ring_spread="calibrated",
                                        core_fraction="profile", core_fraction_hits="parts",
                                        postprocess_energy="drawn"))
    model.fit(data, str(tmp_path / "run"))
    # the radial profile's maps, applied ring by ring in the graph too
    assert model.core_fraction_maps is not None and is_nested_chain(model.core_fraction_maps)
    assert all(fraction_map.hit_regressors == "parts"
               for fraction_map in model.core_fraction_maps)
    assert any(beta is not None for fraction_map in model.core_fraction_maps
               for beta in fraction_map.model_coefficients)
    assert model.ring_spread_map is not None  # fitted after training, applied in the graph
    assert any(flags and any(flags) for flags in model.ring_spread_map.fitted)
    assert len(model.voxel_cuts_mev) == 4 * CYLINDER.n_voxels  # 2 x 2 bins
    assert max(model.voxel_cuts_mev) > CYLINDER.threshold_mev  # the export applies real cuts
    assert model.group_postprocess_nodes is not None
    assert sum(nodes is not None for nodes in model.group_postprocess_nodes) >= CYLINDER.n_layers
    assert model.module is not None and model.module.block_whiten is not None
    colour = model.module.block_colour
    assert not torch.equal(colour, torch.eye(4).expand_as(colour))  # fitted, not identity
    torch.testing.assert_close(colour[:, :, 0], colour[:, :, 1])  # pooled over the angle
    output = str(tmp_path / "cyl.onnx")
    description = export_model(model, output)
    assert description["check"]["max_relative_deviation"] <= 1e-4
    energies = data.incident_energies[:25]
    noise = model.draw_noise(len(energies), shard_generator(3, 0)).numpy()
    inputs = np.concatenate([noise, energies[:, None]], axis=1).astype(np.float32)
    expected = model.sample(energies, seed=3).showers
    assert relative_deviation(run_onnx(output, inputs), expected) <= 1e-4


def test_layer_hits_calibrated_route_every_draw_through_the_map(tmp_path):
    """``layer_hits: calibrated``: fitted after training and saved with the model; sampling
    (and the exported graph, which draws the energies step by step) takes every layer
    energy through the map, so a layer whose flow draws too few hits is hit as the map
    says and its hits carry the mapped deposit."""
    from caloforge.export import export_model, relative_deviation, run_onnx
    from caloforge.layer_hits import LayerHitMap

    data = random_showers(CARTESIAN, 240, seed=9)
    rare = np.random.default_rng(10).random(len(data)) < 0.8  # layer 0 empty in ~80 %
    data.showers[rare, :16] = 0.0
    run = str(tmp_path / "run")
    model = ConvL2LFlow(CARTESIAN, _tiny(1, layer_energy="deposited", layer_hits="calibrated",
                                         layer_hit_showers=240))
    model.fit(data, run)
    assert model.layer_hit_map is not None
    assert load_model(run).layer_hit_map.state() == model.layer_hit_map.state()
    threshold = model.voxel_transform.threshold_mev
    energies = data.incident_energies[:60]
    model.layer_hit_map = None
    with torch.inference_mode():
        raw = model._start_layer_sampling(energies, {}, 3, 0, 1000, "cpu")[3]
    # a map for a flow that loses half of layer 0's hits under the threshold: that layer
    # gets mapped
    deposits = CARTESIAN.layer_energies(np.where(data.showers >= threshold, data.showers, 0))
    rng = np.random.default_rng(11)
    drawn = np.where(deposits > 0, deposits, rng.uniform(0, model.deposit_floor_mev,
                                                         deposits.shape))
    hit = deposits[:, 0] > 0
    drawn[hit, 0] = threshold * np.exp(rng.normal(0, 1, hit.sum()))
    model.layer_hit_map = LayerHitMap.fit(deposits, data.incident_energies, drawn,
                                          data.incident_energies, threshold,
                                          0.5 * model.deposit_floor_mev)
    assert model.layer_hit_map.active[0][0]
    mapped = model.layer_hit_map.apply(raw, torch.as_tensor(energies, dtype=raw.dtype))
    assert not torch.equal(mapped[:, 0], raw[:, 0])
    showers = model.sample(energies, seed=3).showers
    sums = CARTESIAN.layer_energies(showers)
    expected = np.where(mapped.numpy() >= threshold, mapped.numpy(), 0.0)
    np.testing.assert_allclose(sums, expected, rtol=1e-4, atol=1e-6)
    output = str(tmp_path / "hits.onnx")
    assert export_model(model, output)["check"]["max_relative_deviation"] <= 1e-4
    noise = model.draw_noise(len(energies), shard_generator(3, 0)).numpy()
    inputs = np.concatenate([noise, energies[:, None]], axis=1).astype(np.float32)
    assert relative_deviation(run_onnx(output, inputs), showers) <= 1e-4
    with pytest.raises(OptionError, match="layer_hits needs layer_energy"):
        type(model.config).from_dict({"layer_hits": "calibrated"})
    with pytest.raises(OptionError, match="layer_hits must be"):
        type(model.config).from_dict({"layer_hits": "always", "layer_energy": "deposited"})
    with pytest.raises(OptionError, match="layer_hit_showers must be"):
        type(model.config).from_dict({"layer_hit_showers": 10})
