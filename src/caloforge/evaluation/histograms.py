"""Feature histograms, separation power, and reference-vs-generated plots with ratio panels."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence

import numpy as np

from ..atomic import atomic_output
from ..features import _histogram, feature_bins, separation_power  # noqa: F401


def official_feature_bins(name: str, dataset: str, reference: np.ndarray,
                          threshold_mev: float) -> np.ndarray | None:
    """The official plots' bin edges for feature ``name`` of CaloChallenge ``dataset``
    (``evaluate_plotting_helper.py``), or None for a feature they have no fixed range for.

    E_tot/E_inc: 100 bins on [0.5, 1.5]; layer energies and the voxel spectrum: 39 / 49
    log bins from the threshold to the reference's maximum; centres of energy in x, y: 100
    bins on +-30 mm (datasets 2, 3), +-500 mm (dataset 1 layers 12, 13), else +-100 mm;
    widths: [0, 30], [0, 400], [0, 100] mm likewise.
    """
    fine = dataset in ("2", "3")
    hadronic = name.endswith(("_L12", "_L13"))
    if name == "E_tot/E_inc":
        return np.linspace(0.5, 1.5, 101)
    if name.startswith("E_L") or name == "voxel_energy":
        top = float(np.max(reference)) if reference.size else 0.0
        if threshold_mev <= 0 or top <= threshold_mev:
            return None
        return np.logspace(np.log10(threshold_mev), np.log10(top),
                           40 if name.startswith("E_L") else 50)
    if name.startswith(("EC_x_", "EC_y_")):
        limit = 30.0 if fine else 500.0 if hadronic else 100.0
        return np.linspace(-limit, limit, 101)
    if name.startswith(("width_x_", "width_y_")):
        limit = 30.0 if fine else 400.0 if hadronic else 100.0
        return np.linspace(0.0, limit, 101)
    return None


def plot_feature_group(path: str | os.PathLike[str], title: str, names: Sequence[str],
                       reference: dict[str, np.ndarray], generated: dict[str, np.ndarray],
                       bins: dict[str, np.ndarray], separation: dict[str, float],
                       labels: tuple[str, str] = ("reference", "generated"),
                       unclipped: Collection[str] = ()) -> None:
    """One PNG with a panel per feature: normalised histograms over a ratio (gen/ref) panel.

    Features in ``unclipped`` drop values outside their bins (official fixed ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(3.2 * cols, 3.0 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.55, wspace=0.35)
    for i, name in enumerate(names):
        inner = outer[i // cols, i % cols].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        ax, ax_ratio = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        edges = bins[name]
        clip = name not in unclipped
        h_ref = _histogram(reference[name], edges, clip)
        h_gen = _histogram(generated[name], edges, clip)
        ax.stairs(h_ref, edges, label=labels[0], color="black", fill=True, alpha=0.2)
        ax.stairs(h_gen, edges, label=labels[1], color="tab:red")
        ax.set_title(f"{name}\nS = {separation[name]:.4f}", fontsize=8)
        ax.tick_params(labelsize=6, labelbottom=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(h_ref > 0, h_gen / h_ref, np.nan)
        ax_ratio.stairs(ratio, edges, color="tab:red")
        ax_ratio.axhline(1.0, color="black", lw=0.6)
        ax_ratio.set_ylim(0.5, 1.5)
        ax_ratio.tick_params(labelsize=6)
        if edges[-1] / max(edges[0], 1e-30) > 20 and edges[0] > 0:
            ax.set_xscale("log")
            ax_ratio.set_xscale("log")
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10, y=1.0 + 0.12 / rows)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)


def voxel_spectrum_bins(reference: np.ndarray, threshold_mev: float) -> np.ndarray:
    """Log-spaced bins for positive voxel energies (MeV)."""
    positive = reference[reference > 0]
    lo = max(threshold_mev, float(positive.min()) if positive.size else 1e-3, 1e-6)
    hi = max(float(positive.max()) if positive.size else 1.0, lo * 10)
    return np.geomspace(lo, hi * 1.05, 61)
