"""Load from wrk (C, one event-loop thread) and the CPU it costs each process: the benchmarks' measuring
tools.

A Python load generator spends about a core of its own on each request at these rates, on the cores the
server needs; wrk spends a few microseconds, so what gets measured is the server. wrk counts answers by
status only: where labels must be checked, the benchmarks use the Python client (deploy/predict.py)."""

import json
import os
import resource
import shutil
import subprocess
import tempfile
from urllib.parse import urlparse

import psutil

from deploy.client import is_loopback

POST_LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "post.lua")


class WrkError(RuntimeError):
    """wrk did not run or failed: a target off loopback, no wrk installed, or wrk's own error."""


def wrk(url: str, script: str, concurrency: int, seconds: float, env: dict) -> dict:
    """One closed-loop wrk run (`concurrency` connections, one thread); the Lua script prints JSON on its last
    line. Secrets (the key) travel in `env`, never on the command line."""
    if not is_loopback(urlparse(url).hostname or ""):
        raise WrkError(f"wrk: refusing non-loopback target {url}: measure your own server only")
    if not shutil.which("wrk"):
        raise WrkError("wrk not found: run scripts/setup.sh as root, or apt-get install wrk")
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "60s", "-s", script, url]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=seconds + 120
    )
    if out.returncode != 0:
        raise WrkError(f"wrk failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def post_files(
    url: str, key: str | None, files: list[str], concurrency: int, seconds: float, content_type=None
):
    """POST the files in turn as whole bodies (bench/post.lua): req/s, p50/p90/p99 ms (wrk's own histogram),
    statuses, and `errors` (anything but 200, socket errors included)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("".join(os.path.abspath(f) + "\n" for f in files))
        listing.flush()
        env = {"BENCH_BODIES": listing.name, "BENCH_KEY": key or ""}
        if content_type:
            env["BENCH_TYPE"] = content_type
        res = wrk(url, POST_LUA, concurrency, seconds, env)
    res["concurrency"] = concurrency
    res["throughput_rps"] = round(res["requests"] / res["seconds"], 1)
    res["errors"] = sum(n for code, n in res["statuses"].items() if code != "200") + res["socket_errors"]
    return res


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their children, living or reaped."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
