"""Benchmark the serving path against its own limit and against TorchServe's stock handler.

    python -m bench.bench                       # digits (runs/v1) and EfficientNet-Lite0 (ImageNet) at 224x224
    python -m bench.bench --targets digits --requests 300 --concurrency 1,4

For each target model it measures, on this machine, in one run:
  limit   the handler's own pipeline (decode -> preprocess -> inference -> postprocess)
          called in-process, per backend, at batch 1 and at the configured batch size,
          with the thread count the workers use;
  served  the same archive behind a real TorchServe, loaded by a separate client process
          (bench/loadgen.py, loopback only) at each concurrency: req/s, p50/p90/p99, errors;
          ratio = served req/s / (workers x limit img/s at the configured batch size);
  peer    the same weights behind TorchServe's stock `image_classifier` handler;
  cold    `torchserve --start` to the first good prediction, and registration to ready.
Client and server share the machine's cores; the report says how many there are.
Writes bench_results/bench.json, bench_results/bench.png and prints a table.
"""

import argparse
import json
import os
import tempfile
import time
import zipfile

import torch
import yaml

from bench.loadgen import spawn
from bench.peer import build_peer_archive, peer_notes, rgb_copies
from bench.targets import TARGETS, digits_target
from deploy import management, settings
from deploy.archive import build_archive
from deploy.predict import post, read_bytes
from deploy.server import Ports, TorchServe
from model_src.runtime import BACKEND_FILES

BACKENDS = tuple(BACKEND_FILES)
MODEL = settings.MODEL_NAME


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="digits,imagenet", help=f"comma-separated, of: {', '.join(TARGETS)}")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=0, help="requests per level (0: 800 digits, 160 imagenet)")
    p.add_argument(
        "--digits-checkpoint",
        default=os.path.join(settings.RUNS_DIR, "v1", "checkpoint_best.pt"),
        help="trained if missing",
    )
    p.add_argument("--config-file", default=settings.MODEL_CONFIG, help="model-config.yaml under test")
    p.add_argument("--no-peer", action="store_true", help="skip the stock image_classifier peer")
    p.add_argument("--out", default=settings.BENCH_RESULTS, help="folder for bench.json and bench.png")
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
    ctx = Context(MODEL, model_dir, manifest, batch_size, None, "0.12.0", metrics=metrics, model_yaml_config=yaml_cfg)
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx, RequestProcessor


def measure_limit(handler, ctx, request_processor, bodies, batch: int, seconds: float = 3.0) -> float:
    """Images per second through handler.handle() with `batch` requests per call."""
    rows = [{"body": bytearray(bodies[i % len(bodies)])} for i in range(batch)]
    ctx.request_processor = [request_processor({}) for _ in rows]
    ctx.metrics.request_ids = {i: str(i) for i in range(batch)}
    for _ in range(3):
        handler.handle(rows, ctx)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        handler.handle(rows, ctx)
        n += batch
    return n / (time.perf_counter() - t0)


# --- served numbers ------------------------------------------------------------------------------


def load(ts: TorchServe, version: str, images, expect, concurrency: int, requests: int) -> dict:
    """One load level through bench/loadgen.py in its own process; expect=None checks no labels."""
    proc = spawn(f"{ts.url()}/predictions/{MODEL}/{version}", ts.key_file, concurrency, requests, images, expect)
    out, _ = proc.communicate(timeout=900)
    if proc.returncode:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    return json.loads(out)


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


