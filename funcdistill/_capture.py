"""Capturing intermediate outputs without touching the user's modules.

The one place where modules are instrumented and run. :class:`Capture` owns
*shadows* of a model: shallow clones of its module tree (new module objects,
the same tensors, the same non-tensor attributes). Forward hooks that record
the mapped outputs are registered on a shadow once, when it is made, so

* the user's modules never carry a hook, not even during a call;
* nothing is registered while a function is being traced, so ``torch.compile``
  sees ordinary, already-hooked modules and does not break the graph;
* captured tensors are returned from inside the call, so ``vmap`` and ``grad``
  see them as ordinary outputs.

A call puts the state it was given into the shadow's own ``_parameters`` and
``_buffers`` dicts by a swap plan made once (which dict, which key, tied names
included; :class:`~funcdistill._swap.SwapPlan`) and puts the shadow's tensors back in ``finally``; under
``torch.compile`` it uses :func:`torch.func.functional_call` instead. Each
thread gets its own shadow, traced code a dedicated one, and the shape-only
dry run (:mod:`funcdistill._dryrun`) another. Training/eval mode is copied
from the live model at every call; structure and hyper-parameters are a
snapshot taken by ``distill``.

Truncation: a model built with ``truncate=True`` whose modules are all in eval
mode stops right after its last mapped point has run, from its first call on,
by raising :class:`_Stop`, a ``BaseException`` that ``except Exception`` in
model code does not swallow. Whether stopping is safe (every mapped point runs
exactly once) is the dry run's verdict for the input signature; a model with
a module in training mode runs in full, so its random draws and buffer
updates are those of a plain forward.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from operator import attrgetter
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from funcdistill import _dryrun, _failures, _names, _sharded, _taps
from funcdistill._point import Point
from funcdistill._pytree import tree_leaves
from funcdistill._spec import StateSpec
from funcdistill._swap import SwapPlan
from funcdistill._tensors import cast_floating

__all__: list[str] = []

WHOLE = ""
_MAX_VERDICTS = 1024
_Stop = _taps.Stop
_DRY_NOTE = " (Seen by the shape-only dry run that checks a truncated teacher for these input shapes.)"


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
        new.__dict__["_modules"] = {k: None if c is None else clone(c) for k, c in m._modules.items()}
        return new

    return clone(root)


_TRAINING = attrgetter("training")


class _Shadow:
    """One instrumented copy of a model, and the plan to run it on a given state."""

    __slots__ = (
        "module",
        "sink",
        "stop",
        "counts",
        "versions",
        "lives",
        "shadows",
        "modes",
        "plan",
        "units",
    )

    def __init__(self, model: nn.Module, points: tuple[str | Point, ...], role: str):
        self.sink: dict[Any, Any] | None = None  # the values the taps keep, during a call
        self.stop: frozenset[Any] | None = None
        self.counts: dict[Any, int] | None = None  # calls per point, during a call or a dry run
        self.versions: list[tuple[Any, torch.Tensor, int]] | None = None  # eager calls: values' version counters
        module = shallow_clone(model)
        self.units = _sharded.units(module, model)  # FSDP2 units: gathered per unit on the call's state
        live = _names.module_names(model)
        nodes = list(dict.fromkeys(n for n in map(_taps.name_of, points) if n and n not in live))
        if nodes:
            module = _with_node_taps(module, nodes)
        by_name = _names.module_names(module)
        for i, node in enumerate(nodes):
            by_name[node] = module.get_submodule(f"_funcdistill_tap_{i}")
        for point in points:
            if point != WHOLE:
                _taps.register(self, by_name[_taps.name_of(point)], point, len(points), role)
        self.module = module
        pairs = [(m, live[n]) for n, m in by_name.items() if n in live and n not in nodes]
        self.shadows = [m for m, _ in pairs]
        self.lives = [m for _, m in pairs]
        self.modes = [m.training for m in self.shadows]

    def bind(self, spec: StateSpec) -> _Shadow:
        """Make the swap plan for ``spec``'s entries; returns the shadow."""
        self.plan = SwapPlan(self.module, spec)
        return self

    def sync_modes(self) -> bool:
        """Copy the live models' training flags; return whether any module is training."""
        modes = [m.training for m in self.lives] if torch.compiler.is_compiling() else list(map(_TRAINING, self.lives))
        if modes != self.modes:
            for m, flag in zip(self.shadows, modes):
                m.training = flag
            self.modes = modes
        return any(modes)

    def forward(self, swaps: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run the shadow with ``swaps`` in place of its own tensors."""
        if not swaps:
            return self.module(*args, **kwargs)
        if torch.compiler.is_compiling():
            return functional_call(self.module, swaps, args, kwargs, tie_weights=True, strict=False)
        plan = self.plan
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
    """Runs a model statelessly on a given state and returns the outputs at its mapped points.

    Args:
        model: the live model (never modified).
        points: the points to capture: names (``''`` is the final output) and
            :class:`~funcdistill.Point` values, resolved.
        role: ``"teacher"`` or ``"student"``, for messages.
        truncate: stop the forward once every point has been recorded, when
            every module is in eval mode and the dry run allows it.
        clone_buffers: clone the buffers of training-mode modules before a
            call, so that their in-place updates never reach the given tensors.
        dtype: run in this floating dtype (state and floating inputs are cast).
        other: the counterpart (the teacher's, for the student), whose state
            spec this one's is built with.
    """

    def __init__(
        self,
        model: nn.Module,
        points: tuple[str | Point, ...],
        role: str,
        *,
        truncate: bool = False,
        clone_buffers: bool = True,
        dtype: torch.dtype | None = None,
        other: Capture | None = None,
    ):
        self.model = model
        self.role = role
        self.dtype = dtype
        self.points = tuple(dict.fromkeys(points))
        self.whole = WHOLE in self.points
        self.gathers = _taps.needs_whole_forward(self.points)  # some point keeps every call's value
        whole = self.whole or self.gathers
        self.stop_at = frozenset(self.points) if truncate and not whole else None
        self._args = (model, self.points, role)
        _sharded.check(model, role)
        main = _Shadow(*self._args)
        self.spec = StateSpec(
            role,
            model,
            main.module,
            clone_buffers=clone_buffers,
            dtype=dtype,
            other=None if other is None else other.spec,
        )
        self._main = main.bind(self.spec)
        self._traced = _Shadow(*self._args).bind(self.spec)
        self._local = threading.local()
        self._local.shadow = self._main
        self._verdicts: dict[tuple, str] = {}
        self._dry_lock = threading.Lock()
        self._dry: _Shadow | None = None
        self._traced_verdict = constant_under_compile(lambda sig: self._verdict_for(sig))

    @property
    def run_module(self) -> nn.Module:
        """The module the forward runs on (its state names are what a call needs)."""
        return self._main.module

    def run(
        self,
        given: Any,
        args: tuple,
        kwargs: dict,
        *,
        buffers: bool = False,
        report: bool = False,
    ) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor] | None, bool]:
        """Run the model on the ``given`` state.

        Returns its output (``None`` when truncated), the captured points, the
        buffers it ran with (when ``buffers``), and (when ``report``) whether
        the forward updated buffers that were cloned for the call.
        """
        compiling = torch.compiler.is_compiling()
        if compiling:
            shadow = self._traced
        else:
            shadow = getattr(self._local, "shadow", None) or self._new_shadow()
        if shadow.sink is not None:
            raise RuntimeError(
                f"the {self.role} is already running in a distill call on this thread: "
                "a distill function cannot be called from inside itself (for example "
                "from a payload or a hook)."
            )
        training = shadow.sync_modes()
        swaps, cloned = self.spec.swaps(given, shadow.plan)
        if self.dtype is not None:
            args, kwargs = cast_floating((args, kwargs), self.dtype)
        stop = None
        if self.stop_at is not None and not training:
            verdict = self._verdict(args, kwargs, compiling)
            if verdict == _dryrun.TRUNCATE:
                stop = self.stop_at
            elif verdict != _dryrun.FULL:
                raise RuntimeError(verdict)
        shadow.sink, shadow.counts, shadow.stop = {}, {}, stop
        shadow.versions = None if compiling else []
        try:
            try:
                output = shadow.forward(swaps, args, kwargs)
            except _Stop:
                output = None
            except Exception as error:
                self._reraise(error, swaps, shadow, args, kwargs, compiling)
                raise
            captured, counts, versions = shadow.sink, shadow.counts, shadow.versions
        finally:
            shadow.sink = shadow.counts = shadow.versions = None
            if shadow.units is not None:
                shadow.units.release()
        if versions:
            _taps.check_versions(versions, self.role)
        if self.gathers:
            _taps.finish(captured, self.points)
        if self.whole:
            captured[WHOLE] = output
        self._check(captured, counts)
        used = self.spec.buffers(swaps, shadow.plan.own) if buffers else None
        updated = report and bool(cloned) and not compiling and self.spec.updated(swaps, cloned)
        return output, captured, used, updated

    def _new_shadow(self) -> _Shadow:
        """This thread's first call: give it its own shadow."""
        shadow = self._local.shadow = _Shadow(*self._args).bind(self.spec)
        return shadow

    # --- truncation -----------------------------------------------------------------

    def _verdict(self, args: tuple, kwargs: dict, compiling: bool) -> str:
        sig = _dryrun.signature(args, kwargs)
        if sig is None:
            return _dryrun.FULL
        if compiling:  # a constant of the trace: needs static shapes (dynamic=False) or truncate=False
            return self._traced_verdict(sig)
        verdict = self._verdicts.get(sig)
        return self._verdict_for(sig) if verdict is None else verdict

    def _verdict_for(self, sig: tuple) -> str:
        """The dry run's verdict for an input signature (cached: it depends on nothing else)."""
        with self._dry_lock:
            verdict = self._verdicts.get(sig)
            if verdict is not None:
                return verdict
            counts = _dryrun.count_calls(self._dry_run, self._fake_specs(sig), sig)
            if counts is None:
                verdict = _dryrun.FULL
            else:
                problems = self._problems(counts)
                verdict = "\n".join(problems) + _DRY_NOTE if problems else _dryrun.TRUNCATE
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[sig] = verdict
            return verdict

    def _dry_run(self, fake_state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> dict[str, int]:
        if self._dry is None:
            self._dry = _Shadow(*self._args).bind(self.spec)
        shadow = self._dry
        shadow.sync_modes()
        shadow.counts = {}
        try:
            functional_call(shadow.module, fake_state, args, kwargs, tie_weights=True, strict=False)
            return shadow.counts
        finally:
            shadow.counts = None

    def _fake_specs(self, sig: tuple) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
        """Shape, dtype and device of each state entry, as the checked call will run it."""
        spec, dtype = self.spec, self.dtype
        fallback = next((device for _, device in _dryrun.tensor_specs(sig)), torch.device("cpu"))
        out = {}
        for name in spec.names:
            t = spec.live_tensor(name)
            if t is None:
                continue
            t_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            out[name] = (t.shape, t_dtype, fallback if t.is_meta else t.device)
        return out

    def _problems(self, counts: dict[Any, int]) -> list[str]:
        """What the call counts say is wrong (a module run several times with no call selected, ...)."""
        found = (_taps.count_problem(p, counts.get(p, 0), self.role, self.model) for p in self.points)
        return [p for p in found if p is not None]

    # --- errors -----------------------------------------------------------------------

    def _reraise(
        self, error: Exception, swaps: dict, shadow: _Shadow, args: tuple, kwargs: dict, compiling: bool
    ) -> None:
        """Raise a clearer error than the forward's ``error``: which model failed, on what, and what to do.

        Returns (for the caller to raise ``error`` itself) for funcdistill's own
        errors and while compiling.
        """
        if compiling or _failures.raised_by_funcdistill(error):
            return
        if shadow.units is not None:
            _sharded.reraise(error, self.role)
        model = _names.describe(self.model)
        state_dtype = next((t.dtype for t in (*swaps.values(), *shadow.plan.own_list) if t.is_floating_point()), None)
        typed = _failures.dtype_error(error, self.role, model, {"state": state_dtype, **self._dtypes()}, args, kwargs)
        if typed is not None:
            raise _failures.mark(typed) from error
        wrapped = _failures.failed(error, self.role, model, args, kwargs)
        if wrapped is not error:
            raise wrapped from error

    def _dtypes(self) -> dict[str, torch.dtype | None]:
        """The student's floating dtype, and the teacher's as it runs (``None`` when ``teacher_dtype`` casts)."""
        other = self.spec.other
        if other is None:
            return {}
        if self.role == "teacher":
            return {"student": other.floating_dtype(), "teacher": None if self.dtype else self.spec.floating_dtype()}
        return {"teacher": None if other.dtype is not None else other.floating_dtype()}

    def _check(self, captured: dict[Any, Any], counts: dict[Any, int]) -> None:
        if len(captured) != len(self.points) or not all(n == 1 for n in counts.values()):
            problems = self._problems(counts)
            missing = [p for p in self.points if p not in captured and not counts.get(p)]
            if missing:
                problems.append(
                    f"{self.role} module(s) {', '.join(map(repr, missing))} never ran during "
                    f"the forward pass of the {self.role} {_names.describe(self.model)}, so "
                    "there is nothing to distill. Map modules that the forward calls for this "
                    "input."
                )
            if problems:
                raise RuntimeError("\n".join(problems))
        for point, value in captured.items():
            if isinstance(value, torch.Tensor):
                continue
            for leaf in tree_leaves(value):
                if leaf is not None and not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"the {_taps.what(point)} of {self.role} module {_taps.name_of(point)!r} contains "
                        f"a {type(leaf).__name__}, not only tensors; "
                        + (_CACHE_FIX if _is_transformers_cache(leaf) else "")
                        + "map a point whose value is a tensor or a tuple/list/dict of tensors (None entries "
                        f"are allowed){_taps.arg_hint(point)}."
                    )


_CACHE_FIX = (
    "it is the key/value cache of a transformers model, returned because use_cache is on (the "
    "config's default). Pass use_cache=False with the inputs, fn(teacher_state, student_state, ..., "
    "use_cache=False) (both models get it), or set model.config.use_cache = False; or "
)


def _is_transformers_cache(value: Any) -> bool:
    """Whether ``value`` is a ``transformers`` cache (``DynamicCache`` and the like), without importing it."""
    return type(value).__module__.startswith("transformers") and any(c.__name__ == "Cache" for c in type(value).__mro__)


def constant_under_compile(fn: Any) -> Any:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing Dynamo.

    Dynamo then calls ``fn`` at trace time and puts its result in the graph as a
    constant. Importing Dynamo takes about two seconds, which eager-only users
    (and every DataLoader worker) would pay on their first ``distill``; the
    marker is the attribute the public function sets (a test checks they agree).
    """
    fn._dynamo_marked_constant = True
    return fn
