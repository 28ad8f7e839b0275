"""The peers' rows of bench/bench.py: LitServe, BentoML and Ray Serve (bench/peer_frameworks.py) serving the
run's own model.onnx, with our preprocessing, workers, threads, batch size and batch delay, under the same wrk
bodies and levels as TorchServe's rows, right after them on the same machine (TorchServe stopped: it would
hold its idle workers' memory, nothing else). Each peer's answers are checked against ours first.
"""

import os
import statistics
import time

from bench.inprocess import steal_seconds, unstolen
from bench.peer_frameworks import PEERS, PeerError, available, check, serve
from bench.wrk import post_files
from bundle.settings import Ports
from model_src import backends
from model_src.cores import threads_per_worker, usable_cores

TORCHSERVE_BATCH_DELAY_MS = 100  # TorchServe's maxBatchDelay when model-config.yaml leaves it out


def settle(timeout: float = 60):
    """Wait until the machine is idle (the peer still serving what the last row queued: a c=64 backlog
    would spill into the next row), as TorchServe's rows wait for its frontend."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and psutil.cpu_percent(interval=0.5) > 15:
        pass


def load(url: str, files: list[str], c: int, seconds: float) -> dict:
    """wrk against a peer at `c` connections once the machine is idle: its result plus the steal share and the
    unstolen req/s."""
    settle()
    cores = os.cpu_count() or 1
    s0 = steal_seconds()
    res = post_files(url, None, files, c, seconds)
    res["steal_share"] = round((steal_seconds() - s0) / (cores * res["seconds"]), 4)
    res["rps_unstolen"] = round(unstolen(res["throughput_rps"], res["steal_share"]), 1)
    return res


def measure_peers(t, names: list[str]) -> dict:
    """name -> {"served": rows per level and round, "wrong": answers that differ from ours} or {"skipped":
    why}, for the target `t` of bench/bench.py (its export folder must hold model.onnx)."""
    onnx = os.path.join(t.export_dir, backends.get("onnx").file)
    out: dict = {}
    if not os.path.exists(onnx):
        why = "the run exported no ONNX file (add onnx to --backends)"
        return {name: {"skipped": why} for name in names}
    threads = threads_per_worker(t.workers, usable_cores())
    delay = float(t.result["max_batch_delay_ms"] or TORCHSERVE_BATCH_DELAY_MS)
    for name in names:
        if why := available(name):
            out[name] = {"skipped": why}
            print(f"{t.name}: peer {name} skipped: {why}", flush=True)
            continue
        try:
            with serve(
                name, onnx, t.export_dir, t.workers, threads, t.batch, delay, Ports.free().inference
            ) as url:
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


def answered_per_s(row: dict) -> float:
    """A row's 200 answers per second (wrk's req/s counts refusals and errors too)."""
    return row["statuses"].get("200", 0) / row["seconds"]


def median_at(rows: list[dict], c: int, key) -> float:
    """The median over the rows (rounds) at concurrency `c` of `key`: a row's field, or a function of it."""
    return statistics.median(key(r) if callable(key) else r[key] for r in rows if r["concurrency"] == c)


def peer_lines(res: dict) -> list[str]:
    """The peers' table: answers/s, p50, p99 per level (medians over rounds), and two ratios of our answers/s
    to the peer's: ONNX Runtime's archive (the same model.onnx: framework against framework) and the backend
    `--backend auto` ships (what a user gets)."""
    peers = res.get("peers") or {}
    if not peers:
        return []
    shipped = (res.get("backend_choice") or {}).get("backend")
    ours = {name: res["served"][name] for name in dict.fromkeys(["onnx", shipped]) if name in res["served"]}
    lines = [
        f"peers (the run's ONNX file, ONNX Runtime, our preprocessing, {res['workers']} workers, batch "
        f"{res['batch_size']}, {res['max_batch_delay_ms']} ms), medians over rounds of 200 answers/s; "
        f"ours/peer for {' and '.join(ours)} (auto ships {shipped})"
    ]
    for name, p in peers.items():
        if "skipped" in p:
            lines.append(f"  {name}: skipped: {p['skipped']}")
            continue
        rows = p["served"]
        for c in res["levels"]:
            rps = median_at(rows, c, answered_per_s)
            errors = sum(r["errors"] for r in rows if r["concurrency"] == c)
            ratios = "  ".join(
                f"{b}/peer {median_at(r, c, answered_per_s) / rps if rps else float('nan'):.2f}"
                for b, r in ours.items()
            )
            lines.append(
                f"  {name:9s} c={c:3d} {rps:7.1f} answers/s  p50 {median_at(rows, c, 'p50_ms'):.1f} ms  "
                f"p99 {median_at(rows, c, 'p99_ms'):.1f} ms  errors {errors}  {ratios}"
            )
        differ = f": {p['wrong']}" if p["wrong"] else ""
        lines.append(f"  {name}: {len(p['wrong'])} answers differ from ours{differ}")
    return lines


DEFAULT_PEERS = ",".join(PEERS)
