"""Overload: good answers, rejections and latency past capacity, TorchServe alone vs behind the front door.

    python -m bench.overload                               # levels 16 and 1x/2x/4x/10x of 60, both paths
    python -m bench.overload --levels 16,600 --seconds 5
    python -m bench.overload --job-queue-sizes 16,64,256,1024 --levels 60,600 --no-front-door

In one run, on one TorchServe (digits model, 2 workers, free ports) and one front door (deploy/frontdoor.py)
in front of it, wrk (1 thread, closed loop: each connection sends its next request when the last one is
answered) POSTs a digits PNG as base64 JSON with the inference key at each concurrency, first straight to
TorchServe, then through the front door. Per run: good answers/s (200 with the right label), rejections/s
(429/503, each checked for Retry-After and a JSON message), other statuses, p50/p99 of all answers (wrk), the
front door's p99 for its rejections (its access log), and the CPU seconds of TorchServe, HAProxy and wrk.
Also: the TLS handshake's cost (new connections to the front door vs plain TCP to TorchServe). With
--job-queue-sizes, TorchServe is started once per job_queue_size. Writes bench_results/overload.{json,png}.
"""

import argparse
import base64
import json
import os
import re
import socket
import ssl
import statistics
import tempfile
import time

from bench.targets import digits_target
from bench.wrk import WrkError, children_cpu, cpu_seconds, wrk
from bundle import settings
from deploy.archive import archive_checkpoint
from deploy.client import read_bytes
from deploy.frontdoor import FrontDoor, for_server
from deploy.latency import summary
from deploy.server import Ports, TorchServe

LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overload.lua")
MODEL = settings.MODEL_NAME


def get_args_parser():
    """The command line of `python -m bench.overload`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--levels", default="16,60,120,240,600,1200", help="concurrencies (16: reference; 60: capacity)"
    )
    p.add_argument("--seconds", type=int, default=15, help="per run (amortises opening c TLS connections)")
    p.add_argument(
        "--rounds", type=int, default=1, help="passes over all levels and paths (the table: medians)"
    )
    p.add_argument(
        "--maxconn", type=int, default=FrontDoor.maxconn, help="front door: requests inside TorchServe"
    )
    p.add_argument("--queue", type=int, default=FrontDoor.queue, help="front door: requests waiting in it")
    p.add_argument("--job-queue-sizes", default="", help="TorchServe job_queue_size values to compare "
                   "(default: config.properties' only)")  # fmt: skip
    p.add_argument("--no-front-door", action="store_true", help="TorchServe alone only")
    ckpt = os.path.join(settings.RUNS_DIR, "v1", "checkpoint_best.pt")
    p.add_argument("--digits-checkpoint", default=ckpt, help="trained if missing")
    p.add_argument("--out", default=settings.BENCH_RESULTS, help="folder for overload.json and overload.png")
    return p


def rejection_p99(log: str, offset: int) -> tuple[float | None, int]:
    """p99 (ms) of the front door's own rejections (429/503 it answered without TorchServe) logged after
    `offset`, and the log's new size."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        text = f.read()
        end = f.tell()
    ms = [float(m) for m in re.findall(r"status=(?:429|503) ms=(\d+) .*server=<NOSRV>", text)]
    return (summary(ms)["p99_ms"] if ms else None), end


