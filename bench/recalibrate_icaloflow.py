"""Issue 28: a trained iCaloFlow run (teacher or student) re-saved with other after-training
options: hit counts (``hit_counts``) and/or the core fraction map (``core_fraction``), and/or
the range the energy flow's draws are clamped into (``--layer-energy-range fit``, for runs
saved before it); the hit cuts kept as fitted:

    python bench/recalibrate_icaloflow.py RUN --train TRAIN.h5 --hit-counts layer \\
        --core-fraction rings [--core-fraction-radius 2] [--postprocess-showers 2000] \\
        [--hit-count-showers 5000] -o RUN-CF

Fitted as after training (``end_fit``): the count model on the first ``hit_count_showers``
training showers, then (where configured) the spectrum map and the core fraction map on the
model's showers for the first ``postprocess_showers`` training showers' conditions against
those showers. The new run directory then generates and evaluates with the ordinary
commands.
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
from caloforge.data import read_showers
from caloforge.hit_counts import HIT_COUNTS
from caloforge.models.flows.icaloflow import ICaloFlow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained icaloflow or icaloflow-student run")
    parser.add_argument("--train", required=True, help="its training file")
    parser.add_argument("--hit-counts", choices=HIT_COUNTS, default=None)
    parser.add_argument("--hit-count-showers", type=int, default=None)
    parser.add_argument("--core-fraction", choices=CORE_FRACTIONS, default=None)
    parser.add_argument("--core-fraction-radius", type=float, default=None)
    parser.add_argument("--core-fraction-hits", choices=tuple(HIT_REGRESSORS), default=None,
                        help="the hit counts the core maps also condition on: the layer's "
                        "or each map's core's and rest's")
    parser.add_argument("--postprocess-showers", type=int, default=None)
    add_layer_energy_range_option(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", required=True, help="new run directory")
    args = parser.parse_args()
    model = open_run(args, ICaloFlow)
    changes = {key: value for key, value in (
        ("hit_counts", args.hit_counts), ("hit_count_showers", args.hit_count_showers),
        ("core_fraction", args.core_fraction),
        ("core_fraction_radius", args.core_fraction_radius),
        ("core_fraction_hits", args.core_fraction_hits),
        ("postprocess_showers", args.postprocess_showers)) if value is not None}
    ranged = fit_layer_energy_range(model, args)
    if not changes and not ranged:
        parser.error("nothing to change: give --hit-counts, --core-fraction and/or "
                     "--layer-energy-range")
    if changes:
        refit_after_training(model, changes, args.train)
    model.save(args.output)
    print(f"{args.output}: {changes}" + (", the energy flow's range fitted" if ranged else ""))
    return 0


def refit_after_training(model: ICaloFlow, changes: dict, train: str) -> None:
    """The changed options set and what they act on fitted again on ``train``'s showers."""
    model.config = config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    counted = config.hit_counts != "none"
    reference = read_showers(train, model.geometry, max_showers=max(
        config.postprocess_showers, config.hit_count_showers if counted else 0))
    if "hit_counts" in changes or "hit_count_showers" in changes:
        model.hit_count_model = None
        if counted:
            model.fit_hit_counts(reference.select(slice(0, config.hit_count_showers)))
        if config.postprocess == "spline":
            model.fit_postprocess(reference.select(slice(0, config.postprocess_showers)))
    model.core_fraction_maps = None
    if config.core_fraction != "none":
        model.fit_core_fraction(reference.select(slice(0, config.postprocess_showers)))


if __name__ == "__main__":
    run_main(main)
