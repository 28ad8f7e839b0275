"""Package an export folder into a TorchServe archive in model_store/.

    python -m deploy.archive --version 1.0 --checkpoint runs/v1/checkpoint_best.pt
    python -m deploy.archive --version 2.0 --checkpoint runs/v2/checkpoint_best.pt --backend onnx
    python -m deploy.archive --version 3.0 --export-dir exports/v1 --backend onnx

With --checkpoint, the command first exports it (train.export) into the build's staging folder; with
--export-dir it packs a train.export folder as it is. Version 1.0 becomes model_store/<model>.mar, any other
version model_store/<model>_v<version>.mar. An existing archive is never overwritten. A SHA-256 is written
next to every archive (<archive>.sha256, sha256sum format), before the archive is placed, so a build killed at
any point leaves no archive without one; the registration tools refuse archives that do not match it. A killed
build's staging folder (model_store/.archive-*) is removed by the next build.

The archive ships the handler, the whole model_src/ package (nothing else: training code lives in train/), the
serving file of one backend, for the backends without gradients the eager weights too (explanations run on
those), and bundle.json: the export's manifest (model_src/manifest.py) with the archive's part added (model
name, version, build time, the SHA-256 of every file inside). The model card that
`GET /models/<name>/<version>?customized=true` serves is read from it.

The torch-free checks (sha256_of, verify_checksum, read_manifest, read_classes, check_archive) live in
deploy/mar.py and are re-exported here.
"""

import argparse
import contextlib
import datetime
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

from bundle import settings
from deploy import backend_choice
from deploy.mar import (  # noqa: F401  (re-exported: the guard, versions and the tests import them from here)
    NAME,
    SHA256,
    archive_name,
    check_archive,
    read_bundle,
    read_classes,
    read_manifest,
    sha256_of,
    verify_checksum,
    write_checksum,
)
from deploy.privileges import shared_dir
from model_src import backends, manifest
from model_src.cores import usable_cores, workers_of
from model_src.manifest import ArchiveEntry, BackendEntry, Manifest


def get_args_parser():
    """The parser of `python -m deploy.archive`: the version, a checkpoint or an export folder, the backend
    and where the archive goes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", required=True, help="model version, e.g. 1.0")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint to export and package")
    source.add_argument("--export-dir", help="a train.export folder (with bundle.json) to package as it is")
    p.add_argument(
        "--backend",
        default=backend_choice.AUTO,
        choices=[backend_choice.AUTO, *sorted(backends.served())],
        help="serving format to ship; auto: the fastest that passes export's checks, measured here for a "
        "model of 224 px and up, else " + backends.DEFAULT + " (deploy/backend_choice.py)",
    )
    p.add_argument("--model-name", default=settings.MODEL_NAME)
    p.add_argument("--model-store", default=settings.MODEL_STORE)
    p.add_argument(
        "--config-file", default=settings.MODEL_CONFIG, help="model-config.yaml (workers, batching, handler)"
    )
    p.add_argument("--output", default=None, help="archive path (default: chosen from the version)")
    return p


STAGING_PREFIX = ".archive-"  # a build's folder in the model store (hidden: see build_archive)


def fsync_path(path: str):
    """fsync a file or a folder by path (a folder's fsync makes the renames and links in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_archive(built: str, target: str) -> str:
    """Put a built archive at `target` with its checksum, sidecar first: a build killed at any point leaves
    either no .mar or a .mar with its .sha256, never a .mar without one. A sidecar without its .mar is what a
    build killed between the two leaves; it is replaced."""
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


def shipped(bundle: Manifest, backend: backends.Backend) -> dict[str, str]:
    """backend name -> file of what the archive carries: the served file and, where it has no gradients, the
    eager weights explanations run on."""
    want = [backend] if backend.differentiable else [backend, backends.reference()]
    missing = [b.name for b in want if b.name not in bundle.files]
    if missing:
        raise ValueError(
            f"the export folder has no {', '.join(missing)} file (it has {sorted(bundle.files)}): export it "
            f"with --formats {','.join(b.name for b in want)}"
        )
    return {b.name: bundle.files[b.name] for b in want}


def stage_extra_files(export_dir: str, stage: str, files: dict[str, str], served: str):
    """Lay out what the archive needs besides the handler and the served file: the model_src package, whole,
    and the other model files (the eager weights of a backend that cannot explain)."""
    shutil.copytree(
        settings.MODEL_SRC, os.path.join(stage, "model_src"), ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in files.values():
        if name != served:
            shutil.copy2(os.path.join(export_dir, name), os.path.join(stage, name))


def digests(stage: str, served: str) -> dict[str, str]:
    """The SHA-256 of every file the archive carries (paths as in the archive), bundle.json aside."""
    found = {os.path.basename(path): sha256_of(path) for path in (served, settings.HANDLER)}
    for folder, _, names in os.walk(stage):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, stage)] = sha256_of(path)
    return dict(sorted(found.items()))


