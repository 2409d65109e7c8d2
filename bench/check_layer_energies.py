"""Issue 28: how well a layer-flow model's energy flow alone draws the layer energies.

    python bench/check_layer_energies.py RUN [RUN ...] --reference TEST.h5 [--n 3000] \\
        [--repeats 1] [--threads 2]

For each run (CaloFlow, iCaloFlow or convflow): the energy flow's layer energies for the
conditions of the first --n held-out showers (deposits under the readout threshold read as
empty layers, as generation makes them), against the held-out showers' own: the fast
classifier on the energy columns of the official high-level input (log10 E_inc,
log10(E_layer + 1e-8) per layer, log10 E_tot) and the largest per-layer separation power.
Prints JSON. Where this AUC is near the generated showers' own energy-column AUC
(bench/check_feature_groups.py), the energy flow, not the voxel flows, gives them away.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from caloforge.data import read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.features import apply_threshold, separation_power
from caloforge.models import load_model


def energy_columns(layer_energies: np.ndarray, incident: np.ndarray) -> np.ndarray:
    """``(N, L)`` MeV layer energies, ``(N,)`` MeV E_inc -> ``(N, L + 2)`` classifier input."""
    return np.column_stack([np.log10(incident), np.log10(layer_energies + 1e-8),
                            np.log10(layer_energies.sum(1) + 1e-8)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"reference": args.reference, "n": args.n, "runs": {}}
    for run in args.runs:
        model = load_model(run)
        geometry = model.geometry
        data = read_showers(args.reference, geometry, max_showers=args.n)
        threshold = model.voxel_transform.threshold_mev
        real = geometry.layer_energies(apply_threshold(data.showers, threshold),
                                       dtype=np.float64)
        with torch.inference_mode():
            spans, contexts, generator, layer_energies, _ = model._start_layer_sampling(
                data.incident_energies, data.conditions, 1, 0, 1000, "cpu")
        fake = layer_energies.double().numpy()
        fake = np.where(fake < threshold, 0.0, fake)
        result = repeated_classifier_test(energy_columns(real, data.incident_energies),
                                          energy_columns(fake, data.incident_energies),
                                          get_preset("fast"), repeats=args.repeats)
        logs = np.log10(real + 1e-8), np.log10(fake + 1e-8)
        powers = [separation_power(logs[0][:, i], logs[1][:, i],
                                   np.quantile(logs[0][:, i], np.linspace(0, 1, 31)))
                  for i in range(real.shape[1])]
        out["runs"][run] = {"energy_columns_auc": round(result["auc_mean"], 4),
                            "largest_layer_separation_power": round(float(max(powers)), 4),
                            "layer_of_largest": int(np.argmax(powers))}
        print(run, out["runs"][run], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
