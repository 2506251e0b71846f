"""Summary statistics for latency lists: one definition of mean / median / p99 for every report."""
from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank on the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    """{mean, median, p99}; None each for an empty list."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p99": percentile(values, 99)}
