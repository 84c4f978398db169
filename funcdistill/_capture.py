"""Capturing intermediate outputs without touching the user's modules.

The one place where modules are instrumented. :class:`Capture` owns a *shadow*
of a model: a shallow clone of its module tree (new module objects, the same
tensors, the same non-tensor attributes). Forward hooks that record the mapped
outputs are registered on the shadow once, when ``distill`` is called, so

* the user's modules never carry a hook, not even during a call;
* nothing is registered while a function is being traced, so ``torch.compile``
  sees ordinary, already-hooked modules and does not break the graph;
* captured tensors are returned from inside the call, so ``vmap`` and ``grad``
  see them as ordinary outputs.

Each thread gets its own shadow (``torch.func.functional_call`` swaps tensors
into the module it runs, so one module object cannot serve two threads at
once); traced code uses a dedicated one. Training/eval mode is copied from the
live model at every call; structure and hyper-parameters are a snapshot taken
by ``distill``.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, cast

import torch
import torch.utils._pytree as torch_pytree
from torch import nn
from torch.func import functional_call

from funcdistill import _names

__all__: list[str] = []

WHOLE = ""


class Truncate(Exception):
    """Raised by the last tap of a truncated model to stop its forward early."""


class _NodeTap(nn.Module):
    """Identity module inserted after an FX node; its hook records the node's value."""

    def forward(self, x: Any) -> Any:
        return x


