"""A run's checkpoints: written atomically, never over another run, resumed only on the data they came from."""

import os

import torch


def save_checkpoint(state: dict, path: str):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def check_output_dir(args):
    """Refuse a folder holding a run unless continuing that very run: resuming another run's
    checkpoint (or this one's checkpoint_best.pt) would overwrite its checkpoints."""
    last = os.path.join(args.output_dir, "checkpoint_last.pt")
    holds_run = os.path.exists(last)
    resumes_it = holds_run and bool(args.resume) and os.path.isfile(args.resume) and os.path.samefile(args.resume, last)
    if holds_run and not resumes_it:
        raise SystemExit(
            f"error: {args.output_dir} already holds a run; pass --resume auto to continue it, "
            "or choose another --output-dir (nothing is overwritten)"
        )
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    if not os.path.isdir(parent):  # runs/: checkpoints are the models, not for other local users to copy
        os.makedirs(parent, mode=0o750)
    os.makedirs(args.output_dir, exist_ok=True)


def load_resume(args) -> dict | None:
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        raise SystemExit(f"error: --resume: no checkpoint at {args.resume}")
    return torch.load(args.resume, map_location="cpu", weights_only=True)


def check_resume_classes(args, resume_ckpt: dict, class_names: list[str]):
    if class_names != resume_ckpt["class_names"]:
        raise SystemExit(
            f"error: {args.data} has classes {class_names}, but {args.resume} was trained on "
            f"{resume_ckpt['class_names']}; pass the --data it was trained on ({resume_ckpt['args']['data']})"
        )
