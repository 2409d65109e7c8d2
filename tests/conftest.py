"""Shared fixtures: small synthetic shower samples and the location of ../shared."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from caloforge.data import ShowerData
from caloforge.geometry import Geometry

os.environ.setdefault("CALOFORGE_NO_PROGRESS", "1")
# Tiny models gain nothing from intra-op threads, and on a machine where another job holds
# the cores, OpenMP threads spinning against it made a 3 s fit take 110 s.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A command run with --threads N (or any test) leaves torch at one thread for the
    next test on this worker: two workers with two threads each on two cores once made a
    27 s test take 162 s."""
    yield
    torch.set_num_threads(1)


SHARED = Path(os.environ.get("CALOFORGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "calochallenge").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


def random_showers(geometry: Geometry, n: int, seed: int = 0, conditions: bool = False
                   ) -> ShowerData:
    """Sparse random showers with positive energies (MeV) for I/O tests."""
    rng = np.random.default_rng(seed)
    energies = rng.uniform(1e3, 1e5, n)
    voxels = rng.exponential(1.0, (n, geometry.n_voxels)).astype(np.float32)
    voxels[rng.random((n, geometry.n_voxels)) < 0.6] = 0.0
    voxels *= (energies / 1000.0)[:, None].astype(np.float32)
    extra = {}
    units = {}
    if conditions:
        extra = {"entry_point": rng.normal(0, 3, (n, 2)), "direction": rng.normal(0, 0.2, (n, 2))}
        units = {"entry_point": "mm", "direction": "rad"}
    return ShowerData(energies, voxels, extra, units)


def train_tiny_caloflow(run_dir: Path, geometry: Geometry, n: int = 200, seed: int = 0) -> Path:
    """A CaloFlow (tiny preset, one epoch) trained on ``n`` random showers into ``run_dir``:
    a saved run for tests of loading, generation and model files."""
    from caloforge.models.flows.caloflow import CaloFlow

    config = CaloFlow.preset("tiny")
    config.training.epochs = 1
    CaloFlow(geometry, config).fit(random_showers(geometry, n, seed=seed), str(run_dir))
    return run_dir


def showers_from_drawn_noise(model: Any, energies: np.ndarray, seed: int) -> np.ndarray:
    """Showers ``(N, n_voxels)`` MeV of the exported path (``showers_from_noise``) fed the
    noise ``model.sample(energies, seed=seed)`` draws: what that gives, to float rounding."""
    from caloforge.models.base import shard_generator

    noise = model.draw_noise(len(energies), shard_generator(seed, 0))
    with torch.inference_mode():
        return model.showers_from_noise(
            noise, {"incident_energy": torch.as_tensor(energies, dtype=torch.float32)}).numpy()


def tiny_config(model_class: Any, epochs: int, **options: Any) -> Any:
    """``model_class``'s tiny preset with ``epochs`` and the given options set."""
    config = model_class.preset("tiny")
    config.training.epochs = epochs
    for key, value in options.items():
        setattr(config, key, value)
    return config


def simulate(geometry: Geometry, n: int, seed: int) -> ShowerData:
    """``n`` reference-simulator showers of ``geometry``."""
    from caloforge.simulator import SimulationPlan, iter_simulated_chunks

    plan = SimulationPlan.from_options(geometry.name, n, seed=seed)
    return ShowerData.concatenate(list(iter_simulated_chunks(plan)))


class Killed(Exception):
    """Raised by :func:`killed_after_epoch` in place of a kill signal."""


@contextlib.contextmanager
def killed_after_epoch(epoch: int) -> Iterator[None]:
    """Every Trainer built inside the block raises :class:`Killed` once ``epoch`` is done
    (its checkpoint written), like a run killed between epochs."""
    from caloforge.training import Trainer

    original = Trainer.end_epoch

    def patched(self, validation, state, result, started):  # type: ignore[no-untyped-def]
        seconds = original(self, validation, state, result, started)
        if state.epoch == epoch:
            raise Killed
        return seconds

    Trainer.end_epoch = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.end_epoch = original  # type: ignore[method-assign]


def assert_resume_matches_uninterrupted(make_model, data: ShowerData, tmp_path: Path,
                                        epochs: int = 3) -> None:
    """A run killed after epoch 1 and resumed ends with the same weights and log as the
    uninterrupted run. ``make_model()`` returns a fresh model configured for ``epochs``."""
    import torch

    from caloforge.models import load_model
    from caloforge.training import read_log

    reference = make_model()
    reference.fit(data, str(tmp_path / "full"))
    interrupted = make_model()
    with killed_after_epoch(1), pytest.raises(Killed):
        interrupted.fit(data, str(tmp_path / "cut"))
    resumed = load_model(str(tmp_path / "cut"))
    resumed.fit(data, str(tmp_path / "cut"), resume=True)
    log = read_log(str(tmp_path / "cut" / "train_log.jsonl"))
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value)
