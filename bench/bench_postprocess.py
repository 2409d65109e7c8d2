"""The convflow post-processing spline on an already trained run: with and without.

Usage: python bench/bench_postprocess.py RUN --train FILE --test FILE [--n-test 3000]
           [--showers 2000] [--threads 2] [--metrics hist,cls-high] [--out DIR]

Steps (each printed with its figures): copy RUN, fit the monotone spline (generated ->
reference cell energies, log10 MeV, 128 quantiles) on the first --showers showers of the
training file, save the copy; generate the first --n-test held-out conditions with the
copy (seed 1, the seed bench_convflow.py uses, so the flows draw the same showers as the
run without the spline); `caloforge evaluate` (fast classifier, 3 repeats). Prints the
AUCs next to those of RUN's own report when `--baseline REPORT` names it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline import evaluate, generate, headline, read_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--geometry", default="ild-ecal")
    parser.add_argument("--n-test", type=int, default=3000)
    parser.add_argument("--showers", type=int, default=2000,
                        help="training showers the spline is fitted on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--metrics", default="hist,cls-high")
    parser.add_argument("--baseline", default=None,
                        help="metrics.json of the same run evaluated without the spline")
    parser.add_argument("--out", default=None, help="default: RUN-spline")
    args = parser.parse_args()

    import torch

    from caloforge.data import read_showers
    from caloforge.models import load_model

    torch.set_num_threads(args.threads)
    out = args.out or f"{args.run_dir.rstrip('/')}-spline"
    model = load_model(args.run_dir)
    reference = read_showers(args.train, model.geometry, max_showers=args.showers)
    start = time.perf_counter()
    model.fit_postprocess(reference)
    fit_seconds = time.perf_counter() - start
    model.save(out)
    print(f"fitted the spline on {args.showers} training showers in {fit_seconds:.0f} s "
          f"-> {out}", flush=True)
    generated = f"{out}/generated.h5"
    generate(out, args.test, generated, args.threads, args.n_test)
    runs = [("spline", evaluate(args.test, generated, args.geometry, f"{out}/report",
                                ["--metrics", args.metrics, "--max-showers", str(args.n_test)]))]
    if args.baseline:
        runs.insert(0, ("none", read_json(args.baseline)))
    figures: dict = {"fit_seconds": round(fit_seconds, 1)}
    for name, metrics in runs:
        figures.update({f"{name}_{key}": value for key, value in headline(metrics).items()
                        if key.startswith("auc_")})
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
