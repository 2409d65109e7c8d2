"""SIGKILL at random moments: ``simulate``, ``generate``, ``evaluate``, ``train`` and
``distill`` killed anywhere leave the previous target whole (or nothing at the target path);
the next run of the same command finishes and leaves no stray temporary; a killed training
resumes from its last checkpoint to the weights of an uninterrupted run.

Each command first runs uninterrupted: its duration T sets the range of kill moments and
its output is the previous target. Then, per seed, the same command is started again and
killed with SIGKILL after U(0.2, 1.0) x T seconds (the moment is drawn from the seed; where
the process is at that moment depends on the machine). ``CALOFORGE_KILL_SEEDS`` (default 1,
which keeps the suite inside its 10-minute budget) sets how many moments per command;
``python bench/fuzz.py --kill-seeds 10`` runs more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from caloforge.data import read_showers, write_showers
from caloforge.geometry import get_geometry
from caloforge.models import load_model
from caloforge.training import read_log

from conftest import random_showers

GEOMETRY = get_geometry("calochallenge-1-photons")
SEEDS = range(int(os.environ.get("CALOFORGE_KILL_SEEDS", "1")))
EPOCHS = 4


def caloforge(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "caloforge.cli", *arguments, "--threads", "1",
            "--no-progress"]


def run_whole(command: list[str]) -> float:
    """Run ``command`` to its end; its wall seconds."""
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    return time.perf_counter() - started


def run_killed(command: list[str], seconds: float) -> None:
    """Start ``command`` and SIGKILL it after ``seconds`` (if it is still running)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def kill_moment(seed: int, whole_seconds: float) -> float:
    return float(np.random.default_rng(seed).uniform(0.2, 1.0)) * whole_seconds


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill")
    write_showers(str(folder / "train.h5"), random_showers(GEOMETRY, 400, seed=1), GEOMETRY)
    write_showers(str(folder / "other.h5"), random_showers(GEOMETRY, 400, seed=2), GEOMETRY)
    return folder


@pytest.fixture(scope="module")
def teacher(workspace) -> tuple[Path, float]:
    """An uninterrupted training run and its wall seconds."""
    run_dir = workspace / "teacher"
    seconds = run_whole(caloforge("train", "caloflow", "--data", str(workspace / "train.h5"),
                                  "--geometry", GEOMETRY.name, "-o", str(run_dir),
                                  "--preset", "tiny", "--epochs", str(EPOCHS), "--seed", "3"))
    return run_dir, seconds


def check_file_command(folder: Path, command: list[str], target: Path, n: int) -> None:
    seconds = run_whole(command)
    for seed in SEEDS:
        run_killed(command, kill_moment(seed, seconds))
        assert len(read_showers(str(target), GEOMETRY)) == n  # the previous file, whole
        run_whole(command)
        assert temporaries(folder) == []
        assert len(read_showers(str(target), GEOMETRY)) == n


def test_killed_simulation(tmp_path):
    target = tmp_path / "sim.h5"
    check_file_command(tmp_path, caloforge("simulate", "--geometry", GEOMETRY.name, "-n",
                                           "4000", "--seed", "1", "-o", str(target)),
                       target, 4000)


def test_killed_generation(teacher, tmp_path):
    target = tmp_path / "gen.h5"
    check_file_command(tmp_path, caloforge("generate", str(teacher[0]), "-n", "5000",
                                           "--seed", "1", "-o", str(target)), target, 5000)


def test_killed_evaluation(workspace, tmp_path):
    report = tmp_path / "report"
    command = caloforge("evaluate", "--reference", str(workspace / "train.h5"), "--generated",
                        str(workspace / "other.h5"), "--geometry", GEOMETRY.name, "-o",
                        str(report), "--metrics", "hist,cls-low", "--repeats", "1")
    seconds = run_whole(command)
    files = sorted(p.name for p in report.iterdir())
    for seed in SEEDS:
        run_killed(command, kill_moment(seed, seconds))
        # the previous report whole: every file, and a readable metrics.json
        assert sorted(p.name for p in report.iterdir()) == files
        assert json.loads((report / "metrics.json").read_text())["n_reference"] == 400
        run_whole(command)
        assert temporaries(tmp_path) == []


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_killed_training_resumes_to_the_uninterrupted_weights(kind, workspace, teacher,
                                                              tmp_path):
    teacher_dir, teacher_seconds = teacher
    if kind == "train":
        def command(run_dir: Path) -> list[str]:
            return caloforge("train", "caloflow", "--data", str(workspace / "train.h5"),
                             "--geometry", GEOMETRY.name, "-o", str(run_dir), "--preset",
                             "tiny", "--epochs", str(EPOCHS), "--seed", "3")
        whole_dir, seconds = teacher_dir, teacher_seconds
    else:
        def command(run_dir: Path) -> list[str]:
            return caloforge("distill", str(teacher_dir), "-o", str(run_dir), "--preset",
                             "tiny", "--epochs", str(EPOCHS))
        whole_dir = tmp_path / "whole"
        seconds = run_whole(command(whole_dir))
    uninterrupted = load_model(str(whole_dir))
    for seed in SEEDS:
        run_dir = tmp_path / f"killed-{seed}"
        run_killed(command(run_dir), kill_moment(seed, seconds))
        if (run_dir / "model.json").exists():  # a saved model is always a whole one
            load_model(str(run_dir))
        resume = (run_dir / "checkpoint.safetensors").exists()
        run_whole(command(run_dir) + (["--resume"] if resume else []))
        assert [r["epoch"] for r in read_log(str(run_dir / "train_log.jsonl"))] == \
            list(range(1, EPOCHS + 1))
        assert temporaries(run_dir) == []
        resumed = load_model(str(run_dir))
        for key, value in uninterrupted.module.state_dict().items():
            torch.testing.assert_close(resumed.module.state_dict()[key], value)
