"""Helpers shared by the benchmark scripts: timing by medians, and JSON-lines output."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], *, repeat: int = 7, number: int | None = None, min_time: float = 0.05) -> float:
    """Median over ``repeat`` runs of the seconds one call of ``fn`` takes.

    Each run calls ``fn`` ``number`` times (chosen so a run lasts at least ``min_time`` when
    not given) and divides: medians of several runs, since the machine is shared and noisy.
    """
    fn()  # warm up
    if number is None:
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if time.perf_counter() - t0 >= min_time or number >= 1 << 20:
                break
            number *= 2
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number)
    return statistics.median(runs)


def emit(metric: str, value: float, unit: str, **extra: object) -> None:
    """Print one figure as a JSON line: {"metric", "value", "unit", ...}."""
    print(json.dumps({"metric": metric, "value": round(value, 6), "unit": unit, **extra}), flush=True)
