"""Convolutional L2LFlows on reference data: training, generation, evaluation, timing.

Usage: python bench/bench_convflow.py [--geometry ild-ecal] [--n-train 20000] [--n-test 5000]
           [--budget 60m] [--threads 2] [--postprocess none|spline] [--config FILE]
           [--metrics cls-high,hist] [--out bench-output/convflow] [--reuse] [--tag NAME]
           [--train FILE --test FILE] [--stream auto|on|off]

Steps (each printed with its figures): simulate a training set (seed 11) and an independent
held-out reference (seed 12); `caloforge train convflow` (CPU preset unless --config)
within the budget; generate as many showers as the held-out reference; `caloforge evaluate`
(fast classifier preset, 3 repeats); `caloforge bench-sampling` on 1 thread at batch 100.
Peak resident memory of each step from ``os.wait4``.
Targets (issue): ild-ecal high-level AUC <= 0.65 (published L2LFlows 0.63), sampling
<= 100 ms/shower at batch 100 on one CPU thread (published 418 ms); calochallenge-3: AUCs
and ms/shower next to iCaloFlow's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_icaloflow import read_json, run, training_figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="ild-ecal")
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=5_000)
    parser.add_argument("--train", default=None, help="existing training file (else simulated)")
    parser.add_argument("--test", default=None,
                        help="existing held-out file (else simulated); its first --n-test "
                             "showers are used")
    parser.add_argument("--budget", default="60m")
    parser.add_argument("--threads", default="2", help="training and generation threads")
    parser.add_argument("--postprocess", choices=["none", "spline"], default="none")
    parser.add_argument("--config", default=None, help="YAML overriding the cpu preset")
    parser.add_argument("--metrics", default="hist,cls-low,cls-high")
    parser.add_argument("--out", default="bench-output/convflow")
    parser.add_argument("--tag", default="cpu", help="name of this configuration's run")
    parser.add_argument("--reuse", action="store_true",
                        help="keep data files and the trained run of an earlier invocation")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                        help="read the training file block by block (calochallenge-3)")
    args = parser.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "caloforge")
    out, g = args.out, args.geometry
    os.makedirs(out, exist_ok=True)
    name = f"{g}-{args.tag}"
    figures_path = f"{out}/figures-{name}.json"
    figures: dict = {"geometry": g, "tag": args.tag, "threads": args.threads}

    def save() -> None:
        with open(figures_path, "w") as stream:
            json.dump(figures, stream, indent=2)

    train = args.train or f"{out}/{g}-train.h5"
    test = args.test or f"{out}/{g}-test.h5"
    for path, n, seed, given in ((train, args.n_train, 11, args.train),
                                 (test, args.n_test, 12, args.test)):
        if not given and not (args.reuse and os.path.exists(path)):
            run([exe, "simulate", "--geometry", g, "-n", str(n), "--seed", str(seed), "-o",
                 path, "--no-progress"])
    model = f"{out}/{name}-model"
    if not (args.reuse and os.path.exists(f"{model}/model.json")):
        subprocess.run(["rm", "-rf", model], check=True)
        command = [exe, "train", "convflow", "--data", train, "--geometry", g, "-o", model,
                   "--time-budget", args.budget, "--threads", args.threads,
                   "--postprocess", args.postprocess, "--stream", args.stream,
                   "--no-progress"]
        if args.config:
            command += ["--config", args.config]
        wall, peak = run(command)
        figures["train"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2)}
        save()
    training_figures(figures, "train", model)
    generated = f"{out}/{name}-generated.h5"
    wall, peak = run([exe, "generate", model, "--like", test, "-n", str(args.n_test), "-o",
                      generated, "--seed", "1", "--threads", args.threads, "--no-progress"])
    figures["generate"] = {"n": args.n_test, "wall_s": round(wall, 1),
                           "peak_rss_gb": round(peak, 2)}
    save()
    report = f"{out}/{name}-report"
    run([exe, "evaluate", "--reference", test, "--generated", generated, "--geometry", g,
         "-o", report, "--metrics", args.metrics, "--max-showers", str(args.n_test),
         "--no-progress"])
    metrics = read_json(f"{report}/metrics.json")
    for key in ("cls-low", "cls-high"):
        if key in metrics:
            figures[f"auc_{key[4:]}"] = [metrics[key]["auc_mean"], metrics[key]["auc_std"]]
    save()
    if not args.skip_timing:
        run([exe, "bench-sampling", model, "--threads", "1", "--batch-sizes", "100",
             "--repeats", "2", "--max-seconds", "120", "--like", test, "-o",
             f"{out}/{name}-sampling.json", "--no-progress"])
        rows = read_json(f"{out}/{name}-sampling.json")["results"]
        figures["ms_per_shower_1thread"] = {f"bs{r['batch_size']}": round(r["ms_per_shower"], 2)
                                            for r in rows}
        save()
    print(json.dumps(figures, indent=2))
    aucs = ", ".join(f"AUC {k[4:]} {v[0]:.3f}" for k, v in figures.items() if k.startswith("auc_"))
    print(f"{name}: trained {figures['train']['train_seconds'] / 60:.1f} min "
          f"({figures['train']['epochs']} epochs) on {args.threads} thread(s); {aucs}; "
          f"sampling {figures.get('ms_per_shower_1thread', '(not timed)')} ms/shower on 1 thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
