"""Time a run's core-fraction maps alone (issue 28): the layer loop of generation applied to
held-out showers, the maps one after the other and as the families apply them
(``apply_core_fraction_maps``: a nested ``profile`` chain ring by ring), and how far the two
differ.

    python bench/time_core_fraction_maps.py RUN HELDOUT.h5 [--n 100] [--threads 1]

Prints one JSON object: ms per shower at batch ``--n`` (best of 3), the largest cell
difference (MeV), the energy-weighted relative difference and whether the hit patterns are
equal.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from caloforge.core_fraction import apply_core_fraction_maps
from caloforge.data import read_showers
from caloforge.models import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("heldout")
    parser.add_argument("--n", type=int, default=100, help="showers (one batch)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run_dir)
    maps = getattr(model, "core_fraction_maps", None) or []
    data = read_showers(args.heldout, max_showers=args.n)
    cells = torch.from_numpy(data.showers.astype(np.float32))
    incident = torch.from_numpy(np.asarray(data.incident_energies, np.float32).reshape(-1))
    layers = torch.split(cells, list(model.geometry.layer_sizes), dim=1)
    energies = torch.stack([layer.sum(1) for layer in layers], dim=1)

    def one_after_the_other(layer_cells: torch.Tensor, layer: int) -> torch.Tensor:
        for fraction_map in maps:
            layer_cells = fraction_map.apply(layer_cells, layer, incident, energies)
        return layer_cells

    def as_applied(layer_cells: torch.Tensor, layer: int) -> torch.Tensor:
        return apply_core_fraction_maps(maps, layer_cells, layer, incident, energies)

    result: dict[str, object] = {"run": args.run_dir, "maps": len(maps), "showers": args.n,
                                 "threads": args.threads}
    outputs = {}
    with torch.inference_mode():
        for name, apply in (("one_after_the_other", one_after_the_other),
                            ("as_applied", as_applied)):
            times = []
            for _ in range(3):
                started = time.perf_counter()
                out = torch.cat([apply(part, i) for i, part in enumerate(layers)], dim=1)
                times.append(time.perf_counter() - started)
            outputs[name] = out
            result[f"ms_per_shower_{name}"] = round(1e3 * min(times) / args.n, 2)
    a, b = outputs["one_after_the_other"], outputs["as_applied"]
    result["max_abs_difference_mev"] = float((a - b).abs().max())
    result["relative_energy_difference"] = float((a - b).abs().sum() / a.sum())
    result["hit_patterns_equal"] = bool(((a > 0) == (b > 0)).all())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
