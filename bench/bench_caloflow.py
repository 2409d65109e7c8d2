"""CaloFlow on reference data: train the CPU-default config, generate, evaluate, time sampling.

Usage: python bench/bench_caloflow.py [--geometry calochallenge-1-photons] [--n-train 121000]
           [--n-test N] [--time-budget 30m] [--out bench-output/caloflow]

Steps (each printed with its figures): simulate a training set (seed 11) and an independent
held-out reference (seed 12; by default as many showers as the official classifier split of
the dataset needs: 121,000 for dataset 1 photons) with the reference simulator;
`caloforge train caloflow`
(CPU preset) within the time budget; generate as many showers as the held-out reference with
its incident energies; `caloforge evaluate` (fast classifier preset, 3 repeats); teacher
sampling cost in ms/shower at batch sizes 1, 100, 10000 (`caloforge bench-sampling`: median
of up to 3 repeats within --max-seconds per batch size), 2 threads. Steps: bench/pipeline.py.
Targets (issue): low-level AUC <= 0.70, high-level AUC <= 0.65.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import (
    bench_sampling,
    evaluate,
    generate,
    headline,
    save_json,
    simulate_pair,
    train,
    training_summary,
    verdict,
)


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
                        help="keep the data files and trained run of an earlier invocation "
                             "(an interrupted training is resumed)")
    args = parser.parse_args()
    out, g = args.out, args.geometry
    if args.n_test is None:
        from caloforge.evaluation import OFFICIAL_SPLIT_SIZES
        from caloforge.geometry import calochallenge_dataset, get_geometry

        dataset = calochallenge_dataset(get_geometry(g))
        args.n_test = sum(OFFICIAL_SPLIT_SIZES[dataset]) if dataset else 25_000
    figures: dict = {"geometry": g}
    train_file, test = f"{out}/train.h5", f"{out}/heldout.h5"
    simulate_pair(g, train_file, test, args.n_train, args.n_test, args.reuse)
    run_dir = f"{out}/run"
    step = train("caloflow", train_file, g, run_dir, args.time_budget, reuse=args.reuse)
    if step:
        figures["train_wall_s"] = step.wall_s
    figures["generate_wall_s"] = generate(run_dir, test, f"{out}/generated.h5").wall_s
    metrics = evaluate(test, f"{out}/generated.h5", g, f"{out}/report")
    training = training_summary(run_dir)
    figures.update({
        "epochs": training["epochs"], "best_epoch": training["best_epoch"],
        "train_seconds": training["train_seconds"], **headline(metrics),
        "n_reference": metrics["n_reference"], "n_generated": metrics["n_generated"],
        "classifier": metrics["cls-low"]["preset"]["name"]})
    if not args.skip_timing:
        timing = bench_sampling(run_dir, f"{out}/sampling.json", threads="2",
                                batch_sizes="1,100,10000", like=test,
                                max_seconds=args.max_seconds)
        figures["sampling_ms_per_shower"] = {b: round(ms, 3) for (_, b), ms in timing.items()}
    print(json.dumps(figures, indent=2))
    save_json(f"{out}/figures.json", figures)
    low, high = figures["auc_low"][0], figures["auc_high"][0]
    print(f"low-level AUC {low:.3f} (target <= 0.70: {verdict(low, 0.70)}), high-level AUC "
          f"{high:.3f} (target <= 0.65: {verdict(high, 0.65)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
