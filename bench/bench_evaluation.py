"""Cost of the full `fast` evaluation: 50,000 vs 50,000 calochallenge-1-photons showers.

Usage: python bench/bench_evaluation.py [--n 50000] [--out bench-output/eval]

Simulates two independent reference samples (seeds 1 and 2), then times the complete
evaluation (histograms, low- and high-level classifier with the fast preset and 3 repeats,
FPD, KPD) exactly as `caloforge evaluate` runs it. Target: under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from caloforge.data import ShowerData
from caloforge.evaluation import EvaluationSettings, evaluate_samples, format_summary
from caloforge.geometry import get_geometry
from caloforge.simulator import SimulationPlan, iter_simulated_chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-output/eval")
    args = parser.parse_args()
    geometry = get_geometry("calochallenge-1-photons")
    samples = []
    for seed in (1, 2):
        plan = SimulationPlan.from_options(geometry.name, args.n, seed=seed)
        samples.append(ShowerData.concatenate(list(iter_simulated_chunks(plan, workers=2))))
    settings = EvaluationSettings(classifier_preset="fast", repeats=args.repeats)
    start = time.perf_counter()
    result = evaluate_samples(samples[0], samples[1], geometry, args.out, settings)
    seconds = time.perf_counter() - start
    print(format_summary(result))
    verdict = "meets" if seconds < 300 else "MISSES"
    print(f"full fast evaluation of {args.n} vs {args.n} showers: {seconds:.1f} s on "
          f"{os.cpu_count()} cores (target < 300 s: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
