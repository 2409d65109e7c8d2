"""Reference simulator speed: showers per second per geometry, and the two issue targets.

Usage: python bench/bench_simulator.py [--quick] [--workers 2] [--out DIR]

Prints, for every built-in geometry, showers/s of the default particle and energy mix (one
process), then the two targets on this machine:
  * a dataset the size of CaloChallenge dataset 1 photons (121,000 showers, published
    energy mix up to 4 TeV), written to a file: target < 5 minutes;
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small samples only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench-output")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"cpu_count": os.cpu_count(), "rates_single_process": {}}
    print(f"{'geometry':<26}{'showers/s (1 process, default mix)':>36}")
    for geometry in available_geometries():
        n = 200 if geometry in ("calochallenge-3", "ild-ecal") else 2000
        r = rate(geometry, n // (10 if args.quick else 1))
        results["rates_single_process"][geometry] = round(r, 1)
        print(f"{geometry:<26}{r:>36.1f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        scale = 100 if args.quick else 1
        for geometry, n, target_s, target_gb in (("calochallenge-1-photons", 121_000, 300, None),
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
