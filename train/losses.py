"""Losses the project owns, and the masked clamp. Training-only: nothing here ships in an archive."""

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -alpha * (1 - p_t)^gamma * log(p_t).

    gamma=0, alpha=1 is exactly cross-entropy. `alpha` is a scalar or a per-class tensor.
    """

    def __init__(self, gamma: float = 2.0, alpha=1.0, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss: gamma must be >= 0, got {gamma}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"focal loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The focal loss of (N, C) logits against (N,) class indices; ValueError for malformed inputs."""
        if logits.ndim != 2:
            raise ValueError(f"focal loss: logits must be (N, C), got shape {tuple(logits.shape)}")
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"focal loss: target must be (N,) class indices matching logits (N={logits.shape[0]}), "
                f"got shape {tuple(target.shape)}"
            )
        if target.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"focal loss: target must hold integer class indices, got {target.dtype}")
        if target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
            raise ValueError(f"focal loss: target values must lie in [0, {logits.shape[1] - 1}]")
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)  # (N,)
        pt = log_pt.exp()
        alpha = self.alpha[target] if self.alpha.ndim == 1 else self.alpha
        # clamp: d/dx x^gamma is infinite at x=0 for gamma<1, and inf*0 would make a NaN gradient
        # for a confidently right sample (p_t rounds to 1 in float32).
        loss = -alpha * (1 - pt).clamp_min(1e-12).pow(self.gamma) * log_pt
        return _reduce(loss, self.reduction)


class _MaskedClamp(torch.autograd.Function):
    """clamp(x, lo, hi) whose gradient is exactly zero outside [lo, hi]."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float):
        """clamp(x, lo, hi), saving x for the backward pass."""
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad_out):
        """The incoming gradient where lo <= x <= hi, zero elsewhere."""
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.lo) & (x <= ctx.hi)
        return grad_out * inside.to(grad_out.dtype), None, None


def masked_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) whose gradient is exactly zero outside [lo, hi]."""
    return _MaskedClamp.apply(x, lo, hi)


def box_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU of [x1, y1, x2, y2] boxes, (N, 4) x (N, 4) -> (N,).

    Widths/heights are clamped at 0, so inverted or degenerate boxes give IoU 0, never NaN.
    """
    w = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0)  # noqa: E731
    h = lambda b: (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    ix = (torch.min(pred[:, 2], target[:, 2]) - torch.max(pred[:, 0], target[:, 0])).clamp(min=0)
    iy = (torch.min(pred[:, 3], target[:, 3]) - torch.max(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = ix * iy
    union = w(pred) * h(pred) + w(target) * h(target) - inter
    return inter / (union + eps)


class IoULoss(nn.Module):
    """1 - IoU for [x1, y1, x2, y2] boxes."""

    def __init__(self, reduction: str = "mean", eps: float = 1e-7):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"IoU loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction, self.eps = reduction, eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The reduced 1 - IoU of (N, 4) boxes; ValueError for other shapes."""
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 4:
            raise ValueError(
                f"IoU loss: boxes must both be (N, 4), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        return _reduce(1 - box_iou(pred, target, self.eps), self.reduction)


def build_criterion(name: str, label_smoothing: float = 0.0, focal_gamma: float = 2.0) -> nn.Module:
    """The training loss: "ce" (cross-entropy with label smoothing) or "focal"; ValueError otherwise."""
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma=focal_gamma)
    raise ValueError(f"unknown loss {name!r}; choose ce or focal")
