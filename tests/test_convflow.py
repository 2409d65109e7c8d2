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
from caloforge.geometry import CartesianLayer, Geometry
from caloforge.models import load_model
from caloforge.models.flows.convflow import (
    ConvL2LFlow,
    interquartile_spread,
    merge_runs,
    parse_parts,
)
from caloforge.preprocessing import (
    MaxLogTransform,
)
from convflow_cases import CARTESIAN, CORES, CYLINDER, SIDE, trained_model, training_showers
from convflow_cases import tiny as _tiny

from conftest import assert_resume_matches_uninterrupted, random_showers, tiny_config


@pytest.fixture(scope="module")
def data():
    return training_showers()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return trained_model(data, str(tmp_path_factory.mktemp("convflow")))


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
               ("symmetrise: mirror", "symmetrise must be one of none, d4, rotations"),
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
