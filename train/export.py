"""Export a checkpoint into serving files, each checked against the eager model first.

    python -m train.export --checkpoint runs/v1/checkpoint_best.pt --output-dir exports/v1

Writes model.pt (eager), model.torchscript.pt, model.onnx, model.int8.pt,
serving.json (preprocessing, class names, checks) and index_to_name.json; on request
(--formats ...,ptl,pte) the mobile formats model.ptl and model.pte and the phone's
preprocessing.json (train/mobile.py). Every
file is compared with the eager model on the same real validation batch (class-balanced,
at most --batch images), the int8 model also on the whole validation split; if any
check fails, nothing is written.
"""

import argparse
import collections
import copy
import json
import os
import shutil
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from model_src.net import fuse_for_export, load_model
from model_src.preprocessing import Preprocessing
from model_src.runtime import BACKEND_FILES, Predictor
from train import data as datalib
from train import mobile
from train.mobile import MOBILE_FILES, MobileExportError, MobilePredictor

SERVER_FORMATS = tuple(BACKEND_FILES)  # the default: what TorchServe loads
FORMATS = SERVER_FORMATS + tuple(MOBILE_FILES)
FILES = {**BACKEND_FILES, **MOBILE_FILES}
TOLERANCE = 1e-4  # max |p_export - p_eager| over the batch
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_ACC_DROP = 0.005


class ExportCheckError(RuntimeError):
    pass


def load_predictor(path: str, fmt: str, threads: int | None = None):
    """Any exported file in the runtime that checks it: a callable float batch -> logits."""
    return MobilePredictor(path, fmt) if fmt in MOBILE_FILES else Predictor(path, fmt, threads=threads)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (checkpoint_best.pt)")
    p.add_argument("--output-dir", required=True, help="new folder for the serving files (must not exist)")
    p.add_argument(
        "--formats",
        default=",".join(SERVER_FORMATS),
        help="comma-separated subset of " + ",".join(FORMATS) + " (pte needs ExecuTorch: scripts/setup.sh --mobile)",
    )
    p.add_argument("--data", default=None, help="ImageFolder root for the check batch (default: the one trained on)")
    p.add_argument("--batch", default=64, type=int, help="check batch size")
    return p


def val_dataset(data_root: str, prep: Preprocessing) -> datalib.CachedImages:
    return datalib.CachedImages(os.path.join(data_root, "val"), prep, prep, cache=False)


