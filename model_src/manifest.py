"""The bundle manifest: what a model is, where it came from and how it was checked, typed, in one place.

Each step writes its part once: training (model_args, class names, preprocessing, provenance) into the
checkpoint as ckpt["manifest"]; export adds the backend, the files beside it and the checks, in bundle.json of
the export folder; archiving adds the archive's part (name, version, build time, digests of the files inside).
Every reader (the handler, evaluation, the gate, the model card, the phone export) reads it and nothing else.
Its JSON form carries "schema"; a reader refuses a schema it does not know.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
FILE = "bundle.json"


def sha256_of(path: str) -> str:
    """The SHA-256 of a file, hex: the bundle's one digest helper (archives, their contents, imported
    weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ManifestError(ValueError):
    """A manifest this code cannot read (unknown schema, missing fields)."""


@dataclass
class Metrics:
    """The metrics of record, as training measured them when it wrote the checkpoint."""

    best_val_acc: float | None = None
    best_epoch: int | None = None
    epochs_done: int | None = None
    final_val_acc: float | None = None  # the validation accuracy of the checkpoint's own (last) epoch


@dataclass
class Provenance:
    """Where a model came from: its training data and command (or imported weights' source), its metrics."""

    data: str | None = None  # the ImageFolder root trained on (export checks and evaluation default to it)
    command: str | None = None  # the training command line, as typed (None for imported weights)
    source: str | None = None  # where imported weights came from (None for a training run)
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class BackendEntry:
    """The served backend: its name, its file and its precision."""

    name: str
    file: str
    precision: str


@dataclass
class ArchiveEntry:
    """What archiving adds: model name, version, build time, archive file and its members' digests."""

    model_name: str
    version: str
    built: str  # ISO 8601, UTC
    file: str  # the archive's file name at build time (its own SHA-256 is in the sidecar <file>.sha256)
    digests: dict[str, str] = field(default_factory=dict)  # file inside the archive -> SHA-256
    # --backend auto: the backend chosen and the measurement that chose it (deploy/backend_choice.py)
    backend_choice: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """The bundle manifest: one typed record that training, export and archiving each extend once."""

    model_args: dict[str, Any]
    class_names: list[str]
    preprocessing: dict[str, Any]  # Preprocessing.to_dict()
    provenance: Provenance = field(default_factory=Provenance)
    backend: BackendEntry | None = None  # export: the served file
    # backend name -> its file, for every model file beside
    files: dict[str, str] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # export: its report (tolerance, per-format checks)
    archive: ArchiveEntry | None = None  # archiving

    def to_dict(self) -> dict:
        """The manifest as a JSON-ready dict, tagged with its "schema"."""
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """The manifest from its dict form; ManifestError for another schema or missing/unknown fields."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ManifestError(
                f"bundle manifest schema {got!r} is not {SCHEMA}: this code reads schema {SCHEMA}"
            )
        try:
            prov = dict(d.get("provenance") or {})
            prov["metrics"] = Metrics(**(prov.get("metrics") or {}))
            return cls(
                model_args=d["model_args"],
                class_names=list(d["class_names"]),
                preprocessing=d["preprocessing"],
                provenance=Provenance(**prov),
                backend=BackendEntry(**d["backend"]) if d.get("backend") else None,
                files=dict(d.get("files") or {}),
                checks=d.get("checks") or {},
                archive=ArchiveEntry(**d["archive"]) if d.get("archive") else None,
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"bundle manifest is incomplete or has unknown fields: {e}") from None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Manifest":
        """A checkpoint's manifest: ckpt["manifest"], or built from the top-level keys older checkpoints (and
        the bundled pretrained weights) have: model_args, class_names, preprocessing, args, best_metric,
        epoch."""
        if "manifest" in ckpt:
            return cls.from_dict(ckpt["manifest"])
        args, best = ckpt.get("args") or {}, ckpt.get("best_metric") or {}
        epoch = ckpt.get("epoch")
        return cls(
            model_args=ckpt["model_args"],
            class_names=list(ckpt["class_names"]),
            preprocessing=ckpt["preprocessing"],
            provenance=Provenance(
                data=args.get("data"),
                source=args.get("source"),
                metrics=Metrics(
                    best_val_acc=best.get("acc"),
                    best_epoch=best.get("epoch"),
                    epochs_done=epoch,  # epochs count from 1
                ),
            ),
        )

    def index_to_name(self) -> dict[str, str]:
        """TorchServe's label convention (index_to_name.json, keyed by str(index)), for its stock handlers."""
        return {str(i): name for i, name in enumerate(self.class_names)}

    def write(self, folder: str) -> str:
        """Write the manifest as bundle.json into `folder`; return the file's path."""
        path = os.path.join(folder, FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path


def model_args_of(ckpt: dict) -> dict:
    """The architecture of a checkpoint or serving file: all a model needs to be rebuilt (bare weights files
    carry model_args alone, without class names or preprocessing)."""
    return ckpt["manifest"]["model_args"] if "manifest" in ckpt else ckpt["model_args"]


def loads(text: str | bytes) -> Manifest:
    """The manifest from bundle.json's text; ManifestError if it is not JSON or not a readable manifest."""
    try:
        return Manifest.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{FILE} is not JSON: {e}") from None


def read(folder: str) -> Manifest:
    """The manifest in `folder` (an export folder, an unpacked archive; an archive built before bundle.json
    existed is read from its serving.json, so that it keeps serving)."""
    path = os.path.join(folder, FILE)
    try:
        with open(path, "rb") as f:
            return loads(f.read())
    except FileNotFoundError:
        pass

    def read_file(name: str) -> bytes | None:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    legacy = from_legacy(read_file, os.listdir(folder) if os.path.isdir(folder) else [])
    if legacy is None:
        raise ManifestError(f"{path} does not exist: export the model with train.export, which writes it")
    return legacy


LEGACY_FILE = "serving.json"  # what archives built before bundle.json (December 2026) carry instead


def from_legacy(read_file: Callable[[str], bytes | None], names: Iterable[str]) -> Manifest | None:
    """The manifest of an archive built before bundle.json: serving.json (the checkpoint's top-level keys plus
    the export report) and TorchServe's MAR-INF/MANIFEST.json (the served file). `read_file(name)` reads a
    member of a folder or a zip (None if absent); `names` lists its members. None if it is not such an
    archive."""
    text = read_file(LEGACY_FILE)
    if text is None:
        return None
    from model_src import backends  # here: the registry's modules import this one

    try:
        meta = json.loads(text)
        m = Manifest.from_checkpoint(meta)
        m.checks = meta.get("export") or {}
        mar = read_file("MAR-INF/MANIFEST.json")
        if mar is not None:
            served = backends.by_file(os.path.basename(json.loads(mar)["model"]["serializedFile"]))
            m.backend = BackendEntry(served.name, served.file, served.precision)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{LEGACY_FILE} of an older archive does not read: {e}") from None
    present = set(names)
    m.files = {b.name: b.file for b in backends.served().values() if b.file in present}
    return m
