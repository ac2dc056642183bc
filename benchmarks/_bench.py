"""Timing and table printing shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls in seconds, garbage collection off while timing (as `timeit` does)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        gc.enable()
    return min(times)


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` interleaved rounds, garbage collection off while timing."""
    best = [float("inf")] * len(fns)
    for round_ in range(repeats):
        order = list(enumerate(fns))
        for i, fn in order if round_ % 2 == 0 else reversed(order):
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
            gc.enable()
    return best


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` under ``header`` as a text table, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-|-".join("-" * width for width in widths))
    print("\n".join(line.rstrip() for line in lines))
