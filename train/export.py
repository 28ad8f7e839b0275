"""Export a checkpoint into serving files, each checked against the eager model first.

    python -m train.export --checkpoint runs/v1/checkpoint_best.pt --output-dir exports/v1

Writes the file of each backend asked for (model_src/backends/: by default every one TorchServe serves,
model.pt, model.torchscript.pt, model.onnx, model.int8.pt; on request (--formats ...,ptl,pte) the phone
formats model.ptl and model.pte, with the phone's preprocessing.json, train/mobile.py) and bundle.json, the
bundle manifest (model_src/manifest.py): the checkpoint's manifest plus the files written and their checks.
Every file is compared with the eager model on the same real validation batch (class-balanced, at most --batch
images); a backend of reduced precision (int8, bf16) passes the precision gate of train/precision.py instead:
400 random crops of the validation images and the whole labelled split. If any check fails, nothing is
written.
"""

import argparse
import collections
import contextlib
import copy
import functools
import os
import shutil
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from model_src import backends
from model_src.backends import Backend, BackendUnavailable, ExportError, ExportJob
from model_src.manifest import Manifest
from model_src.net import fuse_for_export, load_model
from model_src.preprocessing import Preprocessing
from train import data as datalib
from train import mobile, precision

# the default: what TorchServe loads
SERVER_FORMATS = tuple(n for n, b in backends.served().items() if b.default)
FORMATS = tuple(backends.all_backends())
TOLERANCE = 1e-4  # max |p_export - p_eager| over the batch
FAST_FP32 = ("onnx", "openvino")  # exact files that may stand in for eager as the precision gate's fp32 side


class ExportCheckError(RuntimeError):
    """An exported file disagrees with the eager model beyond its tolerance or precision gate."""

    pass


def get_args_parser():
    """The command line of `python -m train.export`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (checkpoint_best.pt)")
    p.add_argument("--output-dir", required=True, help="new folder for the serving files (must not exist)")
    p.add_argument(
        "--formats",
        default=",".join(SERVER_FORMATS),
        help="comma-separated subset of "
        + ",".join(FORMATS)
        + " (pte needs ExecuTorch: scripts/setup.sh --mobile)",
    )
    p.add_argument(
        "--data", default=None, help="ImageFolder root for the check batch (default: the one trained on)"
    )
    p.add_argument("--batch", default=64, type=int, help="check batch size")
    return p


def val_dataset(data_root: str, prep: Preprocessing) -> datalib.CachedImages:
    """The validation split of `data_root`, uncached, through the eval preprocessing."""
    return datalib.CachedImages(os.path.join(data_root, "val"), prep, prep, cache=False)


def calibration_batches(data_root: str, prep: Preprocessing, batch: int = 32):
    """Batches for post-training quantisation (openvino-int8): the training split (ensure_data has checked
    that there is one), shuffled with a fixed seed so that the first few hundred images cover every class."""

    def batches():  # the folder is read only when a backend calibrates, and only as far as it reads
        ds = datalib.CachedImages(os.path.join(data_root, "train"), prep, prep, cache=False)
        order = torch.Generator().manual_seed(1)
        return (x for x, _ in DataLoader(ds, batch_size=batch, shuffle=True, generator=order))

    return batches


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
    """Softmax probabilities, in float32."""
    return torch.softmax(logits.float(), dim=1)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """The max |Δprob| between `got` and `want` logits; ExportCheckError above TOLERANCE."""
    diff = (probs(got) - probs(want)).abs().max().item()
    if not diff <= TOLERANCE:
        raise ExportCheckError(f"{name}: max |Δprob| {diff:.2e} exceeds {TOLERANCE:.0e}")
    return diff


class GateInput:
    """What the precision gate judges a reduced-precision backend on, made once per export and only if one
    is asked for: random crops of the validation images, and the labelled split when its folders are the
    model's classes (the ImageNet photos' folders are photo names, not the 1,000 classes: no labels there)."""

    def __init__(self, val: datalib.CachedImages, prep: Preprocessing, classes: list[str]):
        self.val, self.prep, self.has_labels = val, prep, list(val.classes) == list(classes)
        self._reference: precision.Reference | None = None
        self.fp32 = None  # a fast exact fp32 file, once one has passed its check (see `reference`)

    @functools.cached_property
    def images(self) -> list:
        """The validation images, decoded once (as training decodes them), for the crops and the labels."""
        return [datalib.decode_trusted(self.prep, path) for path, _ in self.val.folder.samples]

    @functools.cached_property
    def crops(self) -> torch.Tensor:
        """precision.MIN_CROPS random crops of the validation images, through the eval preprocessing."""
        return precision.random_crops(self.images, self.prep)

    @functools.cached_property
    def labelled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every validation image as the handler prepares it (the dataset's own item: prep(decoded)) and its
        label; None without labels."""
        if not self.has_labels:
            return None
        return torch.stack([self.prep(img) for img in self.images]), torch.tensor(self.val.targets)

    def reference(self, model) -> precision.Reference:
        """fp32's side of the gate, computed for the first candidate and reused for the others. Its noise
        floor (NOISE_DRAWS passes over the crops) is most of the gate's cost, so it runs on `fp32` where an
        exact file has already passed its check (ONNX Runtime or OpenVINO fp32, within 1e-4 of eager in
        probability: EfficientNet-Lite0 4-5x faster than eager PyTorch), else on the eager model."""
        if self._reference is None:
            runner = self.fp32 or model
            self._reference = precision.Reference.of(runner, self.crops, self.prep, self.labelled)
        return self._reference


