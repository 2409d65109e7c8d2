"""Distillation benchmark: teacher vs IAF student on calochallenge-1-photons reference data.

Usage: python bench/bench_distill.py [--bench-dir bench-output/caloflow] [--time-budget 30m]
           [--out bench-output/distill] [--config FILE] [--reuse] [--teacher-big-batch]
           [--teacher-batches 1,100]

Needs a finished `bench/bench_caloflow.py` directory (its trained teacher `run/`, the held-out
reference `heldout.h5`, the teacher's `generated.h5` and `report/`). Steps (each printed):
`caloforge distill` (CPU preset: the teacher's architecture, fully guided, beta 0.5) within
the time budget on 2 threads; generate as many showers as the held-out reference; `caloforge
evaluate` (fast classifier, 3 repeats); `caloforge bench-sampling` of the student (1 and 2
threads; batch 1, 100, 10,000) and of the teacher (1 thread; batch 1, 100, 1000 and, with
--teacher-big-batch, 10,000: about 10 minutes more; --teacher-batches picks the sizes, e.g.
1,100 for a fully autoregressive teacher). Prints the side-by-side table; the speed-up is
taken at the largest batch the teacher was timed at.
Targets (issue): student <= 1.0 ms/shower at batch 10,000 on 1 thread and >= 100x faster than
the teacher in the same run; student low-level AUC <= teacher's + 0.05; distillation <= 60 min.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import (
    bench_sampling,
    distill,
    evaluate,
    generate,
    headline,
    read_json,
    save_json,
    training_summary,
    verdict,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default="bench-output/caloflow")
    parser.add_argument("--time-budget", default="30m")
    parser.add_argument("--out", default="bench-output/distill")
    parser.add_argument("--config", default=None, help="distillation YAML config")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a student distilled by an earlier invocation (an "
                             "interrupted distillation is resumed)")
    parser.add_argument("--teacher-big-batch", action="store_true",
                        help="also time the teacher at batch 10,000 on 1 thread (~10 min)")
    parser.add_argument("--teacher-batches", default=None,
                        help="comma-separated batch sizes to time the teacher at (default "
                             "1,100,1000; a fully autoregressive teacher: 1,100)")
    args = parser.parse_args()
    teacher_dir, reference = f"{args.bench_dir}/run", f"{args.bench_dir}/heldout.h5"
    out, student_dir = args.out, f"{args.out}/student"
    figures: dict = {"teacher": teacher_dir}
    step = distill(teacher_dir, student_dir, args.time_budget, reuse=args.reuse,
                   extra=["--config", args.config] if args.config else [])
    if step:
        figures["distill_wall_s"] = step.wall_s
    figures["student_generate_wall_s"] = generate(student_dir, reference,
                                                  f"{out}/generated.h5").wall_s
    student = evaluate(reference, f"{out}/generated.h5", "calochallenge-1-photons",
                       f"{out}/report")
    teacher = read_json(f"{args.bench_dir}/report/metrics.json")
    training = training_summary(student_dir)
    figures.update({"epochs": training["epochs"], "best_epoch": training["best_epoch"],
                    "best_kl_nats": training["best_val_loss"],
                    "distill_seconds": training["train_seconds"]})
    for name, metrics in (("teacher", teacher), ("student", student)):
        figures.update({f"{name}_{key}": value for key, value in headline(metrics).items()})
    teacher_batches = args.teacher_batches or (
        "1,100,1000,10000" if args.teacher_big_batch else "1,100,1000")
    timing = {
        "student": bench_sampling(student_dir, f"{out}/student_sampling.json", threads="1,2",
                                  batch_sizes="1,100,1000,10000"),
        "teacher": bench_sampling(teacher_dir, f"{out}/teacher_sampling.json", threads="1",
                                  batch_sizes=teacher_batches, max_seconds=60)}
    figures["sampling_ms_per_shower"] = {
        name: {f"{t}t_bs{b}": round(ms, 4) for (t, b), ms in rows.items()}
        for name, rows in timing.items()}
    compare = max(int(b) for b in teacher_batches.split(","))
    speedup = timing["teacher"][(1, compare)] / timing["student"][(1, compare)]
    figures[f"speedup_1thread_bs{compare}"] = round(speedup, 1)
    print(json.dumps(figures, indent=2))
    save_json(f"{out}/figures.json", figures)
    student_ms = timing["student"][(1, 10_000)]
    gap = figures["student_auc_low"][0] - figures["teacher_auc_low"][0]
    print(f"{'':10}{'AUC low':>10}{'AUC high':>10}{'FPD x1e3':>10}{'ms/shower 1 thread':>22}")
    for name in ("teacher", "student"):
        print(f"{name:10}{figures[name + '_auc_low'][0]:>10.3f}"
              f"{figures[name + '_auc_high'][0]:>10.3f}{figures[name + '_fpd_x1e3']:>10.1f}"
              f"{timing[name][(1, compare)]:>14.3f} (bs {compare})")
    print(f"student at batch 10,000, 1 thread: {student_ms:.3f} ms/shower (target <= 1.0: "
          f"{verdict(student_ms, 1.0)}); speed-up over the teacher at batch {compare}: "
          f"{speedup:.0f}x (target >= 100: {verdict(speedup, 100, lower_is_better=False)}); "
          f"low-level AUC gap {gap:+.3f} (target <= +0.05: {verdict(gap, 0.05)}); distillation "
          f"{figures['distill_seconds'] / 60:.1f} min (target <= 60)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
