"""The benchmark's peers in the same run: LitServe, BentoML and Ray Serve each serving the same model.onnx
with ONNX Runtime on the CPU, with our preprocessing (bit for bit), our workers, threads, max batch and batch
delay, answering the same raw-JPEG POST bodies (bench/post.lua).

Each peer runs under .venv-peers' Python (scripts/setup.sh --bench-peers; no torch there) in a process group
of its own, from bench/peer_apps/<name>_app.py; `serve` starts one, waits until it answers and stops it, with
every process it started, whatever happens.

    python -m bench.peer_frameworks --onnx EXPORT/model.onnx --images a.jpg b.jpg --concurrency 1,16,64
"""

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile

import psutil
import requests
import yaml

from bench.wrk import post_files
from bundle import settings
from deploy.process import terminate, wait_until
from model_src.cores import split_cores, threads_per_worker, usable_cores

PEERS = {"litserve": "litserve", "bentoml": "bentoml", "ray": "ray.serve"}  # name -> the module it needs
APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_apps")
VENV = os.path.join(settings.ROOT, ".venv-peers")
READY_TIMEOUT_S = 180  # Ray starts its own cluster first: ~15 s alone, a minute on a loaded 2-core box
STOP_TIMEOUT_S = 15
JUNK = b"not an image"  # the readiness probe: a peer that routes it to its app answers 400


class PeerError(RuntimeError):
    """A peer is not installed, did not start, or answered wrongly."""


def python() -> str:
    """.venv-peers' Python."""
    return os.path.join(VENV, "bin", "python")


