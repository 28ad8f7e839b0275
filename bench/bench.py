"""Benchmark the serving path and explain each millisecond of it, with every reference measured in the same
run.

    python -m bench.bench                       # digits (runs/v1) and EfficientNet-Lite0 (ImageNet) at
                                                # 224x224
    python -m bench.bench --targets digits --backends onnx --concurrency 16 --seconds 5

For each target model, on this machine, in one run:
  limit     the handler's own pipeline (parse -> decode -> preprocess -> model -> top-k) called in-process per
            backend, one worker's thread count, at the batch size the row's concurrency makes; measured right
            before each served row (this machine's speed drifts by up to 2x within minutes);
  ceiling   a no-op handler (bench/noop_handler.py, answers {"0": 1.0}) with the same model-config.yaml on
            the same TorchServe: what TorchServe itself costs per request, for the same bodies;
  served    each backend under wrk (1 thread, closed loop, `c` connections): req/s, p50/p90/p99;
  estimate  if a request costs the frontend's share (the ceiling) plus the handler's share (the limit), served
            would be 1 / (1/ceiling + 1/(busy workers x limit)); served / estimate says how much is lost
            beyond those two (busy workers = min(c, workers), at the batch size c requests make);
  ideal     the no-op handler spending exactly the limit's CPU per image before it answers
            (bench/noop_handler.py), served right before the row: the best any handler with our cost can do
            behind this TorchServe here. served / ideal is what our handler loses itself; ideal / estimate is
            what the estimate cannot see (the two parts overlap only partly on shared cores);
  breakdown CPU milliseconds per request at the top level, measured per process (Java frontend, Python
            workers, wrk) and split with the in-process stage times: frontend, TorchServe's worker framing
            (the no-op's worker CPU), decode + preprocess, model, top-k + response, and what is left in the
            workers (metrics, logging, message parsing); bench_breakdown.png stacks them;
  batching  images/s when one request carries 1, 8 or 32 images (JSON list), against the same references;
  checked   every image once through the served backend with the Python client: labels must equal the
            eager model's;
  peer      the same weights behind TorchServe's stock `image_classifier` handler (--no-peer skips it);
  cold      `torchserve --start` to the first good prediction, and registration to ready.
Writes bench_results/bench.json, bench.png and bench_breakdown.png, and prints the tables.
"""

import argparse
import base64
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from bench.inprocess import make_handler, measure_limit, measure_stages, steal_seconds, unstolen
from bench.noop import build_busy_archive, build_noop_archive
from bench.peer import build_peer_archive, peer_notes, rgb_copies
from bench.peer_rows import DEFAULT_PEERS, measure_peers
from bench.report import STAGES as STAGES  # tests read the breakdown's stages from here
from bench.report import add_estimates, has_estimate, plot, plot_breakdown, say, table
from bench.served import Server, cold_start, register, write_busy
from bench.targets import TARGETS, digits_target
from bench.wrk import WrkError
from bundle import settings
from deploy.archive import build_archive
from deploy.client import read_bytes
from deploy.server import Ports, TorchServe
from model_src import backends
from model_src.cores import usable_cores, workers_of

# The archive default first: it is served as my_model.mar and gets the batching rows.
BACKENDS = (backends.DEFAULT, *(b for b in backends.served() if b != backends.DEFAULT))
MODEL = settings.MODEL_NAME


