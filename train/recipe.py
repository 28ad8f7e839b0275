"""The recipe's pieces that train.train builds from its flags: preprocessing, model arguments, optimiser,
scheduler, and the check that a --weights file is there."""

import os

import torch
from torch import nn

from model_src.net import DEFAULT_MODEL_ARGS
from model_src.preprocessing import Preprocessing
from train import data as datalib
from train import finetune


class ConfigError(ValueError):
    """Flags that name no optimiser, scheduler or weights file."""


def make_preprocessing(args) -> Preprocessing:
    """The preprocessing `args` ask for, with mean and std measured on the training split."""
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
    """The model_args of a new model: resnet_small's from its flags, another arch's by name alone."""
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
    """SGD (Nesterov) or AdamW over the model's parameter groups; ConfigError for another name."""
    scale = args.backbone_lr_scale if getattr(args, "finetune_from", None) else None
    groups = finetune.param_groups(model, args.weight_decay, args.lr, scale)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr)
    raise ConfigError(f"unknown optimiser {args.opt!r}; choose adamw or sgd")


def make_scheduler(args, optimizer):
    """The learning-rate schedule (cosine, step or plateau), after a linear warm-up if asked;
    ConfigError for another name."""
    lr_scheduler, warmup_epochs = torch.optim.lr_scheduler, args.lr_warmup_epochs
    if args.lr_scheduler == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_gamma, patience=2)
    if args.lr_scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs - warmup_epochs))
    elif args.lr_scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    else:
        raise ConfigError(f"unknown scheduler {args.lr_scheduler!r}; choose cosine, step or plateau")
    if warmup_epochs <= 0:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def check_weights(args):
    """A --weights file that is not there is refused before the run's folder is made (was: a traceback once
    the model was built, and a run folder left behind). On --resume the run's checkpoint holds the weights."""
    if args.weights in (None, "", "packaged", "cache") or args.resume or os.path.isfile(args.weights):
        return
    raise ConfigError(
        f"--weights {args.weights}: no such file (give a bundle checkpoint, a torchvision weights file, "
        "'cache' or 'packaged')"
    )
