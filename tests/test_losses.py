"""Unit tests for train/losses.py: focal loss, IoU loss, build_criterion and the masked clamp."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.losses import FocalLoss, IoULoss, box_iou, build_criterion, masked_clamp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- focal loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma0_alpha1_is_cross_entropy(reduction):
    logits, target = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
    got = FocalLoss(gamma=0.0, alpha=1.0, reduction=reduction)(logits, target)
    want = F.cross_entropy(logits, target, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_focal_gradient_at_gamma0_is_the_cross_entropy_gradient():
    logits, target = torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8,))
    (g_focal,) = torch.autograd.grad(FocalLoss(gamma=0.0)(logits, target), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
    torch.testing.assert_close(g_focal, g_ce, rtol=1e-5, atol=1e-7)


def test_focal_down_weights_easy_examples():
    # confident .. unsure, all correct
    logits = torch.tensor([[6.0, 0.0, 0.0], [4.0, 1.0, 0.0], [0.2, 0.0, 0.1]])
    target = torch.tensor([0, 0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    focal = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    assert (focal < ce).all()
    ratio = focal / ce  # = (1 - p_t)^gamma: the more confident, the less weight
    assert ratio[0] < ratio[1] < ratio[2]
    p_t = torch.softmax(logits, 1)[:, 0]
    torch.testing.assert_close(ratio, (1 - p_t) ** 2)


def test_focal_does_not_down_weight_hard_examples_as_much():
    wrong = torch.tensor([[0.0, 5.0]])  # confidently wrong: p_t ~ 0.007, weight ~ 0.99
    target = torch.tensor([0])
    ce = F.cross_entropy(wrong, target)
    assert FocalLoss(gamma=2.0)(wrong, target) > 0.98 * ce


def test_focal_per_class_alpha():
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    alpha = torch.tensor([1.0, 0.5, 2.0])
    plain = FocalLoss(gamma=1.0, reduction="none")(logits, target)
    weighted = FocalLoss(gamma=1.0, alpha=alpha, reduction="none")(logits, target)
    torch.testing.assert_close(weighted, plain * alpha[target])
    torch.testing.assert_close(
        FocalLoss(gamma=1.0, alpha=alpha, reduction="sum")(logits, target), (plain * alpha[target]).sum()
    )
    scalar = FocalLoss(gamma=1.0, alpha=0.25, reduction="none")(logits, target)
    torch.testing.assert_close(scalar, 0.25 * plain)


def test_focal_accepts_int32_targets():
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(FocalLoss()(logits, target.int()), FocalLoss()(logits, target))


@pytest.mark.parametrize(
    "logits,target,match",
    [
        (torch.randn(4), torch.tensor([0, 1, 0, 1]), r"logits must be \(N, C\), got shape \(4,\)"),
        (torch.randn(2, 3, 4), torch.tensor([0, 1]), r"logits must be \(N, C\), got shape \(2, 3, 4\)"),
        (torch.randn(4, 3), torch.tensor([0, 1]), r"target must be \(N,\) .*\(N=4\), got shape \(2,\)"),
        (torch.randn(2, 3), torch.tensor([[0], [1]]), r"target must be \(N,\)"),
        (torch.randn(2, 3), torch.tensor([0.0, 1.0]), "integer class indices, got torch.float32"),
        (torch.randn(2, 3), torch.tensor([0, 3]), r"target values must lie in \[0, 2\]"),
        (torch.randn(2, 3), torch.tensor([-1, 0]), r"target values must lie in \[0, 2\]"),
    ],
    ids=["1d-logits", "3d-logits", "short-target", "2d-target", "float-target", "too-big", "negative"],
)
def test_focal_rejects_bad_input_clearly(logits, target, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss()(logits, target)


def test_focal_rejects_bad_settings():
    with pytest.raises(ValueError, match="gamma must be >= 0, got -1"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="reduction must be one of .*got 'avg'"):
        FocalLoss(reduction="avg")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_for_a_perfectly_classified_sample(gamma):
    # row 0: p_t == 1.0 in float32
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.5, 0.2, 0.1]], requires_grad=True)
    FocalLoss(gamma=gamma)(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all(), logits.grad


# --- IoU loss -------------------------------------------------------------------------------------


def test_iou_loss_of_identical_boxes_is_zero():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 2.0, 5.0, 3.5], [-3.0, -1.0, 0.0, 0.0]])
    loss = IoULoss(reduction="none")(boxes, boxes.clone())
    torch.testing.assert_close(loss, torch.zeros(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "other",
    [[3.0, 3.0, 4.0, 4.0], [2.0, 0.0, 4.0, 2.0], [0.0, 5.0, 2.0, 6.0]],
    ids=["apart", "touching-edge", "below"],
)
def test_iou_loss_of_disjoint_boxes_is_one(other):
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert IoULoss()(a, torch.tensor([other])).item() == pytest.approx(1.0, abs=1e-6)


def test_iou_loss_partial_overlap_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 4.0], [1.0, 0.0, 3.0, 2.0]])
    # row 0: overlap 1x1 = 1, areas 4 and 2x3 = 6, union 9 -> IoU 1/9
    # row 1: overlap 1x2 = 2, areas 4 and 4, union 6 -> IoU 1/3
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 9, 1 / 3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        IoULoss(reduction="none")(a, b), torch.tensor([8 / 9, 2 / 3]), rtol=0, atol=1e-6
    )
    assert IoULoss(reduction="mean")(a, b).item() == pytest.approx((8 / 9 + 2 / 3) / 2, abs=1e-6)
    assert IoULoss(reduction="sum")(a, b).item() == pytest.approx(8 / 9 + 2 / 3, abs=1e-6)
    assert torch.equal(box_iou(a, b), box_iou(b, a))  # symmetric


def test_iou_loss_gradient_step_moves_the_box_towards_the_target():
    pred = torch.tensor([[0.5, 0.5, 2.5, 2.5]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    loss = IoULoss()(pred, target)
    loss.backward()
    with torch.no_grad():
        assert IoULoss()(pred - 0.1 * pred.grad, target) < loss


DEGENERATE = {
    "zero-width": ([1.0, 0.0, 1.0, 2.0], [0.0, 0.0, 2.0, 2.0]),
    "zero-height": ([0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 2.0, 2.0]),
    "inverted-x": ([2.0, 0.0, 1.0, 3.0], [0.0, 0.0, 1.0, 1.0]),
    "inverted-both": ([3.0, 3.0, 1.0, 1.0], [1.0, 1.0, 3.0, 3.0]),
    "all-zeros": ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
    "point-on-point": ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),
    "zero-target": ([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_iou_loss_degenerate_boxes_give_finite_values_and_gradients(name):
    p, t = DEGENERATE[name]
    pred = torch.tensor([p], requires_grad=True)
    loss = IoULoss()(pred, torch.tensor([t]))
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= loss.item() <= 1.0 + 1e-6
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_iou_loss_degenerate_boxes_in_a_batch_do_not_poison_the_others():
    pred = torch.tensor([p for p, _ in DEGENERATE.values()] + [[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    target = torch.tensor([t for _, t in DEGENERATE.values()] + [[1.0, 1.0, 3.0, 3.0]])
    IoULoss(reduction="sum")(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[-1].abs().sum() > 0


@pytest.mark.parametrize(
    "pred,target",
    [((2, 4), (2, 3)), ((3, 4), (2, 4)), ((4,), (4,)), ((2, 5), (2, 5)), ((2, 4, 1), (2, 4, 1))],
)
def test_iou_loss_validates_shapes(pred, target):
    with pytest.raises(ValueError, match=r"boxes must both be \(N, 4\)"):
        IoULoss()(torch.zeros(pred), torch.zeros(target))


def test_iou_loss_rejects_a_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        IoULoss(reduction="max")


# --- build_criterion ------------------------------------------------------------------------------


def test_build_criterion_ce_with_label_smoothing():
    crit = build_criterion("ce", label_smoothing=0.1)
    assert isinstance(crit, nn.CrossEntropyLoss) and crit.label_smoothing == 0.1
    logits, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.testing.assert_close(crit(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    assert crit(logits, target) != F.cross_entropy(logits, target)


def test_build_criterion_focal():
    crit = build_criterion("focal", focal_gamma=1.5)
    assert isinstance(crit, FocalLoss) and crit.gamma == 1.5 and crit.reduction == "mean"


def test_build_criterion_unknown():
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        build_criterion("mse")


# --- masked_clamp ---------------------------------------------------------------------------------


def test_masked_clamp_forward_is_clamp():
    x = torch.randn(200) * 3
    assert torch.equal(masked_clamp(x, -1.0, 1.5), x.clamp(-1.0, 1.5))


def test_masked_clamp_gradient_is_zero_outside_and_one_inside():
    x = torch.tensor([-3.0, -1.0001, -1.0, -0.5, 0.0, 0.7, 1.0, 1.0001, 4.0], requires_grad=True)
    masked_clamp(x, -1.0, 1.0).backward(torch.full_like(x, 2.0))
    inside = (x >= -1.0) & (x <= 1.0)
    assert torch.equal(x.grad, 2.0 * inside.float())
    assert x.grad.tolist() == [0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]


def test_masked_clamp_gradcheck_away_from_the_boundaries():
    x = torch.tensor([-3.0, -0.7, 0.2, 0.6, 2.5, 0.99, -0.99], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: masked_clamp(t, -1.0, 1.0), (x,))
