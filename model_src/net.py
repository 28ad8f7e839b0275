"""The classifier: a small ResNet-style CNN, or a torchvision architecture.

`build_model(model_args)` is the only constructor, so a checkpoint that stores
`model_args` can always rebuild its model without the training script.
"""

import os

import torch
from torch import nn

from model_src.layers import ResidualBlock, WNLinear, make_activation
from model_src.manifest import model_args_of

DEFAULT_MODEL_ARGS = {
    "arch": "resnet_small",
    "in_channels": 1,
    "num_classes": 10,
    "widths": [32, 64, 128],
    "blocks": [1, 1, 1],
    "activation": "swish",
    "dropout": 0.1,
}

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
# published weights: lite0 (train/pretrained.py)
LITE_ARCHS = tuple(f"efficientnet_lite{i}" for i in range(5))


class ResNetClassifier(nn.Module):
    """stem -> residual stages (each halves the resolution after the first) -> pool -> WN head."""

    def __init__(self, in_channels, num_classes, widths, blocks, activation="swish", dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            make_activation(activation),
        )
        layers, in_ch = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, blocks)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(ResidualBlock(in_ch, width, stride, activation))
                in_ch = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = WNLinear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes) logits
        """Class logits for a batch of images."""
        x = self.stages(self.stem(x))  # (B, C', H', W')
        x = self.pool(x).flatten(1)  # (B, C')
        return self.head(self.dropout(x))


def build_model(model_args: dict) -> nn.Module:
    """A fresh model for `model_args` (gaps filled from DEFAULT_MODEL_ARGS); ValueError for unknown arch."""
    args = {**DEFAULT_MODEL_ARGS, **model_args}
    arch = args["arch"]
    if arch == "resnet_small":
        return ResNetClassifier(
            args["in_channels"],
            args["num_classes"],
            args["widths"],
            args["blocks"],
            args["activation"],
            args["dropout"],
        )
    if arch in TORCHVISION_ARCHS:
        return build_torchvision(arch, args["num_classes"], args["in_channels"], args.get("weights"))
    if arch in LITE_ARCHS:
        from model_src.efficientnet_lite import EfficientNetLite  # imported here: only lite archives need it

        # Dropout from model_args only when given there: DEFAULT_MODEL_ARGS' is resnet_small's, not the
        # arch's.
        return EfficientNetLite(arch, args["num_classes"], args["in_channels"], model_args.get("dropout"))
    raise ValueError(f"unknown arch {arch!r}; choose resnet_small or one of {TORCHVISION_ARCHS + LITE_ARCHS}")


def build_torchvision(arch, num_classes, in_channels=3, weights_path=None):
    """A torchvision ResNet; optionally start from ImageNet weights in a local file.

    There is no download here on purpose: weights come from `weights_path`, or from
    torchvision's cache (torch.hub.get_dir()/checkpoints) when given as "cache".
    """
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if weights_path:
        state = torch.load(resolve_weights(arch, weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(strip_prefixes(state))
    if in_channels != 3:
        # Grey input: sum the RGB filters, which gives the same response to a grey image.
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
        with torch.no_grad():
            model.conv1.weight.copy_(
                old.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels
            )
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def resolve_weights(arch: str, weights_path: str) -> str:
    """The path of pretrained weights: `weights_path` if it is a file, or for "cache" the arch's default
    torchvision weights in the torch hub cache. FileNotFoundError when the file is not there."""
    if weights_path != "cache":
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"weights file {weights_path} does not exist")
        return weights_path
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"no cached weights at {cached}; download {url} on a machine with internet and copy it there"
        )
    return cached


def strip_prefixes(state_dict: dict) -> dict:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_model(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint or serving file; returns (model in eval mode, checkpoint)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(model_args_of(ckpt))
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    return model.eval(), ckpt


def fuse_for_export(model: nn.Module) -> nn.Module:
    """Replace every WNLinear with its equivalent nn.Linear (in place), so exporters and
    dynamic quantisation see a standard layer."""
    for name, child in model.named_children():
        if isinstance(child, WNLinear):
            setattr(model, name, child.to_linear())
        else:
            fuse_for_export(child)
    return model
