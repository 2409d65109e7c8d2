"""Time one ``model.sample`` call of a saved model on one thread (ms/shower).

For models too slow for ``caloforge bench-sampling`` at a useful batch (calochallenge-3):
loads the model, warms up on 200 showers, then times one call on the first ``-n`` incident
energies of ``--like`` (seed 1, batch size 10,000: the families cut it by memory).

    python bench/time_sample.py RUN --like test.h5 -n 300
"""

from __future__ import annotations

import argparse
import time

import torch

from caloforge.data import read_showers
from caloforge.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--like", required=True, help="shower file whose energies are used")
    parser.add_argument("-n", type=int, default=300, help="showers timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run_dir)
    energies = read_showers(args.like).incident_energies[:args.n]
    model.sample(energies[:200], seed=0)  # warm-up: code paths, caches, allocator
    start = time.perf_counter()
    model.sample(energies, seed=1, batch_size=10_000)
    elapsed = time.perf_counter() - start
    print(f"{args.run_dir}: {1000 * elapsed / len(energies):.2f} ms/shower "
          f"({len(energies)} showers, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
