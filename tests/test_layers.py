"""Unit tests for model_src/layers.py and model_src/net.py: the layers the project owns, model
construction (own ResNet and torchvision), weights from local files, and checkpoint loading."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_src.layers import ResidualBlock, Swish, WNLinear, make_activation
from model_src.net import (
    DEFAULT_MODEL_ARGS,
    build_model,
    build_torchvision,
    fuse_for_export,
    load_model,
    resolve_weights,
    strip_prefixes,
)

SMALL = {"in_channels": 1, "num_classes": 4, "widths": [8, 16], "blocks": [1, 1]}  # cheap resnet_small


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- WNLinear -------------------------------------------------------------------------------------


def test_wnlinear_weight_is_g_times_unit_v_row_by_row():
    layer = WNLinear(6, 4)
    with torch.no_grad():
        layer.g.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    w = layer.weight()
    for i in range(4):
        want = layer.g[i] * layer.v[i] / layer.v[i].norm()
        torch.testing.assert_close(w[i], want, rtol=0, atol=1e-6)
    # only the direction of v matters: scaling a row of v leaves the weight unchanged
    with torch.no_grad():
        layer.v[2] *= 7.0
    torch.testing.assert_close(layer.weight(), w, rtol=0, atol=1e-6)


def test_wnlinear_starts_as_the_plain_linear_with_the_same_v_and_bias():
    layer = WNLinear(5, 3)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(3))
    linear = nn.Linear(5, 3)
    with torch.no_grad():
        linear.weight.copy_(layer.v)
        linear.bias.copy_(layer.bias)
    x = torch.randn(7, 5)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.g, layer.v.norm(dim=1))


@pytest.mark.parametrize("bias", [True, False])
def test_wnlinear_to_linear_gives_identical_outputs(bias):
    layer = WNLinear(5, 3, bias=bias)
    with torch.no_grad():  # move away from the init so g and v are not trivially related
        layer.g.mul_(torch.tensor([0.3, 2.0, -1.0]))
        if bias:
            layer.bias.copy_(torch.randn(3))
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and (linear.bias is None) == (not bias)
    x = torch.randn(9, 5)
    with torch.no_grad():
        assert torch.equal(linear(x), layer(x))
    # a copy, not a view of g/v
    assert isinstance(linear.weight, nn.Parameter) and linear.weight.grad_fn is None


def test_wnlinear_gradients_reach_g_v_and_bias():
    layer = WNLinear(4, 2)
    layer(torch.randn(3, 4)).pow(2).sum().backward()
    for p in (layer.g, layer.v, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --- Swish ----------------------------------------------------------------------------------------


def test_swish_at_beta_one_is_silu():
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(Swish()(x), F.silu(x), rtol=0, atol=1e-6)


def test_swish_beta_is_a_learnable_parameter_that_gets_a_gradient():
    act = Swish()
    assert isinstance(act.beta, nn.Parameter) and act.beta.requires_grad
    assert any(p is act.beta for p in act.parameters())
    act(torch.randn(100)).sum().backward()
    assert act.beta.grad is not None and act.beta.grad.item() != 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_swish_with_another_beta(beta):
    x = torch.linspace(-5, 5, 41)
    torch.testing.assert_close(Swish(beta)(x), x * torch.sigmoid(beta * x), rtol=0, atol=1e-6)


def test_make_activation():
    assert isinstance(make_activation("swish"), Swish)
    assert isinstance(make_activation("relu"), nn.ReLU)
    assert isinstance(make_activation("silu"), nn.SiLU)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        make_activation("gelu")


# --- ResidualBlock --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_ch,out_ch,stride,out_hw",
    [(8, 8, 1, 12), (8, 8, 2, 6), (8, 16, 1, 12), (8, 16, 2, 6), (3, 4, 2, 6)],
)
def test_residual_block_shapes(in_ch, out_ch, stride, out_hw):
    block = ResidualBlock(in_ch, out_ch, stride)
    assert block(torch.randn(2, in_ch, 12, 12)).shape == (2, out_ch, out_hw, out_hw)
    assert isinstance(block.shortcut, nn.Identity) == (in_ch == out_ch and stride == 1)


def test_residual_block_identity_shortcut_passes_the_input_through():
    block = ResidualBlock(6, 6, 1, activation="relu").eval()
    with torch.no_grad():  # silence the residual branch: out = act(0 + shortcut(x)) = relu(x)
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = torch.randn(2, 6, 5, 5)
    assert isinstance(block.shortcut, nn.Identity)
    assert torch.equal(block(x), F.relu(x))


# --- build_model ----------------------------------------------------------------------------------


def test_default_model_is_resnet_small_for_grey_16px_digits():
    model = build_model({}).eval()
    assert DEFAULT_MODEL_ARGS["arch"] == "resnet_small"
    with torch.no_grad():
        assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    assert isinstance(model.head, WNLinear)


def test_model_args_override_the_defaults():
    model = build_model({**SMALL, "in_channels": 3, "activation": "relu"}).eval()
    assert model.stem[0].in_channels == 3 and model.head.out_features == 4
    assert len(model.stages) == 2 and not any(isinstance(m, Swish) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        build_model({"arch": "vgg16"})


def test_torchvision_resnet18_with_grey_input_and_three_classes():
    model = build_model({"arch": "resnet18", "in_channels": 1, "num_classes": 3}).eval()
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A random resnet18 state dict saved as a local weights file; -> (source model, path, module.-path)."""
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    folder = tmp_path_factory.mktemp("weights")
    plain, wrapped = folder / "resnet18.pth", folder / "resnet18-ddp.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, wrapped)  # as saved from DDP
    return source, {"": str(plain), "module.": str(wrapped)}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_torchvision_weights_load_exactly_from_a_local_file(resnet18_file, prefix):
    source, paths = resnet18_file
    model = build_torchvision("resnet18", num_classes=1000, weights_path=paths[prefix])
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert torch.equal(model.bn1.running_mean, source.bn1.running_mean)


