"""Convolutional L2LFlows: preprocessing, train -> generate -> evaluate, layer subsets and
merging, post-processing spline, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caloforge.cli import main
from caloforge.data import ShowerData, read_showers, write_showers
from caloforge.errors import CaloforgeError, GeometryError, OptionError
from caloforge.geometry import CartesianLayer, CylindricalLayer, Geometry
from caloforge.models import load_model
from caloforge.models.base import shard_generator
from caloforge.models.flows.convflow import (
    ConvL2LFlow,
    interquartile_spread,
    merge_runs,
    parse_parts,
)
from caloforge.preprocessing import (
    MaxLogTransform,
    group_quantile_map_nodes,
    hit_rate_groups,
    monotone_log_map,
)

from conftest import assert_resume_matches_uninterrupted, random_showers, tiny_config

# four Cartesian layers of 4 x 4 cells; three cylindrical layers of 4 radial x 6 angular bins
CARTESIAN = Geometry("tiny-4x4x4", tuple(CartesianLayer(i, nx=4, ny=4, dx=10.0, dy=10.0)
                                         for i in range(4)), threshold_mev=0.01)
CYLINDER = Geometry("tiny-cyl", tuple(CylindricalLayer(i, r_edges=(0.0, 5.0, 10.0, 20.0, 40.0),
                                                       n_alpha=6) for i in range(3)),
                    threshold_mev=0.01)


def _tiny(epochs: int = 1, **options):
    return tiny_config(ConvL2LFlow, epochs, **options)


@pytest.fixture(scope="module")
def data():
    return random_showers(CARTESIAN, 240, seed=2)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("convflow"))
    model = ConvL2LFlow(CARTESIAN, _tiny(2))
    model.fit(data, run_dir)
    return model, run_dir


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 0.9), st.floats(-2.0, 4.0),
       st.sampled_from(["max", "energy", "fixed"]))
def test_max_log_transform_round_trips_cells_above_threshold(seed, empty_fraction, log_scale,
                                                             normalise_by):
    rng = np.random.default_rng(seed)
    transform = MaxLogTransform(noise_mev=0.005, threshold_mev=0.015,
                                normalise_by=normalise_by)
    cells = rng.exponential(10.0 ** log_scale, (8, 36)) + 0.015
    cells[rng.random(cells.shape) < empty_fraction] = 0.0
    cells[:, 0] = 10.0 ** log_scale + 0.015  # no empty layer, above the threshold
    transform.fit_scale(cells)
    images = torch.as_tensor(cells, dtype=torch.float64)
    noisy = transform.add_noise(images, torch.Generator().manual_seed(seed))
    assert (noisy > 0).all() and torch.equal(noisy[images > 0], images[images > 0])
    x = transform.forward(noisy)
    assert torch.isfinite(x).all()
    back = transform.inverse(x, noisy.sum(-1))
    np.testing.assert_allclose(back.numpy(), cells, rtol=1e-6, atol=1e-9)


def test_energy_normalisation_leaves_no_cell_at_the_top():
    """Divided by its maximum, every layer has one cell at exactly the top of the range (a
    point mass); divided by its energy, none has."""
    cells = torch.rand(50, 36, generator=torch.Generator().manual_seed(1)) + 0.01
    top = MaxLogTransform(normalise_by="max").forward(cells).amax(-1)
    assert torch.allclose(top, top[0].expand_as(top))  # the same value in every image
    shares = MaxLogTransform(normalise_by="energy").forward(cells).amax(-1)
    assert shares.std() > 0.01 and (shares < top[0] - 0.5).all()
    assert MaxLogTransform.from_state({"noise_mev": 0.01}).normalise_by == "max"  # old files
    with pytest.raises(ValueError, match="normalise_by"):
        MaxLogTransform(normalise_by="median")


def test_a_fixed_scale_puts_the_threshold_at_one_value_in_every_image():
    """Divided by the layer energy, a cell at the readout threshold lands lower the hotter
    its layer; divided by one fixed scale, at the same value in every layer."""
    cells = torch.full((3, 36), 1e-3, dtype=torch.float64)
    cells[:, 0] = 0.015  # at the threshold
    cells[:, 1] = torch.tensor([1.0, 30.0, 1000.0])  # the core: layer energies far apart
    by_energy = MaxLogTransform(threshold_mev=0.015, normalise_by="energy").forward(cells)
    fixed = MaxLogTransform(threshold_mev=0.015, normalise_by="fixed")
    fixed.fit_scale(cells.numpy())
    assert fixed.scale_mev == 2000.0
    at_threshold = fixed.forward(cells)[:, 0]
    assert torch.allclose(at_threshold, at_threshold[0].expand(3))
    assert (by_energy[:, 0].diff() < -0.5).all()
    # a hotter cell than any in the training data reads as the top, not as NaN
    assert torch.isfinite(fixed.forward(cells * 10)).all()


def test_parts_parse_and_refuse_bad_items():
    assert parse_parts("all", 3) == ["energy", "0", "1", "2"]
    assert parse_parts("2, energy,0-1", 4) == ["energy", "0", "1", "2"]
    for bad in ("0-9", "x", "3-1", ""):
        with pytest.raises(OptionError):
            parse_parts(bad, 4)


def test_geometry_checks():
    odd = Geometry("odd", tuple(CartesianLayer(i, nx=3, ny=4, dx=1.0, dy=1.0) for i in range(3)))
    with pytest.raises(GeometryError, match="even"):
        ConvL2LFlow(odd, _tiny())
    mixed = Geometry("mixed", (CartesianLayer(0, 4, 4, 1.0, 1.0),
                               CartesianLayer(1, 2, 2, 1.0, 1.0)))
    with pytest.raises(GeometryError, match="one shape"):
        ConvL2LFlow(mixed, _tiny())
    with pytest.raises(OptionError, match="shared"):
        ConvL2LFlow(CARTESIAN, _tiny(shared=True, layers="0-1"))


def test_cylinder_images_put_the_angle_on_the_wrapping_axis():
    model = ConvL2LFlow(CYLINDER, _tiny())
    assert model.circular and model.image_shape == (4, 6)
    voxels = torch.arange(2 * CYLINDER.n_voxels, dtype=torch.float32).reshape(2, -1)
    images = model._images(voxels)
    assert images.shape == (2, 3, 4, 6)
    # the geometry stores a layer as (angle, radius): cell (alpha, r) at alpha * 4 + r
    assert images[0, 1, 2, 5] == voxels[0, 24 + 5 * 4 + 2]
    torch.testing.assert_close(model._flat(images[:, 1]), voxels[:, 24:48])


def test_position_channels_give_cartesian_rows_and_columns_and_cylinder_radii():
    cartesian = ConvL2LFlow(CARTESIAN, _tiny(position_channels=True))
    cartesian.module = cartesian._new_module()
    previous = torch.zeros(3, 2, 4, 4)
    condition = cartesian._layer_condition(previous, torch.zeros(3, 1), torch.zeros(3), None)
    rows, columns = condition[:, -2], condition[:, -1]
    assert condition.shape == (3, 2 + 1 + 1 + 2, 4, 4)
    torch.testing.assert_close(rows[0, :, 0], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(columns[0, 0], torch.linspace(-1, 1, 4))
    assert torch.equal(rows[:, :, :1].expand_as(rows), rows)  # rows constant along a row
    cylinder = ConvL2LFlow(CYLINDER, _tiny(position_channels=True))
    cylinder.module = cylinder._new_module()
    condition = cylinder._layer_condition(torch.zeros(3, 2, 4, 6), torch.zeros(3, 1),
                                          torch.zeros(3), None)
    radii = condition[:, -1]
    assert condition.shape == (3, 2 + 1 + 1 + 1, 4, 6)
    torch.testing.assert_close(radii[0, :, 0], torch.linspace(-1, 1, 4))
    assert torch.equal(radii[:, :, :1].expand_as(radii), radii)  # no angle: rolls commute
    # a configuration saved before the option existed keeps its condition channels
    saved = {k: v for k, v in _tiny(position_channels=True).to_dict().items()
             if k != "position_channels"}
    assert type(_tiny()).from_dict(saved).position_channels is False


def test_cell_standardisation_is_fitted_saved_and_absent_from_older_models(trained, data):
    model, run_dir = trained
    mean, std = model.module.cell_mean, model.module.cell_std
    assert mean.shape == std.shape == (4, 4, 4) and (std > 0).all()
    assert mean.std() > 0  # fitted, not the initial zeros
    image = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(model._unstandardised(model._standardised(image, 2)[:, 0], 2),
                               image[:, 0])
    reloaded = load_model(run_dir)
    torch.testing.assert_close(reloaded.module.cell_mean, mean)
    state = model.to_json_state()
    older = {**state, "config": {k: v for k, v in state["config"].items()
                                 if k != "standardise_cells"}}
    old_model = ConvL2LFlow.from_json_state(older, CARTESIAN)
    assert old_model.module.cell_mean is None and "cell_mean" not in \
        old_model.module.state_dict()


def test_cell_scale_divides_each_cell_by_its_own_spread_floored_at_half_the_layers(data):
    layer_scaled = ConvL2LFlow(CARTESIAN, _tiny(1))
    cell_scaled = ConvL2LFlow(CARTESIAN, _tiny(1, cell_scale="cell"))
    for model in (layer_scaled, cell_scaled):
        model.prepare_fit(data, resume=False, device="cpu")  # preprocessing + statistics
    pooled = layer_scaled.module.cell_std
    assert torch.equal(pooled, pooled[:, :1, :1].expand_as(pooled))  # one per layer
    torch.testing.assert_close(cell_scaled.module.cell_mean, layer_scaled.module.cell_mean)
    own = cell_scaled.module.cell_std
    assert (own >= 0.5 * pooled - 1e-6).all() and not torch.equal(own, pooled)
    # the cells' own spreads, recomputed: where above the floor, the divisor is that spread
    generator = torch.Generator().manual_seed(cell_scaled.config.training.seed)
    images = cell_scaled._images(torch.as_tensor(data.showers, dtype=torch.float32))
    noisy = cell_scaled.voxel_transform.add_noise(images, generator)
    y = cell_scaled.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape).double()
    spread = y.std(0, unbiased=False).float()
    above = spread > 0.5 * pooled
    assert above.any()
    torch.testing.assert_close(own[above], spread[above], rtol=1e-3, atol=1e-4)


def test_interquartile_spread_measures_the_hits_of_a_sometimes_empty_cell():
    generator = torch.Generator().manual_seed(0)
    n = 4000
    hits = 2.0 + 0.1 * torch.randn(n, generator=generator)
    empty = torch.rand(n, generator=generator) < 0.2  # empty in a fifth of the showers
    cell = torch.where(empty, torch.full((n,), -5.0), hits)
    gaussian = torch.randn(n, generator=generator)
    y = torch.stack([cell, gaussian]).T.reshape(n, 1, 1, 2)  # (N, L=1, H=1, W=2)
    spread = interquartile_spread(y)
    assert cell.std() > 2.5  # the gap between empty and hit sets the standard deviation
    assert 0.08 < float(spread[0, 0, 0]) < 0.2  # the interquartile range sees the hits
    assert abs(float(spread[0, 0, 1]) - 1.0) < 0.08  # a Gaussian's: its sigma
    pooled = interquartile_spread(y, circular=True)  # over the angle (the last axis)
    assert torch.equal(pooled[0, 0, 0], pooled[0, 0, 1])
    quartiles = torch.quantile(y.flatten(), torch.tensor([0.25, 0.75]))
    assert float(pooled[0, 0, 0]) == pytest.approx(float(quartiles[1] - quartiles[0]) / 1.349)


def test_robust_cell_scale_takes_the_smaller_of_the_two_spreads(data):
    # a core cell (layer 0, cell 5): hit in ~85 % of the showers with a steady energy
    showers = data.showers.copy()
    rng = np.random.default_rng(0)
    hit = rng.random(len(showers)) < 0.85
    showers[:, 5] = np.where(hit, rng.normal(2 * showers.max(), 0.1, len(showers)), 0.0)
    core = ShowerData(data.incident_energies, showers, {}, {})
    scaled = {scale: ConvL2LFlow(CARTESIAN, _tiny(1, cell_scale=scale))
              for scale in ("layer", "cell", "robust")}
    for model in scaled.values():
        model.prepare_fit(core, resume=False, device="cpu")
    pooled, own = scaled["layer"].module.cell_std, scaled["cell"].module.cell_std
    robust = scaled["robust"].module.cell_std
    assert (robust >= 0.5 * pooled - 1e-6).all() and (robust <= own + 1e-6).all()
    row, column = divmod(5, 4)
    assert robust[0, row, column] < 0.5 * own[0, row, column]  # its hits, not the gap


def test_block_scale_whitens_each_2x2_block_and_inverts_exactly(data):
    model = ConvL2LFlow(CARTESIAN, _tiny(1, cell_scale="block"))
    model.prepare_fit(data, resume=False, device="cpu")
    generator = torch.Generator().manual_seed(model.config.training.seed)
    images = model._images(torch.as_tensor(data.showers, dtype=torch.float32))
    noisy = model.voxel_transform.add_noise(images, generator)
    y = model.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape)
    layer = 1
    white = model._standardised(y[:, layer:layer + 1], layer)  # (N, 1, 4, 4)
    # each block's four cells come out uncorrelated with unit variance (up to the floor)
    blocks = white.reshape(len(y), 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(len(y), 4, 4)
    for block in range(4):
        covariance = torch.cov(blocks[:, block].T.double())
        off_diagonal = covariance - torch.diag(torch.diag(covariance))
        assert off_diagonal.abs().max() < 0.05
        assert (torch.diag(covariance) < 1.05).all()
    torch.testing.assert_close(model._unstandardised(white[:, 0], layer), y[:, layer],
                               rtol=1e-4, atol=1e-4)
    # the log-determinant the likelihood adds is the map's own
    jacobian = torch.autograd.functional.jacobian(
        lambda x: model._standardised(x.reshape(1, 1, 4, 4), layer).flatten(), y[0, layer])
    expected = torch.linalg.slogdet(jacobian.reshape(16, 16).double())[1]
    assert float(model._standardising_ladj(layer)) == pytest.approx(float(expected), abs=1e-3)


def test_generation_is_reproducible_and_layers_sum_to_their_energies(trained, data):
    model, _ = trained
    energies = data.incident_energies[:60]
    showers = model.sample(energies, seed=3, batch_size=16).showers
    np.testing.assert_allclose(showers, model.sample(energies, seed=3, batch_size=60).showers,
                               rtol=1e-4, atol=1e-4)
    assert not np.array_equal(showers, model.sample(energies, seed=3, shard=1).showers)
    assert np.isfinite(showers).all() and (showers >= 0).all()
    kept = showers[showers > 0]
    assert kept.size and kept.min() >= model.voxel_transform.threshold_mev
    # every layer is rescaled to its sampled energy before the threshold: what is missing
    # from a layer is at most (cut cells) x threshold
    layers = CARTESIAN.layer_energies(showers.astype(np.float64))
    assert layers.sum(1).max() < 10 * energies.max()


def test_temperature_scales_the_voxel_noise_and_is_saved(trained, data, tmp_path):
    model, _ = trained
    energies = data.incident_energies[:80]

    def spread(temperature: float) -> float:
        """Mean over cells of the spread between showers drawn with two seeds."""
        model.config.temperature = temperature
        first, second = (model.sample(energies, seed=seed).showers for seed in (5, 6))
        return float(np.abs(first - second).mean())

    try:
        cold, warm = spread(0.05), spread(1.0)
        # same noise draws, scaled: T = 1 is the model as trained
        model.config.temperature = 1.0
        assert np.array_equal(model.sample(energies, seed=5).showers,
                              model.sample(energies, seed=5).showers)
        # near T = 0 every shower is the flows' mode for its layer energies: the draws
        # of two seeds differ far less than at T = 1 (the energy flow keeps its noise)
        assert cold < 0.7 * warm
        model.config.temperature = 0.5
        model.save(str(tmp_path / "cold"))
        assert load_model(str(tmp_path / "cold")).config.temperature == 0.5
    finally:
        model.config.temperature = 1.0


def test_likelihood_improves_round_trips_and_resumes(trained, data, tmp_path):
    model, run_dir = trained
    log = [json.loads(line) for line in open(f"{run_dir}/train_log.jsonl")]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    loaded = load_model(run_dir)
    assert isinstance(loaded, ConvL2LFlow) and loaded.trained_parts == model.trained_parts
    heldout = data.select(slice(0, 40))
    np.testing.assert_allclose(loaded.log_prob(heldout), model.log_prob(heldout), rtol=1e-5)
    np.testing.assert_array_equal(loaded.sample(heldout.incident_energies, seed=1).showers,
                                  model.sample(heldout.incident_energies, seed=1).showers)
    assert_resume_matches_uninterrupted(lambda: ConvL2LFlow(CARTESIAN, _tiny(2)),
                                        data.select(slice(0, 120)), tmp_path, epochs=2)


def test_layer_subsampling_estimates_the_full_likelihood(trained, data):
    model, _ = trained
    tensors = model.to_tensors(data.select(slice(0, 120)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = model._log_prob(tensors, torch.Generator().manual_seed(1)).mean()
        estimates = [model._log_prob(tensors, generator, layers_per_step=2).mean()
                     for _ in range(24)]
    # unbiased: the average of the subsampled estimates lies near the full value
    assert abs(float(torch.stack(estimates).mean() - full)) < 0.02 * abs(float(full)) + 1.0
    assert float(torch.stack(estimates).std()) > 0


def test_threshold_comes_from_the_data_when_the_geometry_has_none(tmp_path):
    geometry = Geometry("no-threshold", CARTESIAN.layers)
    data = random_showers(geometry, 100, seed=8)
    data.showers[data.showers < 2.0] = 0.0  # a simulation that cut at 2 MeV
    model = ConvL2LFlow(geometry, _tiny(1))
    model.fit(data, str(tmp_path))
    cut = float(data.showers[data.showers > 0].min())
    assert model.voxel_transform.threshold_mev == pytest.approx(cut)
    assert model.voxel_transform.noise_mev == pytest.approx(cut * model.noise_per_threshold)
    showers = model.sample(data.incident_energies[:30], seed=0).showers
    assert showers[showers > 0].min() >= cut


def test_shared_flow_on_a_cylinder_trains_and_samples(tmp_path):
    data = random_showers(CYLINDER, 160, seed=5)
    model = ConvL2LFlow(CYLINDER, _tiny(1, shared=True, position_channels=True))
    model.fit(data, str(tmp_path))
    assert len(model.module.layer_flows) == 1
    showers = model.sample(data.incident_energies[:20], seed=0).showers
    assert showers.shape == (20, CYLINDER.n_voxels) and np.isfinite(showers).all()


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


def test_symmetrise_turns_each_shower_by_one_square_symmetry(trained, data, tmp_path):
    """``symmetrise: d4``: each shower is the unsymmetrised one (same seed) under one of the
    8 symmetries of the square, all layers alike, every element drawn; a model whose hits
    all lie on one place of the 2 x 2 squeeze blocks (the far-halo defect, exaggerated)
    then puts them evenly on the four places; saved with the model; the exported function
    (``showers_from_noise`` on ``draw_noise``) and its ONNX graph give what ``sample``
    gives."""
    model, _ = trained
    energies = data.incident_energies[:120]
    side = 4
    plain = model.sample(energies, seed=4).showers.reshape(-1, CARTESIAN.n_layers, side, side)
    model.config.symmetrise = "d4"
    try:
        turned = model.sample(energies, seed=4).showers.reshape(plain.shape)
        elements = []
        for shower, original in zip(turned, plain):
            matches = [k for k, image in enumerate(_square_symmetries(original))
                       if np.array_equal(image, shower)]
            assert matches, "not a symmetry of the unsymmetrised shower"
            elements.append(matches[0])
        assert len(set(elements)) == 8
        noise = model.draw_noise(len(energies), shard_generator(4, 0))
        with torch.inference_mode():
            traced = model.showers_from_noise(
                noise, {"incident_energy": torch.as_tensor(energies, dtype=torch.float32)})
        np.testing.assert_allclose(traced.numpy(), turned.reshape(len(energies), -1),
                                   rtol=1e-4, atol=1e-5)
        from caloforge.export import export_model

        description = export_model(model, str(tmp_path / "d4.onnx"))
        assert description["check"]["max_relative_deviation"] <= 1e-4
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
    # trained with the option: the count model fitted after training, saved and loaded;
    # the exported function and its ONNX graph draw what sample draws
    counting = ConvL2LFlow(CARTESIAN, _tiny(1, layer_energy="deposited", hit_counts="band",
                                            hit_count_showers=len(data)))
    counting.fit(data, str(tmp_path / "counts"))
    assert counting.hit_count_model is not None
    counted = counting.sample(energies, seed=5).showers
    noise = counting.draw_noise(len(energies), shard_generator(5, 0))
    assert noise.shape[1] == counting.noise_features() == n_layers * (1 + size + 2)
    with torch.inference_mode():
        traced = counting.showers_from_noise(
            noise, {"incident_energy": torch.as_tensor(energies, dtype=torch.float32)})
    np.testing.assert_allclose(traced.numpy(), counted, rtol=1e-4, atol=1e-5)
    from caloforge.export import export_model

    description = export_model(counting, str(tmp_path / "counts.onnx"))
    assert description["check"]["max_relative_deviation"] <= 1e-4
    loaded = load_model(str(tmp_path / "counts"))
    assert loaded.hit_count_model == counting.hit_count_model
    np.testing.assert_array_equal(loaded.sample(energies, seed=5).showers, counted)
    # faint cells are candidates: a count above the flows' hits makes the highest of them
    # hits (>= the threshold), the layer keeping its deposit
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


def test_energy_steps_give_the_energy_flow_its_own_optimiser_and_more_steps(data, tmp_path):
    """``energy_steps: k``: the energy flow gets its own optimiser and k steps per training
    step on random batches of the training layer energies; with the same epochs it fits
    the layer energies better than trained together with the voxel flows, and the run
    resumes with both optimisers."""
    held_out = data.select(slice(200, 240))
    train = data.select(slice(0, 200))

    def energy_nll(model):
        batch = model.to_tensors(held_out)
        deposits = CARTESIAN.layer_energies(held_out.showers, dtype=np.float64)
        energies = torch.as_tensor(deposits, dtype=torch.float32) + 0.5 * model.deposit_floor_mev
        with torch.inference_mode():
            x1 = model.layer_transform.forward(energies, batch["incident_energy"])
            return float(-model.module.flow1(model._context(batch)).log_prob(x1).mean())

    figures = {}
    for steps in (0, 8):
        model = ConvL2LFlow(CARTESIAN, _tiny(3, layer_energy="deposited", energy_steps=steps))
        model.fit(train, str(tmp_path / f"run{steps}"))
        figures[steps] = energy_nll(model)
        if steps:
            players = model.players()
            assert set(players) == {"model", "energy"}
            assert model.player_schedule(0) == ("model",) + ("energy",) * 8
            energy_ids = {id(p) for p in players["energy"][0]}
            assert energy_ids == {id(p) for p in model.module.flow1.parameters()}
            assert not energy_ids & {id(p) for p in players["model"][0]}
            assert model._energy_pool is None  # dropped after training
    assert figures[8] < figures[0] - 0.5, figures
    assert_resume_matches_uninterrupted(
        lambda: ConvL2LFlow(CARTESIAN, _tiny(3, layer_energy="deposited", energy_steps=2)),
        train, tmp_path / "resume")


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
    # float32 (what export runs): log10 to ~1e-7, amplified by steep random segments
    np.testing.assert_allclose(single.numpy(), _scipy_log_map(cells, x, y), rtol=1e-4)
    assert np.array_equal(produced == 0, cells == 0)


@pytest.mark.parametrize("postprocess", ["layer-spline", "group-spline"])
def test_a_cylinder_with_the_spline_exports_to_onnx(tmp_path, postprocess):
    """Circular padding, a shared flow with position channels, 2x2 blocks whitened
    (``cell_scale: block``), deposited layer energies, hit cuts per radial bin and bin of
    the deposit keeping their energy per group, a sampling temperature and the
    post-processing splines per layer or per calibration group: onnxruntime gives the
    showers ``sample`` gives for the same noise."""
    from caloforge.export import export_model, relative_deviation, run_onnx

    data = random_showers(CYLINDER, 160, seed=5)
    model = ConvL2LFlow(CYLINDER, _tiny(1, shared=True, position_channels=True,
                                        noise_mev=0.009, hit_calibration_showers=100,
                                        hit_calibration_groups="ring",
                                        hit_calibration_energy="group", temperature=0.9,
                                        layer_energy="deposited", cell_scale="block",
                                        hit_calibration_bins=2,
                                        postprocess=postprocess, postprocess_showers=100))
    model.fit(data, str(tmp_path / "run"))
    assert len(model.voxel_cuts_mev) == 4 * CYLINDER.n_voxels  # 2 x 2 bins
    assert max(model.voxel_cuts_mev) > CYLINDER.threshold_mev  # the export applies real cuts
    fitted = (model.layer_postprocess_nodes if postprocess == "layer-spline"
              else model.group_postprocess_nodes)
    assert sum(nodes is not None for nodes in fitted) >= CYLINDER.n_layers
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


def test_layer_subsets_merge_through_the_cli(tmp_path):
    path = str(tmp_path / "train.h5")
    write_showers(path, random_showers(CYLINDER, 160, seed=6), CYLINDER)
    runs = []
    for name, parts in (("a", "energy,0-1"), ("b", "2")):
        run = str(tmp_path / name)
        assert main(["train", "convflow", "--data", path, "--xml", _xml(tmp_path), "-o", run,
                     "--preset", "tiny", "--epochs", "1", "--layers", parts,
                     "--no-progress"]) == 0
        runs.append(run)
    assert load_model(runs[0]).trained_parts == ["energy", "0", "1"]
    out = str(tmp_path / "partial.h5")
    assert main(["generate", runs[1], "-n", "5", "-o", out, "--no-progress"]) == 1
    merged = str(tmp_path / "merged")
    assert main(["merge", *runs, "-o", merged]) == 0
    model = load_model(merged)
    assert model.trained_parts == ["energy", "0", "1", "2"]
    # the merged weights are the runs' own
    part_b = load_model(runs[1]).module.layer_flows[2].state_dict()
    for key, value in model.module.layer_flows[2].state_dict().items():
        assert torch.equal(value, part_b[key])
    generated = str(tmp_path / "generated.h5")
    assert main(["generate", merged, "--like", path, "-n", "60", "-o", generated,
                 "--no-progress"]) == 0
    assert read_showers(generated, CYLINDER).showers.shape == (60, CYLINDER.n_voxels)
    assert main(["evaluate", "--reference", path, "--generated", generated, "--xml",
                 _xml(tmp_path), "-o", str(tmp_path / "report"), "--metrics", "hist,cls-high",
                 "--repeats", "1", "--no-progress"]) == 0
    # overlapping parts and an existing output are refused
    assert main(["merge", runs[0], runs[0], "-o", str(tmp_path / "again")]) == 1
    assert main(["merge", *runs, "-o", merged]) == 1


def test_merge_refuses_runs_with_different_preprocessing(data, tmp_path):
    first = ConvL2LFlow(CARTESIAN, _tiny(1, layers="energy,0-1"))
    first.fit(data.select(slice(0, 100)), str(tmp_path / "a"))
    second = ConvL2LFlow(CARTESIAN, _tiny(1, layers="2-3"))
    second.fit(data.select(slice(100, 200)), str(tmp_path / "b"))
    with pytest.raises(CaloforgeError, match="fitted preprocessing"):
        merge_runs([first, second])


def test_convflow_options_are_checked(tmp_path, capsys):
    path = str(tmp_path / "train.h5")
    write_showers(path, random_showers(CYLINDER, 50, seed=7), CYLINDER)
    base = ["train", "--data", path, "--xml", _xml(tmp_path), "-o", str(tmp_path / "run"),
            "--preset", "tiny", "--epochs", "1", "--no-progress"]
    assert main([base[0], "icaloflow", *base[1:], "--layers", "0-1"]) == 1
    assert "--layers is an option of convflow only" in capsys.readouterr().err
    assert main([base[0], "convflow", *base[1:], "--layers", "0-7"]) == 1
    assert "layers are 0 .. 2" in capsys.readouterr().err
    assert main([base[0], "convflow", *base[1:], "--layers", "0-1",
                 "--postprocess", "spline"]) == 1
    assert "every part" in capsys.readouterr().err
    config = tmp_path / "options.yaml"
    refused = [("normalise_by: median", "normalise_by must be max, energy or fixed"),
               ("hit_calibration_groups: radius",
                "hit_calibration_groups must be one of hit-rate, hit-rate-block, ring, "
                "ring-block, layer"),
               ("symmetrise: mirror", "symmetrise must be one of none, d4"),
               ("symmetrise: d4", "symmetrise: d4 needs square Cartesian layers"),
               ("layer_energy: raw", "layer_energy must be one of noisy, deposited"),
               ("layer_energy: deposited\nnormalise_by: fixed",
                "layer_energy: deposited needs normalise_by energy or max"),
               ("hit_calibration_energy: core", "hit_calibration_energy must be layer or group"),
               *[(f"temperature: {t}", "temperature must be in (0, 2]")
                 for t in ("0", "-0.5", "3", ".nan")],
               ("cell_scale: pixel", "cell_scale must be one of layer, cell, robust, block"),
               ("energy_steps: -1", "energy_steps must be >= 0"),
               ("hit_calibration_bins: 0", "hit_calibration_bins must be >= 1"),
               ("energy_steps: 4", "energy_steps needs layer_energy: deposited"),
               ("postprocess: cubic",
                "postprocess must be one of none, spline, layer-spline, group-spline")]
    for text, message in refused:
        config.write_text(text + "\n")
        assert main([base[0], "convflow", *base[1:], "--config", str(config)]) == 1, text
        assert message in capsys.readouterr().err, text
    assert main([base[0], "icaloflow", *base[1:], "--postprocess", "layer-spline"]) == 1
    assert "postprocess must be none or spline" in capsys.readouterr().err
    config.write_text("hit_calibration_showers: 20\n")
    assert main([base[0], "convflow", *base[1:], "--config", str(config), "--layers",
                 "0-1"]) == 1
    assert "hit_calibration_showers needs every part" in capsys.readouterr().err


def _xml(tmp_path) -> str:
    path = tmp_path / "tiny.xml"
    if not path.exists():
        path.write_text(CYLINDER.to_xml())
    return str(path)


SIDE = 8
CORES = Geometry("cores-8x8", tuple(CartesianLayer(i, nx=SIDE, ny=SIDE, dx=5.0, dy=5.0)
                                    for i in range(3)), threshold_mev=0.5)


def _core_showers(n: int, seed: int, side: int = SIDE, jitter: float = 0.5) -> ShowerData:
    """Sharp Gaussian cores (0.6-1.0 cells wide, widening with depth) with a faint tail,
    gamma-fluctuated cells, a 0.5 MeV cut (bench/check_convflow_core.py, smaller); the
    centre jittered by ``jitter`` cells."""
    rng = np.random.default_rng(seed)
    energies = rng.uniform(1e3, 1e4, n)
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    centre = rng.normal(0, jitter, (n, 2))
    layers = []
    for layer in range(3):
        width = rng.uniform(0.6, 1.0, n)[:, None, None] * (1 + 0.25 * layer)
        distance2 = (xx[None] - centre[:, 0, None, None]) ** 2 + \
            (yy[None] - centre[:, 1, None, None]) ** 2
        share = np.exp(-distance2 / (2 * width ** 2)) + 0.02 * np.exp(-np.sqrt(distance2))
        image = share / share.sum((1, 2), keepdims=True) * energies[:, None, None] * 0.15
        image *= rng.gamma(8, 1 / 8, share.shape)
        image[image < 0.5] = 0
        layers.append(image.reshape(n, -1))
    return ShowerData(energies, np.concatenate(layers, 1).astype(np.float32), {}, {})


def test_generated_cores_are_as_hot_as_the_data(tmp_path):
    """Issue 28's core defect on a tiny case. With each layer divided by its maximum, the
    hottest cell of every image sat at one point of the flow's input space; in the base
    space its block was atypical (mean z^2 ~1.6 against ~1.0 elsewhere) and the generated
    cores were ~24 % too faint here. Divided by the layer energy (the default), the hottest
    cells must look typical to the flow and the generated cores must be about as hot as
    the data's."""
    config = tiny_config(ConvL2LFlow, 5, width=8, blocks=3, bins=8, embedding=4,
                         previous_layers=1)
    assert config.normalise_by == "energy"
    config.training.batch_size = 64
    model = ConvL2LFlow(CORES, config)
    model.fit(_core_showers(1500, seed=1), str(tmp_path))
    reference = _core_showers(500, seed=2)
    generated = model.sample(reference.incident_energies, seed=1).showers

    def hottest(showers):
        return showers.reshape(len(showers), 3, -1).max(-1).mean(0)

    ratio = hottest(generated) / hottest(reference.showers)
    assert 0.85 < ratio.mean() < 1.45, ratio  # the max-normalised model: 0.76
    batch = model.to_tensors(reference)
    with torch.no_grad():
        images = model._images(batch["voxels"])
        noisy = model.voxel_transform.add_noise(images, torch.Generator().manual_seed(0))
        y = model.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape)
        log_energies = model._layer_context(noisy.sum(dim=(-2, -1)))
        for layer in range(3):
            condition = model._layer_condition(model._previous(y, layer),
                                               model._context(batch),
                                               log_energies[:, layer], None)
            z, _ = model._flow(layer)(model._standardised(y[:, layer:layer + 1], layer),
                                      condition)
            block = (z ** 2).mean(1)
            flat = noisy[:, layer].flatten(1).argmax(1)
            at_hottest = block[torch.arange(len(z)), flat // SIDE // 2, flat % SIDE // 2]
            assert at_hottest.mean() < 1.3 * block.mean(), layer


def _fixed_core_figures(standardise_cells: bool, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """Train a convflow for one epoch on 10 x 10 showers whose cores all sit in the same
    central 2 x 2 cells (one squeezed pixel, as on the ILD ECAL); per layer, the mean
    distance of the hottest cell from the image centre (cells) and the spread of the
    centre of energy along x (cells), generated and reference, as ``(2, 3)`` arrays."""
    side = 10
    geometry = Geometry("fixed-cores", tuple(CartesianLayer(i, nx=side, ny=side, dx=5.0,
                                                            dy=5.0) for i in range(3)),
                        threshold_mev=0.5)
    config = tiny_config(ConvL2LFlow, 1, width=8, blocks=3, bins=8, embedding=4,
                         previous_layers=1, standardise_cells=standardise_cells)
    config.training.batch_size = 64
    model = ConvL2LFlow(geometry, config)
    model.fit(_core_showers(1500, seed=1, side=side, jitter=0.0), str(tmp_path))
    reference = _core_showers(400, seed=2, side=side, jitter=0.0)
    generated = model.sample(reference.incident_energies, seed=1).showers
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    radius = np.sqrt(xx ** 2 + yy ** 2).ravel()

    def figures(showers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = showers.reshape(len(showers), 3, -1).astype(np.float64)
        centre_x = (images * xx.ravel()).sum(-1) / np.maximum(images.sum(-1), 1e-9)
        return radius[images.argmax(-1)].mean(0), centre_x.std(0)

    (gen_distance, gen_spread), (ref_distance, ref_spread) = \
        figures(generated), figures(reference.showers)
    return np.stack([gen_distance, ref_distance]), np.stack([gen_spread, ref_spread])


def test_a_core_always_in_the_same_cells_is_generated_there(tmp_path):
    """Issue 28's ild-ecal defect ('wandering showers') on a tiny case: the data's cores
    all sit in the same central cells. A briefly trained flow without a position prior
    put its hottest cells ~3-4 cells away and spread the centres by ~1 cell (the reference:
    0.7 and ~0.07); standardised cell by cell (the default), the untrained flow already
    samples around the data's mean image, and a brief training keeps the cores in place."""
    distance, spread = _fixed_core_figures(True, tmp_path)
    assert (distance[0] < distance[1] + 1.0).all(), distance
    assert (spread[0] < 0.5).all(), spread


def _ring_hits(showers: np.ndarray, side: int) -> np.ndarray:
    """Hits per shower ``(3,)`` within r < 1.5, 1.5-3 and >= 3 cells of the image centre,
    layers pooled."""
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    radius = np.hypot(xx, yy).ravel()
    rings = [radius < 1.5, (radius >= 1.5) & (radius < 3), radius >= 3]
    hits = showers.reshape(len(showers), 3, side * side) > 0
    return np.array([hits[:, :, ring].sum((1, 2)).mean() for ring in rings])


def test_calibrated_cuts_keep_the_halo_and_empty_the_far_cells(tmp_path):
    """Issue 28's halo defect on a tiny case. With the empty cells dequantised just under
    the cut (noise 0.9 x the threshold) the flows fill the faint halo but also cross the
    cut far from the axis; one calibrated cut per ring (or per hit-rate bin) must leave
    each ring about the data's hits: no more, and far cells as empty as the data's."""
    side, threshold = 10, 0.5
    geometry = Geometry("halo", tuple(CartesianLayer(i, nx=side, ny=side, dx=5.0, dy=5.0)
                                      for i in range(3)), threshold_mev=threshold)
    config = tiny_config(ConvL2LFlow, 2, width=8, blocks=3, bins=8, embedding=4,
                         previous_layers=1, noise_mev=0.9 * threshold,
                         hit_calibration_showers=800, hit_calibration_groups="ring")
    config.training.batch_size = 64
    model = ConvL2LFlow(geometry, config)
    model.fit(_core_showers(1500, seed=1, side=side), str(tmp_path))
    reference = _core_showers(600, seed=2, side=side)
    wanted = _ring_hits(reference.showers, side)
    calibrated = model.sample(reference.incident_energies, seed=1)
    assert (_ring_hits(calibrated.showers, side) < 1.15 * wanted + 0.2).all()
    cuts = np.array(model.voxel_cuts_mev)
    assert cuts.shape == (geometry.n_voxels,) and (cuts >= threshold).all()
    model.voxel_cuts_mev = None
    uncalibrated_showers = model.sample(reference.incident_energies, seed=1).showers
    uncalibrated = _ring_hits(uncalibrated_showers, side)
    assert uncalibrated[2] > 1.5 * wanted[2], (uncalibrated, wanted)  # noise crossings: 2.1x
    # the same draws: the cut moves energy from the faint cells to the kept ones and keeps
    # each layer's energy above the threshold, not the dequantisation noise under it (the
    # noise band's mass, ~20 MeV per layer here, had been added to the showers)
    np.testing.assert_allclose(geometry.layer_energies(calibrated.showers),
                               geometry.layer_energies(uncalibrated_showers), rtol=1e-4)
    # hit_calibration_energy: group keeps the cut halo energy in the halo rings it came
    # from, where the proportional rule moves it mostly into the core (the ild-ecal hot core)
    model.voxel_cuts_mev = cuts.tolist()
    model.config.hit_calibration_energy = "group"
    grouped = model.sample(reference.incident_energies, seed=1).showers
    model.config.hit_calibration_energy = "layer"
    np.testing.assert_allclose(geometry.layer_energies(grouped),
                               geometry.layer_energies(uncalibrated_showers), rtol=1e-4)
    core = _ring_energy(uncalibrated_showers, side)[0]
    assert _ring_energy(calibrated.showers, side)[0] > 1.01 * core
    # (outer rings cut entirely give their energy to the layer, so the core still takes
    # some: here +1.7 % by layer, +1.3 % by group)
    assert core * 0.999 < _ring_energy(grouped, side)[0] \
        < _ring_energy(calibrated.showers, side)[0] - 0.2 * (
            _ring_energy(calibrated.showers, side)[0] - core)
    for groups in ("ring", "hit-rate", "hit-rate-block", "ring-block"):
        model.config.hit_calibration_groups = groups
        model.calibrate_hits(_core_showers(800, seed=1, side=side))
        got = _ring_hits(model.sample(reference.incident_energies, seed=1).showers, side)
        assert (got < 1.15 * wanted + 0.2).all() and (got > 0.6 * wanted).all(), \
            (groups, got, wanted)
    saved = load_model(str(tmp_path))  # the run's model: calibrated at the end of fit
    assert saved.voxel_cuts_mev == cuts.tolist()
    np.testing.assert_array_equal(saved.sample(reference.incident_energies, seed=1).showers,
                                  calibrated.showers)


def _ring_energy(showers: np.ndarray, side: int) -> np.ndarray:
    """Mean energy per shower (MeV) in each one-cell ring around the image centre."""
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    rings = np.floor(np.hypot(xx, yy)).astype(int).ravel()
    images = showers.reshape(len(showers), -1, side * side).astype(np.float64)
    return np.array([images[:, :, rings == r].sum((1, 2)).mean() for r in range(rings.max() + 1)])


def _faint_showers(n: int, seed: int, side: int = 10, threshold: float = 0.5) -> ShowerData:
    """Gaussian layers of 8 / 50 / 10 MeV on average (a few to tens of hits above the
    0.5 MeV cut): less than the dequantisation noise of 100 empty cells under the cut."""
    rng = np.random.default_rng(seed)
    energies = rng.uniform(1e3, 1e4, n)
    yy, xx = np.mgrid[0:side, 0:side] - (side - 1) / 2
    layers = []
    for layer, scale in enumerate((0.002, 0.01, 0.003)):
        width = rng.uniform(0.8, 1.2, n)[:, None, None] * (1 + 0.25 * layer)
        share = np.exp(-(xx[None] ** 2 + yy[None] ** 2) / (2 * width ** 2))
        image = share / share.sum((1, 2), keepdims=True) * energies[:, None, None] * scale
        image *= rng.gamma(8, 1 / 8, share.shape)
        image[image < threshold] = 0
        layers.append(image.reshape(n, -1))
    return ShowerData(energies, np.concatenate(layers, 1).astype(np.float32), {}, {})


def test_deposited_layer_energies_keep_faint_layers_faint(tmp_path):
    """Issue 28's ild-ecal layer-energy defect on a tiny case. With the empty cells
    dequantised just under the cut (0.9 x the threshold), a layer's noisy sum holds ~22 MeV
    of noise here, more than the deposit of the faint layers; an energy flow of the noisy
    sums made those layers 4-5 x too hot (the hottest layer 1.2-1.4 x; 2 and 5 epochs). With
    ``layer_energy: deposited`` the energy flow learns the deposits and sampling scales each
    image so that its hits carry them (within ~1.6 x at 2 epochs)."""
    side, threshold = 10, 0.5
    geometry = Geometry("faint", tuple(CartesianLayer(i, nx=side, ny=side, dx=5.0, dy=5.0)
                                       for i in range(3)), threshold_mev=threshold)
    config = tiny_config(ConvL2LFlow, 2, width=8, blocks=3, bins=8, embedding=4,
                         previous_layers=1, noise_mev=0.9 * threshold,
                         layer_energy="deposited")
    config.training.batch_size = 64
    model = ConvL2LFlow(geometry, config)
    model.fit(_faint_showers(1500, seed=1), str(tmp_path))
    reference = _faint_showers(600, seed=2)
    generated = model.sample(reference.incident_energies, seed=1).showers
    ratio = geometry.layer_energies(generated).mean(0) / \
        geometry.layer_energies(reference.showers).mean(0)
    assert ((ratio > 0.6) & (ratio < 1.8)).all(), ratio
    kept = generated[generated > 0]
    assert kept.min() >= threshold
    assert load_model(str(tmp_path)).config.layer_energy == "deposited"


def test_hit_calibration_bins_make_the_hits_follow_the_deposit(monkeypatch):
    """Issue 28's halo-count defect on a tiny case. In the data a shower's faint halo has
    more hits the higher its incident energy and, at one energy, the more of it the shower
    deposits (ild-ecal: correlation 0.85 at fixed E_inc); the flows' noise crossings
    follow neither, and one cut per group leaves the hits right on average only. With
    ``hit_calibration_bins: 3`` each of the 3 x 3 bins of E_inc and deposited fraction has
    its own cuts: the hits near the data's in every bin. Here the model's draws are given
    (hits independent of both, twice the data's on average)."""
    side, threshold, n = 6, 0.5, 6000
    geometry = Geometry("halo-count", tuple(CartesianLayer(i, nx=side, ny=side, dx=5.0,
                                                           dy=5.0) for i in range(2)),
                        threshold_mev=threshold)
    rng = np.random.default_rng(3)
    energies = rng.uniform(1e3, 2e3, n)

    def showers(follows: bool) -> np.ndarray:
        fraction = rng.uniform(0.1, 0.3, n)
        deposit = fraction * energies
        rate = 0.1 * (energies / 1.5e3) * (fraction / 0.2) ** 2 if follows else np.full(n, 0.2)
        halo = rng.uniform(threshold, 3 * threshold, (n, geometry.n_voxels))
        halo[rng.random((n, geometry.n_voxels)) > rate[:, None]] = 0
        size = geometry.n_voxels // 2
        for core in (0, size):  # one core cell per layer carries the rest of its half
            halo[:, core] = 0
            halo[:, core] = deposit / 2 - halo[:, core:core + size].sum(1)
        return halo.astype(np.float32)

    reference = ShowerData(energies, showers(True), {}, {})
    generated = showers(False)
    deposits = generated.sum(1, dtype=np.float64)
    levels = [1 / 3, 2 / 3]
    energy_edges = np.quantile(energies, levels)
    fraction_edges = np.quantile(reference.showers.sum(1) / energies, levels)

    def hits_per_bin(cells: np.ndarray, totals: np.ndarray) -> np.ndarray:
        bins = (np.digitize(energies, energy_edges) * 3
                + np.digitize(totals / energies, fraction_edges))
        return np.array([(cells[bins == b] > 0).sum(1).mean() for b in range(9)])

    wanted = hits_per_bin(reference.showers, reference.showers.sum(1))
    assert wanted[8] > 3 * wanted[0]  # the data's hits follow E_inc and the deposit
    errors = {}
    for k in (1, 3):
        model = ConvL2LFlow(geometry, _tiny(1, layer_energy="deposited",
                                            hit_calibration_bins=k))
        monkeypatch.setattr(model, "_sample_in_flow_frame", lambda *_: generated)
        model.calibrate_hits(reference)
        assert len(model.voxel_cuts_mev) == k * k * geometry.n_voxels
        size = geometry.n_voxels // 2
        cut = torch.cat([model._cut_calibrated(
            torch.as_tensor(generated[:, layer * size:(layer + 1) * size]), layer,
            torch.as_tensor(energies), torch.as_tensor(deposits)) for layer in range(2)],
            dim=1).numpy()
        errors[k] = np.abs(hits_per_bin(cut, deposits) / wanted - 1).max()
    assert errors[3] < 0.1 and errors[1] > 0.5, errors
    loaded = ConvL2LFlow(geometry, model.config)
    loaded._restore_extra_state(json.loads(json.dumps(model.to_json_state())))
    assert loaded.voxel_cut_edges == model.voxel_cut_edges
    assert loaded.voxel_cuts_mev == model.voxel_cuts_mev
    with pytest.raises(OptionError, match="hit_calibration_bins needs layer_energy"):
        type(model.config).from_dict({"hit_calibration_bins": 2})
