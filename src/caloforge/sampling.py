"""Generation: batched sampling from any model, streamed into a shower file.

Showers are produced in shards of ``SHARD_SIZE``; shard ``k`` of a run with seed ``s``
always comes from the random stream (s, k), so a file is reproducible whatever the batch
size, and shards can be generated on different machines and concatenated. A generation
cut into ``parts`` (``caloforge generate --shard K/N``, or one part per process under
``torchrun``) gives each part a consecutive run of whole shards: the parts concatenated in
order (``caloforge merge-showers``) are the same showers as the generation in one piece.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import ShowerFile, ShowerWriter
from .errors import CaloforgeError, OptionError
from .models.base import ShowerModel
from .runtime import stop_if_terminated

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


def parse_part(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N): part K (counted from 0) of N."""
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise OptionError(f"--shard must be K/N (part K of N, from 0), got {text!r}") from None
    if parts < 1 or not 0 <= part < parts:
        raise OptionError(f"--shard {text}: need 0 <= K < N")
    return part, parts


def part_range(n: int, part: int, parts: int, shard_size: int = SHARD_SIZE
               ) -> tuple[int, int, int]:
    """(first shard, first shower, end shower) of ``part`` of ``parts`` of a generation of
    ``n`` showers: a consecutive run of whole shards of ``shard_size`` showers."""
    if shard_size < 1:
        raise OptionError(f"--shard-size must be >= 1, got {shard_size}")
    n_shards = -(-n // shard_size)
    if parts > n_shards:
        raise OptionError(f"{n} showers are {n_shards} shard(s) of {shard_size}: they cannot "
                          f"be cut into {parts} parts (lower --shard-size or N)")
    first, end = part * n_shards // parts, (part + 1) * n_shards // parts
    return first, first * shard_size, min(end * shard_size, n)


def generate_to_file(model: ShowerModel, path: str, incident_energies: np.ndarray,
                     conditions: dict[str, np.ndarray], seed: int = 0, batch_size: int = 10_000,
                     device: str = "cpu", progress: Callable[..., Any] | None = None,
                     file_format: str = "calochallenge", part: tuple[int, int] = (0, 1),
                     shard_size: int = SHARD_SIZE) -> int:
    """Sample one shower per incident energy into ``path`` (atomic): all of them, or part
    ``part[0]`` of ``part[1]`` (see :func:`part_range`). Returns the count written."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    first_shard, begin, end = part_range(len(incident_energies), *part, shard_size)
    bar = progress(total=end - begin, desc="generate", unit="shower") if progress else None
    try:
        with ShowerWriter(path, model.geometry, file_format) as writer:
            for shard, start in enumerate(range(begin, end, shard_size), start=first_shard):
                stop_if_terminated()
                stop = min(start + shard_size, end)
                showers = model.sample(incident_energies[start:stop],
                                       {k: v[start:stop] for k, v in conditions.items()},
                                       seed=seed, shard=shard, batch_size=batch_size,
                                       device=device)
                writer.write(showers)
                if bar is not None:
                    bar.update(stop - start)
            writer.annotate("generated_by", f"{model.family} (seed {seed})")
    finally:
        if bar is not None:
            bar.close()
    return end - begin