def test_torchvision_weights_for_grey_input_sum_the_rgb_filters(resnet18_file):
    source, paths = resnet18_file
    model = build_torchvision("resnet18", num_classes=3, in_channels=1, weights_path=paths[""])
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.out_features == 3  # a new head for the new classes
    grey = torch.rand(1, 1, 32, 32)
    with torch.no_grad():  # same response to a grey image as the RGB net to its 3-channel copy
        torch.testing.assert_close(
            model.conv1(grey), source.conv1(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5
        )


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights("resnet18", str(tmp_path / "nope.pth"))


def test_cache_weights_missing_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        resolve_weights("resnet18", "cache")
    message = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in message  # where to copy the file
    assert "download https://" in message and "resnet18" in message  # and what to download


def test_cache_weights_present_are_found(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_weights("resnet18", "cache") == str(cached)


# --- strip_prefixes and load_model ----------------------------------------------------------------


def test_strip_prefixes():
    sd = {"module.a": 1, "_orig_mod.b": 2, "module._orig_mod.c.d": 3, "e": 4, "stages.module.f": 5}
    assert strip_prefixes(sd) == {"a": 1, "b": 2, "c.d": 3, "e": 4, "stages.module.f": 5}


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_load_model_round_trip(tmp_path, prefix):
    model = build_model(SMALL).eval()
    with torch.no_grad():  # non-default BN statistics, so the buffers must really load
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": {prefix + k: v for k, v in model.state_dict().items()}, "model_args": SMALL, "epoch": 3},
        path,
    )
    loaded, ckpt = load_model(str(path))
    assert not loaded.training and ckpt["epoch"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_refuses_weights_of_another_shape(tmp_path):
    model = build_model(SMALL)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": {**SMALL, "num_classes": 5}}, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(str(path))


def test_fuse_for_export_replaces_wnlinear_and_keeps_outputs():
    model = build_model({"in_channels": 1, "num_classes": 10}).eval()
    with torch.no_grad():
        model.head.g.mul_(torch.linspace(0.5, 2.0, 10))  # g no longer equal to |v|
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        fused = fuse_for_export(model)
        after = fused(x)
    assert not any(isinstance(m, WNLinear) for m in fused.modules())
    assert type(fused.head) is nn.Linear
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
