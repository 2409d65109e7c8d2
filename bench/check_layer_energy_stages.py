"""Issue 28: which step of a convflow model's sampling moves the layer energies.

    python bench/check_layer_energy_stages.py RUN --reference TEST.h5 [--n 3000] \\
        [--threads 1] [--seed 1] [-o OUT.json]

Draws showers for the first --n held-out showers' conditions once and records each layer's
energy (the cells at or above the readout threshold) after every step the model applies:
the energy flow's deposits (``flow``; under the threshold read as an empty layer), the
voxel flows' cells scaled to the deposit (``cells``), the calibrated cuts or hit counts
(``cuts``), the spline(s) (``spline``), each core-fraction map (``core_map_1``, ...) and
the core split (``split``); for convflow also the scaling to the drawn deposit (``drawn``) and
the core maps together (``core_maps``). For each: the fast classifier (one repeat) on the energy
columns of the official high-level input (log10 E_inc, log10(E_layer + 1e-8) per layer,
log10 E_tot) against the held-out showers', the share of showers with a hit in the first
layers, the mean layer energy over the reference's per layer, the mean and spread of the
summed layer energies over E_inc, and the first layers' mean hottest cell over the
reference's (0 for an empty layer, as ``check_ild_cores.py``), and the faint hits per
shower (at or above the threshold, below ``--faint-edge`` times it: ild-ecal 0.075-0.1 MeV).
Prints JSON. The step where the AUC jumps is the one that breaks the layer energies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from check_layer_energies import energy_columns

from caloforge.atomic import write_json_atomic
from caloforge.data import read_showers
from caloforge.evaluation.classifier import get_preset, repeated_classifier_test
from caloforge.features import apply_threshold
from caloforge.models import load_model
from caloforge.models.flows import convflow as convflow_module

FIRST_LAYERS = 4


def record_layers(method: Callable[..., torch.Tensor], name: str, threshold: float,
                  store: dict[str, list[np.ndarray]], hottest: dict[str, list[np.ndarray]],
                  faint: dict[str, list[np.ndarray]], faint_edge: float
                  ) -> Callable[..., torch.Tensor]:
    """``method`` (returns one layer's cells ``(B, S)`` MeV, called layer after layer),
    recording each call's layer energy above ``threshold`` under ``name`` in ``store``, its
    hottest cell (0 when none reaches it) in ``hottest`` and its hits below ``faint_edge``
    MeV in ``faint``."""
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        cells = method(*args, **kwargs)
        kept = torch.where(cells >= threshold, cells, torch.zeros_like(cells))
        store[name].append(kept.sum(1).double().cpu().numpy())
        hottest[name].append(kept.amax(1).double().cpu().numpy())
        faint[name].append(((cells >= threshold) & (cells < faint_edge)).sum(1).cpu().numpy())
        return cells
    return wrapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faint-edge", type=float, default=4 / 3,
                        help="faint hits: below this many times the threshold")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model: Any = load_model(args.run)
    geometry = model.geometry
    data = read_showers(args.reference, geometry, max_showers=args.n)
    threshold = model.voxel_transform.threshold_mev
    edge = args.faint_edge * threshold
    store: dict[str, list[np.ndarray]] = defaultdict(list)
    hottest: dict[str, list[np.ndarray]] = defaultdict(list)
    faint: dict[str, list[np.ndarray]] = defaultdict(list)  # per layer (B,) faint hits
    recorded = (store, hottest, faint, edge)

    flow1 = model._sample_flow1

    def flow_deposits(*a: Any, **k: Any) -> torch.Tensor:
        energies = flow1(*a, **k)
        store["flow"] = [e for e in torch.where(energies >= threshold, energies,
                                                torch.zeros_like(energies))
                         .double().cpu().numpy().T]
        return energies

    model._sample_flow1 = flow_deposits
    model._cells = record_layers(model._cells, "cells", threshold, *recorded)
    model._cut_calibrated = record_layers(model._cut_calibrated, "cuts", threshold, *recorded)
    model._postprocess = record_layers(model._postprocess, "spline", threshold, *recorded)
    for i, fraction_map in enumerate(model.core_fraction_maps or []):
        fraction_map.apply = record_layers(fraction_map.apply, f"core_map_{i + 1}",
                                           threshold, *recorded)
    model._split_core = record_layers(model._split_core, "split", threshold, *recorded)
    # the module-level steps between the spline and the split (one call per layer)
    for function, name in (("rescale_hits", "drawn"), ("apply_core_fraction_maps", "core_maps")):
        if hasattr(convflow_module, function):
            setattr(convflow_module, function, record_layers(
                getattr(convflow_module, function), name, threshold, *recorded))
    generated = model.sample(data.incident_energies, data.conditions, seed=args.seed)
    final_cells = apply_threshold(generated.showers, threshold)
    real_cells = apply_threshold(data.showers, threshold)
    final = geometry.layer_energies(final_cells, dtype=np.float64)
    real = geometry.layer_energies(real_cells, dtype=np.float64)
    real_mean = np.maximum(real.mean(0), 1e-12)
    first_cells = geometry.layer_slices[:FIRST_LAYERS]
    real_hottest = np.array([real_cells[:, cells].max(1).mean() for cells in first_cells])
    hottest["final"] = [final_cells[:, cells].max(1).astype(np.float64) for cells in first_cells]
    faint["final"] = [((final_cells >= threshold) & (final_cells < edge)).sum(1)]
    real_faint = float(((real_cells >= threshold) & (real_cells < edge)).sum(1).mean())
    stages: dict[str, Any] = {}
    for name, layers in [*store.items(), ("final", list(final.T))]:
        energies = np.stack(layers, axis=1)
        auc = repeated_classifier_test(energy_columns(real, data.incident_energies),
                                       energy_columns(energies, data.incident_energies),
                                       get_preset("fast"), repeats=1)["auc_mean"]
        ratio = energies.mean(0) / real_mean
        stages[name] = {"energy_columns_auc": round(float(auc), 4),
                        "hit_share_first_layers": (energies[:, :FIRST_LAYERS] > 0).mean(0)
                        .round(4).tolist(),
                        "mean_energy_over_reference_first_layers": ratio[:FIRST_LAYERS]
                        .round(3).tolist(),
                        "mean_energy_over_reference_range": [round(float(ratio.min()), 3),
                                                             round(float(ratio.max()), 3)]}
        response = energies.sum(1) / data.incident_energies
        stages[name]["e_tot_over_e_inc_mean_std"] = [round(float(response.mean()), 4),
                                                     round(float(response.std()), 4)]
        if faint.get(name):
            stages[name]["faint_hits_per_shower"] = round(float(
                np.sum(faint[name], axis=0).mean()), 1)
        if hottest.get(name):
            hot = np.stack(hottest[name][:FIRST_LAYERS], axis=1).mean(0)
            stages[name]["hottest_cell_over_reference_first_layers"] = \
                (hot / np.maximum(real_hottest, 1e-12)).round(3).tolist()
        print(name, stages[name], file=sys.stderr, flush=True)
    real_response = real.sum(1) / data.incident_energies
    out = {"run": args.run, "reference": args.reference, "n": args.n, "seed": args.seed,
           "reference_e_tot_over_e_inc_mean_std": [round(float(real_response.mean()), 4),
                                                   round(float(real_response.std()), 4)],
           "reference_faint_hits_per_shower": round(real_faint, 1),
           "reference_hit_share_first_layers": (real[:, :FIRST_LAYERS] > 0).mean(0)
           .round(4).tolist(), "stages": stages}
    if args.output:
        write_json_atomic(args.output, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
