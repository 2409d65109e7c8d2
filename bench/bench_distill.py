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
import os
import subprocess
import sys
import time


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def read_json(path: str) -> dict:
    with open(path) as stream:
        return json.load(stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", default="bench-output/caloflow")
    parser.add_argument("--time-budget", default="30m")
    parser.add_argument("--out", default="bench-output/distill")
    parser.add_argument("--config", default=None, help="distillation YAML config")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a student distilled by an earlier invocation")
    parser.add_argument("--teacher-big-batch", action="store_true",
                        help="also time the teacher at batch 10,000 on 1 thread (~10 min)")
    parser.add_argument("--teacher-batches", default=None,
                        help="comma-separated batch sizes to time the teacher at (default "
                             "1,100,1000; a fully autoregressive teacher: 1,100)")
    args = parser.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "caloforge")
    teacher_dir, reference = f"{args.bench_dir}/run", f"{args.bench_dir}/heldout.h5"
    out, student_dir = args.out, f"{args.out}/student"
    os.makedirs(out, exist_ok=True)
    figures: dict = {"teacher": teacher_dir}
    if not (args.reuse and os.path.exists(f"{student_dir}/model.json")):
        subprocess.run(["rm", "-rf", student_dir], check=True)
        figures["distill_wall_s"] = round(run(
            [exe, "distill", teacher_dir, "-o", student_dir, "--time-budget", args.time_budget,
             "--threads", "2", "--no-progress"]
            + (["--config", args.config] if args.config else [])), 1)
    figures["student_generate_wall_s"] = round(run(
        [exe, "generate", student_dir, "--like", reference, "-o", f"{out}/generated.h5",
         "--seed", "1", "--threads", "2", "--no-progress"]), 1)
    run([exe, "evaluate", "--reference", reference, "--generated", f"{out}/generated.h5",
         "--geometry", "calochallenge-1-photons", "-o", f"{out}/report", "--no-progress"])
    student = read_json(f"{out}/report/metrics.json")
    teacher = read_json(f"{args.bench_dir}/report/metrics.json")
    training = read_json(f"{student_dir}/model.json")["training"]
    figures.update({"epochs": training["epochs"], "best_epoch": training["best_epoch"],
                    "best_kl_nats": training["best_val_loss"],
                    "distill_seconds": training["train_seconds"]})
    for name, metrics in (("teacher", teacher), ("student", student)):
        figures[name + "_auc_low"] = [metrics["cls-low"]["auc_mean"], metrics["cls-low"]["auc_std"]]
        figures[name + "_auc_high"] = [metrics["cls-high"]["auc_mean"],
                                       metrics["cls-high"]["auc_std"]]
        figures[name + "_fpd_x1e3"] = metrics["fpd_x1e3"]["value"]
    run([exe, "bench-sampling", student_dir, "--threads", "1,2", "--batch-sizes",
         "1,100,1000,10000", "-o", f"{out}/student_sampling.json", "--no-progress"])
    teacher_batches = args.teacher_batches or (
        "1,100,1000,10000" if args.teacher_big_batch else "1,100,1000")
    run([exe, "bench-sampling", teacher_dir, "--threads", "1", "--batch-sizes", teacher_batches,
         "--repeats", "3", "--max-seconds", "60", "-o", f"{out}/teacher_sampling.json",
         "--no-progress"])
    timing = {name: {(r["threads"], r["batch_size"]): r for r in read_json(
        f"{out}/{name}_sampling.json")["results"]} for name in ("student", "teacher")}
    figures["sampling_ms_per_shower"] = {
        name: {f"{t}t_bs{b}": round(r["ms_per_shower"], 4) for (t, b), r in rows.items()}
        for name, rows in timing.items()}
    compare = max(int(b) for b in teacher_batches.split(","))
    speedup = (timing["teacher"][(1, compare)]["ms_per_shower"]
               / timing["student"][(1, compare)]["ms_per_shower"])
    figures[f"speedup_1thread_bs{compare}"] = round(speedup, 1)
    print(json.dumps(figures, indent=2))
    with open(f"{out}/figures.json", "w") as stream:
        json.dump(figures, stream, indent=2)
    student_ms = timing["student"][(1, 10_000)]["ms_per_shower"]
    gap = figures["student_auc_low"][0] - figures["teacher_auc_low"][0]
    print(f"{'':10}{'AUC low':>10}{'AUC high':>10}{'FPD x1e3':>10}{'ms/shower 1 thread':>22}")
    for name in ("teacher", "student"):
        ms = timing[name][(1, compare)]
        print(f"{name:10}{figures[name + '_auc_low'][0]:>10.3f}"
              f"{figures[name + '_auc_high'][0]:>10.3f}{figures[name + '_fpd_x1e3']:>10.1f}"
              f"{ms['ms_per_shower']:>14.3f} (bs {ms['batch_size']})")
    print(f"student at batch 10,000, 1 thread: {student_ms:.3f} ms/shower (target <= 1.0: "
          f"{'meets' if student_ms <= 1.0 else 'MISSES'}); speed-up over the teacher at batch "
          f"{compare}: {speedup:.0f}x (target >= 100: {'meets' if speedup >= 100 else 'MISSES'})"
          f"; low-level AUC gap {gap:+.3f} (target <= +0.05: "
          f"{'meets' if gap <= 0.05 else 'MISSES'}); distillation "
          f"{figures['distill_seconds'] / 60:.1f} min (target <= 60)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
