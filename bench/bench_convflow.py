"""Convolutional L2LFlows on reference data: training, generation, evaluation, timing.

Usage: python bench/bench_convflow.py [--geometry ild-ecal] [--n-train 20000] [--n-test 5000]
           [--budget 60m] [--threads 2] [--postprocess none|spline] [--config FILE]
           [--metrics cls-high,hist] [--out bench-output/convflow] [--reuse] [--tag NAME]
           [--train FILE --test FILE] [--stream auto|on|off]

Steps (each printed with its figures): simulate a training set (seed 11) and an independent
held-out reference (seed 12); `caloforge train convflow` (CPU preset unless --config)
within the budget; generate as many showers as the held-out reference; `caloforge evaluate`
(fast classifier preset, 3 repeats); `caloforge bench-sampling` on 1 thread at batch 100.
Peak resident memory of each step from ``os.wait4``; the steps are bench/pipeline.py's.
Targets (issue): ild-ecal high-level AUC <= 0.65 (published L2LFlows 0.63), sampling
<= 100 ms/shower at batch 100 on one CPU thread (published 418 ms); calochallenge-3: AUCs
and ms/shower next to iCaloFlow's.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import (
    HELDOUT_SEED,
    TRAIN_SEED,
    bench_sampling,
    evaluate,
    generate,
    headline,
    save_json,
    simulate,
    train,
    training_summary,
)


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
                        help="keep data files and the trained run of an earlier invocation "
                             "(an interrupted training is resumed)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                        help="read the training file block by block (calochallenge-3)")
    args = parser.parse_args()
    out, g = args.out, args.geometry
    name = f"{g}-{args.tag}"
    figures_path = f"{out}/figures-{name}.json"
    figures: dict = {"geometry": g, "tag": args.tag, "threads": args.threads}

    def save() -> None:
        save_json(figures_path, figures)

    train_file = args.train or f"{out}/{g}-train.h5"
    test = args.test or f"{out}/{g}-test.h5"
    if not args.train:
        simulate(g, train_file, args.n_train, TRAIN_SEED, args.reuse)
    if not args.test:
        simulate(g, test, args.n_test, HELDOUT_SEED, args.reuse)
    model = f"{out}/{name}-model"
    step = train("convflow", train_file, g, model, args.budget, args.threads, args.reuse,
                 extra=["--postprocess", args.postprocess, "--stream", args.stream,
                        *(["--config", args.config] if args.config else [])])
    if step:
        figures["train"] = step.figures()
    figures.setdefault("train", {}).update(training_summary(model))
    save()
    generated = f"{out}/{name}-generated.h5"
    figures["generate"] = {"n": args.n_test,
                           **generate(model, test, generated, args.threads, args.n_test).figures()}
    save()
    figures.update(headline(evaluate(test, generated, g, f"{out}/{name}-report",
                                     ["--metrics", args.metrics, "--max-showers",
                                      str(args.n_test)])))
    save()
    if not args.skip_timing:
        timing = bench_sampling(model, f"{out}/{name}-sampling.json", threads="1",
                                batch_sizes="100", like=test, repeats=2)
        figures["ms_per_shower_1thread"] = {f"bs{b}": round(ms, 2)
                                            for (_, b), ms in timing.items()}
        save()
    print(json.dumps(figures, indent=2))
    aucs = ", ".join(f"AUC {k[4:]} {v[0]:.3f}" for k, v in figures.items() if k.startswith("auc_"))
    print(f"{name}: trained {figures['train']['train_seconds'] / 60:.1f} min "
          f"({figures['train']['epochs']} epochs) on {args.threads} thread(s); {aucs}; "
          f"sampling {figures.get('ms_per_shower_1thread', '(not timed)')} ms/shower on 1 thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
