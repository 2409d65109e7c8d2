"""Issue 28: a trained convflow run re-saved with other after-training options.

The options that act after training: the sampling ``temperature`` (the voxel flows' base
noise is drawn with this standard deviation), ``postprocess`` (none, spline,
layer-spline or group-spline; docs/convflow.md), ``hit_calibration_groups``,
``hit_calibration_bins``, ``hit_calibration_showers``, ``symmetrise``, ``hit_counts``,
``hit_count_showers``, ``postprocess_energy``, ``core_fraction`` (and its radius),
``core_split``, ``ring_spread``, ``postprocess_showers`` and ``layer_hits`` (and its
showers). The hit
cuts and the post-processing spline(s), which are fitted to the model's own samples, are
fitted again on the first training showers, exactly as after training (``end_fit``),
unless only ``symmetrise``, ``postprocess_energy``, ``core_fraction``, ``ring_spread``
or ``core_split`` change (they act after them; the core fraction, the rings' spread and
the core split are then fitted alone, in that order):

    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --temperature 0.9 -o RUN-T09
    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --postprocess layer-spline \
        -o RUN-LS
    python bench/recalibrate_convflow.py RUN --symmetrise d4 -o RUN-D4
    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --ring-spread calibrated \
        -o RUN-RS
    python bench/recalibrate_convflow.py RUN --train TRAIN.h5 --layer-energy-range fit \
        -o RUN-C   # a run saved before the energy flow's clamp: fit its range

The new run directory then generates and evaluates with the ordinary commands.
"""

from __future__ import annotations

import argparse

from recalibration import (
    add_layer_energy_range_option,
    fit_layer_energy_range,
    open_run,
    run_main,
)

from caloforge.core_fraction import CORE_FRACTIONS, HIT_REGRESSORS
from caloforge.data import ShowerStream, read_showers
from caloforge.hit_counts import HIT_COUNTS
from caloforge.models.flows.convflow import (
    CORE_SPLITS,
    CUT_GROUPS,
    LAYER_HITS,
    POSTPROCESS_ENERGIES,
    SYMMETRIES,
    ConvL2LFlow,
)
from caloforge.ring_spread import RING_SPREADS


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
    parser.add_argument("--postprocess-energy", choices=POSTPROCESS_ENERGIES, default=None)
    parser.add_argument("--core-split", choices=CORE_SPLITS, default=None)
    parser.add_argument("--core-fraction", choices=CORE_FRACTIONS, default=None)
    parser.add_argument("--core-fraction-radius", type=float, default=None)
    parser.add_argument("--core-fraction-hits", choices=tuple(HIT_REGRESSORS), default=None,
                        help="the hit counts the core maps also condition on: the layer's "
                        "or each map's core's and rest's")
    parser.add_argument("--ring-spread", choices=RING_SPREADS, default=None)
    parser.add_argument("--hit-count-showers", type=int, default=None)
    parser.add_argument("--layer-hits", choices=LAYER_HITS, default=None)
    parser.add_argument("--layer-hit-showers", type=int, default=None)
    parser.add_argument("--postprocess-showers", type=int, default=None)
    add_layer_energy_range_option(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", required=True, help="new run directory")
    args = parser.parse_args()
    model = open_run(args, ConvL2LFlow)
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
                                             ("core_split", args.core_split),
                                             ("core_fraction", args.core_fraction),
                                             ("core_fraction_radius",
                                              args.core_fraction_radius),
                                             ("core_fraction_hits", args.core_fraction_hits),
                                             ("ring_spread", args.ring_spread),
                                             ("hit_count_showers", args.hit_count_showers),
                                             ("layer_hits", args.layer_hits),
                                             ("layer_hit_showers", args.layer_hit_showers),
                                             ("postprocess_showers",
                                              args.postprocess_showers))
               if value is not None}
    ranged = fit_layer_energy_range(model, args)
    if not changes and not ranged:
        parser.error("nothing to change: give --temperature, --postprocess, "
                     "--hit-calibration-groups, --hit-calibration-bins, --hit-counts, "
                     "--symmetrise, --layer-energy-range and/or the core options")
    after_all = {"symmetrise", "postprocess_energy", "core_split", "core_fraction",
                 "core_fraction_radius", "core_fraction_hits", "ring_spread",
                 "postprocess_showers"}  # act last
    refit = not set(changes) <= after_all
    model.config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    config = model.config
    # the rest as fitted: only the core fraction and/or split, on the final pipeline
    fraction_only = not refit and config.core_fraction != "none" and bool(
        {"core_fraction", "core_fraction_radius", "core_fraction_hits", "postprocess_showers"}
        & set(changes))
    spread_only = not refit and config.ring_spread != "none" and (
        fraction_only or bool({"ring_spread", "postprocess_showers"} & set(changes)))
    core_only = not refit and config.core_split != "none" and (
        fraction_only or spread_only or "core_split" in changes)
    if (refit or core_only or fraction_only or spread_only) and not args.train:
        parser.error("refitting the hit cuts, counts, splines or core maps needs --train")
    if fraction_only or spread_only or core_only:
        reference = read_showers(args.train, model.geometry,
                                 max_showers=config.postprocess_showers)
        mapped = model.fit_core_fraction(reference) if fraction_only else None
        if spread_only:
            mapped = model.fit_ring_spread(reference, generated=mapped)
        if core_only:
            model.fit_core_split(reference, generated=mapped)
    if refit:
        showers = max(config.hit_calibration_showers, config.postprocess_showers,
                      config.hit_count_showers if config.hit_counts != "none" else 0,
                      config.layer_hit_showers if config.layer_hits != "none" else 0)
        # streamed: the fits read only the showers each needs (layer_hits: 20,000 layer sums)
        with ShowerStream(args.train, model.geometry, max_showers=showers) as stream:
            model.end_fit(stream, args.output)
    model.save(args.output)
    done = ", hit cuts, counts and spline(s) refitted" if refit else "".join(
        text for text, fitted in ((", core fraction fitted", fraction_only),
                                  (", rings' spread fitted", spread_only),
                                  (", core split fitted", core_only)) if fitted)
    ranged_text = ", the energy flow's range fitted" if ranged else ""
    print(f"{args.output}: {changes}{done}{ranged_text}")
    return 0


if __name__ == "__main__":
    run_main(main)
