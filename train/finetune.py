"""Fine-tuning from a pretrained checkpoint: a new classifier head, a frozen or slower backbone.

    python -m train.pretrained --arch efficientnet_lite0 --output runs/imagenet/checkpoint.pt
    python -m train.train --data my_photos --weights runs/imagenet/checkpoint.pt --head-epochs 2 \
        --backbone-lr-scale 0.1 --output-dir runs/ft

The pretrained checkpoint decides the architecture and the preprocessing (its eval transform
carries into the new checkpoint); the data decides the classes. The backbone is every
parameter outside the classifier layer.
"""

import os

import torch
from torch import nn

from model_src.layers import WNLinear
from model_src.manifest import Manifest
from model_src.net import build_model, strip_prefixes

# Fine-tuning flags that shape the optimiser's groups and the epoch schedule: a resumed run keeps its own.
RUN_FLAGS = ("finetune_from", "freeze_backbone", "head_epochs", "backbone_lr_scale")


class FinetuneError(ValueError):
    """Fine-tuning flags or weights that cannot work together."""


def load_pretrained(weights: str | None, arch: str) -> dict | None:
    """A bundle-format checkpoint to start from, or None when `weights` is something else
    (a torchvision weights file or 'cache', which build_model loads itself)."""
    if not weights:
        return None
    if weights == "packaged":
        from train import pretrained

        try:
            return pretrained.import_checkpoint(arch)
        except pretrained.WeightsError as e:
            raise FinetuneError(f"--weights packaged: {e}") from None
    if not os.path.isfile(weights):
        return None
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    bundle = isinstance(ckpt, dict) and "model" in ckpt and ("manifest" in ckpt or "model_args" in ckpt)
    return ckpt if bundle else None


def classifier_name(model: nn.Module) -> str:
    """The attribute holding the final linear layer: EfficientNetLite, torchvision ResNet, resnet_small."""
    for name in ("classifier", "fc", "head"):
        if isinstance(getattr(model, name, None), (nn.Linear, WNLinear)):
            return name
    raise ValueError(f"{type(model).__name__} has no classifier layer named classifier, fc or head")


def build_from_pretrained(pre: dict, class_names: list[str], log=print) -> tuple[nn.Module, dict]:
    """The pretrained model with a fresh classifier when its classes are not `class_names`."""
    known = Manifest.from_checkpoint(pre)
    model_args = {**known.model_args, "num_classes": len(class_names)}
    model_args.pop("weights", None)
    model = build_model(model_args)
    state = strip_prefixes(pre["model"])
    head = classifier_name(model)
    if known.class_names != class_names:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(head + ".") for k in missing):
            raise FinetuneError(f"pretrained weights do not fit: missing {missing}, unexpected {unexpected}")
        old = len(known.class_names) or known.model_args.get("num_classes")
        log(
            f"replaced the classifier head ({head}): the pretrained model has {old} classes, "
            f"the data {len(class_names)}; the new head starts from random weights"
        )
    else:
        model.load_state_dict(state)
        log(f"kept the pretrained classifier head ({head}): the data has the same {len(class_names)} classes")
    return model, model_args


def set_backbone_frozen(model: nn.Module, frozen: bool):
    """Freeze (or unfreeze) every parameter outside the classifier."""
    head = classifier_name(model) + "."
    for name, p in model.named_parameters():
        if not name.startswith(head):
            p.requires_grad_(not frozen)


def backbone_frozen(args, epoch: int) -> bool:
    """Whether the backbone is frozen in `epoch`: always with --freeze-backbone, else in the --head-epochs."""
    return bool(args.freeze_backbone) or epoch <= (args.head_epochs or 0)


def hold_frozen_norms(model: nn.Module):
    """Batch norms whose parameters are all frozen keep their pretrained statistics (eval mode):
    in train mode they would normalise with batch statistics and drift their running ones."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, backbone_lr_scale: float | None
) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases); with a backbone scale, the classifier
    trains at `lr` and the rest at lr * scale. Without one, the two groups of a plain run."""

    def split(params):
        params = list(params)
        return (
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        )

    if backbone_lr_scale is None:
        return list(split(model.parameters()))
    head = classifier_name(model) + "."
    named = list(model.named_parameters())
    head_groups = split(p for n, p in named if n.startswith(head))
    backbone_groups = split(p for n, p in named if not n.startswith(head))
    for g in head_groups:
        g["lr"] = lr
    for g in backbone_groups:
        g["lr"] = lr * backbone_lr_scale
    return [*head_groups, *backbone_groups]  # group 0 is the head: the lr the log shows


def prepare(args, resume_ckpt: dict | None, world: int) -> dict | None:
    """Set args.finetune_from and return the pretrained checkpoint to start from; None on --resume,
    where the run's own checkpoint holds the weights and its fine-tuning flags win over the command line."""
    if resume_ckpt:
        saved = resume_ckpt.get("args", {})
        args.finetune_from = saved.get("finetune_from")
        for flag in RUN_FLAGS[1:]:
            setattr(args, flag, saved.get(flag, getattr(args, flag)))
        pre = None
    else:
        if (args.freeze_backbone or args.head_epochs) and not args.weights:
            raise FinetuneError("--freeze-backbone and --head-epochs need --weights (what to fine-tune from)")
        args.finetune_from = args.weights or None
        pre = load_pretrained(args.weights, args.arch)
        if pre:
            args.arch = Manifest.from_checkpoint(pre).model_args["arch"]
    if args.finetune_from and args.head_epochs and world > 1:
        raise FinetuneError(
            "--head-epochs unfreezes the backbone mid-run, which DDP does not follow (it syncs only the "
            "parameters that required grad when it wrapped the model); use --freeze-backbone or one process"
        )
    return pre


def enter_epoch(model: nn.Module, args, epoch: int, log=print):
    """Freeze or unfreeze the backbone for this epoch, and say so at the start and when that changes."""
    head = classifier_name(model) + "."
    was_frozen = not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith(head))
    frozen = backbone_frozen(args, epoch)
    set_backbone_frozen(model, frozen)
    if epoch == 1 or frozen != was_frozen:
        if frozen:
            log(
                f"epoch {epoch}: training the classifier only (backbone frozen, its batch-norm "
                "statistics too)"
            )
        else:
            log(f"epoch {epoch}: training all layers, the backbone at lr x {args.backbone_lr_scale}")
