"""The bridge between classifier presets: the same pairs of files scored by each definition.

Usage: python bench/bench_evaluation_bridge.py [--out bench-output/bridge]
           [--results docs/results/evaluation-bridge.json]
           [--pairs independent,distorted,student,teacher]
           [--teacher-budget 20m] [--student-budget 15m] [--repeats 1]

Four pairs of calochallenge-1-photons files of 121,000 showers each (the official split of
dataset 1 photons needs 80,000/20,000/21,000 per class), all from the built-in reference
simulator (NOT Geant4: figures compare presets with each other, not with published tables):

* independent: reference (seed 101) vs an independent reference sample (seed 102);
* distorted:   reference vs an independent sample (seed 104) with every voxel of layer 2
               (the layer holding most of the energy) scaled by 1.02: a mild miscalibration;
* student:     reference vs the showers of a CaloFlow II student (distilled for
               --student-budget from the teacher below), generated with the reference's
               incident energies;
* teacher:     reference vs the CaloFlow teacher's showers (CPU preset, trained for
               --teacher-budget on 121,000 showers of seed 103).

Each pair is scored by ``caloforge evaluate`` with the fast preset (hist, cls-low, cls-high,
FPD, KPD) and with the official definition at width 256 and 15 epochs (cls-low, cls-high:
three hidden layers, float64, fixed split sizes, stop only at test accuracy 1). Every step is
skipped when its output exists (a cut run resumes); each figure is written into --results as
soon as it is measured, with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from pipeline import caloforge, distill, generate, read_json, save_json, simulate, train

N_SHOWERS = 121_000
GEOMETRY = "calochallenge-1-photons"
DISTORTED_LAYER_ID, DISTORTION = 2, 1.02
SCORINGS = {
    "fast": ["--classifier-preset", "fast", "--metrics", "hist,cls-low,cls-high,fpd,kpd"],
    "official-256x15": ["--classifier-preset", "official", "--classifier-width", "256",
                        "--classifier-epochs", "15", "--metrics", "cls-low,cls-high"],
}


def simulate_reference(path: str, seed: int) -> None:
    simulate(GEOMETRY, path, N_SHOWERS, seed, extra=["--threads", "2"])


def distort(source: str, path: str) -> None:
    """``source`` with every voxel of layer DISTORTED_LAYER_ID multiplied by DISTORTION."""
    if os.path.exists(path):
        return
    from caloforge.data import read_showers, write_showers
    from caloforge.geometry import get_geometry

    geometry = get_geometry(GEOMETRY)
    data = read_showers(source, geometry)
    position = [layer.layer_id for layer in geometry.layers].index(DISTORTED_LAYER_ID)
    data.showers[:, geometry.layer_slices[position]] *= DISTORTION
    write_showers(path, data, geometry)


def load_results(path: str) -> dict:
    if os.path.exists(path):
        return read_json(path)
    return {"about": __doc__.split("\n\n")[0], "machine": "2 CPU cores (reference simulator "
            "data, not Geant4)", "pairs": {}}


def save_results(path: str, results: dict) -> None:
    """The JSON, and beside it a Markdown table of the same figures."""
    from caloforge.atomic import atomic_output

    save_json(path, results)
    with atomic_output(os.path.splitext(path)[0] + ".md") as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(markdown_table(results))


def markdown_table(results: dict) -> str:
    """One row per pair: AUC low / high of each scoring, FPD and KPD (fast run)."""
    lines = ["# Classifier presets side by side (calochallenge-1-photons)", "",
             "Written by `python bench/bench_evaluation_bridge.py` as each figure is measured; "
             "files of 121,000 showers each from the caloforge reference simulator (not "
             "Geant4); 2 CPU cores. `fast`: caloforge's CPU preset (60/20/20 of each "
             "sample); `official-256x15`: the official classifier definition (3 hidden layers, "
             "float64, 80000/20000/21000 per class, stop only at test accuracy 1) at width "
             "256 and 15 epochs. FPD/KPD x 10^3 with the jetnet definitions on the full "
             "samples.", "",
             "| pair | scoring | AUC low | AUC high | best epoch low / high | FPD x 1e3 | "
             "KPD x 1e3 | wall |", "|---|---|---|---|---|---|---|---|"]
    for key, entry in results["pairs"].items():
        pair, scoring = key.split("/")
        low, high = entry["cls-low"], entry["cls-high"]

        def distance(name: str, entry: dict = entry) -> str:
            return f"{entry[name][0]:.3g} ± {entry[name][1]:.2g}" if name in entry else ""

        lines.append(f"| {pair} | {scoring} | {low['auc']:.4f} | {high['auc']:.4f} | "
                     f"{low['best_epochs'][0]} / {high['best_epochs'][0]} | "
                     f"{distance('fpd_x1e3')} | {distance('kpd_x1e3')} | {entry['wall_s']:.0f} s |")
    lines += ["", "Commands: the `command` of each entry in evaluation-bridge.json.", ""]
    return "\n".join(lines)


def score(out: str, results: dict, results_path: str, pair: str, reference: str,
          generated: str, repeats: int) -> None:
    for name, options in SCORINGS.items():
        key = f"{pair}/{name}"
        if key in results["pairs"]:
            continue
        report = f"{out}/report-{pair}-{name}"
        command = ["evaluate", "--reference", reference, "--generated", generated,
                   "--geometry", GEOMETRY, "-o", report, "--repeats", str(repeats),
                   "--threads", "2", *options]
        wall = caloforge(*command).wall_s
        metrics = read_json(f"{report}/metrics.json")
        entry = {"command": " ".join(command + ["--no-progress"]), "wall_s": round(wall, 1),
                 "n_reference": metrics["n_reference"], "n_generated": metrics["n_generated"]}
        for level in ("cls-low", "cls-high"):
            r = metrics[level]
            entry[level] = {"auc": round(r["auc_mean"], 4), "auc_std": round(r["auc_std"], 4),
                            "jsd": round(r["jsd_mean"], 4), "split": r["split_per_class"],
                            "best_epochs": [run_["best_epoch"] for run_ in r["runs"]],
                            "epochs_run": [run_["epochs_run"] for run_ in r["runs"]]}
        for distance in ("fpd_x1e3", "kpd_x1e3"):
            if distance in metrics:
                entry[distance] = [round(metrics[distance]["value"], 4),
                                   round(metrics[distance]["error"], 4)]
        results["pairs"][key] = entry
        save_results(results_path, results)
        print(key, json.dumps(entry), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-output/bridge")
    parser.add_argument("--results", default="docs/results/evaluation-bridge.json")
    parser.add_argument("--pairs", default="independent,distorted,student,teacher")
    parser.add_argument("--teacher-budget", default="20m")
    parser.add_argument("--student-budget", default="15m")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    results = load_results(args.results)
    reference = f"{out}/reference.h5"
    simulate_reference(reference, 101)
    pairs = args.pairs.split(",")
    teacher, student = f"{out}/teacher", f"{out}/student"
    for pair in pairs:
        if pair == "independent":
            generated = f"{out}/independent.h5"
            simulate_reference(generated, 102)
        elif pair == "distorted":
            simulate_reference(f"{out}/distort-source.h5", 104)
            generated = f"{out}/distorted.h5"
            distort(f"{out}/distort-source.h5", generated)
        elif pair in ("teacher", "student"):
            train_file = f"{out}/train.h5"
            simulate_reference(train_file, 103)
            train("caloflow", train_file, GEOMETRY, teacher, args.teacher_budget)
            if pair == "student":
                distill(teacher, student, args.student_budget)
            generated = f"{out}/{pair}-generated.h5"
            if not os.path.exists(generated):
                generate(teacher if pair == "teacher" else student, reference, generated)
        else:
            raise SystemExit(f"unknown pair {pair!r}")
        score(out, results, args.results, pair, reference, generated, args.repeats)
    print(json.dumps(results["pairs"], indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
