"""What a training run leaves behind besides checkpoints: metrics.json, curves and confusion matrix PNGs,
the golden set for promotion gates, TensorBoard logs and a profiler trace."""

import json
import math
import os
import shutil
import warnings

import torch
from tqdm import tqdm

from train import data as datalib
from train import plots
from train.checkpoint import write_atomic


def write_json(obj, path: str):
    """Write `obj` as JSON to `path` atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    write_atomic(path, write)


def write_golden(data_root: str, out_dir: str):
    """Copy a fixed validation sample into the run, for promotion gates to replay. golden.json, which the
    gates read, comes last and whole: a run killed while copying has none, and its next start copies them
    again."""
    golden_dir = os.path.join(out_dir, "golden")
    os.makedirs(golden_dir, exist_ok=True)
    entries = []
    for i, (path, label) in enumerate(datalib.golden_set(os.path.join(data_root, "val"))):
        name = f"{i:03d}_{label}{os.path.splitext(path)[1]}"
        shutil.copyfile(path, os.path.join(golden_dir, name))
        entries.append({"file": name, "label": label})
    write_json(entries, os.path.join(golden_dir, "golden.json"))


def finish(args, class_names, history, best, val, writer, seconds, world, replicas=None):
    """metrics.json and the plots. Class names and preprocessing are the checkpoint's manifest's to record."""
    done = history[-1]["epoch"] >= args.epochs
    metrics = {
        "best_val_acc": best["acc"],
        "best_epoch": best["epoch"],
        "final_val_acc": val["acc"],
        "final_val_loss": val["loss"],
        "epochs_done": history[-1]["epoch"],
        "epochs": args.epochs,
        "complete": done,
        "train_seconds": round(seconds, 1),
        "processes": world,
        "replicas": replicas,  # per process: rank, node, sha256 of its parameters (distributed runs only)
        "confusion_matrix": val["confusion"].tolist(),
        "history": history,
    }
    if writer is not None:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/best_val_acc": best["acc"]}, run_name=".")
        writer.close()
    if not args.no_plots:
        write_atomic(os.path.join(args.output_dir, "curves.png"), lambda tmp: plots.plot_curves(history, tmp))
        write_atomic(
            os.path.join(args.output_dir, "confusion_matrix.png"),
            lambda tmp: plots.plot_confusion(val["confusion"].numpy(), class_names, tmp, "last-epoch val"),
        )
    # Last: a metrics.json that says "complete" means every report of the run is there.
    write_json(metrics, os.path.join(args.output_dir, "metrics.json"))
    state = "finished" if done else f"stopped after epoch {history[-1]['epoch']} (resume with --resume auto)"
    print(
        f"\n{state} in {seconds:.0f}s | best val acc {best['acc']:.4f} (epoch {best['epoch']}) | "
        f"last val acc {val['acc']:.4f}\n  {args.output_dir}/checkpoint_best.pt, metrics.json"
        f"{', curves.png, confusion_matrix.png' if not args.no_plots else ''}"
        f"{f', tb/ (.venv/bin/tensorboard --logdir {args.output_dir}/tb)' if writer is not None else ''}",
        flush=True,
    )


def add_graph(writer, model, example):
    """Add the model's graph to TensorBoard; a model that cannot be traced only logs a note."""
    try:
        was_training = model.training
        with warnings.catch_warnings():  # add_graph traces with TorchScript, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(model.eval(), example)
        model.train(was_training)
    except Exception as e:  # the graph is a nicety; never fail training for it
        tqdm.write(f"note: TensorBoard graph skipped ({e.__class__.__name__}: {e})")


def log_epoch(writer, model, row):
    """Log one epoch's losses, accuracies, learning rate and parameter histograms to TensorBoard."""
    epoch = row["epoch"]
    for key in ("train_loss", "val_loss"):
        writer.add_scalar(f"loss/{key[:-5]}", row[key], epoch)
    for key in ("train_acc", "val_acc"):
        writer.add_scalar(f"accuracy/{key[:-4]}", row[key], epoch)
    writer.add_scalar("lr", row["lr"], epoch)
    for name, p in model.named_parameters():
        if p.numel() > 1 and math.isfinite(p.detach().float().abs().sum().item()):
            writer.add_histogram(f"params/{name}", p.detach().float().cpu(), epoch)


def start_profiler(out_dir: str):
    """A started torch profiler that writes a TensorBoard trace of 3 steps into `out_dir`/profile."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(os.path.join(out_dir, "profile")),
        record_shapes=True,
    )
    prof.start()
    return prof
