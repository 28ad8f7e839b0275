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
import statistics
import tempfile
import time
import zipfile

import torch
import yaml

from bench.noop import build_busy_archive, build_noop_archive
from bench.peer import build_peer_archive, peer_notes, rgb_copies
from bench.targets import TARGETS, digits_target
from bench.wrk import children_cpu, cpu_seconds, post_files
from bundle import settings
from deploy import management
from deploy.archive import archive_checkpoint
from deploy.client import post, read_bytes, top1
from deploy.server import Ports, TorchServe
from model_src import backends

# The archive default first: it is served as my_model.mar and gets the batching rows.
BACKENDS = (backends.DEFAULT, *(b for b in backends.served() if b != backends.DEFAULT))
MODEL = settings.MODEL_NAME
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


def get_args_parser():
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
    p.add_argument("--out", default=settings.BENCH_RESULTS, help="folder for bench.json and the PNGs")
    return p


# --- the limit: the handler in-process ------------------------------------------------------------


def make_handler(archive: str, work: str, batch_size: int):
    """Unpack an archive and initialise our handler on it with a real TorchServe Context."""
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handlers.image_classifier import ImageClassifier

    model_dir = tempfile.mkdtemp(dir=work)
    with zipfile.ZipFile(archive) as z:
        z.extractall(model_dir)
    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(model_dir, manifest["model"]["configFile"])) as f:  # the name --config-file had
        yaml_cfg = yaml.safe_load(f)
    metrics = MetricsCacheYamlImpl(settings.METRICS_CONFIG)
    metrics.initialize_cache()
    ctx = Context(
        MODEL, model_dir, manifest, batch_size, None, "0.12.0", metrics=metrics, model_yaml_config=yaml_cfg
    )
    ctx.request_processor = None
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx, RequestProcessor


def per_second(fn, units: int, seconds: float) -> float:
    """units/s of fn() repeated for `seconds` after three warm-up calls."""
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += units
    return n / (time.perf_counter() - t0)


def measure_limit(handler, ctx, request_processor, bodies, batch: int, seconds: float = 3.0) -> float:
    """Images per second through handler.handle() with `batch` requests (bodies as sent) per call, the bodies
    taken in turn (real photos differ in size: the first few alone are not the average)."""
    ctx.request_processor = [request_processor({}) for _ in range(batch)]
    ctx.metrics.request_ids = {i: str(i) for i in range(batch)}
    turn = iter(range(10**9))

    def call():
        start = next(turn) * batch
        handler.handle([{"body": bytearray(bodies[(start + i) % len(bodies)])} for i in range(batch)], ctx)

    return per_second(call, batch * images_in(bodies[0]), seconds)


def images_in(body: bytes) -> int:
    return len(json.loads(body)["data"]) if body[:1] == b"{" else 1


def measure_stages(handler, bodies, batch: int, seconds: float = 2.0) -> dict:
    """ms per image of decode + preprocess and of the model (at `batch`), in-process, as the handler runs
    them."""
    i = iter(range(10**9))
    decode = per_second(lambda: handler.decode_all([bodies[next(i) % len(bodies)]], handler.prep), 1, seconds)
    x = torch.stack(handler.decode_all([bodies[k % len(bodies)] for k in range(batch)], handler.prep))
    model = per_second(lambda: handler.predictor(x), batch, seconds)
    return {"decode": 1000 / decode, "model": 1000 / model}


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


# --- served numbers ------------------------------------------------------------------------------


class Server:
    """A benchmark TorchServe: wrk against one version at a time, with the CPU each process spent."""

    def __init__(self, ts: TorchServe, seconds: float):
        self.ts, self.seconds = ts, seconds

    def settle(self, timeout: float = 120):
        """Wait until TorchServe is idle. wrk stops sending at the end of a run, but what was queued is still
        served (a slow backend at c=64 leaves seconds of work), on the cores the next measurement needs."""
        frontend = self.ts.pid()
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            before = cpu_seconds([frontend])
            time.sleep(0.5)
            if cpu_seconds([frontend]) - before < 0.05:  # under 5 % of one core
                return

    def load(self, version: str, files: list[str], c: int, content_type=None) -> dict:
        self.settle()
        cpu0 = self.cpu()
        url = f"{self.ts.url()}/predictions/{MODEL}/{version}"
        res = post_files(url, self.ts.keys()["inference"]["key"], files, c, self.seconds, content_type)
        cpu1 = self.cpu()
        n = max(res["requests"], 1)
        # CPU ms per request of each party; a worker that died mid-run would make these wrong, and is an
        # error. steal: what the hypervisor gave to other guests while this VM wanted its cores (this VM's
        # drift).
        parties = ("frontend", "workers", "wrk", "steal")
        res["cpu_ms"] = {k: round((b - a) * 1000 / n, 4) for k, a, b in zip(parties, cpu0, cpu1)}
        core_seconds = (os.cpu_count() or 1) * res["seconds"]
        res["cpu_ms"]["idle"] = round(max(0.0, core_seconds * 1000 / n - sum(res["cpu_ms"].values())), 4)
        res["steal_share"] = round((cpu1[3] - cpu0[3]) / core_seconds, 4)
        res["rps_unstolen"] = round(unstolen(res["throughput_rps"], res["steal_share"]), 1)
        return res

    def cpu(self) -> tuple[float, float, float, float]:
        """CPU seconds so far of the frontend alone, of its workers (those alive now), of finished wrk runs,
        and the machine's steal time."""
        import psutil

        frontend = self.ts.pid()
        workers = [p.pid for p in psutil.Process(frontend).children(recursive=True)]
        return (
            cpu_seconds([frontend]) - cpu_seconds(workers),
            cpu_seconds(workers),
            children_cpu(),
            steal_seconds(),
        )

    def check(self, version: str, files: list[str], expect: list[str]) -> dict:
        """Every image once, sequentially, with the Python client: answers read and compared."""
        wrong = errors = 0
        for path, label in zip(files, expect):
            resp = post(self.ts, read_bytes(path), MODEL, version)
            errors += resp.status_code != 200
            wrong += resp.status_code == 200 and top1(resp.json()) != label
        return {"requests": len(files), "wrong_labels": wrong, "errors": errors}


