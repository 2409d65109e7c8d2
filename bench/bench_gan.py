"""GANs vs CaloFlow on the same reference data: one table of AUCs, FPD and sampling cost.

Usage: python bench/bench_gan.py [--out bench-output/gan] [--time-budget 40m] [--threads 1]
           [--pairs calogan:caloflow,calogan:calogan,lhcb-ecal:caloflow,lhcb-ecal:wgan]

For every geometry:model pair: the reference simulator writes a training set (seed 11,
--n-train showers) and an independent held-out reference (seed 12, --n-test), once per
geometry; `caloforge train FAMILY` (CPU preset) within --time-budget on --threads threads
unless OUT/GEOMETRY/FAMILY/run already holds a trained model; `caloforge generate --like`
the held-out reference (its energies and conditions); `caloforge evaluate` (fast classifier
preset, 3 repeats: low- and high-level AUC, FPD); sampling cost in ms/shower at batch
sizes 1, 100, 10,000 (CaloFlow: 1, 100, 1000, see TIMED_BATCHES) on one thread (median of
up to 3 repeats within --max-seconds).
Prints the table and writes OUT/figures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

GAN_BATCHES = (1, 100, 10_000)
# The CaloFlow teacher splits batches into micro-batches of <= 1000 showers (fewer for many
# voxels: zuko's spline inverse needs ~10 kB per shower x voxel), so batch 10,000 costs
# what batch 1000 does per shower and would take many minutes to time on one thread.
TIMED_BATCHES = {"caloflow": (1, 100, 1000)}


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def sampling_cost(run_dir: str, heldout: str, max_seconds: float,
                  batch_sizes: tuple[int, ...]) -> dict[int, float]:
    from caloforge.data import read_showers
    from caloforge.evaluation import benchmark_sampling
    from caloforge.models import load_model

    model = load_model(run_dir)
    reference = read_showers(heldout, model.geometry, max_showers=10_000)
    index = np.arange(10_000) % len(reference)
    energies = reference.incident_energies[index]
    conditions = {k: np.asarray(v)[index] for k, v in reference.conditions.items()}

    def sample(n: int) -> None:
        model.sample(energies[:n], {k: v[:n] for k, v in conditions.items()}, batch_size=n)

    rows = benchmark_sampling(sample, threads=[1], batch_sizes=batch_sizes, repeats=3,
                              max_seconds=max_seconds)
    return {r["batch_size"]: round(r["ms_per_shower"], 3) for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-output/gan")
    parser.add_argument("--pairs", default="calogan:caloflow,calogan:calogan,"
                                           "lhcb-ecal:caloflow,lhcb-ecal:wgan")
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--time-budget", default="40m")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for training, generation and evaluation")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--reuse-reports", action="store_true",
                        help="keep generated files and reports of an earlier invocation")
    args = parser.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "caloforge")
    rows = []
    for pair in args.pairs.split(","):
        geometry, family = pair.split(":")
        base = os.path.join(args.out, geometry)
        train, heldout = f"{base}/train.h5", f"{base}/heldout.h5"
        os.makedirs(base, exist_ok=True)
        if not (os.path.exists(train) and os.path.exists(heldout)):
            run([exe, "simulate", "--geometry", geometry, "-n", str(args.n_train), "--seed",
                 "11", "-o", train, "--no-progress"])
            run([exe, "simulate", "--geometry", geometry, "-n", str(args.n_test), "--seed",
                 "12", "-o", heldout, "--no-progress"])
        out = os.path.join(base, family)
        run_dir = f"{out}/run"
        if not os.path.exists(f"{run_dir}/model.json") or os.path.exists(
                f"{run_dir}/checkpoint.safetensors") and not _finished(run_dir):
            resume = ["--resume"] if os.path.exists(f"{run_dir}/checkpoint.safetensors") else []
            run([exe, "train", family, "--data", train, "--geometry", geometry, "-o", run_dir,
                 "--time-budget", args.time_budget, "--threads", str(args.threads),
                 "--no-progress", *resume])
        generated = f"{out}/generated.h5"
        if not (args.reuse_reports and os.path.exists(f"{out}/report/metrics.json")):
            run([exe, "generate", run_dir, "--like", heldout, "-o", generated, "--seed", "1",
                 "--threads", str(args.threads), "--no-progress"])
            run([exe, "evaluate", "--reference", heldout, "--generated", generated,
                 "--geometry", geometry, "-o", f"{out}/report", "--metrics",
                 "cls-low,cls-high,fpd", "--threads", str(args.threads), "--no-progress"])
        with open(f"{out}/report/metrics.json") as stream:
            metrics = json.load(stream)
        with open(f"{run_dir}/model.json") as stream:
            training = json.load(stream)["training"]
        row = {"geometry": geometry, "family": family, "epochs": training["epochs"],
               "best_epoch": training["best_epoch"], "train_seconds": training["train_seconds"],
               "training_threads": args.threads,
               "auc_low": [metrics["cls-low"]["auc_mean"], metrics["cls-low"]["auc_std"]],
               "auc_high": [metrics["cls-high"]["auc_mean"], metrics["cls-high"]["auc_std"]],
               "fpd_x1e3": metrics["fpd_x1e3"]["value"],
               "ms_per_shower_1_thread": sampling_cost(run_dir, heldout, args.max_seconds,
                                                       TIMED_BATCHES.get(family, GAN_BATCHES))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # rows of earlier invocations for other pairs are kept: one table for all pairs
    figures_path = os.path.join(args.out, "figures.json")
    if os.path.exists(figures_path):
        with open(figures_path) as stream:
            earlier = json.load(stream)
        done = {(r["geometry"], r["family"]) for r in rows}
        rows = [r for r in earlier if (r["geometry"], r["family"]) not in done] + rows
    with open(figures_path, "w") as stream:
        json.dump(rows, stream, indent=2)
    print("\n| geometry | model | training | AUC low | AUC high | FPD x1e3 | "
          "ms/shower at batch 1 / 100 / 10,000 (caloflow: 1000), 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms_per_shower_1_thread"]
        print(f"| {r['geometry']} | {r['family']} | {r['train_seconds'] / 60:.0f} min, "
              f"{r['epochs']} epochs (best {r['best_epoch']}) | {r['auc_low'][0]:.3f} ± "
              f"{r['auc_low'][1]:.3f} | {r['auc_high'][0]:.3f} ± {r['auc_high'][1]:.3f} | "
              f"{r['fpd_x1e3']:.4g} | {' / '.join(f'{v:.3g}' for v in ms.values())} |")
    return 0


def _finished(run_dir: str) -> bool:
    with open(f"{run_dir}/model.json") as stream:
        return not json.load(stream)["training"].get("in_progress", False)


if __name__ == "__main__":
    sys.exit(main())
