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


def run_main(main: Callable[[], int]) -> None:
    """Run a recalibration script's ``main``: a caloforge error (a wrong run, option or file)
    is one line on stderr and exit status 1, not a traceback."""
    try:
        raise SystemExit(main())
    except CaloforgeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