def check_backend(backend: Backend, pred, model, example, eager_logits, gate: GateInput) -> dict:
    """The export check of one written file: exact backends match eager on the check batch (and at batch 1);
    the others pass the precision gate (train/precision.py) on `gate`'s crops and labelled split."""
    if backend.exact:
        return {
            "max_diff": check_close(backend.name, pred(example), eager_logits),
            "max_diff_batch1": check_close(f"{backend.name} (batch 1)", pred(example[:1]), eager_logits[:1]),
        }
    try:
        result = precision.require(
            backend.name, model, pred, gate.crops, gate.prep, reference=gate.reference(model)
        )
    except precision.PrecisionError as e:
        raise ExportCheckError(str(e)) from None
    with torch.inference_mode():
        max_diff = (probs(pred(example)) - probs(eager_logits)).abs().max().item()
    return {**result.to_dict(), "max_diff": max_diff}


def chosen(formats) -> list[Backend]:
    """The backends asked for, each usable here: checked before any work, so the message comes first."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {FORMATS}")
    chosen = [backends.get(f) for f in formats]
    for backend in chosen:
        if why := backend.available():
            raise BackendUnavailable(why)
    return chosen


def export_one(backend: Backend, job: ExportJob, path: str, example, eager_logits, gate: GateInput) -> dict:
    """Write `backend`'s file at `path`, load it and check it (check_backend); its report entry."""
    start = time.perf_counter()
    backend.export(job, path)
    seconds = time.perf_counter() - start
    pred = backend.load(path, "cpu", None)
    entry = {"file": backend.file, "bytes": os.path.getsize(path), "export_s": round(seconds, 2)}
    entry.update(check_backend(backend, pred, job.model, example, eager_logits, gate))
    if backend.name in FAST_FP32 and gate.fp32 is None:
        gate.fp32 = pred  # checked within TOLERANCE of eager just above
    return entry


def export_all(
    checkpoint: str,
    output_dir: str,
    formats=SERVER_FORMATS,
    data: str | None = None,
    batch: int = 64,
    optional: frozenset[str] = frozenset(),
) -> dict:
    """Export and check; returns the report. Raises ExportCheckError, ExportError or BackendUnavailable
    (nothing written), except for the backends named in `optional` (the candidates of an archive's
    `--backend auto`): one of those that fails its check or cannot be written is left out, and
    report["refused"] says why."""
    if os.path.exists(output_dir):
        raise FileExistsError(
            f"{output_dir} exists; choose a new --output-dir (exports are never overwritten)"
        )
    todo = sorted(chosen(formats), key=lambda b: not b.exact)  # exact first: the gate's fp32 side (GateInput)
    model, ckpt = load_model(checkpoint)
    manifest = Manifest.from_checkpoint(ckpt)
    prep = Preprocessing.from_dict(manifest.preprocessing)
    data_root = datalib.ensure_data(data or manifest.provenance.data or datalib.DIGITS_DIR)
    val = val_dataset(data_root, prep)
    example, _ = check_batch(val, batch)
    gate = GateInput(val, prep, manifest.class_names)
    with torch.inference_mode():
        eager_logits = model(example)
    fused = fuse_for_export(copy.deepcopy(model)).eval()
    job = ExportJob(model, fused, example, calibration_batches(data_root, prep), manifest)
    report = {
        "checkpoint": os.path.abspath(checkpoint),
        "check_batch": len(example),
        "tolerance": TOLERANCE,
        "formats": {},
    }
    with torch.inference_mode():
        report["fused_max_diff"] = check_close("fused WNLinear", job.fused(example), eager_logits)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)  # exports/ of `--output-dir exports/v1` on a fresh clone
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        for backend in todo:
            path = os.path.join(tmp, backend.file)
            try:
                report["formats"][backend.name] = export_one(backend, job, path, example, eager_logits, gate)
            except Exception as e:  # an optional candidate's converter may raise anything (OpenVINO, NNCF)
                if backend.name not in optional:
                    raise
                why = str(e) if isinstance(e, (ExportCheckError, ExportError)) else f"{type(e).__name__}: {e}"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                report.setdefault("refused", {})[backend.name] = why
                print(f"export: {backend.name} left out: {why}")
        manifest.files = {b.name: b.file for b in todo if b.name in report["formats"]}
        manifest.checks = report
        manifest.write(tmp)
        if any(not b.server for b in todo):
            mobile.write_phone_preprocessing(tmp, manifest)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def print_report(report: dict, output_dir: str):
    """Print each format's file, size, export time and check results, then the output folder."""
    print(
        f"export checks on {report['check_batch']} validation images "
        f"(tolerance {report['tolerance']:.0e} on probabilities):"
    )
    for fmt, e in report["formats"].items():
        line = (
            f"  {fmt:12s} {e['file']:22s} {e['bytes'] / 1024:8.1f} KiB  {e['export_s']:5.1f} s  "
            f"max |Δprob| {e['max_diff']:.2e}"
        )
        if "agreement" in e:
            line += (
                f"  precision gate: top-1 agreement {e['agreement']:.2%} (noise floor "
                f"{e['noise_floor']:.2%}) on {e['crops']} crops, {e['confident_agreement']:.2%} of "
                f"{e['confident']} confident; "
                + (
                    f"{e['wrong_candidate']}/{e['labelled']} wrong (fp32 {e['wrong_fp32']})"
                    if e["labelled"]
                    else "no labelled split (its folders are not the model's classes)"
                )
            )
        print(line)
    print(f"wrote {output_dir}/")


def main(args):
    """Export and print the report; exit with the reason, nothing written, if any step fails."""
    try:
        report = export_all(args.checkpoint, args.output_dir, args.formats.split(","), args.data, args.batch)
    except (ExportCheckError, ExportError, BackendUnavailable, FileExistsError, ValueError) as e:
        raise SystemExit(f"export failed, nothing written: {e}") from None
    print_report(report, args.output_dir)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
