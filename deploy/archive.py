"""Package a checkpoint into a TorchServe archive in model_store/, and check archives before registering them.

    python -m deploy.archive --version 1.0 --checkpoint runs/v1/checkpoint_best.pt
    python -m deploy.archive --version 2.0 --checkpoint runs/v2/checkpoint_best.pt --backend onnx

Version 1.0 becomes model_store/<model>.mar, any other version
model_store/<model>_v<version>.mar. An existing archive is never overwritten. A
SHA-256 is written next to every archive (<archive>.sha256, sha256sum format), before the
archive is placed, so a build killed at any point leaves no archive without one; the
registration tools refuse archives that do not match it. A killed build's staging folder
(model_store/.archive-*) is removed by the next build.

The archive ships the handler, the whole model_src/ package (nothing else: training
code lives in train/), the serving file of one backend and its metadata, a model card
(model_card.json: training data, accuracy, command; served by `GET /models/<name>/<version>?customized=true`)
and, for the backends without gradients (onnx, int8), the eager weights too: explanations run on those.
"""

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib

from bundle import settings
from deploy.privileges import shared_dir


def get_args_parser():
    from model_src.runtime import BACKEND_FILES  # here, not at the top: the checks below need no torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", required=True, help="model version, e.g. 1.0")
    p.add_argument("--checkpoint", required=True, help="training checkpoint to export and package")
    # ONNX Runtime served 1.4-1.5x the requests/s of eager PyTorch in scripts/bench.sh (docs/benchmarks.md).
    p.add_argument("--backend", default="onnx", choices=sorted(BACKEND_FILES), help="serving format to ship")
    p.add_argument("--model-name", default=settings.MODEL_NAME)
    p.add_argument("--model-store", default=settings.MODEL_STORE)
    p.add_argument(
        "--config-file", default=settings.MODEL_CONFIG, help="model-config.yaml (workers, batching, handler)"
    )
    p.add_argument("--output", default=None, help="archive path (default: chosen from the version)")
    return p


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def archive_name(model_name: str, version: str) -> str:
    for what, value in (("model name", model_name), ("version", version)):
        if not NAME.fullmatch(value):
            raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' or '-'")
    return f"{model_name}.mar" if version == "1.0" else f"{model_name}_v{version}.mar"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SHA256 = re.compile(r"[0-9a-f]{64}")
STAGING_PREFIX = ".archive-"  # a build's folder in the model store (hidden: see build_archive)


