"""Atomic, durable file output: write to a temporary file beside the target, then rename.

A reader never sees a half-written file and a failed or interrupted writer leaves the
previous file (or nothing) in place. The file is flushed to disk (fsync) before the rename
and the directory after it, so that after a power loss the target is the old file or the
complete new one, never an empty one. A folder written as a unit (an evaluation report) is
staged in a temporary folder and exchanged with the previous one in one step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    created = _make_dirs(directory)
    remove_stale_temporaries(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                                   suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600: use normal permissions
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        for folder in reversed(created):  # leave no empty folders behind either
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces the folder ``path``
    as a unit (its files flushed to disk first).

    The previous folder is exchanged with the new one in one rename where the system offers
    it (Linux ``renameat2(RENAME_EXCHANGE)``), else moved aside first (a kill between the two
    renames leaves nothing at ``path``, never a mix); it is then removed. On any exception
    the temporary folder is removed and ``path`` is left untouched.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    created = _make_dirs(parent)
    remove_stale_temporaries(path)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                               suffix=".tmp", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_current_umask())
        for root, _, files in os.walk(staging):
            for name in files:
                fsync_path(os.path.join(root, name))
        if os.path.isdir(path) and _exchange(staging, path):
            shutil.rmtree(staging)  # now holds the previous folder
        else:
            if os.path.lexists(path):
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                                         suffix=".tmp", dir=parent)
                os.replace(path, os.path.join(aside, "previous"))
                os.replace(staging, path)
                shutil.rmtree(aside)
            else:
                os.replace(staging, path)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    library = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(library, use_errno=True), "renameat2", None) \
        if library else None
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                     _RENAME_EXCHANGE) == 0


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries of ``path`` (files or folders) left by writers that no longer
    run (a process killed with SIGKILL cannot clean up); returns the removed paths.
    Temporaries are named ``.NAME.PID.XXXX.tmp``: one whose process is alive is another
    writer's, kept."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.dirname(path), os.path.basename(path)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            match = pattern.match(entry)
            if match and not _process_alive(int(match.group(1))):
                stale = os.path.join(directory, entry)
                with contextlib.suppress(FileNotFoundError):
                    if os.path.isdir(stale) and not os.path.islink(stale):
                        shutil.rmtree(stale)
                    else:
                        os.remove(stale)
                    removed.append(stale)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and missing parents; return those created, outermost first."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for folder in reversed(missing):
        os.makedirs(folder, exist_ok=True)
    return list(reversed(missing))


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, sort_keys=False)
            stream.write("\n")
