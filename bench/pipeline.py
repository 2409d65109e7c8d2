"""The steps every benchmark is made of: simulate -> train or distill -> generate -> evaluate
-> time sampling, each through the ``caloforge`` command installed beside this Python.

Each step prints its command, raises ``SystemExit`` naming it when it fails, and returns
what it measured (:class:`Step`: wall seconds and the peak resident memory of its process,
from the kernel's accounting in ``os.wait4``). With ``reuse`` a step whose output already
exists is skipped and an interrupted training (a checkpoint without a finished model) is
resumed; without it the output is made afresh. Benchmark scripts import this module
(``from pipeline import ...``; Python puts the script's folder on the path) and keep only
their own choices: which steps, which settings, which figures and targets to print.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CALOFORGE = os.path.join(os.path.dirname(sys.executable), "caloforge")
TRAIN_SEED, HELDOUT_SEED, GENERATION_SEED = 11, 12, 1


@dataclass(frozen=True)
class Step:
    """What one command cost: wall-clock seconds and the peak resident memory (GB) of its
    process."""

    wall_s: float
    peak_rss_gb: float

    def figures(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 1), "peak_rss_gb": round(self.peak_rss_gb, 2)}


def run(command: Sequence[str]) -> Step:
    """Run ``command``; its :class:`Step`. A failure stops the benchmark with its status."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(list(command))
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{command[1] if len(command) > 1 else command[0]} failed with status "
                         f"{code}: {' '.join(command)}")
    return Step(time.perf_counter() - started, usage.ru_maxrss / 1024 ** 2)  # Linux: kB


def caloforge(*arguments: str, processes: int = 1) -> Step:
    """Run one ``caloforge`` subcommand (progress bars off); with ``processes`` > 1 under
    ``torchrun --standalone`` on this machine (the step's memory is then the launcher's)."""
    if processes == 1:
        return run([CALOFORGE, *arguments, "--no-progress"])
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", "caloforge", *arguments,
                "--no-progress"])


def read_json(path: str) -> dict:
    with open(path) as stream:
        return json.load(stream)


def save_json(path: str, data: object) -> None:
    """Write ``data`` atomically: a benchmark cut mid-write leaves the previous figures."""
    from caloforge.atomic import write_json_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, data)


def update_json(path: str, change: Callable[[dict], None]) -> dict:
    """Read ``path`` (``{}`` when absent), apply ``change`` to it and write it back atomically,
    holding an exclusive lock on ``path + ".lock"`` throughout: benchmarks running side by side
    each add their figures instead of writing back the file as it was when they started."""
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_json(path) if os.path.exists(path) else {}
        change(data)
        save_json(path, data)
        return data


def simulate(geometry: str, path: str, n: int, seed: int, reuse: bool = True,
             extra: Sequence[str] = ()) -> Step | None:
    """``n`` reference-simulator showers of ``geometry`` into ``path`` (kept if ``reuse``)."""
    if reuse and os.path.exists(path):
        return None
    return caloforge("simulate", "--geometry", geometry, "-n", str(n), "--seed", str(seed),
                     "-o", path, *extra)


def simulate_pair(geometry: str, train: str, heldout: str, n_train: int, n_heldout: int,
                  reuse: bool = True) -> None:
    """A training set (seed 11) and an independent held-out reference (seed 12)."""
    simulate(geometry, train, n_train, TRAIN_SEED, reuse)
    simulate(geometry, heldout, n_heldout, HELDOUT_SEED, reuse)


