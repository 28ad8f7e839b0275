"""Building blocks the project owns: weight-normalised linear, learnable Swish and a residual block."""

import torch
import torch.nn.functional as F
from torch import nn


class WNLinear(nn.Module):
    """Linear layer with weight normalisation: weight = g * v / ||v|| (row-wise).

    Decoupling direction (v) from scale (g) keeps the logit scale a single learnable
    number per class, which makes the head train well with large learning rates.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.v = nn.Parameter(torch.empty(out_features, in_features))
        self.g = nn.Parameter(torch.empty(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.v, a=5**0.5)  # same init as nn.Linear
        with torch.no_grad():
            self.g.copy_(self.v.norm(dim=1))  # start as the plain linear layer

    def weight(self) -> torch.Tensor:
        """The normalised weight matrix (out, in): g * v / ||v||, row by row."""
        return self.g.unsqueeze(1) * self.v / self.v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        """x @ weight().T + bias."""
        return F.linear(x, self.weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """The equivalent plain nn.Linear, for export and dynamic quantisation."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        """The feature counts that print(module) shows."""
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learnable beta; beta=1 is SiLU."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(beta * x)."""
        return x * torch.sigmoid(self.beta * x)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: "swish" (learnable beta), "relu" or "silu"; ValueError otherwise."""
    if name == "swish":
        return Swish()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "silu":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}; choose swish, relu or silu")


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, activation: str = "swish"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H/s, W/s)
        """act(bn(conv(act(bn(conv(x))))) + shortcut(x))."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))
