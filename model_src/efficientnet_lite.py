"""EfficientNet-Lite: EfficientNet (Tan & Le, 2019) as TensorFlow re-tuned it for mobile CPUs.

The network of tensorflow/tpu's `efficientnet/lite/efficientnet_lite_builder.py`: ReLU6
instead of swish and no squeeze-excitation (both for int8 and mobile runtimes), and the
stem (32 channels) and head (1280) left unscaled. Strided convolutions pad like TensorFlow's
"SAME" (more at the bottom/right), which nn.Conv2d's symmetric padding cannot express;
without that, published weights give different logits.

Written here rather than imported because this file ships inside every archive: serving
needs no extra package. The PyTorch port that published the weights (efficientnet-lite-pytorch
0.1.0, unmaintained) is a test-only reference; train/pretrained.py maps its keys onto these.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# width multiplier, depth multiplier, resolution, dropout (efficientnet_lite_builder.py)
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# Stages before scaling: (repeats, kernel, stride, expand ratio, out channels); the input is the 32-channel
# stem.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's momentum 0.99 is PyTorch's 0.01


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width` to a multiple of `divisor`, never more than 10 % down."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def round_repeats(repeats: int, depth: float) -> int:
    """A stage's block count scaled by `depth`, rounded up."""
    return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": output ceil(size / stride); the odd pixel of padding goes after, not before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A strided convolution with TF "SAME" padding, computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', ceil(H/s), ceil(W/s))
        """Convolve `x` after padding it TF "SAME" style for its own height and width."""
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


class ConvBN(nn.Module):
    """conv -> batch norm -> ReLU6 (or no activation, for the linear projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        if stride == 1:  # "SAME" at stride 1 is symmetric: a plain convolution does it
            self.conv = nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
        else:
            self.conv = Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """act(bn(conv(x)))."""
        return self.act(self.bn(self.conv(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a random sample of the batch."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> k x k depthwise (maybe strided) -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H/s, W/s)
        """The block's output, plus the input (under stochastic depth) when the shapes match."""
        out = self.project(self.depthwise(self.expand(x)))
        if self.residual:
            out = drop_path(out, self.drop_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite `arch` (lite0 to lite4) with a `num_classes` head; ValueError for another arch."""

    def __init__(
        self,
        arch: str = "efficientnet_lite0",
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float | None = None,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        if arch not in LITE_PARAMS:
            raise ValueError(f"unknown EfficientNet-Lite {arch!r}; choose one of {sorted(LITE_PARAMS)}")
        width, depth, _, default_dropout = LITE_PARAMS[arch]
        self.stem = ConvBN(in_channels, STEM_CHANNELS, 3, 2)
        specs, cin = [], STEM_CHANNELS
        for i, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
            cout = round_filters(cout, width)
            if 0 < i < len(STAGES) - 1:  # the first and last stages keep their depth in the lite models
                repeats = round_repeats(repeats, depth)
            for j in range(repeats):
                specs.append((cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
        # Stochastic depth grows linearly with the block index, as in the reference.
        self.blocks = nn.Sequential(
            *(MBConv(*spec, drop_rate=drop_path_rate * i / len(specs)) for i, spec in enumerate(specs))
        )
        self.head = ConvBN(cin, HEAD_CHANNELS, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(default_dropout if dropout is None else dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """From-scratch init: convolutions fan-out normal as in TF's EfficientNet. The classifier keeps
        PyTorch's uniform 1/sqrt(in): TF's 1/sqrt(out) suits 1000 classes but gives a fresh 3-class
        head logits in the tens."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes) logits
        """Class logits for a batch of images."""
        x = self.head(self.blocks(self.stem(x)))  # (B, 1280, H/32, W/32)
        x = self.pool(x).flatten(1)  # (B, 1280)
        return self.classifier(self.dropout(x))