def write_checksum(path: str) -> str:
    """The sidecar of an archive placed by other means (bench and test archives); build_archive uses place_archive."""
    digest = sha256_of(path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    return digest


def fsync_path(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_archive(built: str, target: str) -> str:
    """Put a built archive at `target` with its checksum, sidecar first: a build killed at any point leaves either
    no .mar or a .mar with its .sha256, never a .mar without one. A sidecar without its .mar is what a build killed
    between the two leaves; it is replaced."""
    digest = sha256_of(built)
    fsync_path(built)
    staged_sidecar = built + ".sha256"
    with open(staged_sidecar, "w") as f:
        f.write(f"{digest}  {os.path.basename(target)}\n")
        f.flush()
        os.fsync(f.fileno())
    store = os.path.dirname(target)
    os.replace(staged_sidecar, target + ".sha256")
    fsync_path(store)
    # link() fails if the target appeared meanwhile, so even a race cannot overwrite an archive.
    os.link(built, target)
    fsync_path(store)
    return digest


def verify_checksum(path: str) -> str:
    """Raise ValueError unless <path>.sha256 exists and matches the archive."""
    sidecar = path + ".sha256"
    if not os.path.isfile(sidecar):
        raise ValueError(f"{sidecar} is missing: build archives with scripts/archive.sh, which writes it")
    with open(sidecar, errors="replace") as f:
        fields = f.read(4096).split()  # sha256sum's line is ~70 bytes plus the name
    if not fields or not SHA256.fullmatch(fields[0]):
        raise ValueError(f"{sidecar} is empty or garbled (no SHA-256 at its start): rebuild the archive")
    expected = fields[0]
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{os.path.basename(path)}: SHA-256 {actual[:12]}… does not match {expected[:12]}… "
            "in its .sha256 file: the archive changed after it was built"
        )
    return actual


def read_manifest(path: str) -> dict:
    """Validate a .mar before TorchServe sees it: a readable zip whose CRCs match, with a manifest."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad:
                raise ValueError(f"{name} is corrupt: {bad} fails its CRC check")
            return json.loads(z.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, zlib.error) as e:  # testzip() lets a broken deflate stream's zlib.error through
        raise ValueError(f"{name} is not a valid .mar (truncated or corrupt zip: {e})") from None
    except KeyError:
        raise ValueError(f"{name} has no MAR-INF/MANIFEST.json: not a TorchServe archive") from None


def read_classes(path: str) -> list[str]:
    """The class names an archive answers, in index order, from its index_to_name.json (keyed by str(index))."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as z:
            labels = json.loads(z.read("index_to_name.json"))
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {name}: {e}") from None
    except KeyError:
        raise ValueError(f"{name} has no index_to_name.json: its class names are unknown") from None
    return [labels[k] for k in sorted(labels, key=int)]


def check_archive(archive: str, model_store: str) -> dict:
    """The manifest's model entry of an archive that may be registered: a file directly in the model
    store, matching its .sha256, a sound zip. ValueError says what is wrong."""
    path, store = os.path.abspath(archive), os.path.abspath(model_store)
    if os.path.dirname(path) != store:
        raise ValueError(
            f"{archive} is not in the model store {store}: only archives there can be registered "
            "(allowed_urls blocks everything else). Build it with scripts/archive.sh"
        )
    if not os.path.isfile(path):
        raise ValueError(f"{archive} does not exist")
    verify_checksum(path)
    return read_manifest(path)["model"]


def stage_extra_files(export_dir: str, stage: str, backend: str, card: dict):
    """Lay out what the archive needs besides the handler: the model_src package, whole, metadata, the model
    card and, where the served file cannot explain, the eager weights."""
    from model_src.runtime import BACKEND_FILES, NOT_DIFFERENTIABLE

    shutil.copytree(settings.MODEL_SRC, os.path.join(stage, "model_src"), ignore=shutil.ignore_patterns("__pycache__"))
    names = ["serving.json", "index_to_name.json"] + ([BACKEND_FILES["eager"]] if backend in NOT_DIFFERENTIABLE else [])
    for name in names:
        shutil.copy2(os.path.join(export_dir, name), os.path.join(stage, name))
    with open(os.path.join(stage, "model_card.json"), "w") as f:
        json.dump(card, f, indent=1)


def training_command(args: dict) -> str | None:
    """The `python -m train.train ...` that made a checkpoint: its stored arguments that differ from the
    defaults (None for imported weights, which no training run made)."""
    if "output_dir" not in args:
        return None
    from train.train import get_args_parser  # (imports torch._inductor, which makes a cache folder in TMPDIR)

    parser = get_args_parser(add_help=False)
    defaults = vars(parser.parse_args(["--output-dir", "x"]))
    flags = []
    for action in parser._actions:
        key = action.dest
        if key not in args or key == "help" or (args[key] == defaults.get(key) and key != "output_dir"):
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true
            flags += [flag] if args[key] else []
        else:
            flags += [flag, relative(str(args[key]))]
    return " ".join(["python -m train.train", *flags])


def relative(path: str) -> str:
    """Paths inside the bundle as the README's commands write them: from the repository root."""
    return os.path.relpath(path, settings.ROOT) if path.startswith(settings.ROOT + os.sep) else path


def model_card(checkpoint: str, meta: dict, report: dict, backend: str) -> dict:
    """What the archive says about itself beyond the manifest: where the model came from and how good it is."""
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "metrics.json")
    metrics = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    args = meta.get("args") or {}  # serving.json: what the export read from the checkpoint
    best = meta.get("best_metric") or {}
    data = args.get("data")
    return {
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "architecture": meta.get("model_args"),
        "training": {
            "data": relative(data) if data else None,
            "source": args.get("source"),
            "command": training_command(args),
            "epochs": metrics.get("epochs_done", meta.get("epoch")),
            "best_val_acc": metrics.get("best_val_acc", best.get("acc")),
            "best_epoch": metrics.get("best_epoch", best.get("epoch")),
            "final_val_acc": metrics.get("final_val_acc"),
            "metrics_json": metrics_path if metrics else None,
        },
        "export_check": {k: v for k, v in report["formats"][backend].items() if k != "file"},
    }