def is_finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a model whose training ended (not a periodic save)."""
    path = os.path.join(run_dir, "model.json")
    return os.path.exists(path) and not read_json(path).get("training", {}).get(
        "in_progress", False)


def _fit(arguments: list[str], run_dir: str, reuse: bool, processes: int = 1) -> Step | None:
    if reuse and is_finished(run_dir):
        return None
    resume = reuse and os.path.exists(os.path.join(run_dir, "checkpoint.safetensors"))
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    return caloforge(*arguments, *(["--resume"] if resume else []), processes=processes)


def train(family: str, data: str, geometry: str, run_dir: str, time_budget: str | None,
          threads: int | str = 2, reuse: bool = True, extra: Sequence[str] = (),
          processes: int = 1) -> Step | None:
    """``caloforge train FAMILY`` within ``time_budget`` (None: the epochs ``extra`` or the
    preset sets) on ``processes`` processes of ``threads`` threads each; None when a
    finished run is kept."""
    budget = ["--time-budget", time_budget] if time_budget else []
    return _fit(["train", family, "--data", data, "--geometry", geometry, "-o", run_dir,
                 *budget, "--threads", str(threads), *extra], run_dir, reuse, processes)


def distill(teacher: str, student: str, time_budget: str, threads: int | str = 2,
            reuse: bool = True, extra: Sequence[str] = ()) -> Step | None:
    """``caloforge distill TEACHER`` within ``time_budget``; None when a finished student is
    kept."""
    return _fit(["distill", teacher, "-o", student, "--time-budget", time_budget, "--threads",
                 str(threads), *extra], student, reuse)


def generate(run_dir: str, like: str, output: str, threads: int | str = 2,
             n: int | None = None, seed: int = GENERATION_SEED) -> Step:
    """Showers for the incident energies (and conditions) of ``like`` into ``output``."""
    return caloforge("generate", run_dir, "--like", like, "-o", output, "--seed", str(seed),
                     "--threads", str(threads), *(["-n", str(n)] if n is not None else []))


def evaluate(reference: str, generated: str, geometry: str, report: str,
             extra: Sequence[str] = ()) -> dict:
    """``caloforge evaluate`` into the folder ``report``; its ``metrics.json``."""
    caloforge("evaluate", "--reference", reference, "--generated", generated, "--geometry",
              geometry, "-o", report, *extra)
    return read_json(os.path.join(report, "metrics.json"))


def headline(metrics: dict) -> dict:
    """The figures benchmarks report from a ``metrics.json``: ``auc_low``/``auc_high`` as
    [mean, std] over the classifier repeats and ``fpd_x1e3``, those that were measured."""
    figures: dict = {}
    for key in ("cls-low", "cls-high"):
        if key in metrics:
            figures[f"auc_{key[4:]}"] = [metrics[key]["auc_mean"], metrics[key]["auc_std"]]
    if "fpd_x1e3" in metrics:
        figures["fpd_x1e3"] = metrics["fpd_x1e3"]["value"]
    return figures


def training_summary(run_dir: str) -> dict:
    """Epochs, best epoch, best validation loss and training seconds saved in ``run_dir``."""
    summary = read_json(os.path.join(run_dir, "model.json"))["training"]
    return {k: summary[k] for k in ("epochs", "best_epoch", "best_val_loss", "train_seconds")}


def bench_sampling(run_dir: str, output: str, threads: str, batch_sizes: str,
                   like: str | None = None, repeats: int = 3,
                   max_seconds: float = 120.0) -> dict[tuple[int, int], float]:
    """``caloforge bench-sampling``: ms per shower by (threads, batch size)."""
    caloforge("bench-sampling", run_dir, "--threads", threads, "--batch-sizes", batch_sizes,
              "--repeats", str(repeats), "--max-seconds", str(max_seconds), "-o", output,
              *(["--like", like] if like else []))
    return {(row["threads"], row["batch_size"]): row["ms_per_shower"]
            for row in read_json(output)["results"]}


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    """``meets`` or ``MISSES`` for printing next to a figure and its target."""
    return "meets" if (value <= target if lower_is_better else value >= target) else "MISSES"


# --- toy experiments (bench/check_*.py) -------------------------------------------------
def core_shares(images: np.ndarray) -> list[np.ndarray]:
    """How the central 2 x 2 cells of each layer share their energy: per layer, the shares
    ``(M, 4)`` of the M showers of ``images`` ``(N, L, side, side)`` with energy there (the
    reference simulator's ild-ecal core is those four cells, docs/convflow.md "What the hot
    core is")."""
    n, layers, side, _ = images.shape
    middle = side // 2
    core = images[:, :, middle - 1:middle + 1, middle - 1:middle + 1].reshape(n, layers, 4)
    core_energy = core.sum(-1)
    return [core[core_energy[:, i] > 0, i] / core_energy[core_energy[:, i] > 0, i, None]
            for i in range(layers)]


def core_share_spread(images: np.ndarray) -> np.ndarray:
    """Per layer ``(L,)``: the standard deviation of a central cell's share of the four,
    averaged over the four (the spread of the core's split)."""
    return np.array([share.std(0).mean() if len(share) else np.nan
                     for share in core_shares(images)])


def toy_experiment_parser(description: str, n_train: int, epochs: int
                          ) -> argparse.ArgumentParser:
    """The options every toy experiment has: --n-train, --epochs, --seed (training) and
    --out (a JSON file of the figures); the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--out", default=None, help="JSON file of the figures")
    return parser


def square_layers(name: str, side: int, layers: int, threshold_mev: float):  # -> Geometry
    """A toy geometry of ``layers`` square layers of ``side`` x ``side`` 5 mm cells."""
    from caloforge.geometry import CartesianLayer, Geometry

    return Geometry(name, tuple(CartesianLayer(i, nx=side, ny=side, dx=5.0, dy=5.0)
                                for i in range(layers)), threshold_mev=threshold_mev)


def fit_and_generate(model, train, heldout):  # -> tuple[float, np.ndarray]
    """Train ``model`` on ``train`` (a throw-away run folder), then generate ``heldout``'s
    incident energies (seed 1): (training seconds, generated showers)."""
    import tempfile

    start = time.perf_counter()
    model.fit(train, tempfile.mkdtemp())
    seconds = time.perf_counter() - start
    return seconds, model.sample(heldout.incident_energies, seed=1).showers


def report_figures(figures: dict, path: str | None) -> None:
    """Print the figures and write them to ``path`` (atomically) if given."""
    print(json.dumps(figures, indent=1))
    if path:
        save_json(path, figures)
