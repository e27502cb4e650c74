"""Timing helpers shared by the benchmarks (imported as a sibling module: run them as scripts)."""

from __future__ import annotations

import statistics
import time


class Stopwatch:
    """Wall time and this process's CPU time of a block. With one thread, CPU time leaves out the
    time other processes hold the core, which wall time on a busy machine does not."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of repeated measurements."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}
