"""Issue 28: a trained iCaloFlow run (teacher or student) re-saved with its core fraction
calibrated (``core_fraction: calibrated``; the hit cuts and the spectrum map kept as fitted):

    python bench/recalibrate_icaloflow.py RUN --train TRAIN.h5 --core-fraction calibrated \\
        [--core-fraction-radius 2] [--postprocess-showers 2000] -o RUN-CF

The map is fitted, as after training (``end_fit``), on the model's showers for the first
``postprocess_showers`` training showers' conditions against those showers. The new run
directory then generates and evaluates with the ordinary commands.
"""

from __future__ import annotations

import argparse

from recalibrate_convflow import open_run

from caloforge.data import read_showers
from caloforge.models.flows.icaloflow import ICaloFlow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained icaloflow or icaloflow-student run")
    parser.add_argument("--train", required=True, help="its training file")
    parser.add_argument("--core-fraction", choices=["none", "calibrated"], required=True)
    parser.add_argument("--core-fraction-radius", type=float, default=None)
    parser.add_argument("--postprocess-showers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", required=True, help="new run directory")
    args = parser.parse_args()
    model = open_run(args, ICaloFlow)
    changes = {key: value for key, value in (
        ("core_fraction", args.core_fraction),
        ("core_fraction_radius", args.core_fraction_radius),
        ("postprocess_showers", args.postprocess_showers)) if value is not None}
    model.config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    model.core_fraction_map = None
    if model.config.core_fraction == "calibrated":
        model.fit_core_fraction(read_showers(args.train, model.geometry,
                                             max_showers=model.config.postprocess_showers))
    model.save(args.output)
    print(f"{args.output}: {changes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
