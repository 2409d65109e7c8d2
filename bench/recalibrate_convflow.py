"""Issue 28: a trained convflow run re-saved with other after-training options.

The options that act after training: the sampling ``temperature`` (the voxel flows' base
noise is drawn with this standard deviation), ``postprocess`` (none, spline,
layer-spline or group-spline; docs/convflow.md), ``hit_calibration_groups``,
``hit_calibration_bins``, ``hit_calibration_showers``, ``symmetrise``, ``hit_counts``,
``hit_count_showers`` and ``postprocess_energy``. The hit cuts and
the post-processing spline(s), which are fitted to the model's own samples, are fitted
again on the first training showers, exactly as after training (``end_fit``), unless only
``symmetrise`` or ``postprocess_energy`` change (they act after them):

    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --temperature 0.9 -o RUN-T09
    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --postprocess layer-spline \
        -o RUN-LS
    python bench/recalibrate_convflow.py RUN --symmetrise d4 -o RUN-D4

The new run directory then generates and evaluates with the ordinary commands.
"""

from __future__ import annotations

import argparse
import os

import torch

from caloforge.data import read_showers
from caloforge.errors import OptionError
from caloforge.models import load_model
from caloforge.models.flows.convflow import CUT_GROUPS, HIT_COUNTS, SYMMETRIES, ConvL2LFlow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained convflow run")
    parser.add_argument("--train", help="its training file (for the refit)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--postprocess", choices=["none", "spline", "layer-spline", "group-spline"],
                        default=None)
    parser.add_argument("--hit-calibration-groups", choices=CUT_GROUPS, default=None)
    parser.add_argument("--hit-calibration-bins", type=int, default=None)
    parser.add_argument("--hit-calibration-showers", type=int, default=None)
    parser.add_argument("--symmetrise", choices=SYMMETRIES, default=None)
    parser.add_argument("--hit-counts", choices=HIT_COUNTS, default=None)
    parser.add_argument("--postprocess-energy", choices=["kept", "restored"], default=None)
    parser.add_argument("--hit-count-showers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", required=True, help="new run directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.output, "model.json")):
        raise OptionError(f"{args.output}: already holds a model")
    model = load_model(args.run_dir)
    if not isinstance(model, ConvL2LFlow):
        raise OptionError(f"{args.run_dir}: a {model.family} model, not convflow")
    changes = {key: value for key, value in (("temperature", args.temperature),
                                             ("postprocess", args.postprocess),
                                             ("hit_calibration_groups",
                                              args.hit_calibration_groups),
                                             ("hit_calibration_bins",
                                              args.hit_calibration_bins),
                                             ("hit_calibration_showers",
                                              args.hit_calibration_showers),
                                             ("symmetrise", args.symmetrise),
                                             ("hit_counts", args.hit_counts),
                                             ("postprocess_energy", args.postprocess_energy),
                                             ("hit_count_showers", args.hit_count_showers))
               if value is not None}
    if not changes:
        parser.error("nothing to change: give --temperature, --postprocess, "
                     "--hit-calibration-groups, --hit-calibration-bins, --hit-counts and/or "
                     "--symmetrise")
    refit = not set(changes) <= {"symmetrise", "postprocess_energy"}
    if refit and not args.train:
        parser.error("refitting the hit cuts and splines needs --train")
    model.config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    if refit:
        config = model.config
        showers = max(config.hit_calibration_showers, config.postprocess_showers,
                      config.hit_count_showers if config.hit_counts != "none" else 0)
        model.end_fit(read_showers(args.train, model.geometry, max_showers=showers),
                      args.output)
    model.save(args.output)
    print(f"{args.output}: {changes}{', hit cuts and spline(s) refitted' if refit else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