def bench_target(target: dict, args, work: str) -> dict:
    from model_src.net import load_model

    backends = args.backends.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    n_requests = args.requests or (800 if target["name"] == "digits" else 160)
    with open(args.config_file) as f:
        model_cfg = yaml.safe_load(f)
    batch = int(model_cfg.get("batchSize", 1))
    store = os.path.join(work, f"store_{target['name']}")
    os.makedirs(store)
    model, ckpt = load_model(target["checkpoint"])
    prep_names = ckpt["class_names"]
    bodies = [read_bytes(p) for p in target["images"]]
    # Expected labels: what the eager model says offline (served answers must agree).
    from model_src.preprocessing import Preprocessing

    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    with torch.inference_mode():
        expect = [prep_names[model(prep(prep.decode(b)).unsqueeze(0)).argmax(1).item()] for b in bodies]

    result = {
        "model": target["name"],
        "batch_size": batch,
        "workers": model_cfg.get("maxWorkers"),
        "max_batch_delay_ms": model_cfg.get("maxBatchDelay"),
        "images": len(bodies),
        "requests_per_level": n_requests,
        "limit": {},
        "served": {},
        "registration_s": {},
    }
    archives = {}
    for i, backend in enumerate(backends):
        name = f"{MODEL}.mar" if i == 0 else f"{MODEL}_v{backend}.mar"
        archives[backend] = build_archive(
            target["checkpoint"], backend, backend, output=os.path.join(store, name), config_file=args.config_file
        )["archive"]
        handler, ctx, rp = make_handler(archives[backend], work, batch)
        per_worker = measure_limit(handler, ctx, rp, bodies, batch)
        result["limit"][backend] = {
            "batch_1": measure_limit(handler, ctx, rp, bodies, 1),
            f"batch_{batch}": per_worker,
            # Each worker runs this pipeline on cores/workers threads, so together they can do workers x.
            "all_workers": per_worker * int(model_cfg.get("maxWorkers", 1)),
        }
        print(f"  limit {target['name']} {backend}: {result['limit'][backend]}", flush=True)
        del handler
    torch.set_num_threads(os.cpu_count() or 1)

    ts = TorchServe(
        workdir=os.path.join(work, f"ts_{target['name']}"), model_store=store, ports=Ports.free(), user=None
    )
    try:
        result["cold_start_s"] = cold_start(ts, target["images"][0])
        served_versions = {backends[0]: backends[0]}
        for backend in backends[1:]:
            result["registration_s"][backend] = register(ts, archives[backend])
            served_versions[backend] = backend
        if not args.no_peer:
            peer = build_peer_archive(target["checkpoint"], store, os.path.join(work, "peer_build"), args.config_file)
            result["registration_s"]["stock"] = register(ts, peer)
            served_versions["stock image_classifier"] = "stock"
            result["peer_notes"] = peer_notes(ts, target["images"][0], prep)
        for label, version in served_versions.items():
            rows = []
            for c in levels:
                if version == "stock":  # RGB copies (the stock handler cannot read grey PNGs); labels unchecked
                    stats = load(ts, version, rgb_copies(target["images"], work), None, c, n_requests)
                else:
                    stats = load(ts, version, target["images"], expect, c, n_requests)
                rows.append(stats)
                print(
                    f"  served {target['name']} {label} c={c}: {stats['throughput_rps']} req/s "
                    f"p50 {stats['p50_ms']:.1f} p99 {stats['p99_ms']:.1f} ms errors {stats['errors']} "
                    f"wrong {stats['wrong_labels']}",
                    flush=True,
                )
            result["served"][label] = rows
    finally:
        ts.stop()
    return result


# --- report --------------------------------------------------------------------------------


def table(res: dict) -> str:
    batch = res["batch_size"]
    lines = [
        f"\n{res['model']}: batch {batch}, {res['workers']} worker(s), maxBatchDelay {res['max_batch_delay_ms']} ms,"
        f" {res['requests_per_level']} requests per level, cold start {res['cold_start_s']:.1f} s",
        f"{'backend':24s}{'limit b1':>10s}{'limit b' + str(batch):>10s}{'x workers':>10s}  {'c':>3s}{'req/s':>9s}"
        f"{'p50':>8s}{'p90':>8s}{'p99':>8s}{'err':>5s}{'served/limit':>14s}",
    ]
    for label, rows in res["served"].items():
        lim = res["limit"].get(label)  # the stock peer has no in-process limit of ours
        for j, r in enumerate(rows):
            l1 = f"{lim['batch_1']:.0f}" if lim and j == 0 else ""
            lb = f"{lim[f'batch_{batch}']:.0f}" if lim and j == 0 else ""
            la = f"{lim['all_workers']:.0f}" if lim and j == 0 else ""
            ratio = f"{r['throughput_rps'] / lim['all_workers']:.2f}" if lim else ""
            lines.append(
                f"{label if j == 0 else '':24s}{l1:>10s}{lb:>10s}{la:>10s}  {r['concurrency']:3d}"
                f"{r['throughput_rps']:9.1f}{r['p50_ms']:8.1f}{r['p90_ms']:8.1f}{r['p99_ms']:8.1f}{r['errors']:5d}{ratio:>14s}"
            )
    regs = ", ".join(f"{k} {v:.1f} s" for k, v in res["registration_s"].items())
    lines.append(f"registration to ready: {regs}")
    return "\n".join(lines)


def plot(results: list, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for col, res in enumerate(results):
        batch = res["batch_size"]
        for label, rows in res["served"].items():
            c = [r["concurrency"] for r in rows]
            axes[0][col].plot(c, [r["throughput_rps"] for r in rows], marker="o", label=label)
            axes[1][col].plot(c, [r["p99_ms"] for r in rows], marker="o", label=label)
            lim = res["limit"].get(label)
            if lim:
                axes[0][col].axhline(lim["all_workers"], linestyle=":", color=axes[0][col].lines[-1].get_color())
        axes[0][col].set(
            title=f"{res['model']}: throughput (dotted: in-process limit x workers, batch {batch})",
            xscale="log",
            xlabel="concurrency",
            ylabel="req/s",
        )
        axes[1][col].set(
            title=f"{res['model']}: p99 latency", xscale="log", yscale="log", xlabel="concurrency", ylabel="ms"
        )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
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
            print(f"benchmarking {name} ({os.cpu_count()} cores shared by client and server)", flush=True)
            results.append(bench_target(target, args, work))
    report = {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "note": "client and server share the cores",
        "results": results,
    }
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, os.path.join(args.out, "bench.png"))
    for res in results:
        print(table(res))
    print(f"\nwrote {args.out}/bench.json and {args.out}/bench.png")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
