"""The one percentile definition used by the gate, the load generator and the reports."""


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): q in [0, 1] of an ascending list."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summary(latencies_ms: list[float]) -> dict:
    """p50/p90/p99 in ms of unsorted latencies."""
    ordered = sorted(latencies_ms)
    return {f"p{q}_ms": percentile(ordered, q / 100) for q in (50, 90, 99)}
