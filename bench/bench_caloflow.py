"""CaloFlow on reference data: train the CPU-default config, generate, evaluate, time sampling.

Usage: python bench/bench_caloflow.py [--geometry calochallenge-1-photons] [--n-train 121000]
           [--n-test N] [--time-budget 30m] [--out bench-output/caloflow]

Steps (each printed with its figures): simulate a training set (seed 11) and an independent
held-out reference (seed 12; by default as many showers as the official classifier split of
the dataset needs: 121,000 for dataset 1 photons) with the reference simulator;
`caloforge train caloflow`
(CPU preset) within the time budget; generate as many showers as the held-out reference with
its incident energies; `caloforge evaluate` (fast classifier preset, 3 repeats); teacher
sampling cost in ms/shower at batch sizes 1, 100, 10000 (median of up to 3 repeats within
--max-seconds per batch size), 2 threads.
Targets (issue): low-level AUC <= 0.70, high-level AUC <= 0.65.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="calochallenge-1-photons")
    parser.add_argument("--n-train", type=int, default=121_000)
    parser.add_argument("--n-test", type=int, default=None,
                        help="held-out showers (default: what the official classifier split "
                             "of the geometry's CaloChallenge dataset needs, e.g. 121,000 "
                             "for dataset 1 photons; else 25,000)")
    parser.add_argument("--time-budget", default="30m")
    parser.add_argument("--out", default="bench-output/caloflow")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop repeating a timing setting after this long (batch 10,000 "
                             "takes the teacher minutes: timed once)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data files and trained run of an earlier invocation")
    args = parser.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "caloforge")
    out, g = args.out, args.geometry
    if args.n_test is None:
        from caloforge.evaluation import OFFICIAL_SPLIT_SIZES
        from caloforge.geometry import calochallenge_dataset, get_geometry

        dataset = calochallenge_dataset(get_geometry(g))
        args.n_test = sum(OFFICIAL_SPLIT_SIZES[dataset]) if dataset else 25_000
    os.makedirs(out, exist_ok=True)
    figures: dict = {"geometry": g}
    train, test = f"{out}/train.h5", f"{out}/heldout.h5"
    if not (args.reuse and os.path.exists(train) and os.path.exists(test)):
        run([exe, "simulate", "--geometry", g, "-n", str(args.n_train), "--seed", "11", "-o",
             train, "--no-progress"])
        run([exe, "simulate", "--geometry", g, "-n", str(args.n_test), "--seed", "12", "-o",
             test, "--no-progress"])
    run_dir = f"{out}/run"
    if not (args.reuse and os.path.exists(f"{run_dir}/model.json")):
        if os.path.exists(f"{run_dir}/checkpoint.safetensors"):
            subprocess.run(["rm", "-rf", run_dir], check=True)
        figures["train_wall_s"] = run([exe, "train", "caloflow", "--data", train, "--geometry",
                                       g, "-o", run_dir, "--time-budget", args.time_budget,
                                       "--threads", "2", "--no-progress"])
    figures["generate_wall_s"] = run([exe, "generate", run_dir, "--like", test, "-o",
                                      f"{out}/generated.h5", "--seed", "1", "--threads", "2",
                                      "--no-progress"])
    run([exe, "evaluate", "--reference", test, "--generated", f"{out}/generated.h5",
         "--geometry", g, "-o", f"{out}/report", "--no-progress"])
    with open(f"{out}/report/metrics.json") as stream:
        metrics = json.load(stream)
    with open(f"{run_dir}/model.json") as stream:
        training = json.load(stream)["training"]
    figures.update({
        "epochs": training["epochs"], "best_epoch": training["best_epoch"],
        "train_seconds": training["train_seconds"],
        "auc_low": [metrics["cls-low"]["auc_mean"], metrics["cls-low"]["auc_std"]],
        "auc_high": [metrics["cls-high"]["auc_mean"], metrics["cls-high"]["auc_std"]],
        "fpd_x1e3": metrics["fpd_x1e3"]["value"],
        "n_reference": metrics["n_reference"], "n_generated": metrics["n_generated"],
        "classifier": metrics["cls-low"]["preset"]["name"]})
    if not args.skip_timing:
        from caloforge.evaluation import benchmark_sampling
        from caloforge.models import load_model

        model = load_model(run_dir)
        energies = model.conditions.sample_energies(10_000, np.random.default_rng(0))

        def sample(n: int) -> None:
            model.sample(energies[:n], batch_size=n)

        rows = benchmark_sampling(sample, threads=[2], batch_sizes=(1, 100, 10_000), repeats=3,
                                  max_seconds=args.max_seconds)
        figures["sampling_ms_per_shower"] = {
            r["batch_size"]: round(r["ms_per_shower"], 3) for r in rows}
        figures["sampling_repeats"] = {r["batch_size"]: r["repeats"] for r in rows}
    print(json.dumps(figures, indent=2))
    with open(f"{out}/figures.json", "w") as stream:
        json.dump(figures, stream, indent=2)
    ok_low, ok_high = figures["auc_low"][0] <= 0.70, figures["auc_high"][0] <= 0.65
    print(f"low-level AUC {figures['auc_low'][0]:.3f} (target <= 0.70: "
          f"{'meets' if ok_low else 'MISSES'}), high-level AUC {figures['auc_high'][0]:.3f} "
          f"(target <= 0.65: {'meets' if ok_high else 'MISSES'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
