"""Deeper fuzzing of the input boundary than the suite runs: the same hypothesis tests
(tests/test_fuzz_inputs.py) with CALOFORGE_FUZZ_SCALE times more cases each.

Usage: python bench/fuzz.py [--scale 50]
Prints how many cases ran per test (pytest's hypothesis statistics) and exits non-zero on
any failure (a traceback or a changed target).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=50.0,
                        help="cases per test = the suite's number x this (default 50)")
    args = parser.parse_args()
    env = {**os.environ, "CALOFORGE_FUZZ_SCALE": str(args.scale)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "--hypothesis-show-statistics",
                            "tests/test_fuzz_inputs.py"], cwd=root, env=env)


if __name__ == "__main__":
    sys.exit(main())
