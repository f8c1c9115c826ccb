"""One timing helper: monotonic durations on one host, and latency percentiles.

Durations are always differences of ``time.perf_counter_ns()`` taken on the same host;
nothing here subtracts clocks of two machines (docs/concepts/split.md, invariant 6).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np


def now_ns() -> int:
    """Monotonic clock in nanoseconds."""
    return time.perf_counter_ns()


@contextmanager
def timed(durations: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block, in milliseconds, to ``durations[name]``."""
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        durations[name] = durations.get(name, 0.0) + (time.perf_counter_ns() - start) / 1e6


def ms_since(start_ns: int) -> float:
    """Milliseconds elapsed since a ``now_ns()`` reading."""
    return (time.perf_counter_ns() - start_ns) / 1e6


def percentiles(values: Iterable[float], qs: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ..., "mean": ...}`` of the values (NaN when empty)."""
    arr = np.asarray(list(values), dtype=np.float64)
    out = {f"p{int(q)}": (float(np.percentile(arr, q)) if arr.size else float("nan")) for q in qs}
    out["mean"] = float(arr.mean()) if arr.size else float("nan")
    return out
