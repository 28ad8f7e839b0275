"""Unit tests for the building blocks in model_src/: layers, losses, model construction and loading."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_src.layers import ResidualBlock, Swish, WNLinear, masked_clamp
from model_src.losses import FocalLoss, IoULoss, box_iou, build_criterion
from model_src.net import build_model, build_torchvision, fuse_for_export, load_model, resolve_weights, strip_prefixes

torch.manual_seed(0)


# --- layers ---------------------------------------------------------------------------------


def test_wnlinear_weight_is_g_times_unit_direction():
    layer = WNLinear(6, 4)
    with torch.no_grad():
        layer.g.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    w = layer.weight()
    assert torch.allclose(w.norm(dim=1), layer.g, atol=1e-6)
    assert torch.allclose(w / w.norm(dim=1, keepdim=True), layer.v / layer.v.norm(dim=1, keepdim=True), atol=1e-6)


def test_wnlinear_starts_as_the_plain_linear_and_fuses_exactly():
    layer = WNLinear(5, 3)
    x = torch.randn(7, 5)
    assert torch.allclose(layer(x), F.linear(x, layer.v, layer.bias), atol=1e-6)
    assert torch.allclose(layer.to_linear()(x), layer(x), atol=1e-6)


def test_wnlinear_trains_scale_and_direction():
    layer = WNLinear(4, 2)
    layer(torch.randn(3, 4)).pow(2).sum().backward()
    assert layer.g.grad is not None and layer.g.grad.abs().sum() > 0
    assert layer.v.grad is not None and layer.v.grad.abs().sum() > 0


def test_swish_is_silu_at_beta_one_and_beta_learns():
    x = torch.randn(100)
    act = Swish()
    assert torch.allclose(act(x), F.silu(x), atol=1e-6)
    assert isinstance(act.beta, nn.Parameter)
    act(x).sum().backward()
    assert act.beta.grad is not None and act.beta.grad != 0
    assert torch.allclose(Swish(2.0)(x), x * torch.sigmoid(2.0 * x), atol=1e-6)


def test_masked_clamp_forward_and_gradient_mask():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = masked_clamp(x, -1.0, 1.0)
    assert torch.equal(y, x.clamp(-1, 1))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_masked_clamp_gradcheck():
    x = torch.tensor([-3.0, -0.7, 0.2, 0.6, 2.5], dtype=torch.double, requires_grad=True)  # away from the edges
    assert torch.autograd.gradcheck(lambda t: masked_clamp(t, -1.0, 1.0), (x,))


@pytest.mark.parametrize("in_ch,out_ch,stride,hw", [(8, 8, 1, 16), (8, 16, 2, 8), (8, 16, 1, 16)])
def test_residual_block_shapes(in_ch, out_ch, stride, hw):
    block = ResidualBlock(in_ch, out_ch, stride)
    assert block(torch.randn(2, in_ch, 16, 16)).shape == (2, out_ch, hw, hw)
    assert isinstance(block.shortcut, nn.Identity) == (in_ch == out_ch and stride == 1)


# --- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma0_alpha1_is_cross_entropy(reduction):
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    got = FocalLoss(gamma=0.0, alpha=1.0, reduction=reduction)(logits, target)
    assert torch.allclose(got, F.cross_entropy(logits, target, reduction=reduction), atol=1e-6)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.2, 0.0, 0.1]])
    target = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    focal = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    assert (focal < ce).all()
    assert focal[0] / ce[0] < focal[1] / ce[1]  # the confident one loses most of its weight


def test_focal_per_class_alpha():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    alpha = torch.tensor([1.0, 0.5, 2.0])
    plain = FocalLoss(gamma=1.0, reduction="none")(logits, target)
    weighted = FocalLoss(gamma=1.0, alpha=alpha, reduction="none")(logits, target)
    assert torch.allclose(weighted, plain * alpha[target])


@pytest.mark.parametrize(
    "logits,target,match",
    [
        (torch.randn(4), torch.tensor([0, 1, 0, 1]), "logits must be"),
        (torch.randn(4, 3), torch.tensor([0, 1]), "target must be"),
        (torch.randn(2, 3), torch.tensor([0.0, 1.0]), "integer class indices"),
        (torch.randn(2, 3), torch.tensor([0, 3]), "must lie in"),
    ],
)
def test_focal_rejects_bad_input_clearly(logits, target, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss()(logits, target)


def test_focal_rejects_bad_settings():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="avg")


def test_iou_loss_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert IoULoss()(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert IoULoss()(a, torch.tensor([[3.0, 3.0, 4.0, 4.0]])).item() == pytest.approx(1.0)
    # overlap 1x2=2, union 4+4-2=6
    assert box_iou(a, torch.tensor([[1.0, 0.0, 3.0, 2.0]])).item() == pytest.approx(2 / 6, abs=1e-6)


def test_iou_loss_degenerate_boxes_stay_finite():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    loss = IoULoss(reduction="sum")(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_iou_loss_validates_shapes():
    with pytest.raises(ValueError, match="boxes must both be"):
        IoULoss()(torch.zeros(2, 4), torch.zeros(2, 3))


def test_build_criterion():
    assert isinstance(build_criterion("focal"), FocalLoss)
    assert build_criterion("ce", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValueError):
        build_criterion("mse")


# --- model construction and loading ---------------------------------------------------------------


def test_default_model_forward_shape():
    model = build_model({"in_channels": 1, "num_classes": 10}).eval()
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown arch"):
        build_model({"arch": "vgg"})


def test_torchvision_resnet18_grey_input_and_class_count():
    model = build_model({"arch": "resnet18", "in_channels": 1, "num_classes": 3}).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_torchvision_weights_from_a_local_file(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # as saved from DataParallel
    model = build_torchvision("resnet18", num_classes=1000, weights_path=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_cached_weights_missing_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no cached weights at .*checkpoints"):
        resolve_weights("resnet18", "cache")


def test_strip_prefixes():
    sd = {"module.a": 1, "_orig_mod.b": 2, "module._orig_mod.c": 3, "d": 4}
    assert strip_prefixes(sd) == {"a": 1, "b": 2, "c": 3, "d": 4}


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", ""])
def test_load_model_accepts_wrapped_state_dicts(tmp_path, prefix):
    args = {"in_channels": 1, "num_classes": 4, "widths": [8, 16], "blocks": [1, 1]}
    model = build_model(args).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}, "model_args": args}, path)
    loaded, _ = load_model(str(path))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_fuse_for_export_keeps_outputs():
    model = build_model({"in_channels": 1, "num_classes": 10}).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        fused = fuse_for_export(model)
        assert not any(isinstance(m, WNLinear) for m in fused.modules())
        assert torch.allclose(fused(x), before, atol=1e-5)
