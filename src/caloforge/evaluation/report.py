"""The full evaluation of a generated sample against a reference sample.

``evaluate_samples`` computes every metric and writes ``metrics.json``, the histogram PNGs
and a self-contained ``report.html`` (images embedded, readable offline) into a directory.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..atomic import atomic_output, write_json_atomic
from ..data import ShowerData, ShowerFile
from ..errors import OptionError, ShowerFileError
from ..geometry import Geometry, calochallenge_dataset
from .classifier import (
    estimate_training_seconds,
    get_preset,
    repeated_classifier_test,
    split_sizes,
)
from .distances import FPD_DEFINITION, KPD_DEFINITION, fpd, kpd, prdc, scale_by_reference_max
from .features import (
    FeatureSet,
    apply_threshold,
    classifier_high_level_inputs,
    classifier_low_level_inputs,
    classifier_low_level_normed_inputs,
    high_level_features,
)
from .histograms import (
    feature_bins,
    official_feature_bins,
    plot_feature_group,
    separation_power,
    voxel_spectrum_bins,
)

METRICS = ("hist", "cls-low", "cls-low-normed", "cls-high", "fpd", "kpd", "prdc")
DEFAULT_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd")
CLASSIFIER_METRICS = ("cls-low", "cls-low-normed", "cls-high")
HIGH_LEVEL_FEATURES = "high-level classifier inputs (official order)"
PRDC_NEAREST_K = 5
PRDC_MAX_SHOWERS = 10_000  # per sample: distances are O(N^2)
FEATURE_GROUPS = (
    ("energy", "Total energy", lambda n: n in ("E_tot", "E_tot/E_inc")),
    ("layer_energy", "Layer energies [MeV]", lambda n: n.startswith("E_L")),
    ("sparsity", "Sparsity (fraction of zero voxels)", lambda n: n.startswith("sparsity_")),
    ("ec_r", "Centre of energy in r [mm]", lambda n: n.startswith("EC_r_")),
    ("width_r", "Width in r [mm]", lambda n: n.startswith("width_r_")),
    ("ec_x", "Centre of energy in x [mm]", lambda n: n.startswith("EC_x_")),
    ("ec_y", "Centre of energy in y [mm]", lambda n: n.startswith("EC_y_")),
    ("width_x", "Width in x [mm]", lambda n: n.startswith("width_x_")),
    ("width_y", "Width in y [mm]", lambda n: n.startswith("width_y_")),
)


@dataclass
class EvaluationSettings:
    """What to compute and how (recorded in metrics.json next to every number)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    classifier_preset: str = "fast"
    classifier_width: int | None = None  # override of the preset's hidden width
    classifier_epochs: int | None = None  # override of the preset's epochs
    repeats: int = 3
    threshold_mev: float | None = None  # None: the geometry's default
    max_showers: int | None = None
    seed: int = 0
    device: str = "cpu"
    labels: tuple[str, str] = ("reference", "generated")
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise OptionError(f"unknown metric(s) {unknown}; choose from {','.join(METRICS)}")
        if self.repeats < 1:
            raise OptionError(f"--repeats must be >= 1, got {self.repeats}")
        if self.threshold_mev is not None and self.threshold_mev < 0:
            raise OptionError("the threshold must be >= 0 MeV")
        get_preset(self.classifier_preset, self.classifier_width, self.classifier_epochs)


def load_for_evaluation(path: str, geometry: Geometry, max_showers: int | None) -> ShowerData:
    """Read a file for evaluation, with messages that name the file."""
    with ShowerFile(path, geometry) as reader:
        if len(reader) == 0:
            raise ShowerFileError(path, "file contains no showers")
        return reader.read(0, max_showers)


