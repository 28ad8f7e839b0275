"""EfficientNet-Lite0 in-process, per CPU backend and precision: ms per image and the precision gate's
figures.

    python -m bench.precisions                          # onnx, openvino, openvino-bf16, openvino-int8
    python -m bench.precisions --rounds 3 --crops 400   # cheap mode

Each backend's file is exported from the imported ImageNet weights (int8 calibrated on 300 random crops of the
bundled photos, another seed than the gate's), loaded with one thread, and timed at batch 1 and 4: each round
runs every backend in turn, starting from a different one, so a slow minute of this shared machine falls on
all of them alike. The table gives the median ms per image over rounds and its 10th-90th percentile. The gate
(train/precision.py) runs each backend against the eager fp32 model on --crops random crops of the photos.
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch

from model_src import backends
from model_src.backends import ExportJob
from model_src.manifest import Manifest
from model_src.net import fuse_for_export
from model_src.preprocessing import Preprocessing
from train import precision, pretrained

DEFAULT = ("onnx", "openvino", "openvino-bf16", "openvino-int8")


def get_args_parser():
    """The command line of `python -m bench.precisions`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=list(DEFAULT), help=f"default: {' '.join(DEFAULT)}")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds (default 10)")
    p.add_argument(
        "--iters", type=int, default=20, help="calls per backend, batch size and round (default 20)"
    )
    p.add_argument("--crops", type=int, default=precision.MIN_CROPS, help="gate crops (default 400)")
    p.add_argument("--threads", type=int, default=1, help="threads per backend (default 1)")
    return p


def export_and_load(
    names: list[str], model, prep: Preprocessing, manifest: Manifest, folder: str, threads: int
):
    """Export each available backend of `names` into `folder` and load it with `threads` threads;
    name -> predictor (a backend not usable here is skipped with a note)."""
    example = precision.photo_crops(prep, 8, seed=1)
    calibration = precision.photo_crops(prep, 300, seed=2)
    fused = fuse_for_export(copy.deepcopy(model)).eval()
    job = ExportJob(model, fused, example, lambda: calibration.split(32), manifest)
    loaded = {}
    for name in names:
        backend = backends.get(name)
        if why := backend.available():
            print(f"{name}: skipped: {why}")
            continue
        path = f"{folder}/{backend.file}"
        start = time.perf_counter()
        backend.export(job, path)
        print(f"{name}: exported in {time.perf_counter() - start:.1f} s")
        loaded[name] = backend.load(path, "cpu", threads)
    return loaded


def ms_per_image(predict, x: torch.Tensor, iters: int) -> float:
    """ms per image of `iters` calls predict(x), after one untimed call."""
    with torch.inference_mode():
        predict(x)
        start = time.perf_counter()
        for _ in range(iters):
            predict(x)
    return (time.perf_counter() - start) / iters / len(x) * 1000


def timings(loaded: dict, prep: Preprocessing, rounds: int, iters: int) -> dict[tuple[str, int], list[float]]:
    """(backend, batch 1 or 4) -> its ms per image of each round; each round starts at another backend."""
    x = precision.photo_crops(prep, 4, seed=3)
    samples: dict[tuple[str, int], list[float]] = {}
    names = list(loaded)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for batch in (1, 4):
                samples.setdefault((name, batch), []).append(ms_per_image(loaded[name], x[:batch], iters))
    return samples


def spread(values: list[float]) -> str:
    """The median and its 10th-90th percentile range, as "m (lo-hi)"."""
    q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return f"{statistics.median(values):.2f} ({q[0]:.2f}-{q[-1]:.2f})"


def main(args):
    """Export, time and gate every backend asked for; print the table."""
    torch.set_num_threads(args.threads)
    model, manifest = pretrained.import_model("efficientnet_lite0")
    prep = Preprocessing.from_dict(manifest.preprocessing)
    crops = precision.photo_crops(prep, args.crops)
    with tempfile.TemporaryDirectory() as folder:
        loaded = export_and_load(args.backends, model, prep, manifest, folder, args.threads)
        samples = timings(loaded, prep, args.rounds, args.iters)
        reference = precision.Reference.of(model, crops, prep)  # fp32's side once, for every backend
        gates = {
            name: precision.evaluate(model, predict, crops, prep, reference=reference)
            for name, predict in loaded.items()
        }
    print(
        f"\n{args.rounds} rounds x {args.iters} calls, {args.threads} thread(s); ms/image median "
        "(10th-90th pct)\n"
    )
    print(
        "| backend | batch 1, ms/image | batch 4, ms/image | top-1 agreement | noise floor | where fp32 "
        "leads by >= 0.05 | max abs Δprob | gate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, g in gates.items():
        print(
            f"| {name} | {spread(samples[name, 1])} | {spread(samples[name, 4])} | {g.agreement:.2%} | "
            f"{g.noise_floor:.2%} | {g.confident_agreement:.2%} of {g.confident} | {g.max_dprob:.4f} | "
            f"{'pass' if g.passed else 'FAIL'} |"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
