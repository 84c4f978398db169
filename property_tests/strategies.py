"""Hypothesis strategies for random architectures, point names and mappings.

An architecture is a tuple of layer specs and a number of loops; :func:`build`
turns it into a model whose points are ``'layers.<i>'`` (and their
``.body``/``.norm`` children), ``'shared'`` (one unit applied ``loops`` times,
like a weight-shared or recurrent block), ``'head'`` and ``''`` for the whole
model, each as its output or its input, and ``'shared'`` call by call.
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
    loops: int = 1
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
        self.shared = Unit(cin, Layer(cin, norm=False, residual=True), arch.conv)
        self.loops = arch.loops
        self.conv = arch.conv
        self.head = nn.Linear(cin, arch.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)
        for _ in range(self.loops):
            h = self.shared(h)
        return self.head(h.mean((2, 3)) if self.conv else h)


IN_WIDTH = 3


def archs(conv: bool) -> st.SearchStrategy[Arch]:
    layer = st.builds(Layer, width=st.sampled_from([2, 3, 4]), norm=st.booleans(), residual=st.booleans())
    return st.builds(
        Arch,
        conv=st.just(conv),
        layers=st.lists(layer, min_size=1, max_size=4).map(tuple),
        loops=st.integers(1, 3),
    )


def build(arch: Arch, seed: int) -> Model:
    torch.manual_seed(seed)
    return Model(arch, IN_WIDTH)


def inputs(conv: bool, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, IN_WIDTH, 4, 4) if conv else (batch, IN_WIDTH)
    return torch.randn(shape, generator=g)


def points(model: Model) -> list[str | fd.Point]:
    """Valid points: outputs and inputs of modules that run once, and of each call of ``shared``."""
    once = ["", "head"]
    for i, unit in enumerate(model.layers):
        once += [f"layers.{i}", f"layers.{i}.body"]
        if not isinstance(unit.norm, nn.Identity):
            once.append(f"layers.{i}.norm")
    calls: list[int | str | None] = [None, 0, -1, "all"]
    found: list[str | fd.Point] = [
        fd.Point(n, io=io, call=c) for n in once for io in ("output", "input") for c in calls
    ]
    loops = [*range(model.loops), *range(-model.loops, 0), "all"] + ([None] if model.loops == 1 else [])
    found += [
        fd.Point(n, io=io, call=c) for n in ("shared", "shared.body") for io in ("output", "input") for c in loops
    ]
    return found


def recorded(model: Model, x: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[str, str], list]]:
    """The output, and every call's input and output of every module, recorded by plain hooks on ``model``.

    An independent reference for what a :class:`funcdistill.Point` reads.
    """
    seen: dict[tuple[str, str], list] = {}
    handles = []
    for name, module in model.named_modules():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, n=name: seen.setdefault((n, "input"), []).append(a[0] if len(a) == 1 else a)
            )
        )
        handles.append(
            module.register_forward_hook(lambda m, a, o, n=name: seen.setdefault((n, "output"), []).append(o))
        )
    try:
        return model(x), seen
    finally:
        for handle in handles:
            handle.remove()


def select(point: str | fd.Point, seen: dict[tuple[str, str], list]) -> object:
    """What ``point`` reads, picked from :func:`recorded`'s calls."""
    p = point if isinstance(point, fd.Point) else fd.Point(point)
    calls = seen[(p.name, p.io)]
    if p.call == "all":
        return tuple(calls)
    return calls[p.call or 0]


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


def summary(value) -> torch.Tensor:
    """One number per sample for a tensor or a tuple of them (``call="all"``)."""
    leaves = value if isinstance(value, tuple) else (value,)
    return torch.stack([leaf.flatten(1).mean(1) for leaf in leaves]).mean(0)


def feature_loss(pairs) -> torch.Tensor:
    """A shape-agnostic weighted loss between paired features."""
    total = torch.zeros(())
    for t, s, w in pairs:
        total = total + w * ((summary(t) - summary(s)) ** 2).mean()
    return total


names = st.text(alphabet="abcxyz_.0123", min_size=0, max_size=8)
any_points = st.one_of(
    names,
    st.builds(
        fd.Point,
        names,
        io=st.sampled_from(["output", "input"]),
        call=st.one_of(st.none(), st.integers(-3, 3), st.just("all")),
    ),
)
payloads = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3))


@st.composite
def mappings(draw) -> fd.Mapping:
    """A Mapping without models, over arbitrary names and payloads."""
    m = fd.Mapping()
    for t, s, p in draw(st.lists(st.tuples(any_points, any_points, payloads), max_size=6)):
        m = m.add(t, s, payload=p)
    return m
