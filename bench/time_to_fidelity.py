"""Time to fidelity: classifier AUCs after 30, 60 and 120 minutes of training, one line per
family and geometry, for the CPU default (``cpu`` preset) of each family.

    python bench/time_to_fidelity.py --family convflow --geometry ild-ecal \\
        --train ild-train.h5 --test ild-test.h5 --stages 30,60,120 --threads 1
    python bench/time_to_fidelity.py --plot   # the plot and table from the recorded stages

One run grows through the stages: `caloforge train --time-budget 30m`, then `--resume
--time-budget 60m`, then 120m (the budget counts the run's whole training time). The
learning-rate schedule follows the budget, so each stage anneals to its end and the next
restarts it from the middle (a warm restart; the best validation epoch is kept). After each
stage the model generates the held-out incident energies (``--n-eval`` showers, seed 1)
and `caloforge evaluate` runs the separation powers and both classifiers (fast preset, 3
repeats). Each stage's figures go into ``--results`` as soon as they exist, and a stage
already recorded there is skipped, so the script can be stopped at any point and run again
(also in a later session: the run directory holds the checkpoint). ``--run DIR --stages M``
measures a run trained by hand to M minutes (its `caloforge train --time-budget Mm`) as that
stage, without a training call. Figures are measured on the reference simulator, not
Geant4, unless ``--test`` holds other showers (``--ground`` names them in the titles: the
G4HepEm lines, docs/real-physics.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

from pipeline import (
    caloforge,
    evaluate,
    generate,
    headline,
    read_json,
    training_summary,
    update_json,
)

RESULTS = "docs/results/time-to-fidelity.json"  # the table goes beside it, as .md
PLOT = "docs/images/time-to-fidelity.png"
FEATURE_GROUPS = {"layer energies": "E_L", "centres": "EC_", "widths": "width_",
                  "sparsity": "sparsity_", "E_tot/E_inc": "E_tot/E_inc"}


def separation_summary(powers: dict[str, float]) -> dict[str, float]:
    """The largest separation power of each feature group (layers pooled)."""
    summary = {}
    for group, prefix in FEATURE_GROUPS.items():
        values = [v for k, v in powers.items() if k.startswith(prefix)]
        if values:
            summary[group] = round(max(values), 3)
    return summary


def recorded_stages(path: str, key: str) -> set[int]:
    """The stage minutes already in the results file for line ``key``."""
    if not os.path.exists(path):
        return set()
    return {s["stage_min"] for s in read_json(path).get("lines", {}).get(key, {}).get(
        "stages", [])}


def record_stage(results: dict, key: str, family: str, geometry: str, stage: dict) -> None:
    """Put ``stage`` into line ``key`` of ``results`` (replacing one of the same minutes)."""
    line = results.setdefault("lines", {}).setdefault(
        key, {"family": family, "geometry": geometry, "stages": []})
    line["stages"] = [s for s in line["stages"] if s["stage_min"] != stage["stage_min"]]
    line["stages"].append(stage)


def line_key(family: str, geometry: str, tag: str) -> str:
    return f"{family} / {geometry}" + (f" ({tag})" if tag != "cpu" else "")


def run_stage(args: argparse.Namespace, minutes: int) -> dict:
    """Train the run up to ``minutes`` of training, generate, evaluate; the stage's figures."""
    run_dir = args.run or os.path.join(args.work, "run")
    peak_rss_gb = train_wall = None
    if not args.run:
        resume = os.path.exists(os.path.join(run_dir, "checkpoint.safetensors"))
        started = time.perf_counter()
        training = caloforge(
            "train", args.family, "--data", args.train, "--geometry", args.geometry, "-o",
            run_dir, "--time-budget", f"{minutes}m", "--threads", str(args.threads), "--stream",
            args.stream, *(["--resume"] if resume else []),
            *(["--config", args.config] if args.config and not resume else []))
        train_wall = round(time.perf_counter() - started, 1)
        peak_rss_gb = round(training.peak_rss_gb, 2)
    summary = training_summary(run_dir)
    generated = os.path.join(args.work, f"generated-{minutes}m.h5")
    step = generate(run_dir, args.test, generated, args.threads, args.n_eval)
    metrics = evaluate(args.test, generated, args.geometry,
                       os.path.join(args.work, f"report-{minutes}m"),
                       ["--metrics", "hist,cls-low,cls-high", "--max-showers", str(args.n_eval),
                        "--no-plots"])
    cores = hottest_cell_ratios(args.test, generated, args.geometry, args.n_eval)
    os.remove(generated)  # hundreds of MB per stage; the report keeps the figures
    return {"stage_min": minutes, "train_min": round(summary["train_seconds"] / 60, 1),
            "epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
            "best_val_loss": summary["best_val_loss"],
            "train_call_wall_s": train_wall, "train_peak_rss_gb": peak_rss_gb,
            "generation_ms_per_shower": round(1e3 * step.wall_s / args.n_eval, 1),
            "n_eval": args.n_eval, **headline(metrics),
            "max_separation_power": separation_summary(metrics.get("separation_power", {})),
            "hottest_cell_ratio": cores,
            "threads": args.threads, "measured": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
            "commit": _commit()}


