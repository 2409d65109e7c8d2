"""Peak training memory: iCaloFlow (one layer at a time) vs one CaloFlow Flow II over all voxels.

Usage: python bench/bench_flow_memory.py [--geometry calochallenge-2] [--steps 3]
           [--out bench-output/icaloflow/memory-calochallenge-2.json]

Each configuration runs in its own process: build the model on 1,000 simulated showers, run
``--steps`` training steps (forward, backward, AdamW) at the preset's batch size, and report
the process's peak resident memory (kernel accounting, ``os.wait4``), the parameter count and
the seconds per step. Configurations: iCaloFlow CPU preset; CaloFlow CPU preset (Flow II:
4 MADE blocks of 256 hidden units over every voxel); CaloFlow with the published Flow II
width (hidden layer as wide as the input, 8 blocks), whose weights alone are computed and,
when they exceed the machine's memory, reported as not fitting instead of being run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from caloforge.geometry import get_geometry
from caloforge.models import families
from caloforge.simulator import SimulationPlan, iter_simulated_chunks
from caloforge.data import ShowerData
family, preset, geometry_name, steps, overrides = sys.argv[1:6]
torch.set_num_threads(2)
geometry = get_geometry(geometry_name)
plan = SimulationPlan.from_options(geometry_name, 1000, seed=1)
data = ShowerData.concatenate(list(iter_simulated_chunks(plan)))
model_class = families()[family]
config = model_class.preset(preset)
for key, value in json.loads(overrides).items():
    section = getattr(config, key)
    for k, v in value.items():
        setattr(section, k, v)
model = model_class(geometry, config)
model.prepare_fit(data, False, "cpu")
optimiser = torch.optim.AdamW(model.module.parameters(), lr=1e-4)
tensors = model.to_tensors(data)
generator = torch.Generator().manual_seed(0)
batch_size = config.training.batch_size
start = None
for step in range(int(steps) + 1):
    if step == 1:
        start = time.perf_counter()  # the first step allocates; time the others
    batch = {k: v[step * batch_size:(step + 1) * batch_size] for k, v in tensors.items()}
    optimiser.zero_grad()
    model.loss(batch, generator).backward()
    optimiser.step()
print(json.dumps({"parameters": sum(p.numel() for p in model.module.parameters()),
                  "batch_size": batch_size,
                  "seconds_per_step": (time.perf_counter() - start) / int(steps)}))
"""


def measure(family: str, preset: str, geometry: str, steps: int, overrides: dict) -> dict:
    """Run one configuration in a fresh process; its figures and peak RSS in GB."""
    process = subprocess.Popen([sys.executable, "-c", CHILD, family, preset, geometry,
                                str(steps), json.dumps(overrides)], stdout=subprocess.PIPE,
                               text=True)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    result = json.loads(output.strip().splitlines()[-1]) if code == 0 else {"exit_status": code}
    result["peak_rss_gb"] = round(usage.ru_maxrss / 1024 ** 2, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="calochallenge-2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from caloforge.geometry import get_geometry

    geometry = get_geometry(args.geometry)
    n_voxels, n_layers = geometry.n_voxels, geometry.n_layers
    results: dict = {"geometry": args.geometry, "n_voxels": n_voxels}
    total_memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    context = 1 + n_layers

    def flow2_parameters(blocks: int, hidden: int) -> int:
        """Weights of a CaloFlow Flow II (MADE: inputs + context -> hidden -> 23 spline
        parameters per voxel)."""
        return blocks * ((n_voxels + context) * hidden + hidden * 23 * n_voxels)

    for name, family, weights_gb in (("icaloflow-cpu", "icaloflow", 0.0),
                                     ("caloflow-cpu", "caloflow",
                                      flow2_parameters(4, 256) * 4 / 1e9)):
        if 4 * weights_gb > 0.5 * total_memory_gb:  # weights, gradients, AdamW moments
            results[name] = {"skipped": f"Flow II weights alone {weights_gb:.1f} GB"}
            print(f"{name}: skipped, {results[name]['skipped']}", flush=True)
            continue
        print(f"{name}: {args.steps} training steps ...", flush=True)
        results[name] = measure(family, "cpu", args.geometry, args.steps, {})
        print(f"  {results[name]}", flush=True)
    # The published CaloFlow Flow II: a hidden layer as wide as the input, 8 blocks.
    parameters = flow2_parameters(8, n_voxels)
    weights_gb = parameters * 4 / 1e9
    results["caloflow-published-width"] = {
        "parameters": parameters, "weights_gb": round(weights_gb, 1),
        "weights_grads_adam_gb": round(4 * weights_gb, 1),
        "machine_memory_gb": round(total_memory_gb, 1),
        "fits": 4 * weights_gb < total_memory_gb}
    print(json.dumps(results, indent=2))
    out = args.out or f"bench-output/icaloflow/memory-{args.geometry}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as stream:
        json.dump(results, stream, indent=2)
    print(f"{args.geometry}: peak training memory iCaloFlow "
          f"{results['icaloflow-cpu'].get('peak_rss_gb')} GB vs CaloFlow (CPU preset) "
          f"{results['caloflow-cpu'].get('peak_rss_gb', 'not run')} GB; "
          "published-width CaloFlow Flow II needs "
          f"{4 * weights_gb:.0f} GB for weights, gradients and AdamW state alone "
          f"({'fits' if 4 * weights_gb < total_memory_gb else 'does not fit'} in "
          f"{total_memory_gb:.0f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
