"""What the recalibration scripts (``recalibrate_convflow.py``, ``recalibrate_icaloflow.py``)
share: opening the trained run to re-save and running a script's ``main`` so that a caloforge
error is one line and exit status 1. Each family's script keeps its own options."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from caloforge.data import read_showers
from caloforge.errors import CaloforgeError, OptionError
from caloforge.models import load_model


def open_run(args: argparse.Namespace, family: type[Any]) -> Any:
    """The model of ``args.run_dir`` (torch set to ``args.threads``); refused when it is
    not of ``family`` or ``args.output`` already holds a model."""
    torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.output, "model.json")):
        raise OptionError(f"{args.output}: already holds a model")
    model = load_model(args.run_dir)
    if not isinstance(model, family):
        raise OptionError(f"{args.run_dir}: a {model.family} model, not {family.family}")
    return model


def add_layer_energy_range_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer-energy-range", choices=["fit"], default=None,
                        help="fit the range the energy flow's draws are clamped into on the "
                        "training showers (runs saved before the clamp have none)")


def fit_layer_energy_range(model: Any, args: argparse.Namespace) -> bool:
    """With ``--layer-energy-range fit``: the clamp's range fitted on ``args.train``'s
    first 20,000 showers (all, if fewer; the u-space was fitted on the training split of
    such a file); whether it was."""
    if args.layer_energy_range != "fit":
        return False
    if not args.train:
        raise OptionError("--layer-energy-range fit needs --train")
    model.fit_layer_energy_range(read_showers(args.train, model.geometry, max_showers=20000))
    return True


def run_main(main: Callable[[], int]) -> None:
    """Run a recalibration script's ``main``: a caloforge error (a wrong run, option or file)
    is one line on stderr and exit status 1, not a traceback."""
    try:
        raise SystemExit(main())
    except CaloforgeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