def get_args_parser():
    """The command line of `python -m bench.bench`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="digits,imagenet", help=f"comma-separated, of: {', '.join(TARGETS)}")
    p.add_argument("--backends", default=",".join(BACKENDS), help="the first one also gets the batching rows")
    p.add_argument(
        "--concurrency", default="1,4,16,64", help="wrk connections per level; the breakdown uses the last"
    )
    p.add_argument("--seconds", type=float, default=10, help="wrk duration per row")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure every level this many times (the table adds medians)"
    )
    p.add_argument(
        "--batching", default="1,8,32", help="images per request for the client-side batching rows"
    )
    p.add_argument("--batching-concurrency", type=int, default=8)
    p.add_argument("--limit-seconds", type=float, default=2, help="in-process limit duration per row")
    p.add_argument(
        "--digits-checkpoint",
        default=os.path.join(settings.RUNS_DIR, "v1", "checkpoint_best.pt"),
        help="trained if missing",
    )
    p.add_argument("--config-file", default=settings.MODEL_CONFIG, help="model-config.yaml under test")
    p.add_argument("--no-peer", action="store_true", help="skip the stock image_classifier peer")
    p.add_argument(
        "--peers",
        default=DEFAULT_PEERS,
        help="comma-separated peer frameworks serving the run's ONNX file after TorchServe's rows "
        "(bench/peer_rows.py; scripts/setup.sh --bench-peers installs them); '' for none",
    )
    p.add_argument("--out", default=settings.BENCH_RESULTS, help="folder for bench.json and the PNGs")
    return p


# --- the client-side batching bodies -------------------------------------------------------------


def json_bodies(files: list[str], n: int, folder: str) -> list[str]:
    """Files holding {"data": [n base64 images]}, the images taken in turn: the client-side batching
    bodies."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for start in range(0, max(len(files), n), n):
        images = [base64.b64encode(read_bytes(files[(start + k) % len(files)])).decode() for k in range(n)]
        out.append(os.path.join(folder, f"{n}_{start}.json"))
        with open(out[-1], "w") as f:
            json.dump({"data": images}, f)
    return out


def batch_at(c: int, workers: int, batch: int) -> int:
    """The batch size `c` closed-loop connections make: each busy worker takes up to `batch` waiting
    requests."""
    return max(1, min(batch, math.ceil(c / workers)))


# --- one target ------------------------------------------------------------------------------------


@dataclass
class Target:
    """One target model under test: its inputs, the parts built for it, and its `result` as rows come in."""

    name: str
    checkpoint: str
    args: argparse.Namespace
    work: str
    backends: list[str]
    levels: list[int]
    batch: int
    workers: int
    fan: list[int]  # images per request of the client-side batching rows
    store: str
    files: list[str]
    bodies: list[bytes]
    fan_files: dict[int, list[str]]
    expect: list[str]  # the eager model's labels, offline: served answers must agree
    prep: Any
    result: dict
    archives: dict = field(default_factory=dict)
    handlers: dict = field(default_factory=dict)  # backend -> (handler, ctx, RequestProcessor), in-process
    busy_file: str = ""
    export_dir: str = ""  # the one export every archive is built from (the peers serve its model.onnx)
    server: Server | None = None
    peer_files: list[str] | None = None


def bench_target(target: dict, args, work: str) -> dict:
    """Benchmark one target on a fresh TorchServe: check and warm each backend, measure every
    concurrency level and the batching rows; returns the result with its estimates."""
    t = prepare_target(target, args, work)
    build_archives(t)
    workdir = os.path.join(work, f"ts_{t.name}")
    ts = TorchServe(workdir=workdir, model_store=t.store, ports=Ports.free(), user=None)
    try:
        start_and_register(t, ts)
        t.server = Server(ts, args.seconds)
        for backend in t.backends:
            t.result["checked"][backend] = t.server.check(backend, t.files, t.expect)
            t.server.load(backend, t.files, t.levels[-1])  # warm-up: JIT, caches, connection pools
        t.server.load("noop", t.files, t.levels[-1])
        # each reference right before its rows: the machine's speed drifts
        for c in [c for _ in range(args.rounds) for c in t.levels]:
            measure_level(t, c)
        measure_batching(t)
    finally:
        ts.stop()
    if args.peers:
        t.result["peers"] = measure_peers(t, args.peers.split(","))
    add_estimates(t.result)
    return t.result


