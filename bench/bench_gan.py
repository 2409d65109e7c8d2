"""GANs vs CaloFlow on the same reference data: one table of AUCs, FPD and sampling cost.

Usage: python bench/bench_gan.py [--out bench-output/gan] [--time-budget 40m] [--threads 1]
           [--pairs calogan:caloflow,calogan:calogan,lhcb-ecal:caloflow,lhcb-ecal:wgan]

For every geometry:model pair: the reference simulator writes a training set (seed 11,
--n-train showers) and an independent held-out reference (seed 12, --n-test), once per
geometry; `caloforge train FAMILY` (CPU preset) within --time-budget on --threads threads
unless OUT/GEOMETRY/FAMILY/run already holds a trained model; `caloforge generate --like`
the held-out reference (its energies and conditions); `caloforge evaluate` (fast classifier
preset, 3 repeats: low- and high-level AUC, FPD); sampling cost in ms/shower at batch
sizes 1, 100, 10,000 (CaloFlow: 1, 100, 1000, see TIMED_BATCHES) on one thread (`caloforge
bench-sampling`: median of up to 3 repeats within --max-seconds). Steps: bench/pipeline.py;
finished trainings are kept and interrupted ones resumed.
Prints the table and writes OUT/figures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import (
    bench_sampling,
    evaluate,
    generate,
    headline,
    read_json,
    save_json,
    simulate_pair,
    train,
    training_summary,
)

GAN_BATCHES = "1,100,10000"
# The CaloFlow teacher splits batches into micro-batches of <= 1000 showers (fewer for many
# voxels: zuko's spline inverse needs ~10 kB per shower x voxel), so batch 10,000 costs
# what batch 1000 does per shower and would take many minutes to time on one thread.
TIMED_BATCHES = {"caloflow": "1,100,1000"}


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
    rows = []
    for pair in args.pairs.split(","):
        geometry, family = pair.split(":")
        base = os.path.join(args.out, geometry)
        heldout = f"{base}/heldout.h5"
        simulate_pair(geometry, f"{base}/train.h5", heldout, args.n_train, args.n_test)
        out = os.path.join(base, family)
        run_dir, generated, report = f"{out}/run", f"{out}/generated.h5", f"{out}/report"
        train(family, f"{base}/train.h5", geometry, run_dir, args.time_budget, args.threads)
        if args.reuse_reports and os.path.exists(f"{report}/metrics.json"):
            metrics = read_json(f"{report}/metrics.json")
        else:
            generate(run_dir, heldout, generated, args.threads)
            metrics = evaluate(heldout, generated, geometry, report,
                               ["--metrics", "cls-low,cls-high,fpd", "--threads",
                                str(args.threads)])
        training = training_summary(run_dir)
        timing = bench_sampling(run_dir, f"{out}/sampling.json", threads="1",
                                batch_sizes=TIMED_BATCHES.get(family, GAN_BATCHES),
                                like=heldout, max_seconds=args.max_seconds)
        row = {"geometry": geometry, "family": family, "epochs": training["epochs"],
               "best_epoch": training["best_epoch"], "train_seconds": training["train_seconds"],
               "training_threads": args.threads, **headline(metrics),
               "ms_per_shower_1_thread": {b: round(ms, 3) for (_, b), ms in timing.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # rows of earlier invocations for other pairs are kept: one table for all pairs
    figures_path = os.path.join(args.out, "figures.json")
    if os.path.exists(figures_path):
        done = {(r["geometry"], r["family"]) for r in rows}
        rows = [r for r in read_json(figures_path)
                if (r["geometry"], r["family"]) not in done] + rows
    save_json(figures_path, rows)
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


if __name__ == "__main__":
    sys.exit(main())
