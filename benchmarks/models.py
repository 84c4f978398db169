"""Models for the benchmarks: a ResNet-18-like CIFAR CNN and a small MLP.

Plain ``nn.Module`` code (no torchvision). Every model also has
``forward_features(x, stop_after=None)``, the hand-written way of getting
intermediate outputs: it returns ``{point: tensor}`` for the named stages
(``''`` is the logits) and stops right after ``stop_after`` when given. It runs
exactly the code ``forward`` runs, so FLOPs and saved tensors are comparable.

>>> import torch
>>> t, s = resnet_teacher(), resnet_student()
>>> 10_000_000 < n_params(t) < 12_000_000, n_params(s) < n_params(t) // 10
(True, True)
>>> sorted(t.forward_features(torch.randn(1, 3, 32, 32), stop_after="layer2"))
['layer1', 'layer2', 'stem']
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = [
    "MLP",
    "BasicBlock",
    "Features",
    "ResNetCifar",
    "mlp_student",
    "mlp_teacher",
    "n_params",
    "resnet_student",
    "resnet_teacher",
    "tensor_stack",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN when the shape changes).

    >>> BasicBlock(4, 8, stride=2)(torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 8, 4, 4])
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 layout for 32x32 images: a 3x3 stem, 4 stages of 2 BasicBlocks, a linear head.

    Stage widths are ``width * (1, 2, 4, 8)``; ``width=64`` is ResNet-18 (~11.2M
    parameters), ``width=16`` a student at a quarter of the width.

    Args:
        width: channels of the stem and the first stage.
        num_classes: outputs of the head.
        blocks: BasicBlocks per stage.
    """

    points = ("stem", "layer1", "layer2", "layer3", "layer4", "")

    def __init__(self, width: int = 64, *, num_classes: int = 10, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width, width * 2, width * 4, width * 8]
        in_ch = width
        for i, ch in enumerate(chans):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_ch, ch, stride=stride)]
            stage += [BasicBlock(ch, ch) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[""]

    def forward_features(self, x: torch.Tensor, stop_after: str | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the stages up to ``stop_after`` (all of them and the logits when ``None``)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.points[:-1]:
            x = getattr(self, name)(x)
            out[name] = x
            if name == stop_after:
                return out
        out[""] = self.fc(torch.flatten(self.pool(x), 1))
        return out


class MLP(nn.Module):
    """``body`` (Linear+ReLU layers) then a linear ``head``.

    >>> MLP([8, 16, 16], num_classes=3)(torch.randn(2, 8)).shape
    torch.Size([2, 3])
    """

    points = ("body", "")

    def __init__(self, sizes: list[int], *, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[""]

    def forward_features(self, x: torch.Tensor, stop_after: str | None = None) -> dict[str, torch.Tensor]:
        """``{'body': hidden, '': logits}``, or only ``body`` when ``stop_after='body'``."""
        h = self.body(x)
        if stop_after == "body":
            return {"body": h}
        return {"body": h, "": self.head(h)}


class Features(nn.Module):
    """A model whose ``forward`` is the wrapped model's ``forward_features``: its outputs by point.

    For :func:`torch.func.functional_call`, which calls ``forward``; the state
    names gain the prefix ``model.``.

    >>> m = MLP([8, 16], num_classes=3)
    >>> state = {f"model.{n}": v for n, v in m.named_parameters()}
    >>> out = torch.func.functional_call(Features(m), state, (torch.randn(2, 8),))
    >>> sorted(out), out[""].shape
    (['', 'body'], torch.Size([2, 3]))
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_features(x)


def resnet_teacher(width: int = 64) -> ResNetCifar:
    """The CNN teacher (ResNet-18-like, ~11.2M parameters at the default width)."""
    return ResNetCifar(width)


def resnet_student(width: int = 16) -> ResNetCifar:
    """The CNN student: the teacher's layout at a quarter of its width."""
    return ResNetCifar(width)


def mlp_teacher(in_features: int = 64, hidden: int = 512, depth: int = 3) -> MLP:
    """A small MLP teacher (8x8 digit-sized inputs by default)."""
    return MLP([in_features] + [hidden] * depth)


def mlp_student(in_features: int = 64, hidden: int = 64, depth: int = 2) -> MLP:
    """The MLP student: narrower and shallower than :func:`mlp_teacher`."""
    return MLP([in_features] + [hidden] * depth)


def tensor_stack(n_tensors: int, *, width: int = 4, num_classes: int = 4) -> nn.Sequential:
    """Many state tensors, negligible compute: tiny Linear-BatchNorm1d-ReLU blocks, then a Linear head.

    Each block holds 7 tensors (Linear weight and bias, BatchNorm weight, bias and
    its 3 buffers); the block count is chosen so that parameters + buffers come to
    about ``n_tensors``. For timing what a call costs per tensor (per-call overhead,
    ``funcdistill.state``), not the arithmetic.

    >>> [sum(1 for _ in (*m.parameters(), *m.buffers())) for m in map(tensor_stack, (50, 200, 800))]
    [51, 198, 800]
    >>> tensor_stack(50)(torch.randn(2, 4)).shape
    torch.Size([2, 4])
    """
    blocks = max(1, round((n_tensors - 2) / 7))
    layers: list[nn.Module] = [
        nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()) for _ in range(blocks)
    ]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
