"""Exported graphs against the torch model: agreement on 10,000 showers and sampling cost.

Usage: python bench/bench_export.py RUN_DIR [RUN_DIR ...] [--n 10000] [--out bench-output/export]
           [--batch-sizes 1,100,10000] [--like REF.h5] [--float64] [--skip-timing]
           [--chunk 1000] [--reuse-exports]

For every run directory (a model that exports: caloflow-student, calogan, wgan):
`caloforge export` to ONNX and to TorchScript; the exported graphs and the torch model
(`SamplingGraph`, i.e. what `caloforge generate` computes) on the same --n inputs of the
training range: largest deviation relative to each shower's largest voxel for onnxruntime
and for torch.jit.load, how many showers exceed 1e-4, and how many voxels rounding moved
across the readout threshold (zero on one side only); then `caloforge bench-sampling` of
the run directory (torch; --like gives the conditions of a model that needs them) and of
the ONNX file (onnxruntime), 1 thread, at --batch-sizes. Prints one table and writes
OUT/figures.json.
Targets (issue): agreement within 1e-4 relative on 10,000 showers; onnxruntime on 1 thread
at batch 1 no slower than torch at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from pipeline import bench_sampling, caloforge, save_json, verdict


def agreement(run_dir: str, onnx_file: str, torchscript_file: str, n: int,
              float64: bool = False, chunk: int = 1000) -> dict:
    """Largest relative deviation of each exported graph from the torch graph on ``n``
    showers (in chunks of ``chunk``: every graph runs a chunk in one call, so large
    models need small chunks to fit in memory): over every voxel, and without the voxels that float
    rounding puts on the other side of the readout cut (counted). With ``float64``, also
    the deviation of the torch graph and of onnxruntime from the same torch graph run in
    float64 (how far float32 itself is from the exact result: where the torch model is
    as far off as onnxruntime, the disagreement is the model's conditioning, not the
    export)."""
    import copy

    import torch

    from caloforge.export import (
        SamplingGraph,
        agreement,
        example_inputs,
        layout_for,
        onnx_session,
        relative_deviation,
    )
    from caloforge.models import load_model

    model = load_model(run_dir)
    graph = SamplingGraph(model, layout_for(model)).eval()
    scripted = torch.jit.load(torchscript_file)
    session = onnx_session(onnx_file)  # once: a large graph takes minutes to load
    inputs = example_inputs(model, graph.layout, n, seed=3)
    names = ("onnxruntime", "torchscript")
    worst = dict.fromkeys(names, 0.0)  # every voxel
    worst_kept = dict.fromkeys(names, 0.0)  # voxels not rounded across the cut
    over = dict.fromkeys(names, 0)  # showers beyond 1e-4, every voxel
    flips = dict.fromkeys(names, 0)  # voxels rounded across the cut
    exact = copy.deepcopy(graph).double() if float64 else None
    from_exact = {"torch": 0.0, "onnxruntime": 0.0}  # without cut flips
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = inputs[start:start + chunk]
            expected = graph(torch.from_numpy(part)).numpy()
            produced = {"onnxruntime": session.run(None, {"inputs": part})[0],
                        "torchscript": scripted(torch.from_numpy(part)).numpy()}
            if exact is not None:
                reference = exact(torch.from_numpy(part).double()).numpy()
                for name, values in (("torch", expected),
                                     ("onnxruntime", produced["onnxruntime"])):
                    from_exact[name] = max(from_exact[name], agreement(values, reference)[0])
            for name, values in produced.items():
                worst[name] = max(worst[name], relative_deviation(values, expected))
                over[name] += sum(relative_deviation(values[i:i + 1], expected[i:i + 1])
                                  > 1e-4 for i in range(len(part)))
                deviation, flipped = agreement(values, expected)
                worst_kept[name] = max(worst_kept[name], deviation)
                flips[name] += flipped
    return {"family": model.family, "geometry": model.geometry.name, "showers": n,
            "max_relative_deviation": worst, "showers_beyond_1e-4": over,
            "max_relative_deviation_without_cut_flips": worst_kept,
            "voxels_rounded_across_the_cut": flips,
            **({"max_relative_deviation_from_float64": from_exact} if float64 else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", default="bench-output/export")
    parser.add_argument("--batch-sizes", default="1,100,10000")
    parser.add_argument("--float64", action="store_true",
                        help="also compare torch and onnxruntime with the torch graph in "
                             "float64 (doubles the agreement step's cost)")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="showers per call in the agreement step (smaller: less memory)")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="keep exported files already in --out instead of exporting again")
    parser.add_argument("--skip-timing", action="store_true",
                        help="agreement only (no bench-sampling)")
    parser.add_argument("--like", default=None,
                        help="shower file whose conditions the torch timing uses (models "
                             "conditioned on more than the energy)")
    args = parser.parse_args()
    rows = []
    for run_dir in args.run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        onnx_file, torchscript_file = f"{args.out}/{name}.onnx", f"{args.out}/{name}.pt"
        os.makedirs(args.out, exist_ok=True)
        for form, path in (("onnx", onnx_file), ("torchscript", torchscript_file)):
            if not (args.reuse_exports and os.path.exists(path)):
                caloforge("export", run_dir, "--format", form, "-o", path)
        row = agreement(run_dir, onnx_file, torchscript_file, args.n, args.float64,
                        args.chunk)
        rows.append(row)
        # written at once: the timing after it can take long (and was once OOM-killed)
        print(json.dumps(row), flush=True)
        save_json(f"{args.out}/figures.json", rows)
        if args.skip_timing:
            continue
        row["torch_ms_per_shower"] = {b: round(ms, 4) for (_, b), ms in bench_sampling(
            run_dir, f"{args.out}/{name}-torch.json", "1", args.batch_sizes,
            like=args.like).items()}
        row["onnxruntime_ms_per_shower"] = {b: round(ms, 4) for (_, b), ms in bench_sampling(
            onnx_file, f"{args.out}/{name}-onnxruntime.json", "1", args.batch_sizes).items()}
        print(json.dumps(row), flush=True)
        save_json(f"{args.out}/figures.json", rows)
    if args.skip_timing:
        return 0
    print("\n| model | geometry | max rel. deviation ORT / TorchScript | ms/shower torch | "
          "ms/shower onnxruntime | (1 thread, batch " + args.batch_sizes + ") |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        worst = row["max_relative_deviation"]
        torch_ms, ort_ms = row["torch_ms_per_shower"], row["onnxruntime_ms_per_shower"]
        print(f"| {row['family']} | {row['geometry']} | {worst['onnxruntime']:.2g} / "
              f"{worst['torchscript']:.2g} | {' / '.join(f'{v:.3g}' for v in torch_ms.values())}"
              f" | {' / '.join(f'{v:.3g}' for v in ort_ms.values())} | |")
        smallest = min(torch_ms)
        print(f"  agreement {verdict(max(worst.values()), 1e-4)} (<= 1e-4); onnxruntime at "
              f"batch {smallest} {ort_ms[smallest]:.3g} ms vs torch {torch_ms[smallest]:.3g} "
              f"ms: {verdict(ort_ms[smallest], torch_ms[smallest])}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
