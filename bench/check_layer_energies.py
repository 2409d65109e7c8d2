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

Also the far tail: showers with a layer above 1.5 times the reference's largest share of
E_inc in that layer, and each layer's mean energy over the reference's (the worst layer); for
a model whose energy flow has a fitted range (``LayerEnergyTransform.logit_min/max``) both
with the clamp and without it (``unclamped``), from the same draws.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from caloforge.data import ShowerData, read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.features import apply_threshold, separation_power
from caloforge.models import load_model


def energy_columns(layer_energies: np.ndarray, incident: np.ndarray) -> np.ndarray:
    """``(N, L)`` MeV layer energies, ``(N,)`` MeV E_inc -> ``(N, L + 2)`` classifier input."""
    return np.column_stack([np.log10(incident), np.log10(layer_energies + 1e-8),
                            np.log10(layer_energies.sum(1) + 1e-8)])


def energy_flow_draws(model: Any, data: ShowerData, threshold: float) -> np.ndarray:
    """The energy flow's layer energies ``(N, L)`` MeV for ``data``'s conditions (seed 0),
    deposits under the readout threshold as empty layers."""
    with torch.inference_mode():
        _, _, _, layer_energies, _ = model._start_layer_sampling(
            data.incident_energies, data.conditions, 1, 0, 1000, "cpu")
    fake = layer_energies.double().numpy()
    return np.where(fake < threshold, 0.0, fake)


def compare(real: np.ndarray, fake: np.ndarray, incident: np.ndarray, repeats: int) -> dict:
    """Classifier AUC, separation powers and the far tail of ``fake`` against ``real``
    layer energies ``(N, L)`` MeV."""
    result = repeated_classifier_test(energy_columns(real, incident),
                                      energy_columns(fake, incident),
                                      get_preset("fast"), repeats=repeats)
    logs = np.log10(real + 1e-8), np.log10(fake + 1e-8)
    powers = [separation_power(logs[0][:, i], logs[1][:, i],
                               np.quantile(logs[0][:, i], np.linspace(0, 1, 31)))
              for i in range(real.shape[1])]
    largest_share = (real / incident[:, None]).max(0)
    beyond = fake / incident[:, None] > 1.5 * largest_share
    mean_ratio = fake.mean(0) / np.maximum(real.mean(0), 1e-12)
    worst = int(np.argmax(np.abs(np.log(np.maximum(mean_ratio, 1e-12)))))
    return {"energy_columns_auc": round(result["auc_mean"], 4),
            "energy_columns_auc_std": round(result["auc_std"], 4),
            "largest_layer_separation_power": round(float(max(powers)), 4),
            "layer_of_largest": int(np.argmax(powers)),
            "showers_beyond_1p5x_largest_share": int(beyond.any(axis=1).sum()),
            "largest_over_reference_largest": round(float(
                (fake / incident[:, None] / np.maximum(largest_share, 1e-12)).max()), 2),
            "worst_layer_mean_ratio": [worst, round(float(mean_ratio[worst]), 3)]}


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
        transform = model.layer_transform
        ranges = {"": (transform.logit_min, transform.logit_max)}
        if transform.logit_max is not None:
            ranges["unclamped"] = (None, None)
        for name, (low, high) in ranges.items():
            transform.logit_min, transform.logit_max = low, high
            fake = energy_flow_draws(model, data, threshold)
            label = f"{run} {name}".strip()
            out["runs"][label] = compare(real, fake, data.incident_energies, args.repeats)
            print(label, out["runs"][label], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
