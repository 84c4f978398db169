"""Shadows: shallow clones of a model with their taps registered once, and the one place that runs them.

A shadow is a new module tree (new module objects, the same tensors, the same
non-tensor attributes) with a tap on each mapped point, registered when the
shadow is made, so

* the user's modules never carry a hook, not even during a call;
* nothing is registered while a function is being traced, so ``torch.compile``
  sees ordinary, already-hooked modules and does not break the graph;
* the values the taps read are returned from inside the call, so ``vmap`` and
  ``grad`` see them as ordinary outputs.

:meth:`Shadow.run` puts a call's state into the shadow's own ``_parameters``
and ``_buffers`` dicts by its :class:`~funcdistill._swap.SwapPlan` and puts
the shadow's tensors back in ``finally``; under ``torch.compile`` it uses
:func:`torch.func.functional_call` instead. It hands the call's
:class:`~funcdistill._taps.CallRecord` to the taps for the duration of the
forward: a shadow keeps nothing of a call. Training/eval mode is copied from
the live model at every call; structure and hyper-parameters are a snapshot
taken by ``distill``.
"""

from __future__ import annotations

import copy
from collections import deque
from itertools import repeat
from operator import attrgetter, getitem
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from funcdistill import _names, _sharded, _taps, _tensor_parallel
from funcdistill._point import Point
from funcdistill._spec import StateSpec
from funcdistill._swap import SwapPlan

__all__: list[str] = []

WHOLE = ""
_TRAINING = attrgetter("training")


def shallow_clone(root: nn.Module) -> nn.Module:
    """A new module tree sharing tensors and attributes with ``root``.

    Containers of the module's state (``_parameters``, ``_buffers``, ``_modules``,
    hook dicts) are copied, so changing the clone never changes ``root``.
    Shared submodules stay shared.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> c = shallow_clone(m)
        >>> c[0] is m[0], c[0].weight is m[0].weight
        (False, True)
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = object.__new__(type(m))
        attrs = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()}
        new.__dict__.update(attrs)
        memo[id(m)] = new
        new.__dict__["_modules"] = {k: None if c is None else clone(c) for k, c in m._modules.items()}
        return new

    return clone(root)


class Shadow:
    """A shallow clone of a model with its taps registered once, and how to run it on a call's state.

    Made in two steps: the first shadow of a side gives the module its
    :class:`~funcdistill._spec.StateSpec` is built from; :meth:`bind` then
    makes the shadow's swap plan from that spec.
    """

    __slots__ = ("module", "taps", "units", "parallel", "lives", "flags", "shadows", "modes", "training", "plan")

    def __init__(self, model: nn.Module, points: tuple[str | Point, ...], role: str, *, dry: bool = False):
        module = shallow_clone(model)
        self.units = _sharded.units(module, model)  # FSDP2 units: gathered per unit on the call's state
        live = _names.module_names(model)
        nodes = list(dict.fromkeys(n for n in map(_taps.name_of, points) if n and n not in live))
        node_taps: dict[str, nn.Module] = {}
        if nodes:
            module, node_taps = _taps.with_node_taps(module, nodes)
        by_name = {**_names.module_names(module), **node_taps}
        self.taps = _taps.Taps()
        if self.units is not None:
            self.taps.guard = self.units.guard  # a value read inside a resharded unit refills it too
        for point in points:
            if point != WHOLE:
                _taps.register(self.taps, by_name[_taps.name_of(point)], point, len(points), role)
        self.module = module
        # tensor parallel: the layout hooks kept (removed for the dry run), values made full tensors
        tp = any(map(_tensor_parallel.styled, module.modules()))
        self.parallel = _tensor_parallel.Parallel(module, role, dry=dry) if tp else None
        pairs = [(m, live[n]) for n, m in by_name.items() if n in live and n not in node_taps]
        self.shadows = [m for m, _ in pairs]
        self.lives = [m for _, m in pairs]
        self.flags = [m.__dict__ for m in self.lives]  # where each live module keeps its training flag
        self.modes = [m.training for m in self.shadows]
        self.training = any(self.modes)

    def bind(self, spec: StateSpec) -> Shadow:
        """Make the swap plan for ``spec``'s entries; returns the shadow."""
        self.plan = SwapPlan(self.module, spec)
        return self

    def sync_modes(self, *, compiling: bool | None = None) -> bool:
        """Copy the live models' training flags; return whether any module is training.

        ``compiling``: whether ``torch.compile`` traces the call (asked of torch when ``None``).
        """
        if torch.compiler.is_compiling() if compiling is None else compiling:
            modes = [m.training for m in self.lives]
        else:
            try:  # read from each module's __dict__ at C level: a third cheaper than getattr
                modes = list(map(getitem, self.flags, repeat("training")))
            except KeyError:  # a module class that keeps ``training`` elsewhere (a property)
                modes = list(map(_TRAINING, self.lives))
        if modes != self.modes:
            for m, flag in zip(self.shadows, modes):
                m.training = flag
            self.modes = modes
            self.training = any(modes)
        return self.training

    def run(
        self,
        record: _taps.CallRecord,
        swaps: dict[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        *,
        functional: bool = False,
    ) -> Any:
        """Run the shadow with ``swaps`` in place of its own tensors, its taps writing into ``record``.

        ``functional``: pass the state through :func:`torch.func.functional_call`
        (the dry run's fake state), as a traced call always does. A
        tensor-parallel model's values come back full (:mod:`funcdistill._tensor_parallel`).
        """
        if self.parallel is None or functional:
            return self._run(record, swaps, args, kwargs, functional=functional)
        return self.parallel.run(lambda s, a, k: self._run(record, s, a, k), record.values, swaps, args, kwargs)

    def _run(
        self, record: _taps.CallRecord, swaps: dict, args: tuple, kwargs: dict, *, functional: bool = False
    ) -> Any:
        taps = self.taps
        taps.record = record
        try:
            if functional:
                return functional_call(self.module, swaps, args, kwargs, tie_weights=True, strict=False)
            if not swaps:
                return self.module(*args, **kwargs)
            if torch.compiler.is_compiling():
                return functional_call(self.module, swaps, args, kwargs, tie_weights=True, strict=False)
            plan = self.plan
            if plan.ordered and len(swaps) == len(plan.names) and list(swaps) == plan.names:
                return self._run_all(swaps, args, kwargs)
            tables = list(map(plan.tables.__getitem__, swaps))
            attrs = list(map(plan.attrs.__getitem__, swaps))
            aliases = [k for k in swaps if k in plan.aliases] if plan.aliases else ()
            try:
                deque(map(dict.__setitem__, tables, attrs, swaps.values()), 0)
                for k in aliases:  # the other names of tied entries
                    for table, attr in plan.aliases[k]:
                        table[attr] = swaps[k]
                return self.module(*args, **kwargs)
            finally:  # put the shadow's own tensors back
                deque(map(dict.__setitem__, tables, attrs, map(plan.own.__getitem__, swaps)), 0)
                for k in aliases:
                    for table, attr in plan.aliases[k]:
                        table[attr] = plan.own[k]
        finally:
            taps.record = None
            if self.units is not None:
                self.units.release()

    def _run_all(self, swaps: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run with every entry swapped, ``swaps`` in the plan's order: the slots are set by position."""
        tables, attrs = self.plan.slots
        try:
            deque(map(dict.__setitem__, tables, attrs, swaps.values()), 0)
            return self.module(*args, **kwargs)
        finally:  # put the shadow's own tensors back
            deque(map(dict.__setitem__, tables, attrs, self.plan.own_list), 0)