@functools.cache
def available(name: str) -> str | None:
    """None when the peer `name` can run here, else why not."""
    if name not in PEERS:
        return f"unknown peer {name!r}; known: {', '.join(PEERS)}"
    if not os.access(python(), os.X_OK):
        return f"{VENV} is missing: run scripts/setup.sh --bench-peers"
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({PEERS[name]!r}) is None)"
    try:
        found = subprocess.run([python(), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return f"{python()} did not answer within 60 s"
    return None if found else f"{PEERS[name]} is not installed in {VENV}: run scripts/setup.sh --bench-peers"


def peer_meta(manifest_or_prep) -> dict:
    """{"preprocessing", "class_names"} from a manifest (bundle.json's path, the folder holding it, its dict,
    or a Manifest), or from a dict that holds just those two keys."""
    from model_src.manifest import Manifest, read

    if isinstance(manifest_or_prep, (str, os.PathLike)):
        path = str(manifest_or_prep)
        manifest_or_prep = read(path if os.path.isdir(path) else os.path.dirname(path))
    if isinstance(manifest_or_prep, Manifest):
        manifest_or_prep = manifest_or_prep.to_dict()
    return {k: manifest_or_prep[k] for k in ("preprocessing", "class_names")}


def command(name: str, onnx_path: str, meta: str, workers, threads, batch, delay_ms, port) -> list[str]:
    """The command line that runs peer `name`'s app."""
    app = os.path.join(APPS, f"{name}_app.py")
    opts = {"onnx": onnx_path, "meta": meta, "workers": workers, "threads": threads, "batch": batch}
    opts |= {"delay-ms": delay_ms, "port": port}
    return [python(), app, *(x for k, v in opts.items() for x in (f"--{k}", str(v)))]


def probe(proc: subprocess.Popen, url: str, log: str):
    """A readiness probe: True once the peer's app refuses the junk body (refused_by_app); PeerError if the
    peer exited."""

    def ready() -> bool | str:
        if proc.poll() is not None:
            raise PeerError(f"exited with status {proc.returncode} before it was ready:\n{tail(log)}")
        try:
            resp = requests.post(url, data=JUNK, timeout=5)
        except requests.RequestException as e:
            return f"{e.__class__.__name__}"
        return True if refused_by_app(resp) else f"status {resp.status_code}"

    return ready


def refused_by_app(resp: requests.Response) -> bool:
    """Whether the peer's app itself refused a body as not an image: its 400 with our JSON error (a proxy in
    front of an app still starting answers 404 or 503, Ray's for one)."""
    try:
        body = resp.json()
    except ValueError:
        return False
    return resp.status_code == 400 and isinstance(body, dict) and body.get("type") == "InputError"


def tail(path: str, lines: int = 15) -> str:
    """The last `lines` lines of a log file."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen):
    """Stop the peer and every process it started (Ray's and BentoML's workers start sessions of their own,
    so they are found as descendants, not by process group)."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    terminate(procs, STOP_TIMEOUT_S)
    proc.wait(timeout=STOP_TIMEOUT_S)
    # and whatever is left in its process group: children reparented to init after a crash are no descendants
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serve(
    name: str,
    onnx_path: str,
    manifest_or_prep,
    workers: int,
    threads: int,
    batch: int,
    delay_ms: float,
    port: int,
    ready_timeout: float = READY_TIMEOUT_S,
):
    """Run peer `name` on 127.0.0.1:`port` serving `onnx_path` and yield the URL to POST images to; stopped on
    exit whatever happens. PeerError if it is not installed or does not start; its log is in the message."""
    if why := available(name):
        raise PeerError(f"{name}: {why}")
    with tempfile.TemporaryDirectory(prefix=f"peer-{name}-") as tmp:
        meta, log = os.path.join(tmp, "meta.json"), os.path.join(tmp, "peer.log")
        with open(meta, "w") as f:
            json.dump(peer_meta(manifest_or_prep), f)
        cmd = command(name, os.path.abspath(onnx_path), meta, workers, threads, batch, delay_ms, port)
        env = {  # Ray keeps its session (logs, sockets) under RAY_TMPDIR: here, so it goes with the peer
            **os.environ,
            "PYTHONPATH": APPS,
            "RAY_TMPDIR": tmp,
            "RAY_USAGE_STATS_ENABLED": "0",
            "BENTOML_DO_NOT_TRACK": "True",
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}/predict"
        try:
            wait_until(
                probe(proc, url, log), ready_timeout, f"{name} on port {port}", interval=1, error=PeerError
            )
            yield url
        finally:
            stop(proc)


def expected_labels(onnx_path: str, meta: dict, files: list[str]) -> list[str]:
    """Our own top-1 of each image: our preprocessing, the same model.onnx in-process (one at a time)."""
    from deploy.client import read_bytes
    from model_src.backends.onnx import load
    from model_src.preprocessing import Preprocessing

    prep, run = Preprocessing.from_dict(meta["preprocessing"]), load(onnx_path, "cpu", 1)
    return [
        meta["class_names"][int(run(prep.batch([prep.prepare(prep.decode(read_bytes(p)))])).argmax())]
        for p in files
    ]


def check(url: str, files: list[str], expect: list[str]) -> list[str]:
    """Post each image once: the images whose top-1 differs from `expect` (or that got no 200), with why."""
    from deploy.client import read_bytes, top1

    wrong = []
    for path, label in zip(files, expect):
        resp = requests.post(
            url, data=read_bytes(path), headers={"Content-Type": "application/octet-stream"}, timeout=60
        )
        got = top1(resp.json()) if resp.status_code == 200 else f"status {resp.status_code}"
        if got != label:
            wrong.append(f"{os.path.basename(path)}: {got!r}, ours {label!r}")
    return wrong


def model_config(path: str = settings.MODEL_CONFIG) -> tuple[int, float]:
    """(batchSize, maxBatchDelay in ms) of handlers/model-config.yaml: what our archives batch with."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    return int(cfg.get("batchSize", 1)), float(cfg.get("maxBatchDelay", 100))


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI's options."""
    batch, delay = model_config()
    split = split_cores(usable_cores())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--onnx", required=True, help="the ONNX file, with bundle.json beside it (an export folder)"
    )
    p.add_argument("--manifest", help="bundle.json (default: the one beside --onnx)")
    p.add_argument("--images", nargs="+", required=True, help="JPEGs to post, in turn")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--workers", type=int, default=split.workers, help="default: model_src/cores.py's rule")
    p.add_argument("--batch", type=int, default=batch, help="default: model-config.yaml's batchSize")
    p.add_argument("--delay-ms", type=float, default=delay, help="default: model-config.yaml's maxBatchDelay")
    p.add_argument("--port", type=int, default=18940)
    return p


def measure(name: str, args, meta: dict, expect: list[str]) -> list[dict]:
    """One row per concurrency level for peer `name`, after checking its top-1 on every image."""
    threads = threads_per_worker(args.workers, usable_cores())
    with serve(name, args.onnx, meta, args.workers, threads, args.batch, args.delay_ms, args.port) as url:
        if wrong := check(url, args.images, expect):
            raise PeerError(f"{name} answers differ from ours: {'; '.join(wrong)}")
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            res = post_files(url, None, args.images, c, args.seconds, "application/octet-stream")
            rows.append({"peer": name, "workers": args.workers, "threads": threads, **res})
    return rows


def row(r: dict) -> str:
    """One printed row: peer, concurrency, req/s, p50 and p99 in ms, errors."""
    cells = (r["concurrency"], r["throughput_rps"], r["p50_ms"], r["p99_ms"], r["errors"])
    return f"{r['peer']:9} {cells[0]:>3} {cells[1]:>8} {cells[2]:>8} {cells[3]:>8} {cells[4]:>6}"


def main(argv=None) -> int:
    """Print one row per (peer, concurrency): req/s, p50, p99 and errors."""
    args = get_args_parser().parse_args(argv)
    try:
        meta = peer_meta(args.manifest or os.path.dirname(os.path.abspath(args.onnx)))
        expect = expected_labels(args.onnx, meta, args.images)
    except (OSError, ValueError) as e:  # a missing file, a manifest that is not one (ManifestError)
        print(f"peer_frameworks: {e}", file=sys.stderr)
        return 2
    print(f"{'peer':9} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    failed = 0
    for name in args.peers.split(","):
        if why := available(name):
            print(f"{name:9} skipped: {why}")
            continue
        try:
            for r in measure(name, args, meta, expect):
                print(row(r))
        except PeerError as e:
            print(f"{name:9} failed: {e}", file=sys.stderr)
            failed += 1
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
