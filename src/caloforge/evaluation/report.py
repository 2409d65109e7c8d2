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
from functools import cached_property
from typing import Any

import numpy as np

from .._version import __version__
from ..atomic import atomic_directory, atomic_output, write_json_atomic
from ..data import ShowerData, ShowerFile
from ..errors import OptionError, ShowerFileError
from ..geometry import Geometry, calochallenge_dataset
from .classifier import (
    Rows,
    estimate_training_seconds,
    get_preset,
    repeated_classifier_test,
    split_sizes,
)
from .distances import FPD_DEFINITION, KPD_DEFINITION, fpd, kpd, prdc, scale_by_reference_max
from .features import (
    FeatureSet,
    LowLevelInputs,
    apply_threshold,
    classifier_high_level_inputs,
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

DEFAULT_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd")
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
    plots: bool = True  # False: separation powers without the PNGs (minutes on 40k voxels)
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


@dataclass
class _Comparison:
    """One evaluation: the two samples and everything the metrics read, each derived
    quantity computed once, on first use."""

    reference: ShowerData
    generated: ShowerData
    geometry: Geometry
    settings: EvaluationSettings
    output_dir: str
    progress: Callable[..., Any] | None
    log: Callable[[str], None]
    threshold: float
    dataset: str | None
    preset: Any  # ClassifierPreset
    images: list[tuple[str, str]] = field(default_factory=list)

    own_showers: bool = False  # the samples' arrays may be thresholded in place

    @cached_property
    def showers(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference and generated showers with the threshold applied: the arrays
        themselves where no voxel lies under it or (``own_showers``) after zeroing those
        in place, else a copy (20,000 calochallenge-3 showers are 3.2 GB a side)."""
        return (self._thresholded(self.reference.showers),
                self._thresholded(self.generated.showers))

    def _thresholded(self, showers: np.ndarray, rows: int = 1000) -> np.ndarray:
        blocks = range(0, len(showers), rows)
        faint = any(((block > 0) & (block < self.threshold)).any()
                    for block in (showers[start:start + rows] for start in blocks))
        if not faint:
            return showers
        if not self.own_showers:
            return apply_threshold(showers, self.threshold)
        for start in blocks:
            block = showers[start:start + rows]
            block[block < self.threshold] = 0.0
        return showers

    @cached_property
    def features(self) -> tuple[FeatureSet, FeatureSet]:
        """The high-level features of both (thresholded) samples."""
        return self.both(lambda showers, energies: high_level_features(
            showers, energies, self.geometry))

    @cached_property
    def high_level(self) -> tuple[np.ndarray, np.ndarray]:
        """The official high-level classifier inputs of both samples."""
        ref, gen = self.features
        return (classifier_high_level_inputs(ref, self.reference.incident_energies,
                                             self.geometry),
                classifier_high_level_inputs(gen, self.generated.incident_energies,
                                             self.geometry))

    def both(self, function: Callable[[np.ndarray, np.ndarray], Any]) -> tuple[Any, Any]:
        """``function(thresholded showers, incident energies)`` of each sample."""
        ref, gen = self.showers
        return (function(ref, self.reference.incident_energies),
                function(gen, self.generated.incident_energies))

    def sizes(self) -> dict[str, int]:
        return {"n_reference": len(self.reference), "n_generated": len(self.generated)}


def _metric_histograms(pair: _Comparison) -> dict[str, Any]:
    pair.log("histograms and separation powers ...")
    powers, binning, pair.images = _histograms(
        *pair.features, *pair.showers, pair.threshold, pair.dataset,
        pair.output_dir if pair.settings.plots else None, pair.settings.labels)
    return {"separation_power": powers, "separation_power_binning": binning}


def _classifier_metric(name: str, inputs: Callable[[_Comparison], tuple[Rows, Rows]]
                       ) -> Callable[[_Comparison], dict[str, Any]]:
    """The classifier test of ``name`` on the inputs ``inputs(pair)`` builds."""

    def metric(pair: _Comparison) -> dict[str, Any]:
        settings, preset = pair.settings, pair.preset
        x_ref, x_gen = inputs(pair)
        n_train = 2 * split_sizes(len(pair.reference), len(pair.generated), preset,
                                  pair.dataset)[0][0]
        expected = estimate_training_seconds(x_ref.shape[1], n_train, preset,
                                             settings.device) * settings.repeats
        pair.log(f"classifier {name}: preset {preset.name}, width {preset.hidden} x "
                 f"{preset.hidden_layers} hidden layers, {preset.dtype}, up to "
                 f"{preset.max_epochs} epochs on {n_train} training showers, "
                 f"{settings.repeats} repeats on {settings.device}: expected up to "
                 f"{expected / 60:.1f} min ...")
        return {name: repeated_classifier_test(x_ref, x_gen, preset, settings.repeats,
                                               settings.seed, settings.device, pair.dataset,
                                               pair.progress)}

    return metric


def _low_level(pair: _Comparison) -> tuple[LowLevelInputs, LowLevelInputs]:
    return pair.both(LowLevelInputs)


def _low_level_normed(pair: _Comparison) -> tuple[np.ndarray, np.ndarray]:
    return pair.both(lambda showers, energies: classifier_low_level_normed_inputs(
        showers, energies, pair.geometry))


def _metric_fpd(pair: _Comparison) -> dict[str, Any]:
    pair.log("FPD (jetnet definition) ...")
    value, error = fpd(*pair.high_level)
    return {"fpd_x1e3": {"value": 1e3 * value, "error": 1e3 * error,
                         "features": HIGH_LEVEL_FEATURES, "definition": FPD_DEFINITION,
                         **pair.sizes()}}


def _metric_kpd(pair: _Comparison) -> dict[str, Any]:
    pair.log("KPD (jetnet definition) ...")
    value, error = kpd(*pair.high_level)
    return {"kpd_x1e3": {"value": 1e3 * value, "error": 1e3 * error,
                         "features": HIGH_LEVEL_FEATURES, "definition": KPD_DEFINITION,
                         **pair.sizes()}}


def _metric_prdc(pair: _Comparison) -> dict[str, Any]:
    pair.log("precision / recall / density / coverage ...")
    return {"prdc": _prdc(*pair.high_level, pair.settings.seed)}


# Every metric ``caloforge evaluate --metrics`` offers, in the order they run: name -> a
# function of the comparison returning its entries of metrics.json. Adding a metric is one
# function and one line here.
METRIC_FUNCTIONS: dict[str, Callable[[_Comparison], dict[str, Any]]] = {
    "hist": _metric_histograms,
    "cls-low": _classifier_metric("cls-low", _low_level),
    "cls-low-normed": _classifier_metric("cls-low-normed", _low_level_normed),
    "cls-high": _classifier_metric("cls-high", lambda pair: pair.high_level),
    "fpd": _metric_fpd,
    "kpd": _metric_kpd,
    "prdc": _metric_prdc,
}
METRICS = tuple(METRIC_FUNCTIONS)
CLASSIFIER_METRICS = ("cls-low", "cls-low-normed", "cls-high")


def check_report_folder(output_dir: str) -> None:
    """Refuse an output folder that a report may not replace: a file, or a folder that
    holds anything but an earlier report (a report replaces its folder as a whole)."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise OptionError(f"{output_dir}: exists and is not a folder; a report is a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and \
            not os.path.exists(os.path.join(output_dir, "metrics.json")):
        raise OptionError(f"{output_dir}: holds files that are not a caloforge report (no "
                          "metrics.json); a report replaces its folder as a whole: name a new "
                          "folder or an earlier report's")


def evaluate_samples(reference: ShowerData, generated: ShowerData, geometry: Geometry,
                     output_dir: str, settings: EvaluationSettings,
                     progress: Callable[..., Any] | None = None,
                     log: Callable[[str], None] = print, own_showers: bool = False
                     ) -> dict[str, Any]:
    """Compute the metrics of ``settings``, write the report into ``output_dir``, return them.

    ``own_showers``: the caller hands the two samples' shower arrays over (the CLI, which
    read them for this): voxels under the threshold are zeroed in them in place instead of
    in a copy.

    Every number in ``metrics.json`` sits beside the definition that produced it (classifier
    preset with any overrides, split sizes and precision; FPD/KPD/PRDC definitions and sample
    sizes; the binning of each separation power).
    """
    settings.validate()
    check_report_folder(output_dir)
    started = time.perf_counter()
    dataset = calochallenge_dataset(geometry)
    preset = get_preset(settings.classifier_preset, settings.classifier_width,
                        settings.classifier_epochs)
    if set(CLASSIFIER_METRICS) & set(settings.metrics):  # refuse too small samples first
        split_sizes(len(reference), len(generated), preset, dataset,
                    labels=(settings.extra.get("reference_file", "the reference"),
                            settings.extra.get("generated_file", "the generated sample")))
    threshold = geometry.threshold_mev if settings.threshold_mev is None else settings.threshold_mev
    result: dict[str, Any] = {
        "caloforge_version": __version__, "geometry": geometry.name,
        "calochallenge_dataset": dataset,
        "n_reference": len(reference), "n_generated": len(generated),
        "threshold_mev": threshold,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "extra"},
        **settings.extra,
    }
    # the report replaces an earlier one in output_dir as a unit: never old and new files mixed
    with atomic_directory(output_dir) as staging:
        pair = _Comparison(reference, generated, geometry, settings, staging, progress, log,
                           threshold, dataset, preset, own_showers=own_showers)
        for name, metric in METRIC_FUNCTIONS.items():
            if name in settings.metrics:
                result.update(metric(pair))
        result["wall_time_s"] = round(time.perf_counter() - started, 2)
        result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
        write_json_atomic(os.path.join(staging, "metrics.json"), result)
        write_html_report(os.path.join(staging, "report.html"), result, pair.images)
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
                output_dir: str | None, labels: tuple[str, str]
                ) -> tuple[dict[str, float], dict[str, str], list[tuple[str, str]]]:
    """Separation power of every feature and the voxel spectrum, their binning ("official"
    fixed ranges for the CaloChallenge datasets where the official plots have one, else
    "quantile"), and the PNGs (none when ``output_dir`` is None)."""
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
    images: list[tuple[str, str]] = []
    if output_dir is None:
        return separation, binning, images
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