def check_batch(ds: datalib.CachedImages, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `size` validation images, one of each class in turn, in a seeded shuffle.

    ImageFolder lists images sorted by class: its first `size` would cover only the first classes.
    """
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    seen, turn = collections.Counter(), {}
    for i in order:
        turn[i] = seen[ds.targets[i]]
        seen[ds.targets[i]] += 1
    items = [ds[i] for i in sorted(order, key=turn.get)[:size]]  # stable: each turn in the shuffled order
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (probs(got) - probs(want)).abs().max().item()
    if not diff <= TOLERANCE:
        raise ExportCheckError(f"{name}: max |Δprob| {diff:.2e} exceeds {TOLERANCE:.0e}")
    return diff


def export_eager(model, ckpt, path):
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": ckpt["model_args"],
            "class_names": ckpt["class_names"],
            "preprocessing": ckpt["preprocessing"],
        },
        path,
    )


def trace(fused, example) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated in this torch, still the format TorchServe loads
        warnings.simplefilter("ignore", FutureWarning)
        # Shape-dependent Python (EfficientNet-Lite's "SAME" padding) is traced as constants: right,
        # since the preprocessing fixes the input size; the batch size stays free.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(fused, example, check_trace=False)


def export_torchscript(fused, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(trace(fused, example), path)


def export_onnx(fused, example, path):
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fused,
            (example,),
            path,
            input_names=["input"],
            output_names=["logits"],
            # Positional (one entry per input), so it does not depend on what forward names its argument.
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(path), full_check=True)


def quantize(fused):
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still the dynamic-quant API here
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per output channel weight scales: a 1000-class ImageNet head has rows of very different
        # ranges, and one scale for all of them flips near-tied top-1s (measured in tests/test_pretrained.py).
        return quantize_dynamic(copy.deepcopy(fused), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def export_int8(fused, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(quantize(fused), example, check_trace=False)
        torch.jit.save(traced, path)


@torch.inference_mode()  # the float reference is the eager model: no autograd graph
def check_int8(pred_int8, pred_float, loader) -> dict:
    """Top-1 agreement and accuracy of int8 vs float over every image of `loader`, a batch at a time."""
    q, f, labels = [], [], []
    for images, targets in loader:
        q.append(pred_int8(images).argmax(1))
        f.append(pred_float(images).argmax(1))
        labels.append(targets)
    q, f, labels = torch.cat(q), torch.cat(f), torch.cat(labels)
    report = {
        "agreement": (q == f).float().mean().item(),
        "acc_float": (f == labels).float().mean().item(),
        "acc_int8": (q == labels).float().mean().item(),
        "images": len(labels),
    }
    report["acc_drop"] = report["acc_float"] - report["acc_int8"]
    if report["agreement"] < INT8_MIN_AGREEMENT or report["acc_drop"] > INT8_MAX_ACC_DROP:
        raise ExportCheckError(
            f"int8: agreement {report['agreement']:.4f} (need ≥ {INT8_MIN_AGREEMENT}), "
            f"accuracy drop {report['acc_drop'] * 100:.2f} points (max {INT8_MAX_ACC_DROP * 100})"
        )
    return report


def export_all(
    checkpoint: str, output_dir: str, formats=SERVER_FORMATS, data: str | None = None, batch: int = 64
) -> dict:
    """Export and check; returns the report. Raises ExportCheckError or MobileExportError (nothing written)."""
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} exists; choose a new --output-dir (exports are never overwritten)")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {FORMATS}")
    if "pte" in formats:  # before any work: the message names the setup flag
        mobile.require_executorch()
    model, ckpt = load_model(checkpoint)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    data = data or ckpt.get("args", {}).get("data") or datalib.DIGITS_DIR
    val = val_dataset(datalib.ensure_data(data), prep)
    example, _ = check_batch(val, batch)
    with torch.inference_mode():
        eager_logits = model(example)
    fused = fuse_for_export(copy.deepcopy(model)).eval()
    report = {
        "checkpoint": os.path.abspath(checkpoint),
        "check_batch": len(example),
        "tolerance": TOLERANCE,
        "formats": {},
    }
    with torch.inference_mode():
        report["fused_max_diff"] = check_close("fused WNLinear", fused(example), eager_logits)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)  # exports/ of `--output-dir exports/v1` on a fresh clone
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        writers = {
            "eager": lambda p: export_eager(model, ckpt, p),
            "torchscript": lambda p: export_torchscript(fused, example, p),
            "onnx": lambda p: export_onnx(fused, example, p),
            "int8": lambda p: export_int8(fused, example, p),
            "ptl": lambda p: mobile.export_ptl(trace(fused, example), p),
            "pte": lambda p: mobile.export_pte(fused, example, p),
        }
        for fmt in formats:
            path = os.path.join(tmp, FILES[fmt])
            start = time.perf_counter()
            writers[fmt](path)
            seconds = time.perf_counter() - start
            pred = load_predictor(path, fmt)
            entry = {"file": FILES[fmt], "bytes": os.path.getsize(path), "export_s": round(seconds, 2)}
            if fmt == "int8":
                entry.update(check_int8(pred, model, DataLoader(val, batch_size=batch)))
                entry["max_diff"] = (probs(pred(example)) - probs(eager_logits)).abs().max().item()
            else:
                entry["max_diff"] = check_close(fmt, pred(example), eager_logits)
                entry["max_diff_batch1"] = check_close(f"{fmt} (batch 1)", pred(example[:1]), eager_logits[:1])
            report["formats"][fmt] = entry
        write_metadata(tmp, ckpt, report)
        if set(formats) & set(MOBILE_FILES):
            mobile.write_phone_preprocessing(tmp, prep, ckpt["class_names"])
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def write_metadata(out_dir: str, ckpt: dict, report: dict):
    with open(os.path.join(out_dir, "index_to_name.json"), "w") as f:
        json.dump({str(i): name for i, name in enumerate(ckpt["class_names"])}, f, indent=1)
    meta = {
        "model_args": ckpt["model_args"],
        "class_names": ckpt["class_names"],
        "preprocessing": ckpt["preprocessing"],
        "data": ckpt.get("args", {}).get("data"),  # lets train.evaluate default to the training data
        "args": ckpt.get("args", {}),  # how it was trained: the archive's model card (deploy/archive.py)
        "epoch": ckpt.get("epoch"),
        "best_metric": ckpt.get("best_metric"),
        "export": report,
    }
    with open(os.path.join(out_dir, "serving.json"), "w") as f:
        json.dump(meta, f, indent=1)


def print_report(report: dict, output_dir: str):
    print(
        f"export checks on {report['check_batch']} validation images "
        f"(tolerance {report['tolerance']:.0e} on probabilities):"
    )
    for fmt, e in report["formats"].items():
        line = (
            f"  {fmt:12s} {e['file']:22s} {e['bytes'] / 1024:8.1f} KiB  {e['export_s']:5.1f} s  "
            f"max |Δprob| {e['max_diff']:.2e}"
        )
        if fmt == "int8":
            line += (
                f"  top-1 agreement {e['agreement'] * 100:.2f}% | acc {e['acc_int8']:.4f} vs float "
                f"{e['acc_float']:.4f} on {e['images']} images"
            )
        print(line)
    print(f"wrote {output_dir}/")


def main(args):
    try:
        report = export_all(args.checkpoint, args.output_dir, args.formats.split(","), args.data, args.batch)
    except (ExportCheckError, MobileExportError, FileExistsError, ValueError) as e:
        raise SystemExit(f"export failed, nothing written: {e}") from None
    print_report(report, args.output_dir)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
