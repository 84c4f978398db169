"""A tiny MobileNetV2-shaped CNN with the module and FX node names of the reference examples.

``features.3``, ``features.5.conv``, ``features.7`` are modules; traced with
``torch.fx``, ``features_18_0``, ``features_2_conv_1_0`` and
``features_5_conv_0_2`` are nodes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def conv_bn_act(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d -> BatchNorm2d -> ReLU6 (indices 0, 1, 2)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """``conv`` = [pointwise expand, depthwise, pointwise project, BatchNorm]; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn_act(cin, hidden),
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNet(nn.Module):
    """19 feature blocks like MobileNetV2 (``features.0`` stem ... ``features.18`` head conv), narrow."""

    STRIDES: ClassVar[dict[int, int]] = {2: 2, 4: 2, 7: 2, 11: 2}

    def __init__(self, width: int = 4, classes: int = 5):
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_act(3, width, 3, stride=4)]
        blocks += [InvertedResidual(width, width, self.STRIDES.get(i, 1)) for i in range(1, 18)]
        blocks.append(conv_bn_act(width, 2 * width))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def pair(seed: int = 0, *, traced: bool = False) -> tuple[nn.Module, nn.Module]:
    """A teacher (eval mode) and a student (train mode) with different weights."""
    torch.manual_seed(seed)
    teacher, student = TinyMobileNet().eval(), TinyMobileNet()
    if traced:
        teacher, student = torch.fx.symbolic_trace(teacher), torch.fx.symbolic_trace(student)
        teacher.eval()
    return teacher, student
