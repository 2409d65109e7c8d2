"""Several processes: data-parallel training under ``torchrun`` (two CPU processes, gloo),
generation in parts and ``merge-showers``.

The torchrun tests start real process groups (``python -m torch.distributed.run
--standalone``), as a user would; the models are the tiny presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloforge.cli import main
from caloforge.data import merge_shower_files, read_showers, write_showers
from caloforge.distributed import World, rank_part
from caloforge.errors import ShowerFileError
from caloforge.geometry import CylindricalLayer, Geometry, get_geometry
from caloforge.models import load_model
from caloforge.training import TensorBatches, rank_share, read_log

from conftest import random_showers, simulate

GEOMETRY = get_geometry("calochallenge-1-photons")
LHCB = get_geometry("lhcb-ecal")


def torchrun(*arguments: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "caloforge", *arguments, "--no-progress"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CALOFORGE_NO_PROGRESS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


@pytest.fixture(scope="module")
def photons(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photons") / "train.h5"
    write_showers(path, simulate(GEOMETRY, 600, seed=3), GEOMETRY)
    return path


@pytest.fixture(scope="module")
def teacher(photons, tmp_path_factory) -> Path:
    """A tiny CaloFlow trained on two processes (rank 0 writes everything)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    finished = run(torchrun("train", "caloflow", "--data", str(photons), "--geometry",
                            GEOMETRY.name, "--preset", "tiny", "--epochs", "2",
                            "-o", str(run_dir)))
    assert finished.stdout.count("trained caloflow") == 1  # printed by rank 0 only
    return run_dir


def _one_writer(run_dir: Path, epochs: int) -> None:
    """The run directory as one process leaves it: one model, one log line per epoch."""
    names = sorted(os.listdir(run_dir))
    assert [n for n in names if n.endswith(".safetensors") and n.startswith("model-")]
    assert len([n for n in names if n.startswith("model-")]) == 1, names
    assert not [n for n in names if n.startswith(".") or ".tmp" in n], names
    assert [r["epoch"] for r in read_log(str(run_dir / "train_log.jsonl"))] == \
        list(range(1, epochs + 1))
    summary = json.loads((run_dir / "model.json").read_text())["training"]
    assert summary["processes"] == 2 and summary["epochs"] == epochs


def test_flow_trains_on_two_processes(teacher):
    _one_writer(teacher, 2)
    model = load_model(str(teacher))
    showers = model.sample(np.full(50, 2e4), seed=1)
    assert np.isfinite(showers.showers).all()


def test_student_distils_on_two_processes(teacher, tmp_path):
    run(torchrun("distill", str(teacher), "-o", str(tmp_path / "student"), "--preset", "tiny",
                 "--epochs", "2"))
    _one_writer(tmp_path / "student", 2)
    assert load_model(str(tmp_path / "student")).family == "caloflow-student"


def test_gan_trains_on_two_processes(tmp_path):
    data = tmp_path / "lhcb.h5"
    write_showers(data, simulate(LHCB, 500, seed=4), LHCB)
    run(torchrun("train", "wgan", "--data", str(data), "--geometry", LHCB.name, "--preset",
                 "tiny", "--epochs", "2", "-o", str(tmp_path / "wgan")))
    _one_writer(tmp_path / "wgan", 2)
    record = read_log(str(tmp_path / "wgan" / "train_log.jsonl"))[-1]
    assert set(record["player_losses"]) == {"critic", "generator"}


def test_convflow_trains_on_two_processes(tmp_path):
    """convflow's ActNorm layers initialise from the first batch they see, and a step
    trains a random subset of layers: the processes must still end with one set of
    weights (training checks it, and fails otherwise)."""
    cylinder = Geometry("tiny-cyl", tuple(CylindricalLayer(
        i, r_edges=(0.0, 5.0, 10.0, 20.0, 40.0), n_alpha=6) for i in range(3)),
        threshold_mev=0.01)
    xml, data = tmp_path / "tiny.xml", tmp_path / "cyl.h5"
    xml.write_text(cylinder.to_xml())
    write_showers(data, random_showers(cylinder, 300, seed=2), cylinder)
    (tmp_path / "c.yaml").write_text("layers_per_step: 2\n")
    run(torchrun("train", "convflow", "--data", str(data), "--xml", str(xml), "--preset",
                 "tiny", "--epochs", "2", "--config", str(tmp_path / "c.yaml"),
                 "-o", str(tmp_path / "conv")))
    _one_writer(tmp_path / "conv", 2)


def test_killed_distributed_run_resumes(photons, tmp_path):
    """kill -9 of the whole job after its first checkpoint; --resume on two processes
    finishes it, and a run may go on with another number of processes."""
    run_dir = tmp_path / "run"
    command = torchrun("train", "caloflow", "--data", str(photons), "--geometry",
                       GEOMETRY.name, "--preset", "tiny", "--epochs", "60", "-o", str(run_dir))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(read_log(str(log))) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    workers = _children(process.pid)
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)  # torchrun itself: its workers must stop with it
    process.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    done = len(read_log(str(log)))
    assert 2 <= done < 60
    run(torchrun("train", "caloflow", "--data", str(photons), "--geometry", GEOMETRY.name,
                 "--epochs", str(done + 2), "-o", str(run_dir), "--resume"))
    assert [r["epoch"] for r in read_log(str(log))] == list(range(1, done + 3))
    finished = subprocess.run([sys.executable, "-m", "caloforge", "train", "caloflow",
                               "--data", str(photons), "--geometry", GEOMETRY.name,
                               "--epochs", str(done + 3), "-o", str(run_dir), "--resume",
                               "--no-progress", "--threads", "1"],
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "goes on with 1" in finished.stderr
    summary = json.loads((run_dir / "model.json").read_text())["training"]
    assert summary["epochs"] == done + 3 and "processes" not in summary


def _children(pid: int) -> list[int]:
    listing = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                             text=True).stdout
    return [int(line) for line in listing.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split()[2] == "Z")


