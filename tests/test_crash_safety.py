"""Killed and failing writers: no stray temporary file, no orphan worker, no half-written
target."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caloforge.atomic import atomic_directory, atomic_output, remove_stale_temporaries
from caloforge.data import ShowerWriter
from caloforge.geometry import get_geometry

from conftest import random_showers, train_tiny_caloflow

GEOMETRY = get_geometry("calochallenge-1-photons")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_a_dead_writers_temporary_is_removed_by_the_next_writer(tmp_path):
    target = tmp_path / "out.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".out.json.{dead}.abcd1234.tmp"
    alive = tmp_path / f".out.json.{os.getpid()}.efgh5678.tmp"  # a running writer's
    other = tmp_path / f".other.json.{dead}.abcd1234.tmp"        # another target's
    for path in (stale, alive, other):
        path.write_text("partial")
    assert remove_stale_temporaries(target) == [str(stale)]
    assert _temporaries(tmp_path) == sorted([alive.name, other.name])
    with atomic_output(target) as tmp:
        Path(tmp).write_text("{}")
    assert target.read_text() == "{}"


def test_a_failing_close_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "showers.h5"
    writer = ShowerWriter(target, GEOMETRY)
    with pytest.raises(OSError, match="disk full"):
        with writer:
            writer.write(random_showers(GEOMETRY, 5))

            def failing_close() -> None:
                raise OSError("disk full")

            monkeypatch.setattr(writer._h5, "close", failing_close)
    assert not target.exists() and _temporaries(tmp_path) == []


def test_sigterm_during_generation_leaves_no_temporary(tmp_path):
    """SIGTERM becomes an exception: the `with atomic_output` on the way out removes its
    temporary file and the previous target stays."""
    run_dir = train_tiny_caloflow(tmp_path / "run", GEOMETRY, 200, seed=1)
    target = tmp_path / "gen.h5"
    target.write_bytes(b"old")
    process = subprocess.Popen(
        [sys.executable, "-m", "caloforge.cli", "generate", str(run_dir), "-n", "3000000",
         "--batch-size", "1000", "-o", str(target), "--threads", "1", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _temporaries(tmp_path) != [] or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert _temporaries(tmp_path) == [] and target.read_bytes() == b"old"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_simulation_workers_die_with_a_killed_parent(tmp_path):
    target = tmp_path / "sim.h5"
    process = subprocess.Popen(
        [sys.executable, "-m", "caloforge.cli", "simulate", "--geometry", "calochallenge-2",
         "-n", "200000", "--workers", "2", "-o", str(target), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        listing = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)],
                                 capture_output=True, text=True).stdout
        return [int(pid) for pid in listing.split()]

    _wait_for(lambda: len(children()) >= 2)
    workers = children()
    process.send_signal(signal.SIGKILL)
    process.wait()

    def all_gone() -> bool:
        alive = []
        for pid in workers:
            try:
                os.kill(pid, 0)
                state = Path(f"/proc/{pid}/stat").read_text().split()[2]
                if state != "Z":
                    alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        return not alive

    _wait_for(all_gone, timeout=30)
    assert not target.exists()
    # the next run of the same command removes the killed run's temporary
    assert len(_temporaries(tmp_path)) == 1
    assert remove_stale_temporaries(target) and _temporaries(tmp_path) == []


def test_a_folder_is_replaced_as_a_unit(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "old.png").write_text("old")
    (report / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(report) as staging:
            (Path(staging) / "metrics.json").write_text('{"new": 1}')
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in report.iterdir()) == ["metrics.json", "old.png"]
    assert (report / "metrics.json").read_text() == "{}" and _temporaries(tmp_path) == []
    with atomic_directory(report) as staging:
        (Path(staging) / "metrics.json").write_text('{"new": 1}')
    assert sorted(p.name for p in report.iterdir()) == ["metrics.json"]
    assert (report / "metrics.json").read_text() == '{"new": 1}'
    assert _temporaries(tmp_path) == []


def test_a_dead_writers_staging_folder_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".report.{dead}.abcd1234.tmp"
    stale.mkdir()
    (stale / "half.png").write_text("partial")
    with atomic_directory(tmp_path / "report") as staging:
        (Path(staging) / "metrics.json").write_text("{}")
    assert not stale.exists() and _temporaries(tmp_path) == []


def test_evaluate_refuses_a_folder_that_is_not_a_report(tmp_path, capsys):
    from caloforge.cli import main
    from caloforge.data import write_showers

    data = tmp_path / "a.h5"
    write_showers(str(data), random_showers(GEOMETRY, 50), GEOMETRY)
    (tmp_path / "notes.txt").write_text("mine")
    status = main(["evaluate", "--reference", str(data), "--generated", str(data),
                   "--geometry", GEOMETRY.name, "-o", str(tmp_path), "--metrics", "hist"])
    err = capsys.readouterr().err
    assert status == 1 and "not a caloforge report" in err and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_lost_sigterm_is_raised_again_at_the_next_safe_point(monkeypatch):
    """A SIGTERM handled while Python runs a finaliser raises there, and Python drops that
    exception (the race that once left a terminated generation running): the request is
    remembered and the next safe point between batches raises it."""
    from caloforge import runtime

    monkeypatch.setattr(runtime, "_termination_requested", False)

    class Finaliser:
        def __del__(self) -> None:
            runtime.request_termination()

    Finaliser()  # its __del__ raises Terminated; Python ignores it
    with pytest.raises(runtime.Terminated):
        runtime.stop_if_terminated()
