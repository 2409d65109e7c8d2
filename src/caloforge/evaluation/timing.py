"""Sampling-cost measurement: ms per shower at several batch sizes.

``benchmark_sampling(sample, threads, batch_sizes)`` calls ``sample(batch_size)`` (which must
generate that many showers and return when they exist) after a warm-up, repeats, and reports
the median per thread count and batch size, with peak memory (``caloforge bench-sampling``).
Fast settings are timed over several back-to-back calls so that each measurement lasts long
enough.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class PeakMemory:
    """Peak resident memory above the level at entry, sampled by a background thread.

    ``with PeakMemory() as peak: ...`` then ``peak.megabytes``. On CUDA devices the
    allocator's own peak (``torch.cuda.max_memory_allocated``) is reported instead.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.device, self.interval_s = device, interval_s
        self.megabytes = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._peak = 0

    @staticmethod
    def _rss_bytes() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as stream:
                return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):  # not Linux: the lifetime peak is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = self._rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._peak, self._rss_bytes())
        self.megabytes = max(peak - self._base, 0) / 2**20


def benchmark_sampling(sample: Callable[[int], Any], threads: Sequence[int],
                       batch_sizes: Sequence[int], repeats: int = 3, device: str = "cpu",
                       max_seconds: float = 120.0, progress: Callable[..., Any] | None = None,
                       ) -> list[dict[str, Any]]:
    """Sampling cost for every (thread count, batch size): median ms/shower, showers/s,
    peak memory (MB above the level before the first call of that setting).

    Each setting gets a warm-up call and up to ``repeats`` timed calls; after the first
    timed call, repeats stop once ``max_seconds`` have been spent on the setting (the
    teacher needs minutes per call at batch 10,000), and the count is reported.
    """
    import torch

    previous = torch.get_num_threads()
    rows = []
    bar = progress(total=len(threads) * len(batch_sizes), desc="bench", unit="setting") \
        if progress else None
    try:
        for thread_count in threads:
            torch.set_num_threads(thread_count)
            for batch_size in batch_sizes:
                with PeakMemory(device) as peak:
                    started = time.perf_counter()
                    warmup = min(batch_size, 1000)
                    sample(warmup)  # warm-up: code paths, allocator, caches
                    per_call = (time.perf_counter() - started) * batch_size / warmup
                    # fast settings: enough back-to-back calls for ~0.5 s per measurement
                    calls = max(1, min(50, int(0.5 / max(per_call, 1e-6))))
                    timings: list[float] = []
                    while len(timings) < repeats and (
                            not timings or time.perf_counter() - started < max_seconds):
                        start = time.perf_counter()
                        for _ in range(calls):
                            sample(batch_size)
                        if device.startswith("cuda"):
                            torch.cuda.synchronize(device)
                        timings.append((time.perf_counter() - start) / (calls * batch_size))
                median = statistics.median(timings)
                rows.append({"threads": thread_count, "batch_size": batch_size,
                             "ms_per_shower": 1e3 * median, "showers_per_s": 1.0 / median,
                             "peak_memory_mb": round(peak.megabytes, 1),
                             "repeats": len(timings), "device": device})
                if bar is not None:
                    bar.update(1)
    finally:
        torch.set_num_threads(previous)
        if bar is not None:
            bar.close()
    return rows


def format_sampling_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`benchmark_sampling` as a fixed-width text table."""
    lines = [f"{'threads':>7} {'batch':>7} {'ms/shower':>11} {'showers/s':>11} "
             f"{'peak MB':>9} {'repeats':>7}"]
    for row in rows:
        lines.append(f"{row['threads']:>7} {row['batch_size']:>7} {row['ms_per_shower']:>11.3f} "
                     f"{row['showers_per_s']:>11.1f} {row['peak_memory_mb']:>9.1f} "
                     f"{row['repeats']:>7}")
    return "\n".join(lines)
