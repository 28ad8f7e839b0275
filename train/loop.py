"""The parts of a training run, and one epoch of training and one evaluation on them, each summed over
the processes of the run (train.train builds the parts and runs the epochs).

A process of a torchrun job joins the group here, and the run's replicas prove themselves identical here.
"""

import argparse
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model_src.preprocessing import Preprocessing
from train import finetune

# --- a run's parts ---------------------------------------------------------------------


@dataclass
class Data:
    """The run's images: its preprocessing, the two splits and their loaders."""

    prep: Preprocessing
    train_set: Any
    val_set: Any
    class_names: list[str]
    train_loader: Any
    val_loader: Any
    train_sampler: Any


@dataclass
class Learner:
    """What an epoch changes: the model (`model_without_ddp` is the bare one, saved without a `module.`
    prefix), its loss, optimiser, scheduler and gradient scaler."""

    model: nn.Module
    model_without_ddp: nn.Module
    model_args: dict
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler


@dataclass
class Progress:
    """Where the run stands: the next epoch, the best one so far, and one row per epoch trained."""

    start_epoch: int = 1
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    history: list[dict] = field(default_factory=list)


@dataclass
class Run:
    """One run's parts once built: where it runs, what it trains on and with, how far it got."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    data: Data
    learner: Learner
    progress: Progress
    command: str  # the command that made the run: a resumed run's is the one that started it
    writer: Any  # TensorBoard's, on rank 0 only


# --- distributed helpers ---------------------------------------------------------------


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, joining the process group;
    (0, 1, 0) when not launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return rank, world, local


def all_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a CPU tensor over processes. NCCL reduces only CUDA tensors, so a copy travels on `device`."""
    if dist.is_available() and dist.is_initialized():
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()
    return t


def state_digest(state) -> str:
    """sha256 of a model's (or a state_dict's) parameters and buffers, by name."""
    h = hashlib.sha256()
    for key, t in sorted((state.state_dict() if isinstance(state, nn.Module) else state).items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(model: nn.Module) -> list[dict] | None:
    """Each process's sha256 of its parameters and buffers, gathered on every rank (None when not
    distributed): DDP keeps replicas identical, and this proves it for processes on other nodes too
    (docs/multinode.md)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    mine = {
        "rank": dist.get_rank(),
        "node": int(os.environ.get("GROUP_RANK", 0)),
        "sha256": state_digest(model),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def log(msg: str, rank: int = 0):
    """Print `msg` above the progress bars, on rank 0 only."""
    if rank == 0:
        tqdm.write(msg)


# --- one epoch ----------------------------------------------------------------------


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on `device` when `enabled`: float16 on CUDA, bfloat16 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scaler, profiler=None, rank=0):
    """Train one epoch (gradient accumulation, clipping, AMP); loss and accuracy summed over processes."""
    model.train()
    finetune.hold_frozen_norms(model)
    total_loss, correct, seen = torch.zeros(3, dtype=torch.float64).unbind(0)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=args.quiet or rank != 0, mininterval=1.0)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        scaler.scale(loss / args.accum_steps).backward()
        if (step + 1) % args.accum_steps == 0 or step + 1 == len(loader):
            if args.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if profiler is not None:
            profiler.step()
    stats = all_sum(torch.stack([total_loss, correct, seen]), device)
    return {"loss": (stats[0] / stats[2]).item(), "acc": (stats[1] / stats[2]).item()}


@torch.inference_mode()
def evaluate(model, criterion, loader, device, num_classes, args):
    """The model's loss, accuracy and confusion matrix on `loader`, summed over processes."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [true, predicted]
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            logits = model(images).float()
        total_loss += criterion(logits, targets).item() * len(targets)
        idx = targets.cpu() * num_classes + logits.argmax(1).cpu()
        confusion += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)
    confusion = all_sum(confusion, device)
    total_loss = all_sum(total_loss, device)
    n = confusion.sum().item()
    return {
        "loss": total_loss.item() / max(n, 1),
        "acc": confusion.diag().sum().item() / max(n, 1),
        "confusion": confusion,
    }
