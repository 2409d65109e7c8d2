"""Generation: batched sampling from any model, streamed into a shower file.

Showers are produced in shards of ``SHARD_SIZE``; shard ``k`` of a run with seed ``s``
always comes from the random stream (s, k), so a file is reproducible whatever the batch
size, and shards can be generated on different machines and concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import ShowerFile, ShowerWriter
from .errors import CaloforgeError, OptionError
from .models.base import ShowerModel

SHARD_SIZE = 10_000


def read_energies_file(path: str) -> np.ndarray:
    """Incident energies (MeV) from a shower file or a text file with one value per line."""
    if path.endswith((".h5", ".hdf5")):
        with ShowerFile(path) as reader:
            return reader.read_conditions()[0]
    if not os.path.exists(path):
        raise CaloforgeError(f"{path}: no such file")
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise CaloforgeError(f"{path}: not a list of energies in MeV ({exc})") from None
    if values.size == 0 or not np.all(np.isfinite(values)) or values.min() <= 0:
        raise CaloforgeError(f"{path}: energies must be positive finite numbers (MeV)")
    return values.reshape(-1)


def generation_inputs(model: ShowerModel, n: int | None, like: str | None,
                      energies_file: str | None, seed: int
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(incident energies, conditions, where they came from) for a generation run."""
    if like and energies_file:
        raise OptionError("give either --like or --energies, not both")
    conditions: dict[str, np.ndarray] = {}
    if like:
        with ShowerFile(like, model.geometry) as reader:
            count = len(reader) if n is None else min(n, len(reader))
            energies, conditions = reader.read_conditions(0, count)
        if n is not None and n > count:
            raise CaloforgeError(f"{like}: has {count} showers, fewer than the {n} requested")
        return energies, conditions, like
    if energies_file:
        energies = read_energies_file(energies_file)
        if n is not None:
            energies = np.resize(energies, n)
        return energies, conditions, energies_file
    if n is None:
        raise OptionError("give -n (number of showers), --like or --energies")
    sampler = getattr(model, "conditions", None)
    if sampler is None or getattr(sampler, "names", []):
        raise OptionError("this model needs conditions: give --like REF.h5 to take them "
                          "from a file")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2 ** 31]))
    return sampler.sample_energies(n, rng), conditions, "the training energy distribution"


def generate_to_file(model: ShowerModel, path: str, incident_energies: np.ndarray,
                     conditions: dict[str, np.ndarray], seed: int = 0, batch_size: int = 10_000,
                     device: str = "cpu", progress: Callable[..., Any] | None = None,
                     file_format: str = "calochallenge") -> int:
    """Sample one shower per incident energy into ``path`` (atomic); returns the count."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    n = len(incident_energies)
    bar = progress(total=n, desc="generate", unit="shower") if progress else None
    try:
        with ShowerWriter(path, model.geometry, file_format) as writer:
            for shard, start in enumerate(range(0, n, SHARD_SIZE)):
                stop = min(start + SHARD_SIZE, n)
                part = model.sample(incident_energies[start:stop],
                                    {k: v[start:stop] for k, v in conditions.items()},
                                    seed=seed, shard=shard, batch_size=batch_size, device=device)
                writer.write(part)
                if bar is not None:
                    bar.update(stop - start)
            writer.annotate("generated_by", f"{model.family} (seed {seed})")
    finally:
        if bar is not None:
            bar.close()
    return n