def measure(path: str, url: str, concurrency: int, seconds: int, env: dict, pids: dict, door=None) -> dict:
    """One wrk run of `path` at `concurrency`: good and rejected answers per second, latency, what
    rejections lacked, and the CPU each process spent; printed and returned as a row."""
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    wrk0 = children_cpu()
    offset = os.path.getsize(door.log) if door else 0
    res = wrk(url, LUA, concurrency, seconds, env)
    cpu = {k: round(cpu_seconds(v) - cpu0[k], 2) for k, v in pids.items()}
    cpu["wrk"] = round(children_cpu() - wrk0, 2)
    counts, secs = res["counts"], res["seconds"]
    rejected = sum(n for code, n in counts.items() if code in ("429", "503"))
    other = {code: n for code, n in counts.items() if code.isdigit() and code not in ("429", "503")}
    row = {
        "path": path,
        "concurrency": concurrency,
        "seconds": secs,
        "good_rps": round(counts.get("good", 0) / secs, 1),
        "rejected_rps": round(rejected / secs, 1),
        "wrong": counts.get("wrong", 0),
        "other_statuses": other,
        "rejections_without_retry_after": counts.get("no_retry_after", 0),
        "rejections_without_json": counts.get("no_json_message", 0),
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "socket_errors": res["socket_errors"],
        "cpu_s": cpu,
        "proxy_cpu_share": round(cpu.get("haproxy", 0) / max(sum(cpu.values()), 1e-9), 3),
    }
    if door:
        row["rejection_p99_ms"], _ = rejection_p99(door.log, offset)
    print(
        f"  {path:10s} c={concurrency:4d}: {row['good_rps']:7.1f} good/s "
        f"{row['rejected_rps']:8.1f} rejected/s "
        f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms  other {other or '-'}  cpu {cpu}",
        flush=True,
    )
    return row


def table(runs: list[dict]) -> list[dict]:
    """One row per path and concurrency: the median of the rounds, and good answers per CPU second of
    TorchServe over all rounds (what a neighbour's load on the shared cores changes least)."""
    rows = []
    for key in dict.fromkeys((r["path"], r["concurrency"]) for r in runs):
        same = [r for r in runs if (r["path"], r["concurrency"]) == key]
        ts_cpu = sum(r["cpu_s"]["torchserve"] for r in same)
        good = sum(r["good_rps"] * r["seconds"] for r in same)
        row = {"path": key[0], "concurrency": key[1], "rounds": len(same)}
        for k in ("good_rps", "rejected_rps", "p50_ms", "p99_ms", "rejection_p99_ms", "proxy_cpu_share"):
            values = [r[k] for r in same if r.get(k) is not None]
            row[k] = round(statistics.median(values), 3) if values else None
        row["good_per_torchserve_cpu_s"] = round(good / ts_cpu, 1) if ts_cpu else None
        for k in ("wrong", "rejections_without_retry_after", "rejections_without_json"):
            row[k] = sum(r[k] for r in same)
        row["other_statuses"] = {c: sum(r["other_statuses"].get(c, 0) for r in same) for c in
                                 {c for r in same for c in r["other_statuses"]}}  # fmt: skip
        rows.append(row)
    return rows


