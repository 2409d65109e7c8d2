"""``python -m caloforge`` (and ``torchrun ... -m caloforge``): the command line."""

import sys

from .cli import main

sys.exit(main())