def evaluate_samples(reference: ShowerData, generated: ShowerData, geometry: Geometry,
                     output_dir: str, settings: EvaluationSettings,
                     progress: Callable[..., Any] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute the metrics of ``settings``, write the report into ``output_dir``, return them.

    Every number in ``metrics.json`` sits beside the definition that produced it (classifier
    preset with any overrides, split sizes and precision; FPD/KPD/PRDC definitions and sample
    sizes; the binning of each separation power).
    """
    settings.validate()
    started = time.perf_counter()
    dataset = calochallenge_dataset(geometry)
    preset = get_preset(settings.classifier_preset, settings.classifier_width,
                        settings.classifier_epochs)
    classifier_metrics = [m for m in CLASSIFIER_METRICS if m in settings.metrics]
    if classifier_metrics:  # refuse too small samples before any work
        split_sizes(len(reference), len(generated), preset, dataset,
                    labels=(settings.extra.get("reference_file", "the reference"),
                            settings.extra.get("generated_file", "the generated sample")))
    threshold = geometry.threshold_mev if settings.threshold_mev is None else settings.threshold_mev
    ref_showers = apply_threshold(reference.showers, threshold)
    gen_showers = apply_threshold(generated.showers, threshold)
    ref_features = high_level_features(ref_showers, reference.incident_energies, geometry)
    gen_features = high_level_features(gen_showers, generated.incident_energies, geometry)
    result: dict[str, Any] = {
        "caloforge_version": __version__, "geometry": geometry.name,
        "calochallenge_dataset": dataset,
        "n_reference": len(reference), "n_generated": len(generated),
        "threshold_mev": threshold,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "extra"},
        **settings.extra,
    }
    images: list[tuple[str, str]] = []
    os.makedirs(output_dir, exist_ok=True)
    if "hist" in settings.metrics:
        log("histograms and separation powers ...")
        result["separation_power"], result["separation_power_binning"], images = _histograms(
            ref_features, gen_features, ref_showers, gen_showers, threshold, dataset,
            output_dir, settings.labels)
    high_ref = high_gen = None
    if {"cls-high", "fpd", "kpd", "prdc"} & set(settings.metrics):
        high_ref = classifier_high_level_inputs(ref_features, reference.incident_energies, geometry)
        high_gen = classifier_high_level_inputs(gen_features, generated.incident_energies, geometry)
    for metric in classifier_metrics:
        if metric == "cls-low":
            inputs = (classifier_low_level_inputs(ref_showers, reference.incident_energies),
                      classifier_low_level_inputs(gen_showers, generated.incident_energies))
        elif metric == "cls-low-normed":
            inputs = (classifier_low_level_normed_inputs(ref_showers, reference.incident_energies,
                                                         geometry),
                      classifier_low_level_normed_inputs(gen_showers, generated.incident_energies,
                                                         geometry))
        else:
            assert high_ref is not None and high_gen is not None
            inputs = (high_ref, high_gen)
        n_train = 2 * split_sizes(len(reference), len(generated), preset, dataset)[0][0]
        expected = estimate_training_seconds(inputs[0].shape[1], n_train, preset,
                                             settings.device) * settings.repeats
        log(f"classifier {metric}: preset {preset.name}, width {preset.hidden} x "
            f"{preset.hidden_layers} hidden layers, {preset.dtype}, up to {preset.max_epochs} "
            f"epochs on {n_train} training showers, {settings.repeats} repeats on "
            f"{settings.device}: expected up to {expected / 60:.1f} min ...")
        result[metric] = repeated_classifier_test(*inputs, preset, settings.repeats,
                                                  settings.seed, settings.device, dataset,
                                                  progress)
    if "fpd" in settings.metrics:
        log("FPD (jetnet definition) ...")
        assert high_ref is not None and high_gen is not None
        value, error = fpd(high_ref, high_gen)
        result["fpd_x1e3"] = {"value": 1e3 * value, "error": 1e3 * error,
                              "features": HIGH_LEVEL_FEATURES, "definition": FPD_DEFINITION,
                              "n_reference": len(reference), "n_generated": len(generated)}
    if "kpd" in settings.metrics:
        log("KPD (jetnet definition) ...")
        assert high_ref is not None and high_gen is not None
        value, error = kpd(high_ref, high_gen)
        result["kpd_x1e3"] = {"value": 1e3 * value, "error": 1e3 * error,
                              "features": HIGH_LEVEL_FEATURES, "definition": KPD_DEFINITION,
                              "n_reference": len(reference), "n_generated": len(generated)}
    if "prdc" in settings.metrics:
        log("precision / recall / density / coverage ...")
        assert high_ref is not None and high_gen is not None
        result["prdc"] = _prdc(high_ref, high_gen, settings.seed)
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    write_html_report(os.path.join(output_dir, "report.html"), result, images)
    return result


def _prdc(high_ref: np.ndarray, high_gen: np.ndarray, seed: int) -> dict[str, Any]:
    """PRDC on the high-level features scaled as for FPD/KPD, at most PRDC_MAX_SHOWERS of
    each sample (a seeded random subset)."""
    rng = np.random.default_rng(seed)
    x, y = scale_by_reference_max(high_ref, high_gen)
    x = x[rng.permutation(len(x))[:PRDC_MAX_SHOWERS]]
    y = y[rng.permutation(len(y))[:PRDC_MAX_SHOWERS]]
    return {**prdc(x, y, PRDC_NEAREST_K),
            "definition": {"source": "prdc package (Naeem et al. 2020)",
                           "nearest_k": PRDC_NEAREST_K, "features": HIGH_LEVEL_FEATURES,
                           "scaling": "reference max |x|"},
            "n_reference": len(x), "n_generated": len(y)}


def _histograms(ref: FeatureSet, gen: FeatureSet, ref_showers: np.ndarray,
                gen_showers: np.ndarray, threshold: float, dataset: str | None,
                output_dir: str, labels: tuple[str, str]
                ) -> tuple[dict[str, float], dict[str, str], list[tuple[str, str]]]:
    """Separation power of every feature and the voxel spectrum, their binning ("official"
    fixed ranges for the CaloChallenge datasets where the official plots have one, else
    "quantile"), and the PNGs."""
    values_ref, values_gen = dict(ref.values), dict(gen.values)
    ref_voxels = ref_showers[ref_showers > 0].astype(np.float64)
    gen_voxels = gen_showers[gen_showers > 0].astype(np.float64)
    names = ref.names()
    if ref_voxels.size and gen_voxels.size:
        values_ref["voxel_energy"], values_gen["voxel_energy"] = ref_voxels, gen_voxels
        names = names + ["voxel_energy"]
    bins: dict[str, np.ndarray] = {}
    binning: dict[str, str] = {}
    for name in names:
        official = (official_feature_bins(name, dataset, values_ref[name], threshold)
                    if dataset is not None else None)
        if official is not None:
            bins[name], binning[name] = official, "official"
        elif name == "voxel_energy":
            bins[name], binning[name] = voxel_spectrum_bins(ref_voxels, threshold), "quantile"
        else:
            bins[name] = feature_bins(values_ref[name], values_gen[name], ref.kinds[name])
            binning[name] = "quantile"
    unclipped = {name for name, how in binning.items() if how == "official"}
    separation = {name: separation_power(values_ref[name], values_gen[name], bins[name],
                                         clip=name not in unclipped)
                  for name in names}
    images = []
    groups = FEATURE_GROUPS + (("voxel_energy", "Voxel energy spectrum [MeV]",
                                lambda n: n == "voxel_energy"),)
    for key, title, select in groups:
        selected = [n for n in names if select(n)]
        if not selected:
            continue
        filename = f"hist_{key}.png"
        plot_feature_group(os.path.join(output_dir, filename), title, selected, values_ref,
                           values_gen, bins, separation, labels, unclipped)
        images.append((title, filename))
    return separation, binning, images


# --- presentation -------------------------------------------------------------------------
def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, how it was produced) rows for the terminal and the HTML report."""
    rows = []
    for metric, label in (("cls-low", "classifier AUC, low-level"),
                          ("cls-low-normed", "classifier AUC, low-level normed"),
                          ("cls-high", "classifier AUC, high-level")):
        if metric in result:
            r = result[metric]
            p = r["preset"]
            how = (f"preset {p['name']} ({p['hidden']} x {p['hidden_layers']}, {p['dtype']}, "
                   f"{p['max_epochs']} epochs), {r['repeats']} repeats")
            rows.append((label, f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}", how))
            rows.append((label.replace("AUC", "JSD"), f"{r['jsd_mean']:.4f} ± {r['jsd_std']:.4f}",
                         how))
    for key, label in (("fpd_x1e3", "FPD x 10^3"), ("kpd_x1e3", "KPD x 10^3")):
        if key in result:
            r = result[key]
            rows.append((label, f"{r['value']:.4g} ± {r['error']:.2g}",
                         f"{r['definition']['source']}, {r['n_reference']} vs "
                         f"{r['n_generated']} showers"))
    if "prdc" in result:
        r = result["prdc"]
        rows.append(("precision / recall / density / coverage",
                     " / ".join(f"{r[k]:.3f}" for k in ("precision", "recall", "density",
                                                         "coverage")),
                     f"k = {r['definition']['nearest_k']}, {r['n_reference']} vs "
                     f"{r['n_generated']} showers"))
    if "separation_power" in result:
        sep = result["separation_power"]
        worst = max(sep, key=sep.get)
        rows.append(("separation power, mean over features", f"{np.mean(list(sep.values())):.4f}",
                     f"{len(sep)} features"))
        rows.append(("separation power, largest", f"{sep[worst]:.4f}", worst))
    rows.append(("evaluation wall time", f"{result['wall_time_s']} s", ""))
    return rows


def format_summary(result: dict[str, Any]) -> str:
    rows = summary_rows(result)
    width = max(len(r[0]) for r in rows)
    lines = [f"{result['geometry']}: {result['n_reference']} reference vs "
             f"{result['n_generated']} generated showers, "
             f"threshold {result['threshold_mev']:g} MeV"]
    lines += [f"  {name:<{width}}  {value:<22} {how}" for name, value, how in rows]
    return "\n".join(lines)


def write_html_report(path: str, result: dict[str, Any], images: list[tuple[str, str]]) -> None:
    """A single HTML file with the summary, the separation-power table and embedded PNGs."""
    directory = os.path.dirname(path)
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>caloforge evaluation: {esc(result['geometry'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             "img{max-width:100%;border:1px solid #eee;margin:8px 0}</style></head><body>",
             f"<h1>Evaluation: {esc(result['geometry'])}</h1>",
             f"<p>{result['n_reference']} reference vs {result['n_generated']} generated showers; "
             f"threshold {result['threshold_mev']:g} MeV; "
             f"caloforge {esc(result['caloforge_version'])}"
             "</p><h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>settings</th></tr>"]
    for name, value, how in summary_rows(result):
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(value)}</td><td>{esc(how)}</td></tr>")
    parts.append("</table>")
    if "separation_power" in result:
        sep = sorted(result["separation_power"].items(), key=lambda kv: -kv[1])
        parts.append("<h2>Separation power per feature (largest first)</h2>"
                     "<table><tr><th>feature</th><th>S</th></tr>")
        parts += [f"<tr><td>{esc(k)}</td><td>{v:.5f}</td></tr>" for k, v in sep]
        parts.append("</table>")
    parts.append("<h2>Histograms</h2>")
    for title, filename in images:
        with open(os.path.join(directory, filename), "rb") as stream:
            encoded = base64.b64encode(stream.read()).decode()
        parts.append(f"<h3>{esc(title)}</h3><img alt='{esc(title)}' "
                     f"src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>")
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write("\n".join(parts))