def prepare_target(target: dict, args, work: str) -> Target:
    """The target's settings, request bodies and expected labels, and its result with nothing measured yet."""
    from model_src.manifest import Manifest
    from model_src.net import load_model
    from model_src.preprocessing import Preprocessing

    levels = [int(c) for c in args.concurrency.split(",")]
    with open(args.config_file) as f:
        model_cfg = yaml.safe_load(f)
    batch, workers = int(model_cfg.get("batchSize", 1)), workers_of(model_cfg, usable_cores())
    fan = [int(n) for n in args.batching.split(",")] if args.batching else []
    store = os.path.join(work, f"store_{target['name']}")
    os.makedirs(store)
    files = target["images"]
    bodies = [read_bytes(p) for p in files]
    fan_files = {n: json_bodies(files, n, os.path.join(work, f"json_{target['name']}")) for n in fan}
    # Expected labels: what the eager model says offline (served answers must agree).
    model, ckpt = load_model(target["checkpoint"])
    known = Manifest.from_checkpoint(ckpt)
    prep = Preprocessing.from_dict(known.preprocessing)
    with torch.inference_mode():
        indices = [model(prep(prep.decode(b)).unsqueeze(0)).argmax(1).item() for b in bodies]
    expect = [known.class_names[i] for i in indices]
    result = {
        "model": target["name"],
        "batch_size": batch,
        "workers": workers,
        "max_batch_delay_ms": model_cfg.get("maxBatchDelay"),
        "images": len(bodies),
        "seconds_per_row": args.seconds,
        "levels": levels,
        "rounds": args.rounds,
        "limit": {},
        "stages_ms_per_image": {},
        "ceiling": [],
        "served": {},
        "checked": {},
        "batching": [],
        "registration_s": {},
    }
    backends = args.backends.split(",")
    return Target(
        target["name"], target["checkpoint"], args, work, backends, levels, batch, workers, fan, store, files,
        bodies, fan_files, expect, prep, result,
    )  # fmt: skip


def build_archives(t: Target):
    """One export of every backend under test (the reduced precisions through export's precision gate: one
    refused is dropped from the run, with its figures), an archive of each (the first as my_model.mar) with
    its in-process handler, the choice `--backend auto` makes from that export on this machine, and the no-op
    and busy (ideal handler) archives."""
    from train.export import export_all

    export_dir = t.export_dir = os.path.join(t.work, f"export_{t.name}")
    formats = list(dict.fromkeys([*t.backends, backends.reference().name]))
    optional = frozenset(b for b in t.backends if not backends.get(b).exact)
    report = export_all(t.checkpoint, export_dir, formats=formats, optional=optional)
    t.result["export"] = {
        b: report["formats"].get(b) or {"refused": report["refused"][b]} for b in t.backends
    }
    for backend in report.get("refused", {}):
        print(f"{t.name}: {backend} dropped: {report['refused'][backend]}", flush=True)
    t.backends = [b for b in t.backends if b in report["formats"]]
    for i, backend in enumerate(t.backends):
        name = f"{MODEL}.mar" if i == 0 else f"{MODEL}_v{backend}.mar"
        output, config_file = os.path.join(t.store, name), t.args.config_file
        t.archives[backend] = build_archive(
            export_dir, backend, backend, output=output, config_file=config_file
        )["archive"]
        t.handlers[backend] = make_handler(t.archives[backend], t.work, t.batch)
    auto = os.path.join(t.work, f"auto_{t.name}.mar")
    t.result["backend_choice"] = build_archive(
        export_dir, "auto", "auto", output=auto, config_file=t.args.config_file
    )["backend_choice"]
    build_noop_archive(t.store, t.args.config_file)
    t.busy_file = os.path.join(t.work, f"busy_{t.name}.us")
    build_busy_archive(t.store, t.args.config_file, t.busy_file)


def start_and_register(t: Target, ts: TorchServe):
    """Cold start with the first backend, then every other version, timed from registration to ready."""
    t.result["cold_start_s"] = cold_start(ts, t.files[0])
    for backend in t.backends[1:]:
        t.result["registration_s"][backend] = register(ts, t.archives[backend])
    t.result["registration_s"]["noop"] = register(ts, os.path.join(t.store, f"{MODEL}_vnoop.mar"))
    write_busy(t.busy_file, 1000.0)
    t.result["registration_s"]["busy"] = register(ts, os.path.join(t.store, f"{MODEL}_vbusy.mar"))
    if not t.args.no_peer:
        build = os.path.join(t.work, "peer_build")
        peer = build_peer_archive(t.checkpoint, t.store, build, t.args.config_file)
        t.result["registration_s"]["stock"] = register(ts, peer)
        t.result["peer_notes"] = peer_notes(ts, t.files[0], t.prep)
        # the stock handler cannot read grey PNGs; its labels are not checked
        t.peer_files = rgb_copies(t.files, t.work)


