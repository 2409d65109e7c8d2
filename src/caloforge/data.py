"""Shower files: the in-memory representation, readers and writers.

In memory a sample is a :class:`ShowerData`: incident energies ``(N,)`` in MeV (float64),
flat voxel energies ``(N, n_voxels)`` in MeV (float32) in the geometry's flattening order,
and optional extra conditions (name -> ``(N, k)`` array with its units).

On disk two formats (:data:`FILE_FORMATS`, one :class:`FileFormat` each) are read and
written:

* ``calochallenge``: ``incident_energies`` (N, 1) float64 and ``showers`` (N, n_voxels)
  float32, gzip-compressed, exactly what the official CaloChallenge ``evaluate.py`` reads
  (it needs the incident energies in float64).
* ``calogan``: ``energy`` (N, 1) in GeV, ``layer_0`` (N, 3, 96), ``layer_1`` (N, 12, 12),
  ``layer_2`` (N, 12, 6) and ``overflow`` (N, 3), cells in MeV.

Extra conditions (entry point, direction, ...) are stored in both formats as datasets of an
HDF5 group ``conditions``, each with a ``units`` attribute; tools that only know the
standard keys ignore them.

Reading is streamed (:meth:`ShowerFile.iter_batches`) so files larger than memory can be
processed; writing (:class:`ShowerWriter`) appends in chunks to a temporary file that is
renamed onto the target only when the writer closes without error.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from ._version import __version__
from .atomic import atomic_output
from .errors import OptionError, ShowerFileError
from .geometry import Geometry, get_geometry

CONDITIONS_GROUP = "conditions"


@dataclass(frozen=True)
class FileFormat:
    """One HDF5 layout of showers: where the incident energies and the voxels are stored,
    in which unit and type. Reading and writing ask this object instead of the name."""

    name: str
    energy_key: str
    mev_per_unit: float         # MeV per unit of the stored incident energy (CaloGAN: GeV)
    energy_dtype: Any
    # None: one flat ``showers`` dataset ``(N, n_voxels)``; else one dataset per layer of
    # the layer's shape, named by these keys
    layer_keys: tuple[str, ...] | None
    overflow: bool              # an ``overflow`` ``(N, 3)`` dataset (CaloGAN)
    geometry: str | None        # the only geometry the format holds (CaloGAN), else None

    @property
    def voxel_keys(self) -> tuple[str, ...]:
        return self.layer_keys if self.layer_keys is not None else ("showers",)

    def recognises(self, keys: set[str]) -> bool:
        """Whether a file with these top-level keys looks like this format."""
        return bool({self.energy_key, self.voxel_keys[0]} & keys)


FILE_FORMATS: dict[str, FileFormat] = {f.name: f for f in (
    FileFormat("calochallenge", "incident_energies", 1.0, np.float64, None, overflow=False,
               geometry=None),
    FileFormat("calogan", "energy", 1000.0, np.float32, ("layer_0", "layer_1", "layer_2"),
               overflow=True, geometry="calogan"),
)}
FORMATS = tuple(FILE_FORMATS)
# Voxel values handled at once when a file or a sample is processed block by block
# (16M: 64 MB as float32).
BLOCK_VALUES = 1 << 24


@dataclass
class ShowerData:
    """A batch of showers.

    Attributes:
        incident_energies: ``(N,)`` float64, incident particle energy in MeV.
        showers: ``(N, n_voxels)`` float32, voxel energies in MeV.
        conditions: extra conditions, name -> ``(N, k)`` float array (e.g. ``entry_point``
            ``(N, 2)`` in mm, ``direction`` ``(N, 2)`` in rad).
        condition_units: name -> unit string for each entry of ``conditions``.
        auxiliary: per-shower data that is neither voxel nor condition (CaloGAN
            ``overflow`` ``(N, 3)`` in MeV), carried through format conversions.
    """

    incident_energies: np.ndarray
    showers: np.ndarray
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    condition_units: dict[str, str] = field(default_factory=dict)
    auxiliary: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.incident_energies = np.asarray(self.incident_energies, dtype=np.float64).reshape(-1)
        self.showers = np.asarray(self.showers, dtype=np.float32)
        n = len(self.incident_energies)
        if self.showers.ndim != 2 or self.showers.shape[0] != n:
            raise ValueError(f"showers must be (N={n}, n_voxels), got {self.showers.shape}")
        for name, values in list(self.conditions.items()):
            values = np.asarray(values, dtype=np.float64)
            values = values.reshape(n, -1)
            self.conditions[name] = values
            self.condition_units.setdefault(name, "")
        for name, values in list(self.auxiliary.items()):
            self.auxiliary[name] = np.asarray(values, dtype=np.float32).reshape(n, -1)

    def __len__(self) -> int:
        return len(self.incident_energies)

    @property
    def n_voxels(self) -> int:
        return self.showers.shape[1]

    def select(self, index: slice | np.ndarray | Sequence[int]) -> ShowerData:
        """A new ShowerData with the showers picked by ``index``."""
        return ShowerData(self.incident_energies[index], self.showers[index],
                          {k: v[index] for k, v in self.conditions.items()},
                          dict(self.condition_units),
                          {k: v[index] for k, v in self.auxiliary.items()})

    @staticmethod
    def concatenate(parts: Sequence[ShowerData]) -> ShowerData:
        """Join batches with the same conditions into one."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        return ShowerData(
            np.concatenate([p.incident_energies for p in parts]),
            np.concatenate([p.showers for p in parts]),
            {k: np.concatenate([p.conditions[k] for p in parts]) for k in first.conditions},
            dict(first.condition_units),
            {k: np.concatenate([p.auxiliary[k] for p in parts]) for k in first.auxiliary},
        )

    def find_problem(self) -> str | None:
        """The first physical inconsistency of the values, as a sentence, or None.

        Checks NaN/inf anywhere, negative voxel energies and non-positive incident energies.
        """
        e_inc = self.incident_energies
        bad = ~np.isfinite(e_inc)
        if bad.any():
            return f"incident energy is NaN or infinite (first at shower {int(np.argmax(bad))})"
        if (e_inc <= 0).any():
            i = int(np.argmax(e_inc <= 0))
            return f"incident energy must be positive, shower {i} has {e_inc[i]:g} MeV"
        # blocks of rows: boolean masks of a whole 10,000 x 40,500 shard would take 0.4 GB each
        block = max(1, BLOCK_VALUES // max(1, self.n_voxels))
        for start in range(0, len(self.showers), block):
            rows = self.showers[start:start + block]
            finite_rows = np.isfinite(rows).all(axis=1)
            if not finite_rows.all():
                return f"voxel energies contain NaN or infinite values (first at shower " \
                       f"{start + int(np.argmin(finite_rows))})"
            negative_rows = (rows < 0).any(axis=1)
            if negative_rows.any():
                i = start + int(np.argmax(negative_rows))
                return f"negative voxel energy (min {self.showers[i].min():g} MeV at shower {i})"
        for name, values in self.conditions.items():
            finite = np.isfinite(values).all(axis=1)
            if not finite.all():
                return f"condition {name!r} has NaN or infinite values (first at shower " \
                       f"{int(np.argmin(finite))})"
        return None


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class ShowerFile:
    """An open shower file, validated on opening, read whole or in batches.

    Structure (keys, shapes, dtypes, voxel count against the geometry) is checked when the
    file is opened; values (NaN/inf, negative energies) are checked on every batch read, so
    a bad value anywhere in a streamed file stops the reader with a clear message.

    Args:
        path: HDF5 file in CaloChallenge or CaloGAN format.
        geometry: expected geometry; its voxel count must match. For CaloGAN files the
            ``calogan`` geometry is implied when none is given.
        file_format: ``"auto"`` (decided from the keys), ``"calochallenge"`` or ``"calogan"``.
    """

    def __init__(self, path: str | os.PathLike[str], geometry: Geometry | None = None,
                 file_format: str = "auto") -> None:
        self.path = os.fspath(path)
        if file_format not in ("auto",) + FORMATS:
            raise OptionError(f"unknown file format {file_format!r}; choose from {FORMATS}")
        if not os.path.exists(self.path):
            raise ShowerFileError(self.path, "no such file")
        if os.path.isdir(self.path):
            raise ShowerFileError(self.path, "is a directory, not a shower file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            reason = "truncated or corrupt HDF5 file" if "truncated" in str(exc).lower() \
                else "not a readable HDF5 file"
            raise ShowerFileError(self.path, f"{reason} ({_short(exc)})") from None
        try:
            self._inspect_structure(geometry, file_format)
        except BaseException:
            self._h5.close()
            raise

    # --- structure ----------------------------------------------------------------------
    def _fail(self, problem: str) -> ShowerFileError:
        return ShowerFileError(self.path, problem)

    def _inspect_structure(self, geometry: Geometry | None, file_format: str) -> None:
        keys = set(self._h5.keys())
        if file_format == "auto":
            found = next((f for f in FILE_FORMATS.values() if f.recognises(keys)), None)
            if found is None:
                raise self._fail(
                    "neither CaloChallenge keys ('incident_energies', 'showers') nor CaloGAN "
                    f"keys ('energy', 'layer_0', ...) found; keys: {sorted(keys) or 'none'}")
            file_format = found.name
        layout = FILE_FORMATS[file_format]
        self.format, self.layout = file_format, layout
        self._energy_key, voxel_keys = layout.energy_key, layout.voxel_keys
        if geometry is None and layout.geometry is not None:
            geometry = get_geometry(layout.geometry)
        missing = [k for k in (self._energy_key, *voxel_keys) if k not in keys]
        if missing:
            raise self._fail(f"missing dataset(s) {missing} for {file_format} format; "
                             f"keys present: {sorted(keys)}")
        energy = self._dataset(self._energy_key)
        n = energy.shape[0] if energy.ndim >= 1 else -1
        if energy.ndim not in (1, 2) or (energy.ndim == 2 and energy.shape[1] != 1):
            raise self._fail(f"dataset {self._energy_key!r} must have shape (N, 1), "
                             f"got {energy.shape}")
        self._voxel_datasets = [self._dataset(k) for k in voxel_keys]
        n_voxels = 0
        for key, ds in zip(voxel_keys, self._voxel_datasets):
            if ds.ndim < 2:
                raise self._fail(f"dataset {key!r} must be (N, ...), got shape {ds.shape}")
            if ds.shape[0] != n:
                raise self._fail(f"dataset {key!r} has {ds.shape[0]} showers but "
                                 f"{self._energy_key!r} has {n}")
            n_voxels += int(np.prod(ds.shape[1:]))
        if geometry is not None and n_voxels != geometry.n_voxels:
            raise self._fail(f"showers have {n_voxels} voxels but geometry {geometry.name!r} "
                             f"has {geometry.n_voxels}")
        self.geometry = geometry
        self.n_showers = int(n)
        self.n_voxels = n_voxels
        self.conditions: dict[str, h5py.Dataset] = {}
        self.condition_units: dict[str, str] = {}
        group = self._h5.get(CONDITIONS_GROUP)
        if isinstance(group, h5py.Group):
            for name in group:
                ds = self._dataset(f"{CONDITIONS_GROUP}/{name}")
                if ds.shape[0] != n:
                    raise self._fail(f"condition {name!r} has {ds.shape[0]} rows but the file "
                                     f"has {n} showers")
                self.conditions[name] = ds
                self.condition_units[name] = _as_str(ds.attrs.get("units", ""))
        self._overflow = self._h5.get("overflow") if layout.overflow else None
        # file-level attributes (caloforge records "geometry", "generated_by", ...)
        self.attributes = {str(k): _as_str(v) for k, v in self._h5.attrs.items()}

    def _dataset(self, key: str) -> h5py.Dataset:
        obj = self._h5.get(key)
        if not isinstance(obj, h5py.Dataset):
            raise self._fail(f"{key!r} is not a dataset")
        if obj.dtype.kind != "f":
            raise self._fail(f"dataset {key!r} has dtype {obj.dtype}; expected floating point")
        return obj

    # --- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_showers

    def read(self, start: int = 0, stop: int | None = None, validate: bool = True) -> ShowerData:
        """Showers ``start:stop`` as a :class:`ShowerData` (MeV), values checked."""
        stop = self.n_showers if stop is None else min(stop, self.n_showers)
        try:
            energy = np.asarray(self._h5[self._energy_key][start:stop], dtype=np.float64)
            parts = [np.asarray(ds[start:stop], dtype=np.float32).reshape(stop - start, -1)
                     for ds in self._voxel_datasets]
            conditions = {k: np.asarray(ds[start:stop], dtype=np.float64)
                          for k, ds in self.conditions.items()}
            auxiliary = {}
            if self._overflow is not None:
                auxiliary["overflow"] = np.asarray(self._overflow[start:stop], dtype=np.float32)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._fail(f"could not read showers {start}-{stop}: file truncated or "
                             f"corrupt ({_short(exc)})") from None
        energy = energy * self.layout.mev_per_unit
        showers = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        batch = ShowerData(energy, showers, conditions, dict(self.condition_units), auxiliary)
        if validate:
            problem = batch.find_problem()
            if problem is not None:
                raise self._fail(_offset_problem(problem, start))
        return batch

    def read_conditions(self, start: int = 0, stop: int | None = None
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Incident energies ``(n,)`` MeV and extra conditions only, without the voxels."""
        stop = self.n_showers if stop is None else min(stop, self.n_showers)
        try:
            energy = np.asarray(self._h5[self._energy_key][start:stop], dtype=np.float64)
            conditions = {k: np.asarray(ds[start:stop], dtype=np.float64)
                          for k, ds in self.conditions.items()}
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._fail(f"could not read incident energies: file truncated or corrupt "
                             f"({_short(exc)})") from None
        energy = energy.reshape(-1) * self.layout.mev_per_unit
        bad = ~np.isfinite(energy) | (energy <= 0)
        if bad.any():
            raise self._fail(f"incident energy must be positive and finite (shower "
                             f"{start + int(np.argmax(bad))})")
        return energy, conditions

    def iter_batches(self, batch_size: int = 10_000, start: int = 0,
                     stop: int | None = None) -> Iterator[ShowerData]:
        """Yield consecutive validated batches of at most ``batch_size`` showers."""
        if batch_size < 1:
            raise OptionError(f"batch size must be >= 1, got {batch_size}")
        stop = self.n_showers if stop is None else min(stop, self.n_showers)
        for first in range(start, stop, batch_size):
            yield self.read(first, min(first + batch_size, stop))

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_showers(path: str | os.PathLike[str], geometry: Geometry | None = None,
                 file_format: str = "auto", max_showers: int | None = None) -> ShowerData:
    """Read (the first ``max_showers`` of) a shower file into memory, validated."""
    with ShowerFile(path, geometry, file_format) as reader:
        return reader.read(0, max_showers)


class ShowerStream:
    """A shower file read in blocks of ``block_size`` consecutive showers, never whole.

    For training on files larger than memory (a CaloChallenge dataset-3 file holds 100,000
    showers of 40,500 voxels, 16 GB as float32): a model reads the blocks it needs, in the
    order it chooses, and memory holds a few blocks at a time. Consecutive rows are what
    HDF5 reads fast (compressed chunks hold consecutive showers), so shuffling happens at
    block level and inside a buffer of blocks. The file is opened (and its structure
    validated) on construction and stays open until :meth:`close`.

    Args:
        path: shower file (CaloChallenge or CaloGAN format).
        geometry: expected geometry (its voxel count is enforced).
        max_showers: use only the first N showers.
        block_size: showers per block (default: 1024, fewer for small files so that they
            still have 32 blocks to split and shuffle, and fewer for large showers so that
            a block holds at most ``block_values`` voxel values: 16M, 64 MB as float32).
    """

    block_values = BLOCK_VALUES

    def __init__(self, path: str | os.PathLike[str], geometry: Geometry | None = None,
                 max_showers: int | None = None, block_size: int | None = None) -> None:
        if block_size is not None and block_size < 1:
            raise OptionError(f"block size must be >= 1, got {block_size}")
        self._file = ShowerFile(path, geometry)
        self.path = self._file.path
        self.geometry = self._file.geometry
        self.n_showers = len(self._file) if max_showers is None \
            else min(max_showers, len(self._file))
        if self.n_showers == 0:
            self._file.close()
            raise ShowerFileError(self.path, "file contains no showers")
        self.block_size = block_size or max(1, min(1024, -(-self.n_showers // 32),
                                                   self.block_values // self.n_voxels))

    def __len__(self) -> int:
        return self.n_showers

    @property
    def n_voxels(self) -> int:
        return self._file.n_voxels

    @property
    def n_blocks(self) -> int:
        return -(-self.n_showers // self.block_size)

    def block_rows(self, block: int) -> tuple[int, int]:
        """(first, stop) rows of ``block``."""
        first = block * self.block_size
        return first, min(first + self.block_size, self.n_showers)

    def count(self, blocks: Sequence[int] | np.ndarray) -> int:
        """Number of showers in ``blocks``."""
        return sum(stop - first for first, stop in (self.block_rows(int(b)) for b in blocks))

    def read_block(self, block: int) -> ShowerData:
        """The showers of one block (validated)."""
        return self._file.read(*self.block_rows(block))

    def read_blocks(self, blocks: Sequence[int] | np.ndarray) -> ShowerData:
        """Several blocks in memory at once (use for subsamples)."""
        return ShowerData.concatenate([self.read_block(int(b)) for b in blocks])

    def read_conditions(self, blocks: Sequence[int] | np.ndarray
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Incident energies ``(n,)`` MeV and extra conditions of ``blocks``, no voxels."""
        parts = [self._file.read_conditions(*self.block_rows(int(b))) for b in blocks]
        return (np.concatenate([p[0] for p in parts]),
                {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]})

    @property
    def condition_units(self) -> dict[str, str]:
        return dict(self._file.condition_units)

    def read_all(self) -> ShowerData:
        """Every shower in memory (for model families that train in memory)."""
        return self._file.read(0, self.n_showers)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShowerStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def first_showers(data: ShowerData | ShowerStream, n: int) -> ShowerData:
    """The first ``n`` showers (fewer if there are not so many) in memory, from showers in
    memory or a stream (only the blocks that hold them are read)."""
    if isinstance(data, ShowerStream):
        data = data.read_blocks(np.arange(min(data.n_blocks, -(-n // data.block_size))))
    return data.select(slice(0, n))


def iter_first_showers(data: ShowerData | ShowerStream, n: int,
                       chunk: int = 1000) -> Iterator[ShowerData]:
    """The first ``n`` showers (fewer if there are not so many) in consecutive pieces of
    about ``chunk`` showers (a stream: whole blocks, at least one), never all in memory."""
    if isinstance(data, ShowerStream):
        per_piece = max(1, chunk // data.block_size)
        n_blocks = min(data.n_blocks, -(-n // data.block_size))
        left = n
        for first in range(0, n_blocks, per_piece):
            piece = data.read_blocks(np.arange(first, min(first + per_piece, n_blocks)))
            yield piece.select(slice(0, left))
            left -= len(piece)
        return
    for start in range(0, min(n, len(data)), chunk):
        yield data.select(slice(start, min(start + chunk, n)))


def _offset_problem(problem: str, offset: int) -> str:
    """Rewrite 'shower i' in a batch-relative problem statement to the file index."""
    return re.sub(r"shower (\d+)", lambda m: f"shower {int(m.group(1)) + offset}", problem)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
class ShowerWriter:
    """Append showers to a new file in chunks; the file appears only on successful close.

    Use as a context manager::

        with ShowerWriter("out.h5", geometry) as writer:
            for batch in batches:
                writer.write(batch)

    If the block raises (or a batch fails validation) the temporary file is deleted and an
    existing file at ``path`` is left untouched.

    Args:
        path: output file.
        geometry: the showers' geometry (its voxel count is enforced; for ``calogan``
            format it must be the ``calogan`` geometry).
        file_format: ``"calochallenge"`` or ``"calogan"``.
        compression: HDF5 filter for the voxel datasets (``"gzip"`` as the datasets use).
    """

    def __init__(self, path: str | os.PathLike[str], geometry: Geometry,
                 file_format: str = "calochallenge", compression: str | None = "gzip") -> None:
        if file_format not in FORMATS:
            raise OptionError(f"unknown file format {file_format!r}; choose from {FORMATS}")
        layout = FILE_FORMATS[file_format]
        if layout.geometry is not None and geometry != get_geometry(layout.geometry):
            raise OptionError(f"the {file_format} format needs the {layout.geometry} "
                              f"geometry, not {geometry.name!r}")
        self.path = os.fspath(path)
        self.geometry = geometry
        self.format, self.layout = file_format, layout
        self.compression = compression
        self.n_written = 0
        self._atomic: contextlib.AbstractContextManager[str] | None = None
        self._h5: h5py.File | None = None

    def __enter__(self) -> ShowerWriter:
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        self._h5 = h5py.File(tmp, "w")
        self._h5.attrs["caloforge_version"] = __version__
        self._h5.attrs["geometry"] = self.geometry.name
        self._h5.attrs["format"] = self.format
        return self

    def _create(self, name: str, row_shape: tuple[int, ...], dtype: Any,
                compress: bool = True, **attrs: str) -> h5py.Dataset:
        assert self._h5 is not None
        row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
        chunk_rows = int(max(1, min(4096, (1 << 20) // max(row_bytes, 1))))
        ds = self._h5.create_dataset(
            name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
            chunks=(chunk_rows, *row_shape),
            compression=self.compression if compress else None)
        for key, value in attrs.items():
            ds.attrs[key] = value
        return ds

    def _append(self, name: str, values: np.ndarray) -> None:
        assert self._h5 is not None
        ds = self._h5[name]
        n0 = ds.shape[0]
        ds.resize(n0 + len(values), axis=0)
        ds[n0:] = values

    def annotate(self, key: str, value: str) -> None:
        """Store a file-level attribute (e.g. the JSON settings that produced the file)."""
        if self._h5 is None:
            raise RuntimeError("ShowerWriter must be used as a context manager")
        self._h5.attrs[key] = value

    def write(self, batch: ShowerData) -> None:
        """Append a batch (validated first: nothing invalid reaches the file)."""
        if self._h5 is None:
            raise RuntimeError("ShowerWriter must be used as a context manager")
        if batch.n_voxels != self.geometry.n_voxels:
            raise ShowerFileError(self.path, f"refusing to write showers with {batch.n_voxels} "
                                  f"voxels to a {self.geometry.name!r} file "
                                  f"({self.geometry.n_voxels} voxels)")
        problem = batch.find_problem()
        if problem is not None:
            raise ShowerFileError(self.path, f"refusing to write invalid showers: "
                                  f"{_offset_problem(problem, self.n_written)}")
        if self.n_written == 0:
            self._create_datasets(batch)
        elif set(batch.conditions) != set(self._condition_names):
            raise ShowerFileError(self.path, "all batches written to one file must carry the "
                                  "same conditions")
        n = len(batch)
        layout = self.layout
        self._append(layout.energy_key,
                     (batch.incident_energies / layout.mev_per_unit).reshape(n, 1))
        if layout.layer_keys is None:
            self._append("showers", batch.showers)
        else:
            for name, image in zip(layout.layer_keys,
                                   self.geometry.split_layers(batch.showers)):
                self._append(name, image)
        if layout.overflow:
            self._append("overflow",
                         batch.auxiliary.get("overflow", np.zeros((n, 3), np.float32)))
        for name in self._condition_names:
            self._append(f"{CONDITIONS_GROUP}/{name}", batch.conditions[name])
        self.n_written += n

    def _create_datasets(self, batch: ShowerData) -> None:
        layout = self.layout
        self._create(layout.energy_key, (1,), layout.energy_dtype, compress=False)
        if layout.layer_keys is None:
            self._create("showers", (self.geometry.n_voxels,), np.float32)
        else:
            for name, layer in zip(layout.layer_keys, self.geometry.layers):
                self._create(name, layer.shape, np.float32)
        if layout.overflow:
            self._create("overflow", (3,), np.float32, compress=False)
        self._condition_names = list(batch.conditions)
        for name, values in batch.conditions.items():
            self._create(f"{CONDITIONS_GROUP}/{name}", values.shape[1:], np.float64,
                         compress=False, units=batch.condition_units.get(name, ""))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._h5 is not None and self._atomic is not None
        try:
            self._h5.close()
        except BaseException as close_error:  # the temporary file goes with the failure
            self._atomic.__exit__(type(close_error), close_error, None)
            raise
        if exc_type is None and self.n_written == 0:
            exc = ShowerFileError(self.path, "no showers to write")
            self._atomic.__exit__(type(exc), exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)


def write_showers(path: str | os.PathLike[str], data: ShowerData, geometry: Geometry,
                  file_format: str = "calochallenge", batch_size: int = 10_000) -> None:
    """Write ``data`` to ``path`` atomically, in chunks of ``batch_size`` showers."""
    with ShowerWriter(path, geometry, file_format) as writer:
        for first in range(0, len(data), batch_size):
            writer.write(data.select(slice(first, first + batch_size)))


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------
def summarize_file(path: str | os.PathLike[str], geometry: Geometry | None = None,
                   batch_size: int = 10_000, progress: Any = None) -> dict[str, Any]:
    """Validate a whole file (streamed) and summarise it.

    Returns a dict with N, format, voxel count, incident-energy range (MeV), mean total
    deposited energy fraction, mean energy per layer (MeV), overall and per-layer sparsity
    (fraction of zero voxels) and the extra conditions with their ranges.
    """
    with ShowerFile(path, geometry) as reader:
        geometry = reader.geometry
        n = len(reader)
        if n == 0:
            raise ShowerFileError(reader.path, "file contains no showers")
        e_min, e_max = np.inf, -np.inf
        layer_sum = None
        zero_count = None
        ratio_sum = 0.0
        condition_ranges: dict[str, list[np.ndarray]] = {k: [] for k in reader.conditions}
        batches = reader.iter_batches(batch_size)
        if progress is not None:
            batches = progress(batches, total=-(-n // batch_size), desc="inspect", unit="batch")
        for batch in batches:
            e_min = min(e_min, batch.incident_energies.min())
            e_max = max(e_max, batch.incident_energies.max())
            ratio_sum += float((batch.showers.sum(axis=1, dtype=np.float64)
                                / batch.incident_energies).sum())
            if geometry is not None:
                energies = geometry.layer_energies(batch.showers, dtype=np.float64).sum(axis=0)
                zeros = geometry.layer_energies((batch.showers == 0).astype(np.float64)).sum(0)
            else:
                energies = batch.showers.sum(axis=(0, 1), dtype=np.float64).reshape(1)
                zeros = np.array([(batch.showers == 0).sum()], dtype=np.float64)
            layer_sum = energies if layer_sum is None else layer_sum + energies
            zero_count = zeros if zero_count is None else zero_count + zeros
            for key, values in batch.conditions.items():
                condition_ranges[key].append(np.stack([values.min(0), values.max(0)]))
    assert layer_sum is not None and zero_count is not None
    sizes = np.asarray(geometry.layer_sizes if geometry is not None else [reader.n_voxels])
    summary: dict[str, Any] = {
        "file": reader.path,
        "format": reader.format,
        "geometry": geometry.name if geometry is not None else None,
        "n_showers": n,
        "n_voxels": reader.n_voxels,
        "incident_energy_mev": [float(e_min), float(e_max)],
        "mean_deposited_fraction": ratio_sum / n,
        "sparsity": float(zero_count.sum() / (n * reader.n_voxels)),
        "conditions": {},
    }
    if geometry is not None:
        summary["layers"] = [
            {"layer_id": layer.layer_id, "n_voxels": layer.n_voxels,
             "mean_energy_mev": float(layer_sum[i] / n),
             "sparsity": float(zero_count[i] / (n * sizes[i]))}
            for i, layer in enumerate(geometry.layers)]
    for key, ranges in condition_ranges.items():
        stacked = np.stack(ranges)
        summary["conditions"][key] = {
            "units": reader.condition_units[key],
            "min": stacked[:, 0].min(0).tolist(), "max": stacked[:, 1].max(0).tolist()}
    return summary


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)



# --------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------
def merge_shower_files(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
                       geometry: Geometry | None = None, batch_size: int = 10_000,
                       progress: Any = None) -> int:
    """Concatenate shower files, in the given order, into ``output`` (streamed, atomic:
    the file appears complete or not at all). Returns the number of showers.

    Every input must have the same geometry (the one given, else the one caloforge
    recorded in the files), file format and extra conditions with the same units; a
    mismatch is a :class:`ShowerFileError` naming the file and what differs, before
    anything is written."""
    if len(paths) < 1:
        raise OptionError("give at least one shower file to merge")
    output = os.fspath(output)
    inputs = [os.fspath(p) for p in paths]
    for path in inputs:
        if os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output):
            raise OptionError(f"{output}: the output is one of the inputs")
    readers: list[ShowerFile] = []
    try:
        for path in inputs:
            readers.append(ShowerFile(path, geometry))
        names = {r.path: r.attributes.get("geometry") for r in readers}
        if geometry is None:
            recorded = {n for n in names.values() if n is not None}
            if len(recorded) > 1:
                one = next(p for p in inputs if names[p] is not None)
                other = next(p for p in inputs if names[p] not in (None, names[one]))
                raise ShowerFileError(other, f"geometry {names[other]!r} differs from "
                                      f"{names[one]!r} of {one}")
            if not recorded:
                raise OptionError("the files do not record their geometry; give --geometry "
                                  "or --xml")
            geometry = get_geometry(recorded.pop())
        first = readers[0]
        for reader in readers:
            name = names[reader.path]
            if name is not None and name != geometry.name:
                raise ShowerFileError(reader.path, f"geometry {name!r}, not {geometry.name!r}")
            if reader.n_voxels != geometry.n_voxels:
                raise ShowerFileError(reader.path, f"{reader.n_voxels} voxels, but geometry "
                                      f"{geometry.name!r} has {geometry.n_voxels}")
            if reader.format != first.format:
                raise ShowerFileError(reader.path, f"{reader.format} format, but "
                                      f"{first.path} is {first.format}")
            if reader.condition_units != first.condition_units:
                raise ShowerFileError(reader.path, f"conditions {reader.condition_units} "
                                      f"differ from {first.condition_units} of {first.path}")
        total = sum(len(r) for r in readers)
        bar = progress(total=total, desc="merge", unit="shower") if progress else None
        with ShowerWriter(output, geometry, first.format) as writer:
            for reader in readers:
                for batch in reader.iter_batches(batch_size):
                    writer.write(batch)
                    if bar is not None:
                        bar.update(len(batch))
            if "generated_by" in first.attributes:
                writer.annotate("generated_by", first.attributes["generated_by"])
            writer.annotate("merged_from", "\n".join(os.path.basename(p) for p in inputs))
        if bar is not None:
            bar.close()
        return total
    finally:
        for reader in readers:
            reader.close()
