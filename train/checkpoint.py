"""A run's files: written atomically, never by two runs at once, never over another run, resumed only on the
data they came from."""

import fcntl
import os
import shutil

import torch

from model_src.manifest import Manifest

LOCK_FILE = "run.lock"  # in the output folder; holds the pid of the run that owns the folder


def write_atomic(path: str, write):
    """`write(tmp_path)` writes the file; it then replaces `path` whole (fsync + rename), so a run killed
    meanwhile leaves the old file or none, never a torn one."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, ...); the message names the free space."""

    pass


class RunError(ValueError):
    """A run's folder or checkpoint refuses this run (in use, another run's, classes that differ)."""


def save_checkpoint(state: dict, path: str):
    """Write `state` to `path` atomically; CheckpointWriteError naming the free space if it fails."""
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp))
    except (RuntimeError, OSError) as e:
        # torch says "basic_ios::clear: iostream error" or "[enforce fail at inline_container.cc] unexpected
        # pos" on a full disk: name the file and the space left.
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {free / 2**20:.1f} MiB free on {folder} "
            f"({e.__class__.__name__}: {e})"
        ) from e


def lock_output_dir(output_dir: str) -> int:
    """Claim the output folder for this process: an open file descriptor holding an flock on its run.lock,
    which the kernel releases when the run ends, however it ends. RunError names the pid of a live holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(
            f"{output_dir} is in use by another training run (pid {holder}, {path}); "
            "wait for it to end or choose another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim_output_dir(args) -> int:
    """lock_output_dir, then check_output_dir under the lock (checked before locking, two runs could both
    pass)."""
    fd = lock_output_dir(args.output_dir)
    try:
        check_output_dir(args)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_output_dir(args):
    """Refuse a folder holding a run unless continuing that very run: resuming another run's
    checkpoint (or this one's checkpoint_best.pt) would overwrite its checkpoints."""
    last = os.path.join(args.output_dir, "checkpoint_last.pt")
    holds_run = os.path.exists(last)
    resumes_it = (
        holds_run
        and bool(args.resume)
        and os.path.isfile(args.resume)
        and os.path.samefile(args.resume, last)
    )
    if holds_run and not resumes_it:
        raise RunError(
            f"{args.output_dir} already holds a run; pass --resume auto to continue it, "
            "or choose another --output-dir (nothing is overwritten)"
        )
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    if not os.path.isdir(parent):  # runs/: checkpoints are the models, not for other local users to copy
        os.makedirs(parent, mode=0o750)
    os.makedirs(args.output_dir, exist_ok=True)


def load_resume(args) -> dict | None:
    """The --resume checkpoint, loaded on the CPU (None without --resume); RunError if it is missing."""
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        raise RunError(f"--resume: no checkpoint at {args.resume}")
    return torch.load(args.resume, map_location="cpu", weights_only=True)


def check_resume_classes(args, resumed: Manifest, class_names: list[str]):
    """RunError unless the data's classes are those the resumed checkpoint was trained on."""
    if class_names != resumed.class_names:
        raise RunError(
            f"{args.data} has classes {class_names}, but {args.resume} was trained on "
            f"{resumed.class_names}; pass the --data it was trained on ({resumed.provenance.data})"
        )
