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
measured from the kernel's accounting of that process (``os.wait4``).
Targets (issue): calochallenge-2 teacher + students <= 90 min on 2 cores, low-level and
high-level AUC <= 0.80, student <= 20 ms/shower at batch 10,000 on 1 thread;
calochallenge-3 training <= 8 GB, generation of 10,000 showers <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run(command: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak resident memory in GB of its process)."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"command failed with status {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024 ** 2  # Linux: kB


def read_json(path: str) -> dict:
    with open(path) as stream:
        return json.load(stream)


def training_figures(figures: dict, key: str, run_dir: str) -> None:
    """Add the training summary saved in ``run_dir`` to ``figures[key]``."""
    summary = read_json(f"{run_dir}/model.json")["training"]
    figures.setdefault(key, {}).update(
        {k: summary[k] for k in ("epochs", "best_epoch", "best_val_loss", "train_seconds")})


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
                        help="keep data files and trained runs of an earlier invocation")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-evaluation", action="store_true",
                        help="stop after generation (e.g. a memory check on calochallenge-3)")
    args = parser.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "caloforge")
    out, g = args.out, args.geometry
    os.makedirs(out, exist_ok=True)
    figures_path = f"{out}/figures-{g}.json"
    figures: dict = read_json(figures_path) if args.reuse and os.path.exists(figures_path) \
        else {}
    figures["geometry"] = g

    def done(path: str) -> bool:
        return args.reuse and os.path.exists(path)

    def save() -> None:
        with open(figures_path, "w") as stream:
            json.dump(figures, stream, indent=2)

    train, test = f"{out}/{g}-train.h5", f"{out}/{g}-test.h5"
    for path, n, seed in ((train, args.n_train, 11), (test, args.n_test, 12)):
        if not done(path):
            run([exe, "simulate", "--geometry", g, "-n", str(n), "--seed", str(seed), "-o",
                 path, "--no-progress"])
    teacher, student = f"{out}/{g}-teacher", f"{out}/{g}-student"
    if not done(f"{teacher}/model.json"):
        subprocess.run(["rm", "-rf", teacher], check=True)
        wall, peak = run([exe, "train", "icaloflow", "--data", train, "--geometry", g, "-o",
                          teacher, "--time-budget", args.teacher_budget, "--threads", "2",
                          "--stream", args.stream, "--no-progress"])
        figures["teacher"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2)}
        save()
    training_figures(figures, "teacher", teacher)
    if not done(f"{student}/model.json"):
        subprocess.run(["rm", "-rf", student], check=True)
        wall, peak = run([exe, "distill", teacher, "-o", student, "--time-budget",
                          args.distill_budget, "--threads", "2", "--stream", args.stream,
                          "--no-progress"])
        figures["student"] = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2)}
        save()
    training_figures(figures, "student", student)
    generated = f"{out}/{g}-generated.h5"
    wall, peak = run([exe, "generate", student, "--like", test, "-o", generated, "--seed", "1",
                      "--threads", "2", "--no-progress"])
    figures["generate"] = {"n": args.n_test, "wall_s": round(wall, 1),
                           "peak_rss_gb": round(peak, 2)}
    save()
    if args.skip_evaluation:
        print(json.dumps(figures, indent=2))
        return 0
    report = f"{out}/{g}-report"
    run([exe, "evaluate", "--reference", test, "--generated", generated, "--geometry", g,
         "-o", report, "--no-progress"])
    metrics = read_json(f"{report}/metrics.json")
    figures["auc_low"] = [metrics["cls-low"]["auc_mean"], metrics["cls-low"]["auc_std"]]
    figures["auc_high"] = [metrics["cls-high"]["auc_mean"], metrics["cls-high"]["auc_std"]]
    figures["fpd_x1e3"] = metrics["fpd_x1e3"]["value"]
    save()
    if not args.skip_timing:
        run([exe, "bench-sampling", student, "--threads", "1", "--batch-sizes", "100,10000",
             "--repeats", "2", "--max-seconds", "120", "--like", test, "-o",
             f"{out}/{g}-student-sampling.json", "--no-progress"])
        rows = read_json(f"{out}/{g}-student-sampling.json")["results"]
        figures["student_ms_per_shower_1thread"] = {
            f"bs{r['batch_size']}": round(r["ms_per_shower"], 2) for r in rows}
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