def measure_limit_next_to_row(t: Target, backend: str, key: str, row_bodies: list[bytes], b: int) -> float:
    """The handler in-process right before the served row it is the reference of (the machine's speed drifts
    by up to 2x within minutes); every measurement is kept, the row uses its own."""
    assert t.server is not None
    handler, ctx, rp = t.handlers[backend]
    t.server.settle()
    t0, s0 = time.perf_counter(), steal_seconds()
    ips = measure_limit(handler, ctx, rp, row_bodies, b, t.args.limit_seconds)
    # the steal is spread over the cores
    share = (steal_seconds() - s0) / ((os.cpu_count() or 1) * (time.perf_counter() - t0))
    t.result["limit"].setdefault(backend, {}).setdefault(key, []).append(round(ips, 1))
    return unstolen(ips, share)


def measure_level(t: Target, c: int):
    """The no-op ceiling at `c` connections, then each backend (and the stock peer) with its limit and its
    ideal handler measured right before it."""
    assert t.server is not None
    server, result = t.server, t.result
    result["ceiling"].append(server.load("noop", t.files, c))
    say(t.name, "no-op", result["ceiling"][-1])
    rows = [(b, t.files) for b in t.backends] + ([("stock", t.peer_files)] if t.peer_files else [])
    for label, fs in rows:
        b = batch_at(c, t.workers, t.batch)
        ips = measure_limit_next_to_row(t, label, f"batch_{b}", t.bodies, b) if label in t.handlers else None
        if label in t.handlers and c == t.levels[-1]:  # the breakdown's split, measured next to its row too
            result["stages_ms_per_image"][label] = measure_stages(t.handlers[label][0], t.bodies, b)
        ideal = None
        if ips and has_estimate(c, t.workers, t.batch):  # the ideal handler at this limit, next to the row
            write_busy(t.busy_file, 1e6 / ips)
            ideal = server.load("busy", t.files, c)
        row = {**server.load(label, fs, c), "limit_ips": ips}
        result["served"].setdefault(label, []).append({**row, "ideal": ideal} if ideal else row)
        say(t.name, label, result["served"][label][-1])


def measure_batching(t: Target):
    """Client-side batching: n images per JSON request to the first backend, with its limit and ceiling."""
    assert t.server is not None
    c, first = t.args.batching_concurrency, t.backends[0]
    for n in t.fan:
        row = {"images_per_request": n, "concurrency": c}
        fan_bodies = [read_bytes(p) for p in t.fan_files[n]]
        row["limit_ips"] = measure_limit_next_to_row(t, first, f"json_{n}", fan_bodies, t.batch)
        row["ceiling"] = t.server.load("noop", t.fan_files[n], c, "application/json")
        row["served"] = t.server.load(first, t.fan_files[n], c, "application/json")
        t.result["batching"].append(row)
        say(t.name, f"{first} x{n} images", row["served"])


def main(args):
    """Benchmark every target asked for; write bench.json and the two plots, print the tables."""
    names = args.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        for name in names:
            target = digits_target(args.digits_checkpoint, work) if name == "digits" else TARGETS[name](work)
            print(f"benchmarking {name} ({os.cpu_count()} cores shared by wrk and the server)", flush=True)
            try:
                results.append(bench_target(target, args, work))
            except WrkError as e:
                raise SystemExit(str(e)) from None
    report = {"cores": os.cpu_count(), "torch": torch.__version__, "results": results}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, os.path.join(args.out, "bench.png"))
    plot_breakdown(results, os.path.join(args.out, "bench_breakdown.png"))
    for res in results:
        print(table(res))
    print(f"\nwrote {args.out}/bench.json, bench.png and bench_breakdown.png")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
