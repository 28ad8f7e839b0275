"""What bench.bench measured, turned into ratios (served / estimate / ideal), the CPU breakdown per request,
the printed tables and the two plots."""

import os
import statistics

from bench.peer_rows import peer_lines

STAGES = ("frontend", "framing", "decode", "model", "topk", "spent", "worker_rest")
STAGE_NAMES = {
    "frontend": "frontend (Java: HTTP, queue, metrics parsing, logs)",
    "framing": "worker framing (TorchServe's Python service, no-op)",
    "decode": "decode + preprocess",
    "model": "model",
    "topk": "top-k + response",
    "spent": "the ideal handler's spent CPU (= the limit)",
    "worker_rest": "rest of the worker (metrics, logging, batching)",
}


def has_estimate(c: int, workers: int, batch: int) -> bool:
    """Only where the batching is known: one request at a time, or every worker taking full batches. In
    between, TorchServe's greedy batching decides (at c=4 one worker often takes all four requests and the
    other waits)."""
    return c == 1 or c >= workers * batch


def estimate(ceiling_rps: float, limit_ips: float, busy_workers: int, images_per_request: int = 1) -> float:
    """Requests/s if each request cost the no-op's time plus its images' share of the busy workers' limit."""
    return 1 / (1 / ceiling_rps + images_per_request / (busy_workers * limit_ips))


def say(name: str, label: str, r: dict):
    """Print one measured row (throughput, p50, p99, errors) as it finishes."""
    print(
        f"  {name} {label} c={r['concurrency']}: {r['throughput_rps']} req/s p50 {r['p50_ms']:.1f} "
        f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}",
        flush=True,
    )


def add_estimates(res: dict):
    """served / estimate for every row, and the CPU breakdown per request at the top level."""
    workers = res["workers"]
    for rows in res["served"].values():
        for row, ceiling in zip(rows, res["ceiling"]):
            c = row["concurrency"]
            if row["limit_ips"] and has_estimate(c, workers, res["batch_size"]):
                row["estimate_rps"] = round(
                    estimate(ceiling["rps_unstolen"], row["limit_ips"], min(c, workers)), 1
                )
                row["vs_estimate"] = round(row["rps_unstolen"] / row["estimate_rps"], 3)
            if row.get("ideal"):
                row["ideal_rps"] = row["ideal"]["rps_unstolen"]
                row["vs_ideal"] = round(row["rps_unstolen"] / row["ideal_rps"], 3)
                row["ideal_vs_estimate"] = round(row["ideal_rps"] / row["estimate_rps"], 3)
    for row in res["batching"]:
        n = row["images_per_request"]
        row["images_per_s"] = round(row["served"]["throughput_rps"] * n, 1)
        ceiling = row["ceiling"]["rps_unstolen"]
        row["estimate_images_per_s"] = round(n * estimate(ceiling, row["limit_ips"], workers, n), 1)
        row["vs_estimate"] = round(row["served"]["rps_unstolen"] * n / row["estimate_images_per_s"], 3)
    top = res["ceiling"][-1]
    res["breakdown_ms"] = {}
    for label, rows in res["served"].items():
        if label not in res["limit"]:
            continue
        cpu, stages = rows[-1]["cpu_ms"], res["stages_ms_per_image"][label]
        # one worker thread: CPU ms per image, measured next to the row
        handler_ms = 1000 / rows[-1]["limit_ips"]
        framing = top["cpu_ms"]["workers"]
        topk = max(0.0, handler_ms - stages["decode"] - stages["model"])
        handler = {"decode": stages["decode"], "model": stages["model"], "topk": topk}
        res["breakdown_ms"][label] = split_cpu(cpu, framing, handler_ms, handler)
        if rows[-1].get("ideal"):  # the same row's ideal handler: where its CPU went, for comparison
            res["breakdown_ms"][f"{label} ideal"] = split_cpu(
                rows[-1]["ideal"]["cpu_ms"], framing, handler_ms, {"spent": handler_ms}
            )


