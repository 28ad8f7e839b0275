"""Evaluate a checkpoint or an exported serving file on an ImageFolder split.

    python -m train.evaluate --model runs/v1/checkpoint_best.pt
    python -m train.evaluate --model exports/v1/model.onnx --data data/digits --split val

Prints accuracy, per-class precision/recall and the confusion matrix; --json writes them.
An exported file (any backend's, model_src/backends/) is told by the bundle.json beside it
(model_src/manifest.py), which names its backend and holds its preprocessing, class names and training data
folder; a checkpoint (or a model.pt copied on its own) describes itself.
"""

import argparse
import json
import os

import torch

from model_src import backends, manifest
from model_src.manifest import Manifest
from model_src.preprocessing import Preprocessing
from train import data as datalib


class ClassMismatchError(ValueError):
    """The data's classes are not the model's."""


def get_args_parser():
    """The command line of `python -m train.evaluate`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint_*.pt, or any backend's file in an export folder (bundle.json beside it)",
    )
    p.add_argument(
        "--data", default=None, help="ImageFolder root (default: the one the model was trained on)"
    )
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", default=256, type=int)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--confusion-png", default=None, help="also draw the confusion matrix to this PNG")
    return p


def load_any(path: str):
    """-> (predictor, preprocessing, class names, data root it was trained on or None)."""
    folder, name = os.path.split(path)
    if os.path.isfile(os.path.join(folder, manifest.FILE)):  # an export folder
        m = manifest.read(folder)
        backend = next((b for b, file in m.files.items() if file == name), None)
        if backend is None:
            raise ValueError(f"{path}: the {manifest.FILE} beside it lists only {sorted(m.files.values())}")
    else:  # a checkpoint
        m, backend = (
            Manifest.from_checkpoint(torch.load(path, map_location="cpu", weights_only=True)),
            "eager",
        )
    return (
        backends.load(path, backend),
        Preprocessing.from_dict(m.preprocessing),
        m.class_names,
        m.provenance.data,
    )


def confusion_matrix(predictor, loader, num_classes: int) -> torch.Tensor:
    """The [true, predicted] counts of `predictor`'s top-1 over `loader`."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [true, predicted]
    for images, targets in loader:
        pred = predictor(images).argmax(1)
        confusion += torch.bincount(targets * num_classes + pred, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    return confusion


def summarize(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix as a JSON-ready dict."""
    c = confusion.double()
    tp = c.diag()
    precision = (tp / c.sum(0).clamp(min=1)).tolist()
    recall = (tp / c.sum(1).clamp(min=1)).tolist()
    return {
        "accuracy": (tp.sum() / c.sum().clamp(min=1)).item(),
        "images": int(c.sum().item()),
        "per_class": {
            n: {"precision": p, "recall": r, "support": int(s)}
            for n, p, r, s in zip(class_names, precision, recall, c.sum(1).tolist())
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": class_names,
    }


def print_summary(res: dict):
    """Print summarize()'s result as tables: per-class metrics, then the confusion matrix."""
    print(f"accuracy {res['accuracy']:.4f} on {res['images']} images\n")
    print(f"{'class':>12s} {'precision':>9s} {'recall':>7s} {'support':>7s}")
    for name, m in res["per_class"].items():
        print(f"{name:>12s} {m['precision']:9.4f} {m['recall']:7.4f} {m['support']:7d}")
    names = res["class_names"]
    width = max(4, *(len(n) for n in names)) + 1
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{n:>{width}s}" for n in names))
    for n, row in zip(names, res["confusion_matrix"]):
        print(f"{n:>{width}s}" + "".join(f"{v:>{width}d}" for v in row))


def evaluate(model_path: str, data: str | None = None, split: str = "val", batch_size: int = 256) -> dict:
    """summarize() of a checkpoint or exported model on `split` of `data` (default: the data it was
    trained on). ClassMismatchError if the data's classes are not the model's."""
    predictor, prep, class_names, trained_on = load_any(model_path)
    root = datalib.ensure_data(data or trained_on or datalib.DIGITS_DIR)
    ds = datalib.CachedImages(os.path.join(root, split), prep, prep, cache=False)
    if ds.classes != class_names:
        raise ClassMismatchError(f"{root}/{split} has classes {ds.classes}, the model knows {class_names}")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    return summarize(confusion_matrix(predictor, loader, len(class_names)), class_names)


def main(args):
    """Evaluate, print the summary and write the JSON and PNG asked for; exit with the error on failure."""
    try:
        res = evaluate(args.model, args.data, args.split, args.batch_size)
    except (ValueError, backends.BackendUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    print_summary(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.confusion_png:
        from train.plots import plot_confusion

        plot_confusion(
            torch.tensor(res["confusion_matrix"]).numpy(), res["class_names"], args.confusion_png, args.split
        )


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except datalib.DataError as e:  # the data is not what is needed: say what to change, without a traceback
        raise SystemExit(f"error: {e}") from None
