"""Batch-1 latency of each runtime in an export folder on this CPU: eager beside the mobile formats.

    python -m bench.mobile --export-dir exports/v1 [--runs 200] [--json mobile.json]

A phone sends one image at a time, so every runtime gets one (1, C, H, W) input, the shape in
preprocessing.json; each is warmed up, then timed `--runs` times one call after another, all on the same
number of threads (--threads: torch's pool, ONNX Runtime's, ExecuTorch's XNNPACK pool). The numbers are
this machine's x86 CPU, not a phone's: read them as ratios to eager.
"""

import argparse
import importlib.util
import json
import os
import time

import torch

from deploy.latency import summary
from model_src import backends, manifest
from train.mobile import PHONE_JSON


def get_args_parser():
    """The command line of `python -m bench.mobile`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--export-dir", required=True, help="a train.export folder with preprocessing.json")
    p.add_argument("--runs", default=200, type=int, help="timed calls per runtime")
    p.add_argument("--warmup", default=10, type=int, help="untimed calls first")
    p.add_argument(
        "--threads", default=1, type=int, help="threads of every runtime (1: steadier on a busy machine)"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def set_threads(threads: int):
    """Use `threads` threads in torch and, when installed, in ExecuTorch's XNNPACK pool."""
    torch.set_num_threads(threads)
    if importlib.util.find_spec("executorch") is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)  # XNNPACK's pool otherwise takes every core


def time_calls(predictor, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """The latency of each of `runs` calls predictor(x) in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        predictor(x)
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor(x)
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def measure(export_dir: str, runs: int = 200, warmup: int = 10, threads: int = 1) -> dict:
    """Batch-1 latency of each format in the export folder on the phone's input shape, per runtime."""
    set_threads(threads)
    with open(os.path.join(export_dir, PHONE_JSON)) as f:
        x = torch.randn(json.load(f)["input_shape"], generator=torch.Generator().manual_seed(0))
    results = {}
    for name, file in manifest.read(export_dir).files.items():  # the folder may hold only some formats
        path = os.path.join(export_dir, file)
        results[backends.get(name).runner] = {
            "file": file,
            "bytes": os.path.getsize(path),
            **summary(time_calls(backends.load(path, name, "cpu", threads), x, runs, warmup)),
        }
    return {
        "export_dir": os.path.abspath(export_dir),
        "input_shape": list(x.shape),
        "runs": runs,
        "threads": threads,
        "runtimes": results,
    }


def main(args):
    """Measure, print one latency row per runtime, and write the JSON if asked."""
    report = measure(args.export_dir, args.runs, args.warmup, args.threads)
    print(
        f"batch-1 latency, {report['runs']} calls each, {args.threads} thread(s), input "
        f"{report['input_shape']}:"
    )
    for runtime, r in report["runtimes"].items():
        print(
            f"  {runtime:20s} {r['file']:22s} {r['bytes'] / 1e6:7.2f} MB  "
            f"p50 {r['p50_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
