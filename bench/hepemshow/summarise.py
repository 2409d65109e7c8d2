"""Print the simulator-vs-G4HepEm comparison recorded by compare_simulator.py as markdown.

    python bench/hepemshow/summarise.py [bench/hepemshow/results/simulator-vs-g4hepem.json]

One row per target measure and label (before / after ...), then the largest separation
power of each high-level feature group and the per-energy-bin facts of the last label.
"""

from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def feature_groups(powers: dict) -> dict[str, float]:
    groups: dict[str, float] = {}
    for name, value in powers.items():
        if isinstance(value, (int, float)):
            group = re.sub(r"_L\d+$", "", name)
            groups[group] = max(groups.get(group, 0.0), value)
    return groups


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        HERE, "results", "simulator-vs-g4hepem.json")
    with open(path) as handle:
        results = json.load(handle)
    labels = list(results)
    print("| measure (target) | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    targets = next(iter(results.values()))["targets"]
    rows = [("AUC low-level", "auc_low"), ("AUC high-level", "auc_high"),
            ("worst visible fraction, relative", "worst_visible_fraction_rel"),
            ("worst resolution, relative", "worst_resolution_rel"),
            ("worst centre of gravity, layers", "worst_cog_layers"),
            ("hit median, relative", "hit_median_rel"), ("MIP peak, relative", "mip_peak_rel")]
    for title, key in rows:
        cells = []
        for label in labels:
            entry = results[label]
            if key.startswith("auc"):
                auc = entry.get("auc", {}).get("cls-" + key[4:])
                cells.append(f"{auc['auc_mean']:.4f} ± {auc['auc_std']:.4f}" if auc else "–")
            else:
                cells.append(f"{entry['measures'][key]:+.3f}")
        print(f"| {title} (≤ {targets[key]:g}) | " + " | ".join(cells) + " |")
    print("\n| feature group: largest separation power | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    groups = [feature_groups(results[label].get("separation_power") or {}) for label in labels]
    for name in groups[0]:
        print(f"| {name} | " + " | ".join(f"{g.get(name, float('nan')):.3f}" for g in groups)
              + " |")
    last = results[labels[-1]]
    print(f"\n| E bin (GeV) | visible fraction G4HepEm / sim ({labels[-1]}) | resolution | "
          "centre of gravity (layer) | last-layer share (%) | voxels hit |")
    print("|---|---|---|---|---|---|")
    for ref, sim in zip(last["g4hepem_facts"]["energy_bins"],
                        last["simulator_facts"]["energy_bins"]):
        print(f"| {ref['e_lo_mev'] / 1e3:.1f}–{ref['e_hi_mev'] / 1e3:.1f} | "
              f"{ref['visible_fraction']:.4f} / {sim['visible_fraction']:.4f} | "
              f"{ref['resolution']:.3f} / {sim['resolution']:.3f} | "
              f"{ref['cog_layer']:.2f} / {sim['cog_layer']:.2f} | "
              f"{100 * ref['last_layer_share']:.2f} / {100 * sim['last_layer_share']:.2f} | "
              f"{ref['occupancy']:.3f} / {sim['occupancy']:.3f} |")
    for key in ("hit_percentiles_mev", "mip_peak_mev", "hits_below_0.1_mev"):
        print(f"\n{key}: G4HepEm {last['g4hepem_facts'][key]}; simulator "
              f"{last['simulator_facts'][key]}")


if __name__ == "__main__":
    main()
