"""``python -m caloforge`` (and ``torchrun ... -m caloforge``): the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (e.g. by the docs' doctest collection)
    sys.exit(main())
