"""Deeper fuzzing of the input boundary and deeper kill tests than the suite runs: the same
hypothesis tests (tests/test_fuzz_inputs.py) with CALOFORGE_FUZZ_SCALE times more cases
each, and the SIGKILL tests (tests/test_kill.py) at CALOFORGE_KILL_SEEDS random moments per
command.

Usage: python bench/fuzz.py [--scale 50] [--kill-seeds 10]
Prints how many cases ran per test (pytest's hypothesis statistics) and exits non-zero on
any failure (a traceback, a changed or half-written target, a stray temporary).
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
    parser.add_argument("--kill-seeds", type=int, default=10,
                        help="random kill moments per command (the suite: 2; default 10)")
    args = parser.parse_args()
    env = {**os.environ, "CALOFORGE_FUZZ_SCALE": str(args.scale),
           "CALOFORGE_KILL_SEEDS": str(args.kill_seeds)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "--hypothesis-show-statistics",
                            "tests/test_fuzz_inputs.py", "tests/test_kill.py"], cwd=root, env=env)


if __name__ == "__main__":
    sys.exit(main())
