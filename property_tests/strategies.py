"""Hypothesis strategies for random architectures, point names and mappings.

An architecture is a tuple of layer specs; :func:`build` turns it into a model
whose points are ``'layers.<i>'`` (and their ``.body``/``.norm`` children) plus
``''`` for the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import funcdistill as fd


@dataclass(frozen=True)
class Layer:
    width: int
    norm: bool
    residual: bool


@dataclass(frozen=True)
class Arch:
    conv: bool
    layers: tuple[Layer, ...]
    classes: int = 3


class Unit(nn.Module):
    def __init__(self, cin: int, layer: Layer, conv: bool):
        super().__init__()
        self.body = nn.Conv2d(cin, layer.width, 3, padding=1) if conv else nn.Linear(cin, layer.width)
        self.norm = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(layer.width) if layer.norm else nn.Identity()
        self.residual = layer.residual and cin == layer.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(self.body(x)))
        return x + y if self.residual else y


class Model(nn.Module):
    def __init__(self, arch: Arch, in_width: int):
        super().__init__()
        units, cin = [], in_width
        for layer in arch.layers:
            units.append(Unit(cin, layer, arch.conv))
            cin = layer.width
        self.layers = nn.Sequential(*units)
        self.conv = arch.conv
        self.head = nn.Linear(cin, arch.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)
        return self.head(h.mean((2, 3)) if self.conv else h)


IN_WIDTH = 3


def archs(conv: bool) -> st.SearchStrategy[Arch]:
    layer = st.builds(Layer, width=st.sampled_from([2, 3, 4]), norm=st.booleans(), residual=st.booleans())
    return st.builds(Arch, conv=st.just(conv), layers=st.lists(layer, min_size=1, max_size=4).map(tuple))


def build(arch: Arch, seed: int) -> Model:
    torch.manual_seed(seed)
    return Model(arch, IN_WIDTH)


def inputs(conv: bool, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, IN_WIDTH, 4, 4) if conv else (batch, IN_WIDTH)
    return torch.randn(shape, generator=g)


def points(model: Model) -> list[str]:
    """Points whose output is a single tensor and that run once per forward."""
    names = ["", "head"]
    for i, unit in enumerate(model.layers):
        names += [f"layers.{i}", f"layers.{i}.body"]
        if not isinstance(unit.norm, nn.Identity):
            names.append(f"layers.{i}.norm")
    return names


@st.composite
def model_pairs(draw) -> tuple[Model, Model, fd.Mapping, torch.Tensor]:
    """A teacher, a student, a random mapping between them, and an input batch."""
    conv = draw(st.booleans())
    teacher = build(draw(archs(conv)), draw(st.integers(0, 2**16)))
    student = build(draw(archs(conv)), draw(st.integers(0, 2**16)))
    teacher.train(draw(st.booleans()))
    student.train(draw(st.booleans()))
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(points(teacher)), st.sampled_from(points(student)), st.floats(0.1, 2.0)),
            min_size=1,
            max_size=4,
        )
    )
    mapping = fd.Mapping(teacher, student)
    for t, s, w in pairs:
        mapping = mapping.add(t, s, payload=w)
    return teacher, student, mapping, inputs(conv, seed=draw(st.integers(0, 100)))


def feature_loss(pairs) -> torch.Tensor:
    """A shape-agnostic weighted loss between paired features."""
    total = torch.zeros(())
    for t, s, w in pairs:
        total = total + w * ((t.flatten(1).mean(1) - s.flatten(1).mean(1)) ** 2).mean()
    return total


names = st.text(alphabet="abcxyz_.0123", min_size=0, max_size=8)
payloads = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3))


@st.composite
def mappings(draw) -> fd.Mapping:
    """A Mapping without models, over arbitrary names and payloads."""
    m = fd.Mapping()
    for t, s, p in draw(st.lists(st.tuples(names, names, payloads), max_size=6)):
        m = m.add(t, s, payload=p)
    return m
