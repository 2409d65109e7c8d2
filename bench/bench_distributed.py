"""Data-parallel training and generation in parts on this machine (torchrun, gloo).

Trains the same model on the same reference-simulator showers three ways, for the same
number of epochs and the same global batch (showers per optimiser step):

* one process, 1 thread, batch B;
* one process, 2 threads, batch B;
* two processes (``torchrun --nproc-per-node 2``), 1 thread each, batch B/2 each;

and prints, per run, the training throughput (training showers per second of epoch time,
validation included) and the per-epoch losses, with the largest difference between the
two-process curve and the one-process curve. Then it generates N showers from the trained
model in one process and in two (one part each, merged by rank 0), times both and checks
that the two files hold the same bytes.

    python bench/bench_distributed.py                    # ~15 min on 2 cores
    python bench/bench_distributed.py --epochs 2 --n-train 5000   # a quick look

Figures go to ``--results`` (docs/results/distributed.json) as they are measured.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np
from pipeline import TRAIN_SEED, caloforge, read_json, save_json, simulate, train

from caloforge.training import read_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="caloflow")
    parser.add_argument("--geometry", default="calochallenge-1-photons")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="global batch B")
    parser.add_argument("--n-generate", type=int, default=40_000)
    parser.add_argument("--out", default="bench-output/distributed")
    parser.add_argument("--results", default="docs/results/distributed.json")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument("--skip-generation", action="store_true",
                        help="keep the generation figures already in --results")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    previous = os.path.join(args.out, "previous-results.json")
    if os.path.exists(args.results):  # the last figures, for --skip-generation
        save_json(previous, read_json(args.results))
    data = os.path.join(args.out, "train.h5")
    simulate(args.geometry, data, args.n_train, TRAIN_SEED)
    results: dict = {"what": "reference simulator (not Geant4), "
                             f"{args.geometry}, {args.family} preset {args.preset}, "
                             f"{args.n_train} showers, {args.epochs} epochs, global batch "
                             f"{args.batch}, 2 CPU cores",
                     "command": "python bench/bench_distributed.py", "training": {}}
    runs = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2),
            "2 processes x 1 thread": (2, 1)}
    for name, (processes, threads) in runs.items():
        run_dir = os.path.join(args.out, f"p{processes}t{threads}")
        config = os.path.join(args.out, f"batch{args.batch // processes}.yaml")
        with open(config, "w") as stream:
            stream.write(f"training:\n  batch_size: {args.batch // processes}\n")
        step = train(args.family, data, args.geometry, run_dir, None, threads, args.reuse,
                     ["--preset", args.preset, "--config", config, "--epochs",
                      str(args.epochs)], processes=processes)
        records = read_log(os.path.join(run_dir, "train_log.jsonl"))
        n_train = round(args.n_train * 0.9)
        seconds = sum(r["seconds"] for r in records)
        results["training"][name] = {
            "processes": processes, "threads_per_process": threads,
            "batch_per_process": args.batch // processes,
            "showers_per_s": round(n_train * len(records) / seconds, 1),
            "epoch_seconds": [r["seconds"] for r in records],
            "train_loss": [round(r["train_loss"], 2) for r in records],
            "val_loss": [round(r["val_loss"], 2) for r in records],
            **({"wall_s": round(step.wall_s, 1)} if step else {})}
        save_json(args.results, results)
        print(f"{name}: {results['training'][name]['showers_per_s']} showers/s; validation "
              f"loss per epoch {results['training'][name]['val_loss']}")
    one, two = (results["training"][k] for k in ("1 process x 2 threads",
                                                  "2 processes x 1 thread"))
    for key in ("train_loss", "val_loss"):
        difference = np.abs(np.subtract(two[key], one[key]))
        drop = one[key][0] - one[key][-1]
        results[f"{key}_max_difference"] = round(float(difference.max()), 2)
        results[f"{key}_max_difference_of_drop"] = round(float(difference.max() / drop), 4)
        print(f"{key}: two processes vs one (same global batch): largest per-epoch difference "
              f"{difference.max():.2f} nats, {difference.max() / drop:.1%} of the decrease "
              f"from the first to the last epoch")
    results["speed_up_2_processes_vs_1_thread"] = round(
        two["showers_per_s"] / results["training"]["1 process x 1 thread"]["showers_per_s"], 2)
    results["speed_up_2_processes_vs_2_threads"] = round(
        two["showers_per_s"] / one["showers_per_s"], 2)
    save_json(args.results, results)
    if args.skip_generation:
        results["generation"] = read_json(previous).get("generation", {}) \
            if os.path.exists(previous) else {}
        save_json(args.results, results)
        return

    model = os.path.join(args.out, "p1t2")
    files = {}
    results["generation"] = {}
    for processes, threads in ((1, 2), (2, 1)):
        output = os.path.join(args.out, f"generated-p{processes}.h5")
        files[processes] = output
        step = caloforge("generate", model, "-n", str(args.n_generate), "--seed", "3",
                         "--threads", str(threads), "-o", output, processes=processes)
        results["generation"][f"{processes} process(es) x {threads} thread(s)"] = {
            "wall_s": round(step.wall_s, 1),
            "showers_per_s": round(args.n_generate / step.wall_s, 1)}
        save_json(args.results, results)
    with h5py.File(files[1]) as first, h5py.File(files[2]) as second:
        same = all(first[k][()].tobytes() == second[k][()].tobytes()
                   for k in ("incident_energies", "showers"))
    results["generation"]["two_processes_same_bytes_as_one"] = same
    save_json(args.results, results)
    print(f"generation: {results['generation']}")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
