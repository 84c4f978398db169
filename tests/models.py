"""Tiny models shared by the tests."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class Block(nn.Module):
    """Conv-BN-ReLU with a residual add."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """features.0 (stem) -> features.1..n (blocks) -> pool -> head."""

    def __init__(self, width: int = 4, depth: int = 2, classes: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
        layers += [Block(width) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def mlp(widths: tuple[int, ...] = (4, 8, 3)) -> nn.Sequential:
    """Linear/ReLU stack: Linear modules at even indices."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Shared(nn.Module):
    """Calls the same module twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lin(self.lin(x)))


class Branchy(nn.Module):
    """Returns a dict and has a submodule that returns a tuple, and one never called."""

    def __init__(self):
        super().__init__()
        self.split = SplitTwo()
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.split(x)
        return {"a": a, "b": b * 2}


class SplitTwo(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x - 1


class Labelled(nn.Module):
    """Output contains a string: not a pytree of tensors."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tag = Tag()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.tag(x)
        return self.lin(x)


class Tag(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x, "label"


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 6, 6)


class Tied(nn.Module):
    """Two Linear layers sharing one weight tensor (tied under two names)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class Unrolled(nn.Module):
    """One ``cell`` applied ``steps`` times (a recurrent/weight-shared block), then a ``head`` with a keyword input."""

    def __init__(self, width: int = 4, steps: int = 3):
        super().__init__()
        self.steps = steps
        self.cell = nn.Linear(width, width)
        self.head = Scaled(width)

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(self.cell(x))
        return self.head(x, scale=x.mean(-1, keepdim=True))


class Scaled(nn.Module):
    """A linear head whose forward takes a keyword input."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, 3)

    def forward(self, h, *, scale):
        return self.lin(h) * scale