def hottest_cell_ratios(reference: str, generated: str, geometry: str, n: int
                        ) -> dict[str, float]:
    """Per layer, the generated showers' mean hottest-cell energy over the reference's
    (issue 28: "showers with a core", within 10 %): mean, min and max over the layers with
    hits, and how many layers are within 10 %."""
    import numpy as np

    from caloforge.data import read_showers
    from caloforge.geometry import get_geometry

    layers = get_geometry(geometry).layer_sizes
    means = []
    for path in (reference, generated):
        showers = read_showers(path, max_showers=n).showers
        means.append(np.array([part.max(1).mean() for part in
                               np.split(showers, np.cumsum(layers)[:-1], axis=1)]))
    hit = means[0] > 0
    ratio = means[1][hit] / means[0][hit]
    return {"mean": round(float(ratio.mean()), 3), "min": round(float(ratio.min()), 3),
            "max": round(float(ratio.max()), 3),
            "layers_within_10_percent": int((np.abs(ratio - 1) <= 0.1).sum()),
            "layers": int(hit.sum())}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_plot_and_table(results: dict, plot: str, table: str,
                         ground: str = "reference simulator, not Geant4") -> None:
    """The plot (AUC against training minutes, one line per family and geometry, low- and
    high-level panels) and the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted(results.get("lines", {}).items())
    # the legend goes under the panels (one entry per line would cover them); 20 colours
    legend_inches = 0.3 + 0.17 * ((len(lines) + 1) // 2)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5 + legend_inches), sharey=True)
    colours = plt.get_cmap("tab20").colors
    rows = ["| family / geometry | training (min) | epochs | AUC low | AUC high | largest "
            "separation power (group) | held-out showers |", "|---|---|---|---|---|---|---|"]
    for index, (key, line) in enumerate(lines):
        stages = sorted(line["stages"], key=lambda s: s["stage_min"])
        for axis, name in zip(axes, ("auc_low", "auc_high")):
            points = [(s["train_min"], s[name][0], s[name][1]) for s in stages if name in s]
            if points:
                x, y, error = zip(*points)
                axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=key,
                              color=colours[index % len(colours)])
        for s in stages:
            worst = max(s["max_separation_power"].items(), key=lambda kv: kv[1],
                        default=("-", 0.0))
            rows.append(f"| {key} | {s['train_min']} | {s['epochs']} | "
                        f"{s['auc_low'][0]:.3f} ± {s['auc_low'][1]:.3f} | "
                        f"{s['auc_high'][0]:.3f} ± {s['auc_high'][1]:.3f} | "
                        f"{worst[1]:.2f} ({worst[0]})"
                        f"{'; ' + s['note'] if s.get('note') else ''} | {s['n_eval']} |")
    for axis, title in zip(axes, ("low-level classifier", "high-level classifier")):
        axis.set_title(title)
        axis.set_xlabel("training time on the CPU default (minutes)")
        axis.axhline(0.5, color="grey", lw=0.5)
        axis.set_xlim(0, 130)
    axes[0].set_ylabel("AUC (fast preset, 3 repeats; 0.5 = indistinguishable)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    figure.suptitle(f"Time to fidelity ({ground}; 2-core CPU)")
    figure.tight_layout(rect=(0, legend_inches / (4.5 + legend_inches), 1, 1))
    os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
    figure.savefig(plot, dpi=110)
    with open(table, "w") as stream:
        stream.write(f"Time to fidelity (`python bench/time_to_fidelity.py`; {ground})\n\n"
                     + "\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family")
    parser.add_argument("--geometry")
    parser.add_argument("--train", help="training shower file")
    parser.add_argument("--test", help="held-out shower file (its first --n-eval showers)")
    parser.add_argument("--stages", default="30,60,120", help="training minutes, ascending")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-eval", type=int, default=5000)
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                        help="caloforge train --stream (on: bounded memory for large files)")
    parser.add_argument("--config", default=None, help="YAML over the cpu preset (first stage)")
    parser.add_argument("--tag", default="cpu", help="names a line that is not the default")
    parser.add_argument("--work", default=None, help="run folder (default bench-output/ttf/..)")
    parser.add_argument("--run", default=None,
                        help="measure this run as it stands, as the one --stages stage (trained "
                             "by hand or elsewhere to that budget): no training call")
    parser.add_argument("--note", default=None, help="a note for the measured stage")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--plot-file", default=PLOT)
    parser.add_argument("--plot", action="store_true", help="only redraw plot and table")
    parser.add_argument("--ground", default="reference simulator, not Geant4",
                        help="what the held-out showers are, for the plot and table titles")
    args = parser.parse_args()
    table = os.path.splitext(args.results)[0] + ".md"
    if not args.plot:
        if not (args.family and args.geometry and args.train and args.test):
            parser.error("--family, --geometry, --train and --test are needed to measure")
        if args.run and "," in args.stages:
            parser.error("--run measures one stage: give --stages the minutes it was trained")
        key = line_key(args.family, args.geometry, args.tag)
        args.work = args.work or os.path.join("bench-output", "ttf",
                                              f"{args.family}-{args.geometry}-{args.tag}")
        for minutes in sorted(int(m) for m in args.stages.split(",")):
            if minutes in recorded_stages(args.results, key):
                print(f"{key}: {minutes} min already measured")
                continue
            stage = run_stage(args, minutes)
            if args.note:
                stage["note"] = args.note
            results = update_json(args.results, functools.partial(
                record_stage, key=key, family=args.family, geometry=args.geometry, stage=stage))
            print(json.dumps(stage), flush=True)
            write_plot_and_table(results, args.plot_file, table, args.ground)
    results = read_json(args.results) if os.path.exists(args.results) else {"lines": {}}
    write_plot_and_table(results, args.plot_file, table, args.ground)
    return 0


if __name__ == "__main__":
    sys.exit(main())
