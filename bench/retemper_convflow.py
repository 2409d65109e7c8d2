"""Issue 28: a trained convflow run re-saved with another sampling temperature.

The voxel flows' base noise is drawn with standard deviation ``temperature`` (convflow
option, docs/convflow.md); the hit cuts and the spline post-processing, which are fitted
to the model's own samples, are fitted again at the new temperature on the first training
showers, exactly as after training (``end_fit``):

    python bench/retemper_convflow.py RUN --train TRAIN.h5 --temperature 0.9 -o RUN-T09

The new run directory then generates and evaluates with the ordinary commands.
"""

from __future__ import annotations

import argparse
import os

import torch

from caloforge.data import read_showers
from caloforge.errors import OptionError
from caloforge.models import load_model
from caloforge.models.flows.convflow import ConvL2LFlow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained convflow run")
    parser.add_argument("--train", required=True, help="its training file")
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", required=True, help="new run directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.output, "model.json")):
        raise OptionError(f"{args.output}: already holds a model")
    model = load_model(args.run_dir)
    if not isinstance(model, ConvL2LFlow):
        raise OptionError(f"{args.run_dir}: a {model.family} model, not convflow")
    model.config = type(model.config).from_dict(
        {**model.config.to_dict(), "temperature": args.temperature})
    showers = max(model.config.hit_calibration_showers, model.config.postprocess_showers)
    model.end_fit(read_showers(args.train, model.geometry, max_showers=showers), args.output)
    model.save(args.output)
    print(f"{args.output}: temperature {args.temperature:g}, hit cuts and spline refitted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
