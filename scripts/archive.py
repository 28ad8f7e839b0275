"""Package a checkpoint into a TorchServe archive in model_store/.

    python -m scripts.archive --version 1.0 --checkpoint runs/v1/checkpoint_best.pt
    python -m scripts.archive --version 2.0 --checkpoint runs/v2/checkpoint_best.pt --backend onnx

Version 1.0 becomes model_store/my_model.mar, any other version
model_store/my_model_v<version>.mar. An existing archive is never overwritten. A
SHA-256 is written next to every archive (<archive>.sha256, sha256sum format); the
registration tools refuse archives that do not match it.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

from model_src.runtime import BACKEND_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_STORE = os.path.join(ROOT, "model_store")
HANDLER = os.path.join(ROOT, "handlers", "image_classifier.py")
MODEL_CONFIG = os.path.join(ROOT, "handlers", "model-config.yaml")
SERVED_SOURCES = ("__init__.py", "layers.py", "net.py", "preprocessing.py", "runtime.py")  # no training code
DEFAULT_MODEL = "my_model"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", required=True, help="model version, e.g. 1.0")
    p.add_argument("--checkpoint", required=True, help="training checkpoint to export and package")
    # ONNX Runtime served 1.4-1.5x the requests/s of eager PyTorch in scripts/bench.sh (README, Benchmarks).
    p.add_argument("--backend", default="onnx", choices=sorted(BACKEND_FILES), help="serving format to ship")
    p.add_argument("--model-name", default=DEFAULT_MODEL)
    p.add_argument("--model-store", default=MODEL_STORE)
    p.add_argument("--config-file", default=MODEL_CONFIG, help="model-config.yaml (workers, batching, handler)")
    p.add_argument("--output", default=None, help="archive path (default: chosen from the version)")
    return p


def archive_name(model_name: str, version: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise ValueError(f"version {version!r}: use letters, digits, '.', '_' or '-'")
    return f"{model_name}.mar" if version == "1.0" else f"{model_name}_v{version}.mar"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksum(path: str) -> str:
    digest = sha256_of(path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    return digest


def verify_checksum(path: str) -> str:
    """Raise ValueError unless <path>.sha256 exists and matches the archive."""
    sidecar = path + ".sha256"
    if not os.path.isfile(sidecar):
        raise ValueError(f"{sidecar} is missing: build archives with scripts/archive.sh, which writes it")
    with open(sidecar) as f:
        expected = f.read().split()[0]
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{os.path.basename(path)}: SHA-256 {actual[:12]}… does not match {expected[:12]}… "
            "in its .sha256 file: the archive changed after it was built"
        )
    return actual


def stage_extra_files(export_dir: str, stage: str):
    """Lay out what the archive needs besides the handler: model_src/ (served code only) and metadata."""
    os.makedirs(os.path.join(stage, "model_src"))
    for name in SERVED_SOURCES:
        shutil.copy2(os.path.join(ROOT, "model_src", name), os.path.join(stage, "model_src", name))
    for name in ("serving.json", "index_to_name.json"):
        shutil.copy2(os.path.join(export_dir, name), os.path.join(stage, name))


def build_archive(
    checkpoint,
    version,
    backend="onnx",
    model_name=DEFAULT_MODEL,
    model_store=MODEL_STORE,
    config_file=MODEL_CONFIG,
    output=None,
) -> dict:
    from train.export import export_all

    target = output or os.path.join(model_store, archive_name(model_name, version))
    if os.path.exists(target):
        raise FileExistsError(
            f"{target} exists; archives are never overwritten: pick a new --version "
            "or remove the old archive (and its .sha256) yourself"
        )
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    # Built beside the target, not in $TMPDIR: link() cannot cross filesystems (a tmpfs /tmp), and the dot keeps
    # TorchServe (load_models=all skips hidden entries) and anyone listing *.mar from taking a leftover for an
    # archive. TemporaryDirectory removes it whether the build succeeds or fails.
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=os.path.dirname(os.path.abspath(target))) as tmp:
        export_dir = os.path.join(tmp, "export")
        report = export_all(checkpoint, export_dir, formats=(backend,))
        stage = os.path.join(tmp, "stage")
        stage_extra_files(export_dir, stage)
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
            "--model-name",
            model_name,
            "--version",
            version,
            "--serialized-file",
            os.path.join(export_dir, BACKEND_FILES[backend]),
            "--handler",
            HANDLER,
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
        built = os.path.join(tmp, f"{model_name}.mar")
        # link() fails if the target appeared meanwhile, so even a race cannot overwrite an archive.
        os.link(built, target)
    digest = write_checksum(target)
    return {"archive": target, "sha256": digest, "bytes": os.path.getsize(target), "export": report}


def main(args):
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
