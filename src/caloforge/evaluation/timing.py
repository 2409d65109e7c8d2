"""Sampling-cost measurement: ms per shower at several batch sizes.

``time_sampling(sample)`` calls ``sample(batch_size)`` (which must generate that many showers
and return when they exist) after a warm-up, repeats, and reports the median. Small batches
are timed over several back-to-back calls so that each measurement lasts long enough.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence


def time_sampling(sample: Callable[[int], Any], batch_sizes: Sequence[int] = (1, 100, 10_000),
                  repeats: int = 3, warmup: int = 1, min_showers_per_measurement: int = 200,
                  ) -> list[dict[str, Any]]:
    """Median ms/shower and showers/s for each batch size, with the torch thread count."""
    try:
        import torch

        threads: int | None = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    results = []
    for batch_size in batch_sizes:
        if batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}")
        calls = max(1, min(50, min_showers_per_measurement // batch_size))
        for _ in range(warmup):
            sample(batch_size)
        per_shower = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                sample(batch_size)
            per_shower.append((time.perf_counter() - start) / (calls * batch_size))
        median = statistics.median(per_shower)
        results.append({"batch_size": batch_size, "ms_per_shower": 1e3 * median,
                        "showers_per_s": 1.0 / median, "repeats": repeats,
                        "calls_per_repeat": calls, "threads": threads})
    return results