def add_archive_part(
    bundle: Manifest, backend: backends.Backend, files, model_name, version, target, choice: dict
) -> Manifest:
    """Archiving's part of the manifest: what is served and shipped, by whom, when."""
    return Manifest(
        **{
            **bundle.__dict__,
            "backend": BackendEntry(backend.name, backend.file, backend.precision),
            "files": files,
            "archive": ArchiveEntry(
                model_name=model_name,
                version=version,
                built=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                file=os.path.basename(target),
                backend_choice=choice,
            ),
        }
    )


@contextlib.contextmanager
def staging(store: str):
    """A build's folder in the store, removed when the build ends, also by an exception. The build holds an
    flock on it, which the kernel releases when the build dies: remove_dead_staging tells a dead build's
    folder by that."""
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
    export_dir: str,
    version: str,
    backend: str = backend_choice.AUTO,
    model_name: str = settings.MODEL_NAME,
    model_store: str = settings.MODEL_STORE,
    config_file: str = settings.MODEL_CONFIG,
    output: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Package the export folder `export_dir` (its bundle.json says what is there) as a checked archive with
    its .sha256; `batch_size` replaces the config file's batchSize for this archive only. `backend` "auto"
    ships the one deploy/backend_choice.py picks (measured here for a real model) and records why."""
    bundle = manifest.read(export_dir)
    choice: dict = {}
    if backend == backend_choice.AUTO:
        import yaml

        with open(config_file) as f:
            picked = backend_choice.resolve(export_dir, bundle, yaml.safe_load(f), batch_size)
        print(f"archive: --backend auto chose {picked.summary()}")
        backend, choice = picked.backend, picked.to_dict()
    chosen = backends.get(backend)
    if not chosen.server:
        raise ValueError(
            f"TorchServe cannot serve the {backend} backend; choose one of {sorted(backends.served())}"
        )
    files = shipped(bundle, chosen)
    target = new_target(version, model_name, model_store, output)
    store = os.path.dirname(os.path.abspath(target))
    shared_dir(store)
    remove_dead_staging(store)
    # Built beside the target, not in $TMPDIR: link() cannot cross filesystems (a tmpfs /tmp), and the dot
    # keeps TorchServe (load_models=all skips hidden entries) and anyone listing *.mar from taking a leftover
    # for an archive.
    with staging(store) as tmp:
        stage, served = os.path.join(tmp, "stage"), os.path.join(export_dir, chosen.file)
        stage_extra_files(export_dir, stage, files, chosen.file)
        archived = add_archive_part(bundle, chosen, files, model_name, version, target, choice)
        archived.archive.digests = digests(stage, served)  # type: ignore[union-attr]
        archived.write(stage)
        config_file = shipped_config(config_file, batch_size, os.path.join(tmp, "model-config.yaml"))
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
            "--model-name",
            model_name,
            "--version",
            version,
            "--serialized-file",
            served,
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
    return {
        "archive": target,
        "sha256": digest,
        "bytes": os.path.getsize(target),
        "export": bundle.checks,
        "backend": backend,
        "backend_choice": choice,
    }


def new_target(version: str, model_name: str, model_store: str, output: str | None) -> str:
    """The archive's path: `output`, or chosen from the version in the store. FileExistsError if it exists."""
    target = output or os.path.join(model_store, archive_name(model_name, version))
    if os.path.exists(target):
        raise FileExistsError(
            f"{target} exists; archives are never overwritten: pick a new --version "
            "or remove the old archive (and its .sha256) yourself"
        )
    return target


