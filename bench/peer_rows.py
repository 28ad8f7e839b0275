"""The peers' rows of bench/bench.py: LitServe, BentoML and Ray Serve (bench/peer_frameworks.py) serving the
run's own model.onnx, with our preprocessing, workers, threads, batch size and batch delay, under the same wrk
bodies and levels as TorchServe's rows, right after them on the same machine (TorchServe stopped: it would
hold its idle workers' memory, nothing else). Each peer's answers are checked against ours first.
"""

import os
import socket
import statistics

from bench.inprocess import steal_seconds, unstolen
from bench.peer_frameworks import PEERS, PeerError, available, check, serve
from bench.wrk import post_files
from model_src.cores import threads_per_worker, usable_cores


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, files: list[str], c: int, seconds: float) -> dict:
    """wrk against a peer at `c` connections: its result plus the steal share and the unstolen req/s."""
    cores = os.cpu_count() or 1
    s0 = steal_seconds()
    res = post_files(url, None, files, c, seconds)
    res["steal_share"] = round((steal_seconds() - s0) / (cores * res["seconds"]), 4)
    res["rps_unstolen"] = round(unstolen(res["throughput_rps"], res["steal_share"]), 1)
    return res


def measure_peers(t, names: list[str]) -> dict:
    """name -> {"served": rows per level and round, "wrong": answers that differ from ours} or {"skipped":
    why}, for the target `t` of bench/bench.py (its export folder must hold model.onnx)."""
    onnx = os.path.join(t.export_dir, "model.onnx")
    out: dict = {}
    if not os.path.exists(onnx):
        why = "the run exported no model.onnx (add onnx to --backends)"
        return {name: {"skipped": why} for name in names}
    threads = threads_per_worker(t.workers, usable_cores())
    delay = float(t.result["max_batch_delay_ms"] or 0)
    for name in names:
        if why := available(name):
            out[name] = {"skipped": why}
            print(f"{t.name}: peer {name} skipped: {why}", flush=True)
            continue
        try:
            with serve(name, onnx, t.export_dir, t.workers, threads, t.batch, delay, free_port()) as url:
                wrong = check(url, t.files, t.expect)
                load(url, t.files, t.levels[-1], t.args.seconds)  # warm-up, as TorchServe's rows get
                rows = [load(url, t.files, c, t.args.seconds) for _ in range(t.args.rounds) for c in t.levels]
        except PeerError as e:
            out[name] = {"skipped": f"did not serve: {e}"}
            print(f"{t.name}: peer {name} failed: {e}", flush=True)
            continue
        out[name] = {"served": rows, "wrong": wrong}
        for r in rows:
            print(
                f"{t.name}: {name:9s} c={r['concurrency']:3d} {r['throughput_rps']:7.1f} req/s  "
                f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  errors {r['errors']}",
                flush=True,
            )
    return out


def median_at(rows: list[dict], c: int, key: str) -> float:
    """The median of `key` over the rows (rounds) at concurrency `c`."""
    return statistics.median(r[key] for r in rows if r["concurrency"] == c)


def peer_lines(res: dict) -> list[str]:
    """The peers' table: req/s, p50, p99 per level (medians over rounds), and our best backend / the peer."""
    peers = res.get("peers") or {}
    if not peers:
        return []
    ours = {
        c: max(median_at(rows, c, "throughput_rps") for b, rows in res["served"].items() if b != "stock")
        for c in res["levels"]
    }
    lines = [
        f"peers (the run's model.onnx, ONNX Runtime, our preprocessing, {res['workers']} workers, batch "
        f"{res['batch_size']}, {res['max_batch_delay_ms']} ms), medians over rounds; ours/peer = our best "
        "backend's req/s at that level over the peer's"
    ]
    for name, p in peers.items():
        if "skipped" in p:
            lines.append(f"  {name}: skipped: {p['skipped']}")
            continue
        for c in res["levels"]:
            rps, rows = median_at(p["served"], c, "throughput_rps"), p["served"]
            errors = sum(r["errors"] for r in rows if r["concurrency"] == c)
            lines.append(
                f"  {name:9s} c={c:3d} {rps:7.1f} req/s  p50 {median_at(rows, c, 'p50_ms'):.1f} ms  "
                f"p99 {median_at(rows, c, 'p99_ms'):.1f} ms  errors {errors}  "
                f"ours/peer {ours[c] / rps if rps else float('nan'):.2f}"
            )
        differ = f": {p['wrong']}" if p["wrong"] else ""
        lines.append(f"  {name}: {len(p['wrong'])} answers differ from ours{differ}")
    return lines


DEFAULT_PEERS = ",".join(PEERS)