@contextlib.contextmanager
def staging(store: str):
    """A build's folder in the store, removed when the build ends, also by an exception. The build holds an flock
    on it, which the kernel releases when the build dies: remove_dead_staging tells a dead build's folder by that."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=store) as tmp:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
        finally:
            os.close(fd)


def remove_dead_staging(store: str):
    """Remove the staging folders of builds that were killed (SIGKILL, a power cut): ours, real folders (no
    symlinks), whose flock no live build holds."""
    for name in os.listdir(store):
        path = os.path.join(store, name)
        if not name.startswith(STAGING_PREFIX):
            continue
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path)
        except BlockingIOError:
            pass  # a build in progress
        finally:
            os.close(fd)


def build_archive(
    checkpoint,
    version,
    backend="onnx",
    model_name=settings.MODEL_NAME,
    model_store=settings.MODEL_STORE,
    config_file=settings.MODEL_CONFIG,
    output=None,
    batch_size: int | None = None,
) -> dict:
    """Export `checkpoint` and package it as a checked archive with its .sha256; `batch_size` replaces the
    config file's batchSize for this archive only."""
    from model_src.runtime import BACKEND_FILES, NOT_DIFFERENTIABLE
    from train.export import export_all

    target = output or os.path.join(model_store, archive_name(model_name, version))
    if os.path.exists(target):
        raise FileExistsError(
            f"{target} exists; archives are never overwritten: pick a new --version "
            "or remove the old archive (and its .sha256) yourself"
        )
    store = os.path.dirname(os.path.abspath(target))
    shared_dir(store)
    remove_dead_staging(store)
    # Built beside the target, not in $TMPDIR: link() cannot cross filesystems (a tmpfs /tmp), and the dot keeps
    # TorchServe (load_models=all skips hidden entries) and anyone listing *.mar from taking a leftover for an
    # archive.
    with staging(store) as tmp:
        export_dir = os.path.join(tmp, "export")
        formats = (backend, "eager") if backend in NOT_DIFFERENTIABLE else (backend,)
        report = export_all(checkpoint, export_dir, formats=formats)
        with open(os.path.join(export_dir, "serving.json")) as f:
            meta = json.load(f)
        stage = os.path.join(tmp, "stage")
        stage_extra_files(export_dir, stage, backend, model_card(checkpoint, meta, report, backend))
        if batch_size is not None:
            config_file = with_batch_size(config_file, batch_size, os.path.join(tmp, "model-config.yaml"))
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
            "--model-name",
            model_name,
            "--version",
            version,
            "--serialized-file",
            os.path.join(export_dir, BACKEND_FILES[backend]),
            "--handler",
            settings.HANDLER,
            "--extra-files",
            stage,
            "--config-file",
            config_file,
            "--export-path",
            tmp,
        ]
        # The archiver stages files in $TMPDIR/<model-name> and deletes that folder before and after:
        # a private TMPDIR keeps two archive builds (quickstart and tests, say) from clobbering each other.
        subprocess.run(cmd, check=True, env={**os.environ, "TMPDIR": tmp})
        digest = place_archive(os.path.join(tmp, f"{model_name}.mar"), os.path.abspath(target))
    return {"archive": target, "sha256": digest, "bytes": os.path.getsize(target), "export": report}


def with_batch_size(config_file: str, batch_size: int, out: str) -> str:
    """A copy of `config_file` at `out` with batchSize set to `batch_size`."""
    import yaml

    with open(config_file) as f:
        config = yaml.safe_load(f)
    config["batchSize"] = batch_size
    with open(out, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return out


def exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the staging folder is removed, the archiver killed


def main(args):
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    try:
        info = build_archive(
            args.checkpoint,
            args.version,
            args.backend,
            args.model_name,
            args.model_store,
            args.config_file,
            args.output,
        )
    except (FileExistsError, ValueError, RuntimeError) as e:
        raise SystemExit(f"archive failed: {e}") from None
    entry = info["export"]["formats"][args.backend]
    print(
        f"archived {args.model_name} {args.version} ({args.backend}, max |Δprob| vs eager {entry['max_diff']:.1e})"
        f"\n  {os.path.relpath(info['archive'])}  {info['bytes'] / 1024:.0f} KiB  sha256 {info['sha256']}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
