"""iCaloFlow on reference data: teacher, students, generation, evaluation, timing, memory.

Usage: python bench/bench_icaloflow.py [--geometry calochallenge-2] [--n-train 100000]
           [--n-test 20000] [--teacher-budget 60m] [--distill-budget 25m]
           [--out bench-output/icaloflow] [--reuse] [--stream auto|on|off]

Steps (each printed with its figures): simulate a training set (seed 11) and an independent
held-out reference (seed 12); `caloforge train icaloflow` (CPU preset) within the teacher
budget on 2 threads; `caloforge distill` (students for Flow-2 and Flow-3) within the
distillation budget; generate as many showers as the held-out reference with the student;
`caloforge evaluate` (fast classifier preset, 3 repeats); `caloforge bench-sampling` of the
student on 1 thread at batch 100 and 10,000. The peak resident memory of every step is
measured from the kernel's accounting of that process (``os.wait4``); the steps are
bench/pipeline.py's.
Targets (issue): calochallenge-2 teacher + students <= 90 min on 2 cores, low-level and
high-level AUC <= 0.80, student <= 20 ms/shower at batch 10,000 on 1 thread;
calochallenge-3 training <= 8 GB, generation of 10,000 showers <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import (
    bench_sampling,
    distill,
    evaluate,
    generate,
    headline,
    read_json,
    save_json,
    simulate_pair,
    train,
    training_summary,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="calochallenge-2")
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--teacher-budget", default="60m")
    parser.add_argument("--distill-budget", default="25m")
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--out", default="bench-output/icaloflow")
    parser.add_argument("--reuse", action="store_true",
                        help="keep data files and trained runs of an earlier invocation (an "
                             "interrupted training is resumed)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-evaluation", action="store_true",
                        help="stop after generation (e.g. a memory check on calochallenge-3)")
    args = parser.parse_args()
    out, g = args.out, args.geometry
    figures_path = f"{out}/figures-{g}.json"
    figures: dict = read_json(figures_path) if args.reuse and os.path.exists(figures_path) \
        else {}
    figures["geometry"] = g

    def save() -> None:
        save_json(figures_path, figures)

    train_file, test = f"{out}/{g}-train.h5", f"{out}/{g}-test.h5"
    simulate_pair(g, train_file, test, args.n_train, args.n_test, args.reuse)
    teacher, student = f"{out}/{g}-teacher", f"{out}/{g}-student"
    stream = ["--stream", args.stream]
    for key, step in (("teacher", lambda: train("icaloflow", train_file, g, teacher,
                                                args.teacher_budget, reuse=args.reuse,
                                                extra=stream)),
                      ("student", lambda: distill(teacher, student, args.distill_budget,
                                                  reuse=args.reuse, extra=stream))):
        measured = step()
        if measured:
            figures[key] = measured.figures()
        figures.setdefault(key, {}).update(training_summary(teacher if key == "teacher"
                                                            else student))
        save()
    generated = f"{out}/{g}-generated.h5"
    figures["generate"] = {"n": args.n_test, **generate(student, test, generated).figures()}
    save()
    if args.skip_evaluation:
        print(json.dumps(figures, indent=2))
        return 0
    figures.update(headline(evaluate(test, generated, g, f"{out}/{g}-report")))
    save()
    if not args.skip_timing:
        timing = bench_sampling(student, f"{out}/{g}-student-sampling.json", threads="1",
                                batch_sizes="100,10000", like=test, repeats=2)
        figures["student_ms_per_shower_1thread"] = {
            f"bs{b}": round(ms, 2) for (_, b), ms in timing.items()}
        save()
    print(json.dumps(figures, indent=2))
    minutes = (figures["teacher"]["train_seconds"] + figures["student"]["train_seconds"]) / 60
    print(f"{g}: teacher {figures['teacher']['train_seconds'] / 60:.1f} min "
          f"({figures['teacher']['epochs']} epochs, peak "
          f"{figures['teacher'].get('peak_rss_gb', '(not measured here)')} GB)"
          f" + students {figures['student']['train_seconds'] / 60:.1f} min = {minutes:.1f} min;"
          f" AUC low {figures['auc_low'][0]:.3f}, high {figures['auc_high'][0]:.3f}; "
          f"generation of {args.n_test} showers peak {figures['generate']['peak_rss_gb']} GB")
    if "student_ms_per_shower_1thread" in figures:
        print(f"student sampling, 1 thread: {figures['student_ms_per_shower_1thread']} "
              "ms/shower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