def test_rank_shares_are_disjoint_and_cover_the_data():
    index = np.arange(1000)[np.random.default_rng(0).random(1000) < 0.9]
    for size in (1, 2, 3, 8):
        shares = [rank_share(index, World(rank, size), seed=5) for rank in range(size)]
        assert sorted(np.concatenate(shares).tolist()) == index.tolist()
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
        again = [rank_share(index, World(rank, size), seed=5) for rank in range(size)]
        assert all(np.array_equal(a, b) for a, b in zip(shares, again))  # deterministic
    other_seed = rank_share(index, World(0, 2), seed=6)
    assert not np.array_equal(other_seed, rank_share(index, World(0, 2), seed=5))
    assert rank_part(list(range(10)), World(2, 3)) == [6, 7, 8, 9]


def test_validation_parts_cover_the_set_once():
    """Each process validates on its slice of the set, in order."""
    import torch

    source = TensorBatches({"x": torch.arange(103)})
    parts = [torch.cat([b["x"] for b in source.batches(10, None, rank, 3)]) for rank in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(103))


@pytest.fixture(scope="module")
def generated_whole(teacher, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("generated")
    whole = folder / "whole.h5"
    assert main(["generate", str(teacher), "-n", "230", "--shard-size", "50", "--seed", "4",
                 "-o", str(whole), "--no-progress", "--threads", "1"]) == 0
    return folder, whole


def _same_showers(a: Path, b: Path) -> None:
    with h5py.File(a) as first, h5py.File(b) as second:
        for key in ("incident_energies", "showers"):
            assert first[key][()].tobytes() == second[key][()].tobytes(), key


def test_parts_merged_are_the_whole_generation(teacher, generated_whole):
    folder, whole = generated_whole
    parts = []
    for part in range(3):
        parts.append(folder / f"part{part}.h5")
        assert main(["generate", str(teacher), "-n", "230", "--shard-size", "50", "--seed", "4",
                     "--shard", f"{part}/3", "-o", str(parts[-1]), "--no-progress"]) == 0
    assert [len(read_showers(p)) for p in parts] == [50, 100, 80]  # whole shards of 50
    assert main(["merge-showers", *map(str, parts), "-o", str(folder / "merged.h5"),
                 "--no-progress"]) == 0
    _same_showers(whole, folder / "merged.h5")


def test_torchrun_generation_is_the_whole_generation(teacher, generated_whole):
    folder, whole = generated_whole
    run(torchrun("generate", str(teacher), "-n", "230", "--shard-size", "50", "--seed", "4",
                 "-o", str(folder / "two.h5")))
    _same_showers(whole, folder / "two.h5")
    assert not [n for n in os.listdir(folder) if ".part-" in n]  # the parts are removed


def test_impossible_parts_are_refused(teacher, tmp_path, capsys):
    assert main(["generate", str(teacher), "-n", "60", "--shard-size", "50", "--shard", "0/3",
                 "-o", str(tmp_path / "x.h5")]) == 1
    assert "cannot be cut into 3 parts" in capsys.readouterr().err
    for bad in ("3/3", "1", "a/b", "2/1", "0/0"):
        assert main(["generate", str(teacher), "-n", "60", "--shard", bad,
                     "-o", str(tmp_path / "x.h5")]) == 1
    assert not (tmp_path / "x.h5").exists()


def test_merge_refuses_mismatched_files(tmp_path, capsys):
    photons, other = tmp_path / "photons.h5", tmp_path / "lhcb.h5"
    write_showers(photons, random_showers(GEOMETRY, 20), GEOMETRY)
    write_showers(other, random_showers(LHCB, 20), LHCB)
    with_conditions = tmp_path / "conditions.h5"
    write_showers(with_conditions, random_showers(GEOMETRY, 20, conditions=True), GEOMETRY)
    output = tmp_path / "out.h5"
    cases = {(photons, other): "geometry 'lhcb-ecal'",
             (photons, with_conditions): "conditions",
             (photons, tmp_path / "missing.h5"): "no such file"}
    for (first, second), message in cases.items():
        assert main(["merge-showers", str(first), str(second), "-o", str(output)]) == 1
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
        assert not output.exists()
    assert main(["merge-showers", str(photons), str(photons), "-o", str(photons)]) == 1
    assert "output is one of the inputs" in capsys.readouterr().err
    with pytest.raises(ShowerFileError, match="geometry"):
        merge_shower_files([photons, photons], output, LHCB)
    assert len(read_showers(photons)) == 20  # the inputs are untouched


def test_command_line_shard_size_is_the_library_one():
    from caloforge import cli, sampling

    assert cli.SHARD_SIZE == sampling.SHARD_SIZE
