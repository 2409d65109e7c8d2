"""Reference simulator: voxel-energy spectra, speed per geometry, and the size targets.

Usage: python bench/bench_simulator.py [--quick] [--workers 2] [--out DIR]
           [--spectra docs/images/voxel-spectra.png] [--spectra-only]

Draws the hit-voxel energy spectrum of every built-in geometry (default particle and energy
mix; log axis, dN/dlog10 E as a share of the hits, the readout threshold and the expected
MIP peak marked) into --spectra, so that realism is judged at a glance; prints, for every
geometry, showers/s (one process), then the targets on this machine:
  * a dataset the size of CaloChallenge dataset 1 photons (121,000 showers, published
    energy mix up to 4 TeV), written to a file: target < 5 minutes;
  * 100,000 calochallenge-2 showers written to a file: target < 10 minutes;
  * 10,000 calochallenge-3 showers written to a file: target < 5 minutes and peak memory
    (largest resident set of the main process or any worker) < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from caloforge.geometry import available_geometries
from caloforge.simulator import SimulationPlan, iter_simulated_chunks, simulate_to_file


def peak_rss_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024 ** 2  # ru_maxrss is in KiB on Linux


def rate(geometry: str, n: int) -> float:
    plan = SimulationPlan.from_options(geometry, n, seed=1)
    start = time.perf_counter()
    for _ in iter_simulated_chunks(plan, workers=1):
        pass
    return n / (time.perf_counter() - start)


def to_file(geometry: str, n: int, workers: int, directory: str) -> dict:
    plan = SimulationPlan.from_options(geometry, n, seed=1)
    path = os.path.join(directory, f"{geometry}.h5")
    start = time.perf_counter()
    simulate_to_file(path, plan, workers=workers)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path) / 1024 ** 2
    os.remove(path)
    return {"geometry": geometry, "n": n, "workers": workers, "seconds": round(seconds, 1),
            "showers_per_s": round(n / seconds, 1), "file_mb": round(size, 1)}


def plot_voxel_spectra(path: str, label: str, quick: bool) -> dict:
    """One panel per geometry: hit-voxel spectrum, threshold and MIP peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from caloforge.detectors import get_detector

    names = available_geometries()
    figure, axes = plt.subplots(2, 4, figsize=(16, 7))
    summary = {}
    for axis, geometry in zip(axes.ravel(), names):
        n = 100 if geometry in ("calochallenge-3", "ild-ecal") else 1000
        plan = SimulationPlan.from_options(geometry, n // (5 if quick else 1), seed=3)
        showers = np.concatenate([chunk.showers for chunk in iter_simulated_chunks(plan)])
        hits = showers[showers > 0].astype(np.float64)
        detector = get_detector(geometry)
        readout = getattr(detector, "readout", None)
        mip = readout.mip_stored_mev if readout is not None else None
        threshold = detector.threshold_mev
        edges = np.logspace(np.log10(threshold) - 0.5, np.log10(hits.max()) + 0.1, 61)
        counts, _ = np.histogram(hits, bins=edges)
        axis.stairs(counts / len(hits), edges, color="tab:blue", fill=True, alpha=0.4)
        axis.set_xscale("log")
        axis.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3g}")
        if mip is not None:
            axis.axvline(mip, color="tab:red", lw=1, label=f"MIP peak {mip:.3g}")
        axis.set_title(f"{geometry} ({plan.particle}, {plan.n} showers)\n"
                       f"{(showers > 0).sum(1).mean():.0f} hits/shower", fontsize=9)
        axis.set_xlabel("voxel energy [MeV, as stored]", fontsize=8)
        axis.legend(fontsize=7)
        quarter = threshold * 10 ** (0.25 * np.arange(0, 41))
        shares = np.histogram(hits, bins=quarter)[0] / len(hits)
        summary[geometry] = {
            "hits_per_shower": round(float((showers > 0).sum(1).mean()), 1),
            "median_hit_mev": round(float(np.median(hits)), 4),
            "share_below_10x_threshold": round(float((hits < 10 * threshold).mean()), 4),
            "share_above_10_mev": round(float((hits > 10).mean()), 4),
            "quarter_decade_shares_from_threshold": [round(float(v), 4) for v in shares[:16]],
            "mip_peak_mev": mip}
    axes.ravel()[-1].axis("off")
    figure.suptitle(f"Hit-voxel energy spectra of the reference simulator ({label})")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    print(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--spectra", default="docs/images/voxel-spectra.png")
    parser.add_argument("--spectra-label", default="readout response: MIP crossings + soft "
                                                    "electrons")
    parser.add_argument("--spectra-only", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"cpu_count": os.cpu_count(), "rates_single_process": {}}
    results["spectra"] = plot_voxel_spectra(args.spectra, args.spectra_label, args.quick)
    if args.spectra_only:
        return 0
    print(f"{'geometry':<26}{'showers/s (1 process, default mix)':>36}")
    for geometry in available_geometries():
        n = 200 if geometry in ("calochallenge-3", "ild-ecal") else 2000
        r = rate(geometry, n // (10 if args.quick else 1))
        results["rates_single_process"][geometry] = round(r, 1)
        print(f"{geometry:<26}{r:>36.1f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        scale = 100 if args.quick else 1
        for geometry, n, target_s, target_gb in (("calochallenge-1-photons", 121_000, 300, None),
                                                 ("calochallenge-2", 100_000, 600, None),
                                                 ("calochallenge-3", 10_000, 300, 4.0)):
            result = to_file(geometry, n // scale, args.workers, tmp)
            result["peak_rss_gb_so_far"] = round(peak_rss_gb(), 2)
            verdict = "meets" if result["seconds"] < target_s / scale else "MISSES"
            print(f"{geometry}: {result['n']} showers to file in {result['seconds']} s "
                  f"({result['showers_per_s']}/s, {args.workers} workers, {result['file_mb']} MB); "
                  f"target < {target_s / scale:g} s: {verdict}"
                  + (f"; peak RSS {result['peak_rss_gb_so_far']} GB (target < {target_gb} GB)"
                     if target_gb else ""), flush=True)
            results[geometry] = result
    results["peak_rss_gb"] = round(peak_rss_gb(), 2)
    with open(os.path.join(args.out, "bench_simulator.json"), "w") as stream:
        json.dump(results, stream, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