def archive_checkpoint(
    checkpoint: str,
    version: str,
    backend: str = backend_choice.AUTO,
    model_name: str = settings.MODEL_NAME,
    model_store: str = settings.MODEL_STORE,
    config_file: str = settings.MODEL_CONFIG,
    output: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Export `checkpoint` (train.export) into a staging folder in the store, then build_archive that folder:
    what the CLI's --checkpoint does. With `backend` "auto", every candidate of deploy/backend_choice.py
    (a failing one is left out), and build_archive measures them."""
    # Imported here, not at the top: this module's re-exported checks are imported by the guard, which loads
    # no torch; only this CLI path exports.
    from train.export import export_all

    if backend == backend_choice.AUTO:
        formats, optional = backend_choice.export_plan(checkpoint_preprocessing(checkpoint))
    else:
        chosen = backends.get(backend)
        formats = [chosen.name] if chosen.differentiable else [chosen.name, backends.reference().name]
        optional = frozenset()
    # before export
    store = os.path.dirname(os.path.abspath(new_target(version, model_name, model_store, output)))
    shared_dir(store)
    remove_dead_staging(store)
    with staging(store) as tmp:
        export_dir = os.path.join(tmp, "export")
        export_all(checkpoint, export_dir, formats=formats, optional=optional)
        return build_archive(
            export_dir, version, backend, model_name, model_store, config_file, output, batch_size
        )


def checkpoint_preprocessing(checkpoint: str) -> dict:
    """The preprocessing a checkpoint's manifest records (what `auto` decides on)."""
    from model_src.manifest import Manifest
    from model_src.net import load_model

    return Manifest.from_checkpoint(load_model(checkpoint)[1]).preprocessing


def shipped_config(config_file: str, batch_size: int | None, out: str) -> str:
    """`config_file` as the archive ships it: batchSize set to `batch_size` (None keeps it), and minWorkers
    and maxWorkers, where it leaves them out, from this machine's cores (model_src/cores.py). Returns
    `config_file` itself when nothing changes, else a copy written at `out` (its text and comments kept unless
    the batch size changes)."""
    import yaml

    with open(config_file) as f:
        text = f.read()
    config = yaml.safe_load(text)
    if batch_size is not None:
        text = yaml.safe_dump({**config, "batchSize": batch_size}, sort_keys=False)
    cores = usable_cores()
    workers = workers_of(config, cores)
    missing = [key for key in ("minWorkers", "maxWorkers") if key not in config]
    if missing:
        text += "" if text.endswith("\n") else "\n"
        text += f"# {' and '.join(missing)}: model_src/cores.py's rule for the {cores} cores of its build\n"
        text += "".join(f"{key}: {workers}\n" for key in missing)
    elif batch_size is None:
        return config_file
    with open(out, "w") as f:
        f.write(text)
    return out


def exit_on_signal(signum, frame):
    """SIGTERM and SIGHUP handler: unwind like Ctrl-C (SystemExit 128 + signum), so the staging folder is
    removed and the archiver killed."""
    raise SystemExit(128 + signum)


def main(args):
    """Build the archive `args` ask for (from a checkpoint or an export folder) and print where it is;
    SystemExit with the reason when the build fails."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on_signal)
    options = dict(model_name=args.model_name, model_store=args.model_store, config_file=args.config_file)
    try:
        if args.checkpoint:
            info = archive_checkpoint(
                args.checkpoint, args.version, args.backend, output=args.output, **options
            )
        else:
            info = build_archive(args.export_dir, args.version, args.backend, output=args.output, **options)
    except (FileExistsError, ValueError, RuntimeError) as e:
        raise SystemExit(f"archive failed: {e}") from None
    entry = info["export"]["formats"][info["backend"]]
    print(
        f"archived {args.model_name} {args.version} ({info['backend']}, max |Δprob| vs eager "
        f"{entry['max_diff']:.1e})"
        f"\n  {os.path.relpath(info['archive'])}  {info['bytes'] / 1024:.0f} KiB  sha256 {info['sha256']}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