def register(ts: TorchServe, archive: str) -> float:
    t0 = time.perf_counter()
    management.register(ts, os.path.basename(archive))
    return time.perf_counter() - t0


def cold_start(ts: TorchServe, image: str, timeout: float = 120) -> float:
    """torchserve --start (our start() returns only when workers are READY) to the first 200."""
    t0 = time.perf_counter()
    ts.start(models=f"{MODEL}={MODEL}.mar", restore=False)
    body = read_bytes(image)
    while post(ts, body).status_code != 200:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no good answer {timeout:.0f} s after the start; see {ts.log_dir}")
        time.sleep(0.05)
    return time.perf_counter() - t0


def steal_seconds() -> float:
    """The machine's steal time so far (Linux; 0 elsewhere): CPU the hypervisor gave to other guests while
    this VM wanted it. On the reference VM it reached 45 % of the cores for minutes."""
    import psutil

    return getattr(psutil.cpu_times(), "steal", 0.0)


def unstolen(rate: float, steal_share: float) -> float:
    """A rate per core-second the host left us: every reference and row is compared in these units, so minutes
    when the host took a share of the cores do not read as a slow server (all three are CPU-bound)."""
    return rate / max(1e-3, 1 - steal_share)


def has_estimate(c: int, workers: int, batch: int) -> bool:
    """Only where the batching is known: one request at a time, or every worker taking full batches. In
    between, TorchServe's greedy batching decides (at c=4 one worker often takes all four requests and the
    other waits)."""
    return c == 1 or c >= workers * batch


def write_busy(path: str, us_per_image: float):
    """What the ideal handler spends per image from now on (it re-reads the file when it changes)."""
    with open(path, "w") as f:
        f.write(f"{us_per_image:.1f}")


def batch_at(c: int, workers: int, batch: int) -> int:
    """The batch size `c` closed-loop connections make: each busy worker takes up to `batch` waiting
    requests."""
    return max(1, min(batch, math.ceil(c / workers)))


def estimate(ceiling_rps: float, limit_ips: float, busy_workers: int, images_per_request: int = 1) -> float:
    """Requests/s if each request cost the no-op's time plus its images' share of the busy workers' limit."""
    return 1 / (1 / ceiling_rps + images_per_request / (busy_workers * limit_ips))


# --- one target ------------------------------------------------------------------------------------


