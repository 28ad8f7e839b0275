"""The CUDA path in one run (bench/gpu.sh starts it): AMP training steps, the exported formats on the device,
and TorchServe serving them with GPU workers, ending in one table.

    bench/gpu.sh                          # on a machine with a CUDA GPU: digits and EfficientNet-Lite0
    bench/gpu.sh --device cpu --quick     # the same steps on the CPU (what CI runs: tests/test_gpu_script.py)

Per model: (a) a few optimiser steps with AMP (train/loop.py: fp16 autocast + GradScaler on CUDA, bf16
autocast on the CPU), timed per step; digits trains on the bundled digits and is served as trained,
EfficientNet-Lite0 fine-tunes from the packaged ImageNet weights on the photo crops and is served with the
published weights (a few steps from a new head would answer noise); (b) eager, TorchScript and, where
ONNX Runtime has the device's provider, ONNX, each loaded on the device and checked against eager there;
(c) each served format archived (deploy/archive.py) and served by TorchServe with `number_of_gpu` GPUs, loaded
with wrk at each concurrency (bench/wrk.py post_files, real JPEGs), then every image posted again by
`concurrency` clients at once with its answer's top-1 compared with eager's on the device.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench import gpu_steps
from bench.wrk import post_files
from bundle import settings
from deploy.archive import build_archive
from deploy.client import post, read_bytes, top1
from deploy.server import Ports, TorchServe
from model_src import manifest
from model_src.preprocessing import Preprocessing

SERVED = ("eager", "torchscript")  # what TorchServe runs on the GPU (ONNX Runtime's backend stays on the CPU)


def get_args_parser():
    """The command line of `python -m bench.gpu` (bench/gpu.sh)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script itself")
    p.add_argument("--quick", action="store_true", help="digits only, 2 training steps, c=1,4 for 2 s")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 10; 2 with --quick)")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,16; 1,4 with --quick)")
    p.add_argument("--seconds", type=float, default=None, help="per wrk run (default 10; 2 with --quick)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="per served model (default: the archive's rule; 1 with --quick)",
    )
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    return p


def say(msg: str):
    """A progress line, flushed (the run takes minutes)."""
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def jpeg_copies(images: list[str], folder: str) -> list[str]:
    """The request images as JPEGs: JPEGs as they are, others (the digits' PNGs) re-encoded at quality 95."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    out = []
    for i, path in enumerate(images):
        if path.lower().endswith((".jpg", ".jpeg")):
            out.append(path)  # posted as they are
            continue
        out.append(os.path.join(folder, f"{i:03d}.jpg"))
        with Image.open(path) as img:
            img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(out[-1], quality=95)
    return out


def photos(data: str) -> list[str]:
    """The full photos (450-600 px JPEGs) that deploy/import_pretrained.py writes beside its crops."""
    samples = os.path.join(data, "samples")
    return sorted(os.path.join(samples, f) for f in os.listdir(samples) if f.endswith(".jpg"))


def targets(args, work: str) -> list[dict]:
    """Per model: its name, training data and weights, the checkpoint it serves (None: the one trained here)
    and its request images."""
    from bench.targets import imagenet_target
    from train.data import write_digits

    digits = write_digits()
    val = os.path.join(digits, "val")
    pngs = sorted(
        os.path.join(val, c, f) for c in sorted(os.listdir(val)) for f in os.listdir(os.path.join(val, c))
    )
    found = [
        {
            "name": "digits",
            "data": digits,
            "weights": None,
            "serve": None,
            "images": pngs[:: 40 if args.quick else 8],
        }
    ]
    if not args.quick:
        net = imagenet_target(work)
        found.append(
            {
                "name": "efficientnet_lite0",
                "data": net["data"],
                "weights": net["checkpoint"],
                "serve": net["checkpoint"],
                "images": photos(net["data"]),
            }
        )
    return found


def run_model(target: dict, args, device: torch.device, work: str) -> dict:
    """Steps (a) and (b) for one model; returns what it serves and its in-process rows."""
    from train.export import export_all

    name = target["name"]
    say(f"{name}: {args.steps} AMP training steps on {device}")
    batch = 8 if target["weights"] else 32
    out = os.path.join(work, f"train_{name}")
    ms_step, trained = gpu_steps.train_steps(
        target["data"], out, device, args.steps, batch, target["weights"]
    )
    say(f"{name}: {ms_step:.1f} ms/step; exporting {', '.join(gpu_steps.formats(device))}")
    checkpoint = target["serve"] or trained
    export_dir = os.path.join(work, f"export_{name}")
    export_all(checkpoint, export_dir, formats=gpu_steps.formats(device))
    prep = manifest.read(export_dir)
    files = jpeg_copies(target["images"], os.path.join(work, f"jpeg_{name}"))
    x = gpu_steps.inputs(Preprocessing.from_dict(prep.preprocessing), [read_bytes(f) for f in files])
    eager = gpu_steps.load_on(export_dir, "eager", device)
    labels = [prep.class_names[i] for i in gpu_steps.probabilities(eager, x).argmax(1).tolist()]
    rows = {}
    for fmt in ["eager", "torchscript", "onnx"]:
        why = None if fmt in gpu_steps.formats(device) else gpu_steps.onnx_missing(device)
        rows[fmt] = {
            "model": name,
            "backend": fmt,
            "device": str(device),
            "train_ms_step": ms_step,
            "skipped": why,
        }
        if why is None:
            rows[fmt].update(gpu_steps.measure(export_dir, fmt, device, x, eager, 0.5 if args.quick else 3.0))
            say(f"{name} {fmt}: {rows[fmt]['ms_b1']:.2f} ms/img at batch 1, {rows[fmt]['ms_b8']:.2f} at 8")
    return {"name": name, "export_dir": export_dir, "files": files, "labels": labels, "rows": rows}


def check_answers(ts: TorchServe, model_name: str, files: list[str], labels: list[str], c: int) -> dict:
    """Every image posted once by `c` clients at once: answers that are not 200 (with the first one's status
    and body, to say why) and top-1s unlike eager's."""

    def one(i: int) -> tuple[int, bool, str]:
        resp = post(ts, read_bytes(files[i]), model_name, timeout=60)
        ok = resp.status_code == 200 and top1(resp.json()) == labels[i]
        return (
            resp.status_code,
            ok,
            "" if resp.status_code == 200 else f"{resp.status_code} {resp.text[:200]}",
        )

    with ThreadPoolExecutor(max_workers=c) as pool:
        results = list(pool.map(one, range(len(files))))
    failed = [why for _, _, why in results if why]
    return {
        "answers": len(results),
        "errors": len(failed),
        "wrong": sum(s == 200 and not ok for s, ok, _ in results),
        "first_error": failed[0] if failed else None,
    }


def serve_all(models: list[dict], args, device: torch.device, work: str):
    """Step (c): every served format of every model archived, one TorchServe with GPU workers
    (`number_of_gpu`) loading them all at its start, wrk at each concurrency and the answers checked; adds the
    served numbers to the rows."""
    store = os.path.join(work, "store")
    os.makedirs(store)
    names, config = {}, worker_config(args.workers, work)
    for m in models:
        for fmt in SERVED:  # one model name per format: TorchServe loads them side by side at its start
            names[m["name"], fmt] = name = f"gpu_{m['name']}_{fmt}"
            build_archive(m["export_dir"], "1.0", fmt, name, store, config)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ts = TorchServe(
        workdir=os.path.join(work, "ts"),
        model_store=store,
        ports=Ports.free(),
        user=None,
        overrides={"number_of_gpu": str(gpus)},
    )
    say(f"starting TorchServe (number_of_gpu={gpus}) with {len(names)} archives: {', '.join(names.values())}")
    ts.start(models=",".join(f"{n}={n}.mar" for n in names.values()), restore=False)
    try:
        for m in models:
            for fmt in SERVED:
                serve_one(ts, m, fmt, names[m["name"], fmt], args)
    finally:
        ts.stop()


def worker_config(workers: int | None, work: str) -> str:
    """handlers/model-config.yaml, or a copy of it with `workers` workers per model (the --quick run's 1: four
    workers starting at once on 2 loaded cores took half a minute)."""
    if not workers:
        return settings.MODEL_CONFIG
    with open(settings.MODEL_CONFIG) as f:
        text = f.read()
    path = os.path.join(work, "model-config.yaml")
    with open(path, "w") as f:
        f.write(f"{text.rstrip()}\nminWorkers: {workers}\nmaxWorkers: {workers}\n")
    return path


def serve_one(ts: TorchServe, m: dict, fmt: str, model_name: str, args):
    """Load one served format with wrk at each concurrency, then check every answer at that concurrency."""
    say(f"{m['name']} {fmt}: wrk at c={','.join(map(str, args.levels))}, {args.seconds:g} s each")
    row = m["rows"][fmt]
    url = f"{ts.url()}/predictions/{model_name}"
    key = ts.keys()["inference"]["key"]
    row["served"], row["answers"] = {}, []
    post_files(url, key, m["files"], max(args.levels), 1)  # warm-up: CUDA kernels, worker caches
    for c in args.levels:
        res = post_files(url, key, m["files"], c, args.seconds)
        row["served"][c] = {k: res[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors", "requests")}
        row["answers"].append(check_answers(ts, model_name, m["files"], m["labels"], c))
        rps, p50, answers = res["throughput_rps"], res["p50_ms"], row["answers"][-1]
        say(f"{m['name']} {fmt} c={c}: {rps} req/s, p50 {p50:.1f} ms, answers {answers}")


def cell(value, fmt: str = "{:.2f}") -> str:
    """A table cell: the value formatted, '-' where there is none."""
    return "-" if value is None else fmt.format(value)


def agreement(row: dict) -> str:
    """The row's agreement with eager: in-process top-1 and max |Δprob|, then served answers right/all."""
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    text = f"in-process top-1 {row['top1_agree']}/{row['checked']}, max Δprob {row['max_dprob']:.1e}"
    if row.get("answers"):
        right = sum(a["answers"] - a["errors"] - a["wrong"] for a in row["answers"])
        text += f"; served {right}/{sum(a['answers'] for a in row['answers'])} right"
    return text


def table(rows: list[dict], levels: list[int]) -> str:
    """The run's one table (markdown)."""
    served = [f"c={c} req/s / p50 / p99 ms" for c in levels]
    head = [
        "model",
        "backend",
        "device",
        "train ms/step",
        "ms/img b1",
        "ms/img b8",
        *served,
        "agreement with eager",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        at = [r.get("served", {}).get(c) for c in levels]
        cells = [
            f"{s['throughput_rps']:.1f} / {s['p50_ms']:.1f} / {s['p99_ms']:.1f}" if s else "-" for s in at
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["backend"],
                    r["device"],
                    cell(r["train_ms_step"], "{:.1f}"),
                    cell(r.get("ms_b1")),
                    cell(r.get("ms_b8")),
                    *cells,
                    agreement(r),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def all_right(rows: list[dict]) -> bool:
    """Whether every measured row agreed with eager in-process and every served answer was a 200 with eager's
    top-1."""
    measured = [r for r in rows if not r.get("skipped")]
    ok = all(r["top1_agree"] == r["checked"] for r in measured)
    answers = [a for r in measured for a in r.get("answers", [])]
    served = [s for r in measured for s in r.get("served", {}).values()]
    return (
        ok
        and all(a["errors"] == 0 and a["wrong"] == 0 for a in answers)
        and all(s["errors"] == 0 for s in served)
    )


def main(args) -> int:
    """The whole run; prints the table; exit status 0 when every answer was right, 1 otherwise."""
    args.steps = args.steps or (2 if args.quick else 10)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.workers = args.workers or (1 if args.quick else None)
    args.levels = [int(c) for c in (args.concurrency or ("1,4" if args.quick else "1,16")).split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench/gpu.py: torch sees no CUDA device; --device cpu checks the script on the CPU",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    on = torch.cuda.get_device_name(0) if device.type == "cuda" else "the CPU"
    say(f"torch {torch.__version__} on {on}")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = args.work or tmp
        models = [run_model(t, args, device, work) for t in targets(args, work)]
        serve_all(models, args, device, work)
    rows = [r for m in models for r in m["rows"].values()]
    print(table(rows, args.levels), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "levels": args.levels, "rows": rows, "all_right": all_right(rows)},
                f,
                indent=1,
            )
    print("every answer right" if all_right(rows) else "SOME ANSWERS WRONG (see the agreement column)")
    return 0 if all_right(rows) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
