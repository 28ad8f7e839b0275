"""A canary step's verdict, the candidate against the default over the same window, and the report's plot
(deploy/canary.py).

Each side of a window is {"answers": n, "errors": 5xx count, "gone": 404 count, "p99_ms": float | None,
"classes": {label: n}}: answers and errors come from Prometheus (HAProxy's exporter, per server of the door's
`canary` backend), 404s (a version TorchServe no longer serves) and the top-1 labels from the door's answer
table, p99 from the door's access log. A client's other 4xx (no key, a bad body, too many requests) are never
judged: any client can send them, to either side. The thresholds live here and nowhere else;
docs/deployment.md gives the reason for each."""

from dataclasses import asdict, dataclass

from deploy.latency import percentile


@dataclass
class Thresholds:
    """The limits judge() holds a canary step to; the comment above each field gives its reason."""

    # Answers the candidate must have given in a step before it is judged: a class distribution of fewer is
    # noise (at 20, one odd answer moves a share by 5 points), and a step without them waits (up to
    # max_step_seconds).
    min_answers: int = 20
    # The candidate's rate of 5xx and 404 answers may exceed the default's by this much (a share) plus the
    # sampling noise of the two rates (rate_noise()): one failure in a hundred may be a worker restart; a
    # version that fails on an input the default answers shows up far above it.
    max_error_gap: float = 0.01
    # p99 may be this many times the default's plus p99_slack_ms: on a shared machine p99s of a few ms jitter
    # by tens of ms, so the slack keeps a fast model from failing on noise, and the ratio catches a slow one.
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 50.0
    # Total variation distance between the two top-1 distributions (0: same, 1: disjoint), on top of the
    # sampling noise of the candidate's answers (noise(): 1/sqrt(n), 0.22 at 20). Two honest versions on the
    # same traffic differ by that noise; a model with mixed-up labels moves whole classes. A distribution can
    # look the same while answers differ: the offline gate's agreement catches that.
    max_class_distance: float = 0.25
    # A step that has not collected min_answers after this long fails: traffic nobody can judge is not
    # promoted.
    max_step_seconds: float = 600.0

    def as_dict(self) -> dict:
        """The thresholds as a plain dict, for the canary's JSON report."""
        return asdict(self)


def failures(side: dict) -> int:
    """Answers the version caused to fail: 5xx, and 404 (TorchServe no longer serves it)."""
    return side["errors"] + side.get("gone", 0)


def error_rate(side: dict) -> float:
    """The side's failures (failures()) as a share of its answers plus failures; 0.0 when it has neither."""
    total = side["answers"] + failures(side)
    return failures(side) / total if total else 0.0


def rate_noise(a: dict, b: dict) -> float:
    """How far two sides' failure rates may differ by chance, about: two standard errors of the difference of
    two shares at their pooled rate, 2 sqrt(p (1 - p) (1/na + 1/nb)); it shrinks as the samples grow, like
    noise().
    A side with no answers drops out (its term and its rate, taken as 0): the other is judged on its own."""
    na, nb = a["answers"] + failures(a), b["answers"] + failures(b)
    if not na + nb:
        return 1.0
    p = (failures(a) + failures(b)) / (na + nb)
    return 2 * (p * (1 - p) * sum(1 / n for n in (na, nb) if n)) ** 0.5


def class_distance(a: dict[str, int], b: dict[str, int]) -> float:
    """Total variation distance between two label counts (half the L1 distance of their shares)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b)) / 2


def noise(n: int) -> float:
    """How far n answers' shares may stray by chance, about: 1/sqrt(n) (two standard errors of a share near
    0.5). 16 answers from a good candidate on 3:1 traffic measured 0.26 apart; a permutation of labels
    measures ~1."""
    return 1 / n**0.5 if n else 1.0


def measures(candidate: dict, default: dict, th: Thresholds) -> dict:
    """What judge() compares, each figure beside its limit (None where a side has no latency): the error
    rates' gap, the candidate's p99 and the class distance. Kept in each step of the report and plotted."""
    p99, base = candidate.get("p99_ms"), default.get("p99_ms")
    return {
        "error_rate": error_rate(candidate),
        "default_error_rate": error_rate(default),
        "error_gap": error_rate(candidate) - error_rate(default),
        "error_gap_limit": th.max_error_gap + rate_noise(candidate, default),
        "p99_ms": p99,
        "default_p99_ms": base,
        "p99_limit_ms": None if base is None else base * th.max_p99_ratio + th.p99_slack_ms,
        "class_distance": class_distance(candidate["classes"], default["classes"]),
        "class_distance_limit": th.max_class_distance + noise(sum(candidate["classes"].values())),
    }


def judge(candidate: dict, default: dict, th: Thresholds) -> list[str]:
    """Why the candidate fails this window against `default` (the default's side of the same window, or of the
    last window that had one, at 100 %); empty when it passes."""
    return reasons(measures(candidate, default, th), th)


def reasons(m: dict, th: Thresholds) -> list[str]:
    """Why the figures of measures() fail their limits; empty when none does."""
    why = []
    if m["error_gap"] > m["error_gap_limit"]:
        why.append(
            f"error rate (5xx, 404) {m['error_rate']:.1%} vs the default's {m['default_error_rate']:.1%} "
            f"(over the allowed {m['error_gap_limit']:.1%} more)"
        )
    if m["p99_ms"] is not None and m["p99_limit_ms"] is not None and m["p99_ms"] > m["p99_limit_ms"]:
        limit = f"limit {th.max_p99_ratio} x + {th.p99_slack_ms:.0f} ms"
        why.append(f"p99 {m['p99_ms']:.0f} ms vs the default's {m['default_p99_ms']:.0f} ms ({limit})")
    if m["class_distance"] > m["class_distance_limit"]:
        distance, bound = m["class_distance"], m["class_distance_limit"]
        why.append(f"predicted classes differ: distance {distance:.2f} (limit {bound:.2f})")
    return why


def p99(ordered: list[float]) -> float | None:
    """The bundle's percentile (deploy/latency.py) of an ascending list, None without data."""
    return percentile(ordered, 0.99)


def plot(report: dict, path: str):
    """A canary report's steps as a PNG at `path`: each judged figure (the step's `judged`, from measures())
    against its limit: the error rates' gap, the candidate's p99 (and the default's), the class distance.
    At 100 % these are against the last window that had the default, as judged."""
    import matplotlib  # here: only a report draws, and matplotlib costs a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in report["steps"] if s.get("judged")]
    x = [f"{s['share']} %" for s in steps]

    def series(key: str) -> list[float]:  # a missing figure (no latency at all) is a gap, not a zero
        return [float("nan") if s["judged"][key] is None else s["judged"][key] for s in steps]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    panels = [
        ("error rate gap (points)", [("candidate - default", "error_gap", 100)], "error_gap_limit", 100),
        ("p99 (ms)", [("candidate", "p99_ms", 1), ("default", "default_p99_ms", 1)], "p99_limit_ms", 1),
        ("class distance", [("candidate vs default", "class_distance", 1)], "class_distance_limit", 1),
    ]
    for ax, (title, lines, limit, scale) in zip(axes, panels):
        for label, key, k in lines:
            ax.plot(x, [v * k for v in series(key)], "o-", label=label)
        # a marker too: a report of one step (rolled back at 5 %) has no line to draw
        ax.plot(x, [v * scale for v in series(limit)], "r--", marker="_", markersize=24, label="limit")
        ax.set_title(title)
        ax.set_xlabel("candidate share")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"canary {report['model']} {report['candidate']} vs {report['default']}: {report['verdict'][:100]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