def handshake_ms(host: str, port: int, ca: str | None, n: int = 200) -> float:
    """Median ms to open a connection (and, with ca, finish the TLS handshake)."""
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=10) as s:
            if ctx:
                with ctx.wrap_socket(s, server_hostname="localhost"):
                    times.append((time.perf_counter() - t0) * 1000)
                continue
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def run_server(args, store: str, work: str, env: dict, levels: list[int], job_queue: str | None) -> dict:
    """One TorchServe (with `job_queue` as its job_queue_size if given) and its front door: every level
    through each path for --rounds; the rows, the handshake times and the front door's limits."""
    overrides = {"job_queue_size": job_queue} if job_queue else {}
    ts = TorchServe(
        workdir=tempfile.mkdtemp(dir=work),
        model_store=store,
        ports=Ports.free(),
        overrides=overrides,
        user=None,
    )
    door = None
    try:
        ts.start(models=f"{MODEL}={MODEL}.mar", restore=False)
        env = {**env, "OVERLOAD_KEY": ts.keys()["inference"]["key"]}
        pids = {"torchserve": [ts.pid()]}
        if not args.no_front_door:
            door = for_server(
                ts, port=Ports.free().inference, folder=os.path.join(work, "door"), names=["localhost"]
            )
            door.maxconn, door.queue = args.maxconn, args.queue
            door.per_source = max(levels)  # wrk's connections all come from one address
            door.start()
            pids["haproxy"] = [door.pid()]
        direct = f"{ts.url()}/predictions/{MODEL}"
        through = f"https://127.0.0.1:{door.port}/predictions/{MODEL}" if door else None
        wrk(direct, LUA, 16, 3, env)  # warm-up: workers, JIT, caches
        runs = []
        for _ in range(args.rounds):  # rounds interleave the paths, so a noisy neighbour hits both
            for c in levels:
                runs.append(measure("torchserve", direct, c, args.seconds, env, pids))
                if door:
                    runs.append(measure("front door", through, c, args.seconds, env, pids, door))
        result = {"job_queue_size": ts.config().get("job_queue_size"), "rows": table(runs), "runs": runs}
        if door:
            result["handshake_ms"] = {
                "tls_front_door": handshake_ms("127.0.0.1", door.port, door.ca),
                "tcp_torchserve": handshake_ms("127.0.0.1", ts.ports.inference, None),
            }
            result["front_door"] = {
                "maxconn": door.maxconn,
                "queue": door.queue,
                "queue_timeout_s": door.queue_timeout,
            }
        return result
    finally:
        if door:
            door.stop()
        ts.stop()


def plot(runs: list[dict], path: str):
    """Plot good answers/s, good answers per TorchServe CPU second and p99 against concurrency
    into the PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        for name in ("torchserve", "front door"):
            rows = [r for r in run["rows"] if r["path"] == name]
            if not rows:
                continue
            label = f"{name} (job_queue_size {run['job_queue_size']})"
            c = [r["concurrency"] for r in rows]
            ax1.plot(c, [r["good_rps"] for r in rows], marker="o", label=label)
            ax2.plot(c, [r["p99_ms"] for r in rows], marker="o", label=label)
            ax3.plot(c, [r["good_per_torchserve_cpu_s"] for r in rows], marker="o", label=label)
    ax1.set(xscale="log", xlabel="concurrency (wrk, closed loop)", ylabel="good answers/s", ylim=(0, None))
    ax2.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p99 latency of all answers (ms)")
    ax3.set(
        xscale="log", xlabel="concurrency", ylabel="good answers per CPU second of TorchServe", ylim=(0, None)
    )
    ax3.set_title("the same, per CPU second TorchServe got")
    ax1.legend(fontsize=8)
    ax1.set_title("good answers under overload")
    ax2.set_title("p99")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args):
    """Run the overload levels for each job_queue_size asked for; write overload.json and
    overload.png; returns the result."""
    levels = [int(c) for c in args.levels.split(",")]
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        target = digits_target(args.digits_checkpoint, work)
        store = os.path.join(work, "store")
        archive_checkpoint(target["checkpoint"], "1.0", "eager", output=os.path.join(store, f"{MODEL}.mar"))
        image = next(p for p in target["images"] if os.path.basename(os.path.dirname(p)) == "3")
        body = os.path.join(work, "body.json")
        with open(body, "w") as f:
            json.dump({"data": base64.b64encode(read_bytes(image)).decode()}, f)
        env = {"OVERLOAD_BODY": body, "OVERLOAD_LABEL": "3"}
        runs = []
        for jq in args.job_queue_sizes.split(",") if args.job_queue_sizes else [None]:
            print(f"job_queue_size {jq or 'from config.properties'}:", flush=True)
            try:
                runs.append(run_server(args, store, work, env, levels, jq))
            except WrkError as e:
                raise SystemExit(str(e)) from None
    result = {"cores": os.cpu_count(), "seconds_per_run": args.seconds, "image": image, "runs": runs}
    with open(os.path.join(args.out, "overload.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(runs, os.path.join(args.out, "overload.png"))
    print(f"wrote {args.out}/overload.json and overload.png")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