def shallow_clone(root: nn.Module) -> nn.Module:
    """A new module tree sharing tensors and attributes with ``root``.

    Containers of the module's state (``_parameters``, ``_buffers``, ``_modules``,
    hook dicts) are copied, so changing the clone never changes ``root``.
    Shared submodules stay shared.
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = object.__new__(type(m))
        attrs = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()}
        new.__dict__.update(attrs)
        memo[id(m)] = new
        new.__dict__["_modules"] = {
            k: None if c is None else clone(c) for k, c in m._modules.items()
        }
        return new

    return clone(root)


class _Shadow:
    """One thread's instrumented copy of a model."""

    __slots__ = ("module", "sink", "stop", "own", "pairs")

    def __init__(self, model: nn.Module, points: tuple[str, ...], role: str):
        self.sink: dict[str, Any] | None = None
        self.stop: frozenset[str] | None = None
        module = shallow_clone(model)
        live = _names.module_names(model)
        nodes = [p for p in points if p and p not in live]
        if nodes:
            module = _with_node_taps(module, nodes)
        by_name = _names.module_names(module)
        for i, node in enumerate(nodes):
            by_name[node] = module.get_submodule(f"_funcdistill_tap_{i}")
        for point in points:
            if point != WHOLE:
                by_name[point].register_forward_hook(self._hook(point, role))
        self.module = module
        self.pairs = [(m, live[n]) for n, m in by_name.items() if n in live and n not in nodes]
        # the tensors the shadow holds between calls: passing these is free
        self.own: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        self.own.update(module.named_buffers(remove_duplicate=False))

    def _hook(self, point: str, role: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            sink = self.sink
            if sink is None:  # a forward outside a distill call (e.g. checkpoint recompute)
                return
            if point in sink:
                raise RuntimeError(
                    f"{role} module {point!r} ran more than once in one forward pass, so "
                    "its output is ambiguous. Map a module that runs once (for example one "
                    "of the calls' parent modules), give each call its own module, or trace "
                    "the model with torch.fx and map the node of the call you mean."
                )
            sink[point] = output
            stop = self.stop
            if stop is not None and stop.issubset(sink):
                raise Truncate

        return record

    def sync_modes(self) -> None:
        for shadow, live in self.pairs:
            if shadow.training != live.training:
                shadow.training = live.training

    def forward(self, full_state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run the shadow with ``full_state``, swapping only what it does not hold already."""
        own = self.own
        swap = {k: v for k, v in full_state.items() if own.get(k) is not v}
        if not swap:
            return self.module(*args, **kwargs)
        return functional_call(self.module, swap, args, kwargs, tie_weights=True)


def _with_node_taps(module: nn.Module, nodes: list[str]) -> nn.Module:
    """A GraphModule like ``module`` (a shadow of one) with an identity tap after each named node."""
    from torch.fx import Graph, GraphModule

    graph: Graph = copy.deepcopy(cast(GraphModule, module).graph)
    by_name = {n.name: n for n in graph.nodes}
    for i, node_name in enumerate(nodes):
        tap = f"_funcdistill_tap_{i}"
        module.add_module(tap, _NodeTap())
        with graph.inserting_after(by_name[node_name]):
            graph.call_module(tap, (by_name[node_name],))
    return GraphModule(module, graph, class_name=type(module).__name__)


class Capture:
    """Runs a model statelessly and returns the outputs at its mapped points.

    Args:
        model: the live model (never modified).
        points: point names to capture (``''`` is the final output).
        role: ``"teacher"`` or ``"student"``, for messages.
        truncate: once a first full call has shown that every point runs exactly
            once, stop later forwards as soon as every point has been recorded.
    """

    def __init__(self, model: nn.Module, points: tuple[str, ...], role: str, *, truncate: bool = False):
        self.model = model
        self.role = role
        self.points = tuple(dict.fromkeys(points))
        self.whole = WHOLE in self.points
        self.stop_at = frozenset(self.points) if truncate and not self.whole else None
        self.checked = False
        self._args = (model, self.points, role)
        self._main = _Shadow(*self._args)
        self._traced = _Shadow(*self._args)
        self._local = threading.local()
        self._local.shadow = self._main

    @property
    def run_module(self) -> nn.Module:
        """The module the forward runs on (its state names are what a call needs)."""
        return self._main.module

    def _new_shadow(self) -> _Shadow:
        """This thread's first call: give it its own shadow."""
        shadow = self._local.shadow = _Shadow(*self._args)
        return shadow

    def run(self, full_state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        """Run the model with ``full_state``; return its output and the captured points.

        The output is ``None`` when the forward was truncated.
        """
        if torch.compiler.is_compiling():
            shadow = self._traced
        else:
            shadow = getattr(self._local, "shadow", None) or self._new_shadow()
        if shadow.sink is not None:
            raise RuntimeError(
                f"the {self.role} is already running in a distill call on this thread: "
                "a distill function cannot be called from inside itself (for example "
                "from a payload or a hook)."
            )
        shadow.sync_modes()
        shadow.sink = {}
        shadow.stop = self.stop_at if self.checked else None
        try:
            try:
                output = shadow.forward(full_state, args, kwargs)
            except Truncate:
                output = None
            captured = shadow.sink
        finally:
            shadow.sink = None
        if self.whole:
            captured[WHOLE] = output
        self._check(captured)
        if self.stop_at is not None and not self.checked and not torch.compiler.is_compiling():
            self.checked = True  # every point ran exactly once in a full forward
        return output, captured

    def _check(self, captured: dict[str, Any]) -> None:
        if len(captured) != len(self.points):
            missing = [p for p in self.points if p not in captured]
            raise RuntimeError(
                f"{self.role} module(s) {', '.join(map(repr, missing))} never ran during "
                f"the forward pass of the {self.role} {_names.describe(self.model)}, so "
                "there is nothing to distill. Map modules that the forward calls for this "
                "input."
            )
        for point, value in captured.items():
            if isinstance(value, torch.Tensor):
                continue
            for leaf in torch_pytree.tree_leaves(value):
                if leaf is not None and not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"the output of {self.role} module {point!r} contains a "
                        f"{type(leaf).__name__}, not only tensors; map a module whose "
                        "output is a tensor or a tuple/list/dict of tensors (None "
                        "entries are allowed)."
                    )
