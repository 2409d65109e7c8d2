"""Atomic, durable file output: write to a temporary file beside the target, then rename.

A reader never sees a half-written file and a failed or interrupted writer leaves the
previous file (or nothing) in place. The file is flushed to disk (fsync) before the rename
and the directory after it, so that after a power loss the target is the old file or the
complete new one, never an empty one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries of ``path`` left by writers that no longer run (a process
    killed with SIGKILL cannot clean up); returns the removed paths. Temporaries are named
    ``.NAME.PID.XXXX.tmp``: one whose process is alive is another writer's, kept."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.dirname(path), os.path.basename(path)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            match = pattern.match(entry)
            if match and not _process_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, entry))
                    removed.append(os.path.join(directory, entry))
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
