"""The GAN families (calogan, wgan) on tiny models: the full cycle, resume, condition
response, their building blocks and bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caloforge.cli import main
from caloforge.data import read_showers, write_showers
from caloforge.errors import CaloforgeError, OptionError
from caloforge.geometry import get_geometry
from caloforge.models import load_model
from caloforge.models.base import weights_path
from caloforge.models.gans.calogan import CaloGan, LocallyConnected2d
from caloforge.models.gans.common import GanConfig, mean_separation_power
from caloforge.models.gans.wgan import Wgan, translate
from caloforge.preprocessing import BoxCoxTransform
from caloforge.simulator import ReferenceSimulator
from caloforge.training import TrainingConfig, read_log

from conftest import assert_resume_matches_uninterrupted, simulate

CALOGAN = get_geometry("calogan")
LHCB = get_geometry("lhcb-ecal")


@pytest.fixture(scope="module")
def calogan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calogan") / "train.h5"
    write_showers(path, simulate(CALOGAN, 500, 1), CALOGAN)
    return str(path)


@pytest.fixture(scope="module")
def lhcb_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lhcb") / "train.h5"
    write_showers(path, simulate(LHCB, 500, 1), LHCB)
    return str(path)


@pytest.mark.parametrize("family, geometry, fixture", [
    ("calogan", "calogan", "calogan_file"), ("wgan", "lhcb-ecal", "lhcb_file")])
def test_cli_train_generate_evaluate(family, geometry, fixture, request, tmp_path, capsys):
    data_file = request.getfixturevalue(fixture)
    run_dir = tmp_path / "run"
    assert main(["train", family, "--data", data_file, "--geometry", geometry, "-o",
                 str(run_dir), "--preset", "tiny", "--epochs", "3", "--threads", "1"]) == 0
    assert "mean separation power" in capsys.readouterr().out
    assert Path(weights_path(str(run_dir))).exists()
    for name in ("model.json", "checkpoint.safetensors", "loss_curve.png",
                 "train_log.jsonl", "diagnostics/epoch_001.png", "diagnostics/epoch_003.png"):
        assert (run_dir / name).exists(), name
    log = read_log(str(run_dir / "train_log.jsonl"))
    assert set(log[0]["player_losses"]) == {"critic", "generator"}
    description = json.loads((run_dir / "model.json").read_text())
    best = min(log, key=lambda r: r["val_loss"])
    # the checkpoint kept is the epoch with the best validation metric
    assert description["training"]["best_epoch"] == best["epoch"]
    assert description["family"] == family
    generated = tmp_path / "gen.h5"
    assert main(["generate", str(run_dir), "--like", data_file, "-o", str(generated),
                 "--seed", "3"]) == 0
    model = load_model(str(run_dir))
    reference = read_showers(data_file, model.geometry)
    out = read_showers(str(generated), model.geometry)
    assert out.showers.shape == reference.showers.shape
    assert np.isfinite(out.showers).all() and (out.showers >= 0).all()
    kept = out.showers[out.showers > 0]
    assert kept.size and kept.min() >= model.threshold_mev
    np.testing.assert_array_equal(out.incident_energies, reference.incident_energies)
    # reproducible per (seed, shard) whatever the batch size
    first = reference.select(slice(0, 50))
    a = model.sample(first.incident_energies, first.conditions, seed=3, batch_size=7)
    b = model.sample(first.incident_energies, first.conditions, seed=3, batch_size=50)
    np.testing.assert_allclose(a.showers, b.showers, rtol=1e-5, atol=1e-4)
    assert main(["evaluate", "--reference", data_file, "--generated", str(generated),
                 "--geometry", geometry, "-o", str(tmp_path / "report"), "--metrics",
                 "hist,fpd", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert np.isfinite(metrics["fpd_x1e3"]["value"])


@pytest.mark.parametrize("model_class, geometry", [(CaloGan, CALOGAN), (Wgan, LHCB)])
def test_resume_after_interruption_matches_uninterrupted(model_class, geometry, tmp_path):
    data = simulate(geometry, 300, 2)

    def make():
        model = model_class(geometry, model_class.preset("tiny"))
        model.config.training.epochs = 3
        return model

    assert_resume_matches_uninterrupted(make, data, tmp_path)


def _centre_x(showers: np.ndarray, coordinate: np.ndarray) -> float:
    return float(np.mean(showers @ coordinate / showers.sum(axis=1)))


def test_wgan_responds_to_entry_point_angle_and_energy(tmp_path):
    """Trained on showers with entry points within +-40 mm and angles within +-0.4 rad,
    the generated centre of energy follows the requested entry point and angle as the
    reference simulator's does, and the deposited energy follows E_inc."""
    rng = np.random.default_rng(0)
    n = 1500
    conditions = {"entry_point": rng.uniform(-40, 40, (n, 2)),
                  "direction": rng.uniform(-0.4, 0.4, (n, 2))}
    simulator = ReferenceSimulator("lhcb-ecal")
    data = simulator.simulate(rng.uniform(1e4, 5e4, n), "electron", conditions,
                              {"entry_point": "mm", "direction": "rad"}, rng=rng)
    config = GanConfig(latent_dim=8, generator_width=8, critic_width=8, n_critic=2,
                       validation_showers=200, diagnostics=False,
                       training=TrainingConfig(epochs=2, batch_size=64, learning_rate=5e-4,
                                               weight_decay=0.0, schedule="constant"))
    model = Wgan(LHCB, config)
    model.fit(data, str(tmp_path))
    k = 200
    x, y = LHCB.voxel_centres[:, 0], LHCB.voxel_centres[:, 1]
    for name, column, values, coordinate in [("entry_point", 0, (-30.0, 30.0), x),
                                             ("entry_point", 1, (-30.0, 30.0), y),
                                             ("direction", 0, (-0.35, 0.35), x)]:
        generated, real = [], []
        for value in values:
            requested = {"entry_point": np.zeros((k, 2)), "direction": np.zeros((k, 2))}
            requested[name][:, column] = value
            energies = np.full(k, 3e4)
            generated.append(_centre_x(model.sample(energies, requested, seed=1).showers,
                                       coordinate))
            real.append(_centre_x(simulator.simulate(energies, "electron", requested,
                                                     rng=rng).showers, coordinate))
        moved, expected = generated[1] - generated[0], real[1] - real[0]
        assert expected > 40.0  # the reference moves by ~60 mm (entry) / ~100 mm (angle)
        assert 0.7 * expected < moved < 1.3 * expected, (name, column, generated, real)
    straight = {"entry_point": np.zeros((k, 2)), "direction": np.zeros((k, 2))}
    low = model.sample(np.full(k, 1.5e4), straight, seed=2).showers.sum(axis=1).mean()
    high = model.sample(np.full(k, 4.5e4), straight, seed=2).showers.sum(axis=1).mean()
    assert 2.4 < high / low < 3.6  # 3x the incident energy -> ~3x the deposit


