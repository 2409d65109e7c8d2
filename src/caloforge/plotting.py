"""Pictures of showers: single showers and the average per layer, longitudinal and radial profiles.

Cylindrical layers are drawn as polar images over (angle, radial bin index) so that the fine
inner bins of CaloChallenge dataset 1 stay visible; Cartesian layers as images in mm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .atomic import atomic_output
from .geometry import CartesianLayer, CylindricalLayer, Geometry


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def choose_layers(geometry: Geometry, mean_layer_energy: np.ndarray, max_layers: int = 5
                  ) -> list[int]:
    """Up to ``max_layers`` layer positions to draw: all if few, else spread around the maximum."""
    if geometry.n_layers <= max_layers:
        return list(range(geometry.n_layers))
    significant = np.flatnonzero(mean_layer_energy > 0.01 * mean_layer_energy.max())
    lo, hi = ((significant.min(), significant.max()) if significant.size
              else (0, geometry.n_layers - 1))
    return sorted(set(np.linspace(lo, hi, max_layers).round().astype(int).tolist()))


def _draw_layer(fig, spec, layer, image: np.ndarray, vmin: float, vmax: float, title: str):
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=vmin, vmax=vmax)
    masked = np.ma.masked_less_equal(image, 0)
    if isinstance(layer, CylindricalLayer):
        ax = fig.add_subplot(spec, projection="polar")
        # a single angular bin spanning 2 pi is a degenerate quad: draw it as sub-bins
        repeat = max(1, 32 // layer.n_alpha)
        alpha_edges = np.linspace(-np.pi, np.pi, layer.n_alpha * repeat + 1)
        radial_edges = np.arange(layer.n_radial + 1)
        mesh = ax.pcolormesh(alpha_edges, radial_edges, np.repeat(masked, repeat, axis=0).T,
                             norm=norm, cmap="viridis")
        ax.set_yticklabels([])
        ax.set_xticklabels([])
        ax.grid(False)
    else:
        assert isinstance(layer, CartesianLayer)
        ax = fig.add_subplot(spec)
        extent = (layer.x_edges()[0], layer.x_edges()[-1], layer.y_edges()[0], layer.y_edges()[-1])
        mesh = ax.imshow(masked, origin="lower", extent=extent, norm=norm, cmap="viridis",
                         aspect="auto", interpolation="nearest")
        ax.set_xlabel("x [mm]", fontsize=7)
        ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    return mesh


def plot_showers(showers: np.ndarray, incident_energies: np.ndarray, geometry: Geometry,
                 path: str | os.PathLike[str], n_examples: int = 3, title: str = "",
                 layers: Sequence[int] | None = None) -> None:
    """Save a PNG: ``n_examples`` single showers and the mean shower, layer by layer, plus
    the mean longitudinal profile and the mean radial profile.

    Args:
        showers: ``(N, n_voxels)`` MeV; incident_energies: ``(N,)`` MeV.
    """
    plt = _pyplot()
    showers = np.asarray(showers, dtype=np.float64)
    layer_energy = geometry.layer_energies(showers)
    mean_layer = layer_energy.mean(axis=0)
    chosen = list(layers) if layers is not None else choose_layers(geometry, mean_layer)
    n_examples = min(n_examples, len(showers))
    rows = n_examples + 1
    cols = len(chosen)
    fig = plt.figure(figsize=(2.3 * cols + 4.2, 2.2 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols + 3, width_ratios=[1] * cols + [0.08, 0.45, 1.9],
                            hspace=0.45, wspace=0.35)
    positive = showers[showers > 0]
    vmin = max(float(np.percentile(positive, 5)) if positive.size else 1e-3, 1e-4)
    vmax = max(float(showers.max()), vmin * 10)
    mean_shower = showers.mean(axis=0)
    mesh = None
    for row in range(rows):
        shower = mean_shower if row == n_examples else showers[row]
        images = geometry.split_layers(shower[None])
        for col, position in enumerate(chosen):
            layer = geometry.layers[position]
            label = (f"mean, layer {layer.layer_id}" if row == n_examples else
                     f"E={incident_energies[row] / 1000:.3g} GeV, layer {layer.layer_id}")
            mesh = _draw_layer(fig, grid[row, col], layer, images[position][0], vmin, vmax, label)
    if mesh is not None:
        colorbar = fig.colorbar(mesh, cax=fig.add_subplot(grid[:, cols]))
        colorbar.set_label("voxel energy [MeV]", fontsize=8)

    half = max(rows // 2, 1)
    ax = fig.add_subplot(grid[:half, cols + 2])
    if geometry.n_layers > 1:
        ax.step(np.arange(geometry.n_layers), mean_layer, where="mid")
        ax.set_yscale("log")
        ax.set_xlabel("layer position", fontsize=8)
        ax.set_ylabel("mean energy [MeV]", fontsize=8)
        ax.set_title("longitudinal profile", fontsize=9)
    else:  # one readout layer: show the response instead
        ax.hist(showers.sum(axis=1) / incident_energies, bins=50, histtype="step")
        ax.set_xlabel("E_dep / E_inc", fontsize=8)
        ax.set_ylabel("showers", fontsize=8)
        ax.set_title("response", fontsize=9)
    ax = fig.add_subplot(grid[half:, cols + 2])
    for position, image in zip(chosen, (geometry.split_layers(mean_shower[None])[p][0]
                                        for p in chosen)):
        radii, energy, edges = _radial_profile(geometry.layers[position], image)
        ax.step(radii, energy / np.diff(edges), where="mid",
                label=f"layer {geometry.layers[position].layer_id}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=6)
    ax.set_xlabel("r [mm]", fontsize=8)
    ax.set_ylabel("mean dE/dr [MeV/mm]", fontsize=8)
    ax.set_title("radial profile", fontsize=9)
    fig.suptitle(title or f"{geometry.name}: {len(showers)} showers", fontsize=10)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def _radial_profile(layer, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, energy per bin, bin edges) of a layer image against radius in mm."""
    if isinstance(layer, CylindricalLayer):
        edges = np.asarray(layer.r_edges, dtype=float)
        energy = image.sum(axis=0)
    else:
        radii = layer.voxel_radii()
        edges = np.linspace(0.0, radii.max() * 1.001, min(layer.nx, layer.ny) // 2 + 2)
        energy, _ = np.histogram(radii, bins=edges, weights=image.ravel())
    centres = 0.5 * (edges[1:] + edges[:-1])
    centres[0] = max(centres[0], 0.5 * edges[1])
    return centres, energy, edges


def plot_average_comparison(reference: np.ndarray, generated: np.ndarray,
                            incident_energies: np.ndarray, geometry: Geometry,
                            path: str | os.PathLike[str], title: str = "",
                            labels: tuple[str, str] = ("reference", "generated")) -> None:
    """Save a PNG: the mean reference and the mean generated shower, layer by layer (one
    colour scale), and the E_tot/E_inc histograms of both.

    Args:
        reference, generated: ``(N, n_voxels)`` MeV with the same ``incident_energies`` ``(N,)``.
    """
    plt = _pyplot()
    means = [np.asarray(s, dtype=np.float64).mean(axis=0) for s in (reference, generated)]
    chosen = choose_layers(geometry, geometry.layer_energies(means[0][None])[0])
    cols = len(chosen)
    fig = plt.figure(figsize=(2.3 * cols + 3.6, 5.0))
    grid = fig.add_gridspec(2, cols + 3, width_ratios=[1] * cols + [0.08, 0.35, 1.6],
                            hspace=0.45, wspace=0.35)
    positive = means[0][means[0] > 0]
    vmin = max(float(positive.min()) if positive.size else 1e-3, 1e-4)
    vmax = max(float(max(m.max() for m in means)), vmin * 10)
    mesh = None
    for row, (label, mean) in enumerate(zip(labels, means)):
        images = geometry.split_layers(mean[None])
        for col, position in enumerate(chosen):
            layer = geometry.layers[position]
            mesh = _draw_layer(fig, grid[row, col], layer, images[position][0], vmin, vmax,
                               f"{label} mean, layer {layer.layer_id}")
    if mesh is not None:
        fig.colorbar(mesh, cax=fig.add_subplot(grid[:, cols])).set_label(
            "mean voxel energy [MeV]", fontsize=8)
    ax = fig.add_subplot(grid[:, cols + 2])
    e_inc = np.asarray(incident_energies, dtype=np.float64)
    ratios = [np.asarray(s, dtype=np.float64).sum(axis=1) / e_inc for s in (reference, generated)]
    lo, hi = np.quantile(ratios[0], [0.001, 0.999])
    bins = np.linspace(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), 50)
    for label, ratio in zip(labels, ratios):
        ax.hist(np.clip(ratio, bins[0], bins[-1]), bins=bins, histtype="step", label=label)
    ax.set_xlabel("E_tot / E_inc", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(title or geometry.name, fontsize=10)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)
