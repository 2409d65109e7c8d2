"""CaloFlow and the shared training machinery, on tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.data import read_showers, write_showers
from caloforge.errors import CaloforgeError
from caloforge.evaluation import EvaluationSettings, evaluate_samples
from caloforge.geometry import get_geometry
from caloforge.models import load_model
from caloforge.models.base import weights_path
from caloforge.models.flows.caloflow import CaloFlow
from caloforge.training import Trainer, TrainingConfig, TrainingHooks, read_log

from conftest import assert_resume_matches_uninterrupted, simulate

GEOMETRY = get_geometry("calochallenge-1-photons")


@pytest.fixture(scope="module")
def data():
    return simulate(GEOMETRY, 1200, 1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    model = CaloFlow(GEOMETRY, CaloFlow.preset("tiny"))
    model.config.training.epochs = 3
    summary = model.fit(data, run_dir)
    return model, run_dir, summary


def test_train_save_load_generate_evaluate(trained, data, tmp_path):
    model, run_dir, summary = trained
    assert summary["epochs"] == 3 and 1 <= summary["best_epoch"] <= 3
    for name in ("model.json", "checkpoint.safetensors", "loss_curve.png", "train_log.jsonl"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert os.path.exists(weights_path(run_dir))
    log = read_log(os.path.join(run_dir, "train_log.jsonl"))
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # it learns
    loaded = load_model(run_dir)
    energies = data.incident_energies[:200]
    a = model.sample(energies, seed=3, shard=1, batch_size=64)
    b = loaded.sample(energies, seed=3, shard=1, batch_size=200)
    # the batch size changes the matmuls' summation order: float32 rounding reaches 1e-5
    # relative on some CPUs (1 voxel of 73,600 at 1.08e-5 on this one's torch build)
    np.testing.assert_allclose(a.showers, b.showers, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(a.showers, loaded.sample(energies, seed=4).showers)
    loaded.sampling_memory_bytes = 1e6  # forces micro-batches of a few showers
    # equal up to float32 rounding (matrix products are blocked differently per batch size)
    np.testing.assert_allclose(loaded.sample(energies, seed=3, shard=1).showers, b.showers,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.log_prob(data.select(slice(0, 50))),
                               loaded.log_prob(data.select(slice(0, 50))), rtol=1e-5)
    assert a.showers.shape == (200, GEOMETRY.n_voxels) and np.isfinite(a.showers).all()
    assert (a.showers >= 0).all()
    kept = a.showers[a.showers > 0]
    assert kept.size == 0 or kept.min() >= model.config.threshold_mev
    settings = EvaluationSettings(metrics=("hist",), repeats=1)
    result = evaluate_samples(data.select(slice(0, 200)), a, GEOMETRY, str(tmp_path), settings,
                              log=lambda _: None)
    assert set(result["separation_power"]) >= {"E_tot", "E_L0"}


def test_cli_generate_like_and_out_of_range(trained, data, tmp_path, capsys):
    _, run_dir, _ = trained
    reference = tmp_path / "ref.h5"
    write_showers(reference, data.select(slice(0, 100)), GEOMETRY)
    out = tmp_path / "gen.h5"
    assert main(["generate", run_dir, "--like", str(reference), "-o", str(out), "--seed", "2"]) == 0
    generated = read_showers(out, GEOMETRY)
    np.testing.assert_array_equal(generated.incident_energies, data.incident_energies[:100])
    energies = tmp_path / "e.txt"
    energies.write_text("1e7\n")  # above the 4.2 TeV maximum of the training set
    bad = tmp_path / "bad.h5"
    assert main(["generate", run_dir, "--energies", str(energies), "-o", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "training range" in err and "--allow-extrapolation" in err and not bad.exists()
    assert main(["generate", run_dir, "--energies", str(energies), "-o", str(bad),
                 "--allow-extrapolation"]) == 0
    assert main(["generate", str(tmp_path), "-n", "5", "-o", str(bad)]) == 1
    assert "not a caloforge model directory" in capsys.readouterr().err


def test_conditions_are_used(tmp_path):
    geometry = get_geometry("lhcb-ecal")
    data = simulate(geometry, 400, 2)
    model = CaloFlow(geometry, CaloFlow.preset("tiny"))
    model.config.training.epochs = 1
    model.fit(data, str(tmp_path))
    assert model.conditions.names == ["direction", "entry_point"]
    with pytest.raises(CaloforgeError, match="condition"):
        model.sample(data.incident_energies[:5])
    out = model.sample(data.incident_energies[:5], data.select(slice(0, 5)).conditions)
    assert out.showers.shape == (5, 900)
    # the sampling benchmark takes (N, 2) conditions from a file and repeats them by row
    reference = tmp_path / "ref.h5"
    write_showers(reference, data.select(slice(0, 3)), geometry)
    assert main(["bench-sampling", str(tmp_path), "--like", str(reference), "--threads", "1",
                 "--batch-sizes", "1,7", "--repeats", "1", "--no-progress"]) == 0


def test_resume_after_interruption_matches_uninterrupted(data, tmp_path):
    def make():
        model = CaloFlow(GEOMETRY, CaloFlow.preset("tiny"))
        model.config.training.epochs = 3
        return model

    assert_resume_matches_uninterrupted(make, data, tmp_path)


def test_killed_process_resumes(tmp_path):
    geometry = get_geometry("calogan")
    path = tmp_path / "train.h5"
    write_showers(path, simulate(geometry, 1500, 3), geometry)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "caloforge.cli", "train", "caloflow", "--data", str(path),
               "--geometry", "calogan", "-o", str(run_dir), "--preset", "tiny", "--epochs", "40",
               "--no-progress", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = run_dir / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_path.exists() and
                                          len(log_path.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(read_log(str(log_path)))
    assert 2 <= done_before < 40
    resume = command[:command.index("--epochs")] + ["--epochs", str(done_before + 2), "--resume",
                                                    "--no-progress"]
    assert subprocess.run(resume, capture_output=True).returncode == 0
    log = read_log(str(log_path))
    assert [r["epoch"] for r in log] == list(range(1, done_before + 3))
    load_model(str(run_dir))


def test_nonfinite_steps_are_skipped_then_divergence_stops(tmp_path):
    class Flaky(TrainingHooks):
        def __init__(self, bad_every):
            self.module = torch.nn.Linear(2, 1)
            self.calls = 0
            self.bad_every = bad_every

        def loss(self, batch, generator):
            self.calls += 1
            value = (self.module(batch["x"]) ** 2).mean()
            if self.module.training and self.calls % self.bad_every == 0:
                return value * float("nan")
            return value

    tensors = {"x": torch.randn(64, 2)}
    config = TrainingConfig(epochs=2, batch_size=8)
    flaky = Flaky(bad_every=3)
    summary = Trainer(flaky, config, str(tmp_path / "a")).fit(tensors, tensors)
    assert summary["skipped_steps"] > 0 and np.isfinite(summary["best_val_loss"])
    assert all(torch.isfinite(p).all() for p in flaky.module.parameters())
    broken = Flaky(bad_every=1)
    with pytest.raises(CaloforgeError, match="diverged"):
        Trainer(broken, TrainingConfig(epochs=2, batch_size=8, max_nonfinite_in_a_row=5),
                str(tmp_path / "b")).fit(tensors, tensors)


class _SlowModel(TrainingHooks):
    """A trainable whose training steps take at least ``step_seconds``."""

    def __init__(self, step_seconds: float) -> None:
        self.module = torch.nn.Linear(2, 1)
        self.steps, self.step_seconds = 0, step_seconds

    def loss(self, batch, generator):
        if self.module.training:
            self.steps += 1
            time.sleep(self.step_seconds)
        return (self.module(batch["x"]) ** 2).mean()


def _train_slow(tmp_path, n: int, step_seconds: float, epochs: int, budget_s: float):
    """Train a :class:`_SlowModel` on ``n`` rows in batches of 8 within ``budget_s``."""
    tensors = {"x": torch.randn(n, 2)}
    slow = _SlowModel(step_seconds)
    config = TrainingConfig(epochs=epochs, batch_size=8, time_budget_s=budget_s)
    summary = Trainer(slow, config, str(tmp_path)).fit(tensors, tensors)
    return slow, summary, read_log(str(tmp_path / "train_log.jsonl"))


def test_time_budget_ends_a_long_epoch_early(tmp_path):
    # one epoch is 50 steps of >= 50 ms; the budget of 0.5 s ends it after ~10
    slow, summary, log = _train_slow(tmp_path, 400, 0.05, epochs=3, budget_s=0.5)
    assert summary["epochs"] == 1 and log[0]["ended_by_time_budget"]
    assert 5 <= slow.steps < 50 and summary["train_seconds"] < 2.0


def test_epoch_that_does_not_fit_runs_to_the_budget(tmp_path):
    # an epoch is 20 steps of >= 20 ms; 1.1 s holds two and a bit: the third starts and is cut
    slow, summary, log = _train_slow(tmp_path, 160, 0.02, epochs=10, budget_s=1.1)
    assert summary["epochs"] == 3 and log[-1]["ended_by_time_budget"]
    assert 40 < slow.steps < 60
    # the time-driven schedule got close to its end (one-cycle ends at base / 1e4)
    assert log[-1]["lr"] < 0.05 * TrainingConfig().learning_rate


def test_train_cli_bad_inputs(tmp_path, capsys, data):
    path = tmp_path / "train.h5"
    write_showers(path, data.select(slice(0, 100)), GEOMETRY)
    base = ["train", "caloflow", "--data", str(path), "--preset", "tiny"]
    assert main(base + ["--geometry", "calogan", "-o", str(tmp_path / "r")]) == 1
    assert "504" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("flow2: {blocks: 2, wings: 3}\n")
    assert main(base + ["--geometry", GEOMETRY.name, "-o", str(tmp_path / "r2"),
                        "--config", str(config)]) == 1
    assert "flow2" in capsys.readouterr().err
    assert main(base + ["--geometry", GEOMETRY.name, "-o", str(tmp_path / "r3"),
                        "--epochs", "1"]) == 0
    assert main(base + ["--geometry", GEOMETRY.name, "-o", str(tmp_path / "r3"),
                        "--epochs", "1"]) == 1
    assert "--resume" in capsys.readouterr().err
    weights = Path(weights_path(str(tmp_path / "r3")))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", str(tmp_path / "r3"), "-n", "3", "-o", str(tmp_path / "g.h5")]) == 1
    assert "unreadable or truncated" in capsys.readouterr().err