@settings(max_examples=40, deadline=None)
@given(lam=st.floats(0.0, 1.0), threshold=st.floats(1e-6, 1.0),
       energies=st.lists(st.floats(0.0, 1e5), min_size=1, max_size=20))
def test_boxcox_round_trip(lam, threshold, energies):
    transform = BoxCoxTransform(threshold_mev=threshold, lam=lam, mean=0.3, std=2.0,
                                max_mev=1e6)
    values = torch.tensor(energies, dtype=torch.float64)
    back = transform.inverse(transform.forward(values))
    expected = torch.where(values < threshold, torch.zeros_like(values), values)
    clear = (values - threshold).abs() > 1e-6 * threshold  # rounding decides at the threshold
    torch.testing.assert_close(back[clear], expected[clear], rtol=1e-6, atol=1e-6 * threshold)


def test_boxcox_fit_limits_lambda_and_keeps_zero_finite():
    rng = np.random.default_rng(1)
    energies = np.where(rng.random(20_000) < 0.8, 0.0, rng.pareto(1.0, 20_000) + 0.1)
    transform = BoxCoxTransform(threshold_mev=0.1).fit(energies)
    assert 0.0 <= transform.lam <= 1.0  # heavy tails fit lam < 0: limited to 0 (log)
    y = transform.forward(torch.as_tensor(energies))
    assert torch.isfinite(y).all()
    assert abs(float(y.mean())) < 1e-6 and abs(float(y.std()) - 1) < 1e-3


def test_locally_connected_equals_convolution_with_shared_weights():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    local = LocallyConnected2d(3, 2, 5, 7)
    with torch.no_grad():
        local.weight.copy_(conv.weight.reshape(2, -1).T.expand(35, -1, -1))
        local.bias.copy_(conv.bias[:, None].expand(-1, 35))
    x = torch.randn(4, 3, 5, 7)
    torch.testing.assert_close(local(x), conv(x), rtol=1e-5, atol=1e-5)


def test_translate_moves_content_by_whole_cells():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 2] = 1.0
    moved = translate(image, torch.tensor([[2 * 2 / 8, -1 * 2 / 8]]))  # +2 cells x, -1 y
    assert moved[0, 0, 2, 4] == pytest.approx(1.0, abs=1e-6)
    assert float(moved.sum()) == pytest.approx(1.0, abs=1e-6)


def test_mean_separation_power_is_zero_for_identical_samples():
    data = simulate(CALOGAN, 200, 4)
    assert mean_separation_power(data.showers, data.showers, data.incident_energies,
                                 CALOGAN) == 0.0
    other = simulate(CALOGAN, 200, 5).showers * 1.5
    assert mean_separation_power(data.showers, other, data.incident_energies, CALOGAN) > 0.1


def test_bad_geometry_and_options(calogan_file, tmp_path, capsys):
    with pytest.raises(CaloforgeError, match="Cartesian layers of one shape"):
        Wgan(CALOGAN)
    with pytest.raises(CaloforgeError, match="Cartesian"):
        CaloGan(get_geometry("calochallenge-1-photons"))
    with pytest.raises(OptionError, match="unknown GAN option"):
        GanConfig.from_dict({"latent": 3})
    with pytest.raises(OptionError, match="loss"):
        GanConfig.from_dict({"loss": "hinge"})
    out = tmp_path / "run"
    assert main(["train", "wgan", "--data", calogan_file, "--geometry", "calogan", "-o",
                 str(out), "--preset", "tiny"]) == 1
    assert "Cartesian layers of one shape" in capsys.readouterr().err
    assert not (out / "model.json").exists()
    config = tmp_path / "bad.yaml"
    config.write_text("n_critic: 0\n")
    assert main(["train", "calogan", "--data", calogan_file, "--geometry", "calogan", "-o",
                 str(out), "--config", str(config)]) == 1
    assert "n_critic" in capsys.readouterr().err
    assert not os.path.exists(out / "model.json")
