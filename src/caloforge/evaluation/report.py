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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..atomic import atomic_output, write_json_atomic
from ..data import ShowerData, ShowerFile
from ..errors import OptionError, ShowerFileError
from ..geometry import Geometry
from .classifier import repeated_classifier_test
from .distances import fpd, kpd
from .features import (
    FeatureSet,
    apply_threshold,
    classifier_high_level_inputs,
    classifier_low_level_inputs,
    high_level_features,
)
from .histograms import (
    feature_bins,
    plot_feature_group,
    separation_power,
    voxel_spectrum_bins,
)

STANDARDISED = "high-level classifier inputs standardised by the reference"
METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd")
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

    metrics: tuple[str, ...] = METRICS
    classifier_preset: str = "fast"
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
    """Compute the metrics of ``settings``, write the report into ``output_dir``, return them."""
    settings.validate()
    started = time.perf_counter()
    threshold = geometry.threshold_mev if settings.threshold_mev is None else settings.threshold_mev
    ref_showers = apply_threshold(reference.showers, threshold)
    gen_showers = apply_threshold(generated.showers, threshold)
    ref_features = high_level_features(ref_showers, reference.incident_energies, geometry)
    gen_features = high_level_features(gen_showers, generated.incident_energies, geometry)
    result: dict[str, Any] = {
        "caloforge_version": __version__, "geometry": geometry.name,
        "n_reference": len(reference), "n_generated": len(generated),
        "threshold_mev": threshold,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "extra"},
        **settings.extra,
    }
    images: list[tuple[str, str]] = []
    os.makedirs(output_dir, exist_ok=True)
    if "hist" in settings.metrics:
        log("histograms and separation powers ...")
        result["separation_power"], images = _histograms(
            ref_features, gen_features, ref_showers, gen_showers, threshold, output_dir,
            settings.labels)
    high_ref = high_gen = None
    if {"cls-high", "fpd", "kpd"} & set(settings.metrics):
        high_ref = classifier_high_level_inputs(ref_features, reference.incident_energies, geometry)
        high_gen = classifier_high_level_inputs(gen_features, generated.incident_energies, geometry)
    for metric in ("cls-low", "cls-high"):
        if metric not in settings.metrics:
            continue
        log(f"classifier {metric} ({settings.classifier_preset}, {settings.repeats} repeats) ...")
        if metric == "cls-low":
            inputs = (classifier_low_level_inputs(ref_showers, reference.incident_energies),
                      classifier_low_level_inputs(gen_showers, generated.incident_energies))
        else:
            assert high_ref is not None and high_gen is not None
            inputs = (high_ref, high_gen)
        result[metric] = repeated_classifier_test(*inputs, settings.classifier_preset,
                                                  settings.repeats, settings.seed,
                                                  settings.device, progress)
    if high_ref is not None and high_gen is not None:
        # FPD/KPD on features standardised by the reference (scale-free, stable kernels)
        mean, std = high_ref.mean(axis=0), high_ref.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        high_ref, high_gen = (high_ref - mean) / std, (high_gen - mean) / std
    if "fpd" in settings.metrics:
        log("FPD ...")
        value, error = fpd(high_ref, high_gen, seed=settings.seed)
        result["fpd_x1e3"] = {"value": 1e3 * value, "error": 1e3 * error,
                              "features": STANDARDISED}
    if "kpd" in settings.metrics:
        log("KPD ...")
        value, error = kpd(high_ref, high_gen, seed=settings.seed)
        result["kpd_x1e3"] = {"value": 1e3 * value, "error": 1e3 * error,
                              "features": STANDARDISED}
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    write_json_atomic(os.path.join(output_dir, "metrics.json"), result)
    write_html_report(os.path.join(output_dir, "report.html"), result, images)
    return result


def _histograms(ref: FeatureSet, gen: FeatureSet, ref_showers: np.ndarray,
                gen_showers: np.ndarray, threshold: float, output_dir: str,
                labels: tuple[str, str]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    bins = {name: feature_bins(ref.values[name], gen.values[name], ref.kinds[name])
            for name in ref.names()}
    separation = {name: separation_power(ref.values[name], gen.values[name], bins[name])
                  for name in ref.names()}
    images = []
    for key, title, select in FEATURE_GROUPS:
        names = [n for n in ref.names() if select(n)]
        if not names:
            continue
        filename = f"hist_{key}.png"
        plot_feature_group(os.path.join(output_dir, filename), title, names, ref.values,
                           gen.values, bins, separation, labels)
        images.append((title, filename))
    ref_voxels = ref_showers[ref_showers > 0].astype(np.float64)
    gen_voxels = gen_showers[gen_showers > 0].astype(np.float64)
    if ref_voxels.size and gen_voxels.size:
        edges = voxel_spectrum_bins(ref_voxels, threshold)
        separation["voxel_energy"] = separation_power(ref_voxels, gen_voxels, edges)
        plot_feature_group(os.path.join(output_dir, "hist_voxel_energy.png"),
                           "Voxel energy spectrum [MeV]", ["voxel_energy"],
                           {"voxel_energy": ref_voxels}, {"voxel_energy": gen_voxels},
                           {"voxel_energy": edges}, separation, labels)
        images.append(("Voxel energy spectrum", "hist_voxel_energy.png"))
    return separation, images


# --- presentation -------------------------------------------------------------------------
def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, how it was produced) rows for the terminal and the HTML report."""
    rows = []
    for metric, label in (("cls-low", "classifier AUC, low-level"),
                          ("cls-high", "classifier AUC, high-level")):
        if metric in result:
            r = result[metric]
            how = f"preset {r['preset']['name']}, {r['repeats']} repeats"
            rows.append((label, f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}", how))
            rows.append((label.replace("AUC", "JSD"), f"{r['jsd_mean']:.4f} ± {r['jsd_std']:.4f}",
                         how))
    for key, label in (("fpd_x1e3", "FPD x 10^3"), ("kpd_x1e3", "KPD x 10^3")):
        if key in result:
            r = result[key]
            rows.append((label, f"{r['value']:.4g} ± {r['error']:.2g}", r["features"]))
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
             f"{result['n_generated']} generated showers, threshold {result['threshold_mev']:g} MeV"]
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
             f"threshold {result['threshold_mev']:g} MeV; caloforge {esc(result['caloforge_version'])}"
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
