"""Shared fixtures: small synthetic shower samples and the location of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from caloforge.data import ShowerData
from caloforge.geometry import Geometry

os.environ.setdefault("CALOFORGE_NO_PROGRESS", "1")
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