def split_cpu(cpu: dict, framing: float, handler_ms: float, handler: dict) -> dict:
    """One row's CPU ms per request by stage: the workers' share beyond TorchServe's framing and the handler's
    own `handler_ms` (split as `handler` says) is the rest of the worker."""
    parts = {
        "frontend": cpu["frontend"],
        "framing": framing,
        "decode": 0.0,
        "model": 0.0,
        "topk": 0.0,
        "spent": 0.0,
    }
    parts |= handler
    parts |= {"worker_rest": cpu["workers"] - framing - handler_ms, "wrk": cpu["wrk"]}
    parts |= {"steal": cpu.get("steal", 0.0), "idle": cpu["idle"]}
    return {k: round(v, 4) for k, v in parts.items()}


# --- tables and plots --------------------------------------------------------------------------------


def table(res: dict) -> str:
    """The printed report of one benchmark result: the rows per backend and concurrency with their
    ratios, then the limits, batching and CPU breakdown lines."""
    lines = [
        f"\n{res['model']}: batch {res['batch_size']}, {res['workers']} worker(s), maxBatchDelay "
        f"{res['max_batch_delay_ms']} ms, wrk {res['seconds_per_row']:g} s per row, "
        f"cold start {res['cold_start_s']:.1f} s",
        "(steal: the share of the cores the host took during the row; no-op, estimate, ideal and the ratios "
        "are per core-second it left)",
        f"{'backend':14s}{'c':>4s}{'req/s':>9s}{'p50':>8s}{'p90':>8s}{'p99':>8s}{'err':>5s}{'steal':>7s}"
        f"{'no-op':>9s}"
        f"{'estimate':>10s}{'served/est':>12s}{'ideal':>9s}{'served/ideal':>14s}{'ideal/est':>11s}",
    ]
    for label, rows in res["served"].items():
        for j, (r, ceil) in enumerate(zip(rows, res["ceiling"])):
            est = f"{r['estimate_rps']:.0f}" if "estimate_rps" in r else ""
            ratio = f"{r['vs_estimate']:.2f}" if "vs_estimate" in r else ""
            ideal = (
                f"{r['ideal_rps']:9.0f}{r['vs_ideal']:14.2f}{r['ideal_vs_estimate']:11.2f}"
                if "ideal_rps" in r
                else ""
            )
            lines.append(
                f"{label if j == 0 else '':14s}{r['concurrency']:4d}{r['throughput_rps']:9.1f}"
                f"{r['p50_ms']:8.1f}{r['p90_ms']:8.1f}{r['p99_ms']:8.1f}{r['errors']:5d}"
                f"{r['steal_share']:7.0%}{ceil['rps_unstolen']:9.0f}"
                f"{est:>10s}{ratio:>12s}" + ideal
            )
    lines.append(
        "limit, img/s in-process, each measured next to its row: "
        + "; ".join(
            f"{b}: " + ", ".join(f"{k} {min(v):.0f}-{max(v):.0f}" for k, v in row.items())
            for b, row in res["limit"].items()
        )
    )
    if res.get("rounds", 1) > 1:
        lines += medians(res)
    for row in res["batching"]:
        lines.append(
            f"client batching x{row['images_per_request']} (c={row['concurrency']}): "
            f"{row['images_per_s']:.0f} img/s, "
            f"estimate {row['estimate_images_per_s']:.0f}, ratio {row['vs_estimate']:.2f}, "
            f"p50 {row['served']['p50_ms']:.1f} ms, errors {row['served']['errors']}"
        )
    for label, parts in res["breakdown_ms"].items():
        lines.append(
            f"CPU ms per request at c={res['levels'][-1]}, {label}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        )
    lines.append(
        "checked: "
        + ", ".join(
            f"{b} {v['wrong_labels']} wrong / {v['errors']} errors of {v['requests']}"
            for b, v in res["checked"].items()
        )
    )
    for backend, e in res.get("export", {}).items():
        lines.append(f"export {backend}: " + export_line(e))
    if choice := res.get("backend_choice"):
        timed = ", ".join(f"{b} {ms:.2f}" for b, ms in choice["ms_per_image"].items())
        lines.append(
            f"--backend auto chose {choice['backend']} ({choice['rule']}"
            + (
                f"; ms/image at batch {choice['batch']}, {choice['threads']} thread(s): {timed}"
                if timed
                else ""
            )
            + ")"
        )
    lines += peer_lines(res)
    lines.append(
        "registration to ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["registration_s"].items())
    )
    return "\n".join(lines)


def export_line(e: dict) -> str:
    """One backend's export check in words: refused, exact (max |Δprob|), or the precision gate's figures."""
    if "refused" in e:
        return f"refused: {e['refused']}"
    if "agreement" not in e:
        return f"exact, max |Δprob| vs eager {e['max_diff']:.1e}"
    return (
        f"top-1 agreement {e['agreement']:.2%} (noise floor {e['noise_floor']:.2%}), "
        f"{e['confident_agreement']:.2%} of {e['confident']} confident crops, "
        f"max |Δprob| {e['max_dprob']:.4f}"
    )


def by_level(rows: list, key: str) -> tuple[list, list]:
    """(levels, the median of `key` at each level over the rounds), for the rows that have it."""
    levels = sorted({r["concurrency"] for r in rows if key in r})
    return levels, [
        statistics.median(r[key] for r in rows if r["concurrency"] == c and key in r) for c in levels
    ]


def medians(res: dict) -> list[str]:
    """One line per backend and level with an estimate: the ratios' medians and ranges over the rounds."""
    lines = []
    for label, rows in res["served"].items():
        for c in by_level(rows, "vs_estimate")[0]:
            at = [r for r in rows if r["concurrency"] == c]
            parts = []
            for key in ("vs_estimate", "vs_ideal", "ideal_vs_estimate"):
                v = [r[key] for r in at if key in r]
                if v:
                    parts.append(f"{key} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
            lines.append(f"median of {len(at)} at c={c}, {label}: " + ", ".join(parts))
    return lines


def plot(results: list, path: str):
    """Plot req/s (with the no-op ceiling, estimate and ideal) and p99 against concurrency, a column per
    result, into the PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for col, res in enumerate(results):
        axes[0][col].plot(*by_level(res["ceiling"], "throughput_rps"), "k--", label="no-op handler (ceiling)")
        for label, rows in res["served"].items():
            (line,) = axes[0][col].plot(*by_level(rows, "throughput_rps"), marker="o", label=label)
            for key, style, marker in (("estimate_rps", ":", "."), ("ideal_rps", "-.", "x")):
                if any(key in r for r in rows):
                    axes[0][col].plot(
                        *by_level(rows, key), style, marker=marker, color=line.get_color(), alpha=0.7
                    )
            axes[1][col].plot(*by_level(rows, "p99_ms"), marker="o", label=label)
        for name, peer in (res.get("peers") or {}).items():  # the peers: dashed, squares
            if "served" in peer:
                axes[0][col].plot(*by_level(peer["served"], "throughput_rps"), "--", marker="s", label=name)
                axes[1][col].plot(*by_level(peer["served"], "p99_ms"), "--", marker="s", label=name)
        axes[0][col].set(
            title=f"{res['model']}: req/s (dotted: estimate, dash-dot: ideal, dashed: peers)",
            xscale="log",
            yscale="log",
            xlabel="concurrency (wrk)",
            ylabel="req/s",
        )
        axes[1][col].set(
            title=f"{res['model']}: p99", xscale="log", yscale="log", xlabel="concurrency", ylabel="ms"
        )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_breakdown(results: list, path: str):
    """One stacked bar per model and backend: CPU ms per request, by where it went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['model']}\n{label}", parts) for r in results for label, parts in r["breakdown_ms"].items()]
    names = {
        **STAGE_NAMES,
        "wrk": "load generator (wrk)",
        "steal": "taken by the host (steal)",
        "idle": "idle cores",
    }
    rest = ["wrk", "steal", "idle"]
    fig, axes = plt.subplots(1, len(results), figsize=(4 + 3 * len(bars), 5), squeeze=False)
    for ax, res in zip(axes[0], results):
        mine = [(label, parts) for label, parts in res["breakdown_ms"].items()]
        for k, key in enumerate([*STAGES, *rest]):
            bottoms = [sum(max(0.0, p.get(s, 0.0)) for s in [*STAGES, *rest][:k]) for _, p in mine]
            ax.bar(
                [label for label, _ in mine],
                [max(0.0, p.get(key, 0.0)) for _, p in mine],
                bottom=bottoms,
                label=names[key],
                color=f"C{k}",
                hatch="//" if key in ("idle", "steal") else None,
                alpha=0.4 if key in ("idle", "steal") else 1,
            )
        ax.set(
            title=f"{res['model']}, c={res['levels'][-1]}, {os.cpu_count()} cores",
            ylabel="ms of CPU per request",
        )
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