def bench_target(target: dict, args, work: str) -> dict:
    from model_src.manifest import Manifest
    from model_src.net import load_model
    from model_src.preprocessing import Preprocessing

    backends = args.backends.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    with open(args.config_file) as f:
        model_cfg = yaml.safe_load(f)
    batch, workers = int(model_cfg.get("batchSize", 1)), int(model_cfg.get("maxWorkers", 1))
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
        expect = [
            known.class_names[model(prep(prep.decode(b)).unsqueeze(0)).argmax(1).item()] for b in bodies
        ]

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
    archives, handlers = {}, {}
    for i, backend in enumerate(backends):
        name = f"{MODEL}.mar" if i == 0 else f"{MODEL}_v{backend}.mar"
        archives[backend] = archive_checkpoint(
            target["checkpoint"],
            backend,
            backend,
            output=os.path.join(store, name),
            config_file=args.config_file,
        )["archive"]
        handlers[backend] = make_handler(archives[backend], work, batch)
    build_noop_archive(store, args.config_file)
    busy_file = os.path.join(work, f"busy_{target['name']}.us")
    build_busy_archive(store, args.config_file, busy_file)

    def limit(backend: str, key: str, row_bodies: list[bytes], b: int) -> float:
        """The handler in-process right before the served row it is the reference of (the machine's speed
        drifts by up to 2x within minutes); every measurement is kept, the row uses its own."""
        handler, ctx, rp = handlers[backend]
        server.settle()
        t0, s0 = time.perf_counter(), steal_seconds()
        ips = measure_limit(handler, ctx, rp, row_bodies, b, args.limit_seconds)
        # spread over the cores
        share = (steal_seconds() - s0) / ((os.cpu_count() or 1) * (time.perf_counter() - t0))
        result["limit"].setdefault(backend, {}).setdefault(key, []).append(round(ips, 1))
        return unstolen(ips, share)

    ts = TorchServe(
        workdir=os.path.join(work, f"ts_{target['name']}"), model_store=store, ports=Ports.free(), user=None
    )
    try:
        result["cold_start_s"] = cold_start(ts, files[0])
        versions = {backends[0]: backends[0]}
        for backend in backends[1:]:
            result["registration_s"][backend] = register(ts, archives[backend])
            versions[backend] = backend
        result["registration_s"]["noop"] = register(ts, os.path.join(store, f"{MODEL}_vnoop.mar"))
        write_busy(busy_file, 1000.0)
        result["registration_s"]["busy"] = register(ts, os.path.join(store, f"{MODEL}_vbusy.mar"))
        peer_files = None
        if not args.no_peer:
            peer = build_peer_archive(
                target["checkpoint"], store, os.path.join(work, "peer_build"), args.config_file
            )
            result["registration_s"]["stock"] = register(ts, peer)
            result["peer_notes"] = peer_notes(ts, files[0], prep)
            peer_files = rgb_copies(files, work)  # the stock handler cannot read grey PNGs; labels unchecked
        server = Server(ts, args.seconds)
        for backend in backends:
            result["checked"][backend] = server.check(backend, files, expect)
            server.load(backend, files, levels[-1])  # warm-up: JIT, caches, connection pools
        server.load("noop", files, levels[-1])
        # each reference right before its rows: drift
        for c in [c for _ in range(args.rounds) for c in levels]:
            result["ceiling"].append(server.load("noop", files, c))
            say(target["name"], "no-op", result["ceiling"][-1])
            for label, version, fs in [
                *((b, b, files) for b in backends),
                *([("stock", "stock", peer_files)] if peer_files else []),
            ]:
                b = batch_at(c, workers, batch)
                ips = limit(label, f"batch_{b}", bodies, b) if label in handlers else None
                # the breakdown's split, measured next to its row too
                if label in handlers and c == levels[-1]:
                    result["stages_ms_per_image"][label] = measure_stages(handlers[label][0], bodies, b)
                ideal = None
                # the ideal handler at this limit, next to the row
                if ips and has_estimate(c, workers, batch):
                    write_busy(busy_file, 1e6 / ips)
                    ideal = server.load("busy", files, c)
                row = {**server.load(version, fs, c), "limit_ips": ips}
                result["served"].setdefault(label, []).append({**row, "ideal": ideal} if ideal else row)
                say(target["name"], label, result["served"][label][-1])
        c = args.batching_concurrency
        for n in fan:
            row = {"images_per_request": n, "concurrency": c}
            row["limit_ips"] = limit(backends[0], f"json_{n}", [read_bytes(p) for p in fan_files[n]], batch)
            row["ceiling"] = server.load("noop", fan_files[n], c, "application/json")
            row["served"] = server.load(backends[0], fan_files[n], c, "application/json")
            result["batching"].append(row)
            say(target["name"], f"{backends[0]} x{n} images", row["served"])
    finally:
        ts.stop()
    add_estimates(result)
    return result


def say(name: str, label: str, r: dict):
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


# --- report --------------------------------------------------------------------------------


def table(res: dict) -> str:
    lines = [
        f"\n{res['model']}: batch {res['batch_size']}, {res['workers']} worker(s), maxBatchDelay "
        f"{res['max_batch_delay_ms']} ms, wrk {res['seconds_per_row']:g} s per row, "
        f"cold start {res['cold_start_s']:.1f} s",
        "(steal: the share of the cores the host took during the row; no-op, estimate, ideal and the ratios "
        "are per core-second it left)",
        f"{'backend':14s}{'c':>4s}{'req/s':>9s}{'p50':>8s}{'p90':>8s}{'p99':>8s}{'err':>5s}{'steal':>7s}{'no-op':>9s}"
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
                f"{r['p50_ms']:8.1f}{r['p90_ms']:8.1f}{r['p99_ms']:8.1f}{r['errors']:5d}{r['steal_share']:7.0%}"
                f"{ceil['rps_unstolen']:9.0f}{est:>10s}{ratio:>12s}" + ideal
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
    lines.append(
        "registration to ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["registration_s"].items())
    )
    return "\n".join(lines)


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
        axes[0][col].set(
            title=f"{res['model']}: req/s (dotted: estimate; dash-dot: ideal handler)",
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


def main(args):
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
            results.append(bench_target(target, args, work))
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
