"""The reference simulator held against G4HepEm showers (real Geant4 electromagnetic physics).

Usage:
    python bench/hepemshow/compare_simulator.py --reference DATA/test.h5 --work DIR \
        [--n 20000] [--seed 1] [--label NAME] [--classifier-preset fast] [--threads 1] \
        [--facts-only] [--radial-scales 1,1,1] \
        [--results bench/hepemshow/results/simulator-vs-g4hepem.json]

Simulates the reference file's incident energies with caloforge's reference simulator
(geometry hepemshow-pbwo4-lar, electrons on the axis), then prints and records under
``--label`` in the results JSON (one entry per label; an entry is replaced when re-run):

* the physics facts of both samples per energy bin (visible fraction and resolution,
  centre of gravity, last-layer share, occupancy), the centre of gravity's fit against
  ln E, the hit-voxel percentiles and MIP peak, the radial containment
  (:mod:`caloforge.evaluation.shower_facts`) and the measures of the issue's targets;
* unless ``--facts-only``: ``caloforge evaluate``'s separation power of every high-level
  feature and the classifier AUCs, low and high level (report in ``WORK/eval-LABEL``).

The figures are the reference simulator's distance to G4HepEm on one detector, not a
generative model's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from caloforge.atomic import write_json_atomic
from caloforge.data import ShowerData, ShowerFile, write_showers
from caloforge.detectors import Detector, get_detector
from caloforge.evaluation.shower_facts import compare_facts, shower_facts
from caloforge.geometry import get_geometry
from caloforge.simulator import RESPONSE_MODEL, ReferenceSimulator

GEOMETRY = "hepemshow-pbwo4-lar"
HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"auc_high": 0.75, "auc_low": 0.90, "worst_visible_fraction_rel": 0.01,
           "worst_resolution_rel": 0.10, "worst_cog_layers": 0.5, "hit_median_rel": 0.20,
           "mip_peak_rel": 0.10}


def simulate_like(energies: np.ndarray, seed: int, detector: Detector | None = None,
                  chunk: int = 500) -> np.ndarray:
    """Reference-simulator showers ``(n, 8000)`` MeV for the incident energies ``(n,)`` MeV
    (``detector``: instead of the built-in one, to measure changes of it)."""
    simulator = ReferenceSimulator(GEOMETRY, detector=detector)
    rng = np.random.default_rng(seed)
    parts = [simulator.simulate(energies[i:i + chunk], rng=rng).showers
             for i in range(0, len(energies), chunk)]
    return np.concatenate(parts)


def print_facts(reference: dict, simulated: dict, measures: dict) -> None:
    print(f"{'E bin GeV':>12} {'visible fraction':>18} {'resolution':>14} {'CoG layer':>13} "
          f"{'last layer %':>13} {'occupancy':>13}")
    for ref, sim in zip(reference["energy_bins"], simulated["energy_bins"]):
        print(f"{ref['e_lo_mev'] / 1e3:5.1f}-{ref['e_hi_mev'] / 1e3:5.1f} "
              f"{ref['visible_fraction']:8.4f} {sim['visible_fraction']:8.4f} "
              f"{ref['resolution']:6.3f} {sim['resolution']:6.3f} "
              f"{ref['cog_layer']:6.2f} {sim['cog_layer']:6.2f} "
              f"{100 * ref['last_layer_share']:6.2f} {100 * sim['last_layer_share']:6.2f} "
              f"{ref['occupancy']:6.3f} {sim['occupancy']:6.3f}")
    for key in ("cog_vs_ln_e_gev", "hit_percentiles_mev", "hits_below_0.1_mev", "mip_peak_mev",
                "radial_containment"):
        print(f"{key}:\n  G4HepEm   {reference[key]}\n  simulator {simulated[key]}")
    print("measures:", {k: round(v, 4) for k, v in measures.items() if k != "energy_bins"})


def evaluate(reference: str, simulated: str, out_dir: str, preset: str, threads: int,
             n: int) -> dict:
    """``caloforge evaluate`` (histograms, low- and high-level classifier) of the two files."""
    caloforge = os.path.join(os.path.dirname(sys.executable), "caloforge")
    subprocess.run([caloforge, "evaluate", "--reference", reference, "--generated", simulated,
                    "--geometry", GEOMETRY, "--metrics", "hist,cls-low,cls-high",
                    "--classifier-preset", preset, "--max-showers", str(n),
                    "--threads", str(threads), "-o", out_dir, "--no-progress"], check=True)
    with open(os.path.join(out_dir, "metrics.json")) as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="G4HepEm shower file (held out)")
    parser.add_argument("--work", required=True, help="folder for the simulated file, reports")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label", default="current")
    parser.add_argument("--classifier-preset", default="fast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--facts-only", action="store_true")
    parser.add_argument("--radial-scales", default=None,
                        help="R_C,R_T,p_core factors instead of the detector's (e.g. 1,1,1)")
    parser.add_argument("--results", default=os.path.join(HERE, "results",
                                                          "simulator-vs-g4hepem.json"))
    args = parser.parse_args()
    geometry = get_geometry(GEOMETRY)
    with ShowerFile(args.reference, geometry) as reader:
        data = reader.read(0, args.n)
    started = time.perf_counter()
    scales = (tuple(float(v) for v in args.radial_scales.split(","))
              if args.radial_scales else None)
    detector = get_detector(GEOMETRY)
    if scales is not None:
        detector = replace(detector, radial_scales=scales)  # type: ignore[arg-type]
    simulated = simulate_like(data.incident_energies, args.seed, detector)
    seconds = time.perf_counter() - started
    os.makedirs(args.work, exist_ok=True)
    simulated_path = os.path.join(args.work, f"simulated-{args.label}.h5")
    write_showers(simulated_path, ShowerData(data.incident_energies, simulated), geometry)
    reference_facts = shower_facts(data.showers, data.incident_energies, geometry)
    simulated_facts = shower_facts(simulated, data.incident_energies, geometry)
    measures = compare_facts(reference_facts, simulated_facts)
    print(f"{len(simulated)} showers simulated in {seconds:.0f} s "
          f"({1e3 * seconds / len(simulated):.2f} ms/shower, 1 process)")
    print_facts(reference_facts, simulated_facts, measures)
    entry = {"command": " ".join(sys.argv), "n": len(simulated), "seed": args.seed,
             "detector": {"readout": asdict(detector.readout) if detector.readout else None,
                          "longitudinal_spread": detector.longitudinal_spread,
                          "radial_scales": list(detector.radial_scales)},
             "response_model": RESPONSE_MODEL, "simulator_ms_per_shower":
             round(1e3 * seconds / len(simulated), 2), "targets": TARGETS,
             "g4hepem_facts": reference_facts, "simulator_facts": simulated_facts,
             "measures": measures, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.facts_only:
        metrics = evaluate(args.reference, simulated_path, os.path.join(args.work,
                           f"eval-{args.label}"), args.classifier_preset, args.threads,
                           len(simulated))
        entry["auc"] = {key: metrics[key] for key in ("cls-low", "cls-high") if key in metrics}
        entry["separation_power"] = metrics.get("separation_power")
        print("AUC:", json.dumps(entry["auc"]))
    results = {}
    if os.path.exists(args.results):
        with open(args.results) as handle:
            results = json.load(handle)
    results[args.label] = entry
    write_json_atomic(args.results, results)
    print(f"recorded under {args.label!r} in {args.results}")


if __name__ == "__main__":
    main()
