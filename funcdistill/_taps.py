"""Taps: the hooks that read a point's value during a forward, call by call, into the call's record.

One tap per mapped point, registered once on a shadow's module
(:mod:`funcdistill._shadow`): a forward hook for a module's output, a
forward pre-hook (with keyword arguments) for its input, so a truncated model
can stop *before* a module whose input is the last thing it needs. An FX
node is tapped on an identity module inserted after it (:func:`with_node_taps`).

Each call of a side makes a :class:`CallRecord`, and the shadow hands it to
its taps (:class:`Taps`) for the duration of the forward. Every tap counts the
calls of its module in it and keeps the value its
:class:`~funcdistill.Point` selects: the only call (``call=None``), the
``k``-th, or all of them (``call="all"`` and negative indices, resolved when
the forward ends). The counts then say what went wrong, if anything: a
module that ran several times with no call selected, a call index that never
happened. The shape-only dry run (:mod:`funcdistill._dryrun`) counts with
the same taps, so a truncated teacher reports these before it runs.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from funcdistill import _names, _roles
from funcdistill._point import ALL, Point
from funcdistill._pytree import tree_leaves

__all__: list[str] = []

_SELECT_FIX = (
    "Select one call with funcdistill.Point({name!r}, call=k) (k counts from 0; negative from the end), "
    "all calls with call='all', or map a module that runs once."
)


def name_of(point: str | Point) -> str:
    """The module or node name of a point (resolved points only)."""
    return point if isinstance(point, str) else str(point.name)


def select(point: str | Point) -> int | str | None:
    """How a tap keeps values: ``None`` (first call), ``k`` (the k-th call) or ``ALL`` (every call)."""
    if isinstance(point, str) or point.call is None:
        return None
    return ALL if point.whole_forward else point.call


def needs_whole_forward(points: tuple[str | Point, ...]) -> bool:
    """Whether some point is known only when the forward has ended."""
    return any(isinstance(p, Point) and p.whole_forward for p in points)


class CallRecord:
    """What one call of a side collects; made for each call (and each dry run), never stored.

    Its shadow hands it to its taps for the duration of the forward
    (:attr:`Taps.record`).

    Attributes:
        values: the value each point keeps (``None`` in the dry run, which only counts).
        counts: how many times each point's module ran.
        stop: the points after which the forward stops (a truncated teacher), or ``None``.
        versions: ``(point, tensor, version)`` for each tensor kept, checked after an
            eager call (:func:`check_versions`); ``None`` where nothing is checked
            (traced calls, the dry run).

    Example:
        >>> record = CallRecord(versions=False)
        >>> record.values, record.counts, record.stop, record.versions
        ({}, {}, None, None)
    """

    __slots__ = ("values", "counts", "stop", "versions")

    def __init__(self, *, values: bool = True, stop: frozenset[Any] | None = None, versions: bool = True):
        self.values: dict[Any, Any] | None = {} if values else None
        self.counts: dict[Any, int] = {}
        self.stop = stop
        self.versions: list[tuple[Any, torch.Tensor, int]] | None = [] if versions else None


class Taps:
    """The taps of one shadow, and the record of the call running on it (``None`` between calls).

    The shadow sets :attr:`record` for the duration of a forward and resets it
    in ``finally``: a tap that runs outside a call (a checkpoint's recompute
    during backward, say) finds ``None`` and records nothing. :attr:`guard`,
    if set, sees each value a tap keeps (a resharded unit's refill hooks on
    it: :mod:`funcdistill._reshard`).
    """

    __slots__ = ("record", "guard")

    def __init__(self) -> None:
        self.record: CallRecord | None = None
        self.guard: Callable[[Any], None] | None = None


def register(taps: Taps, module: nn.Module, point: str | Point, n_points: int, role: str) -> None:
    """Register ``point``'s tap on ``module``; it writes into ``taps.record`` while a call runs.

    ``n_points``: how many points the shadow taps (a stop waits for all of
    them); ``role`` (``"teacher"``, ...) is for messages.
    """
    keep = select(point)
    wrap = not _hooked(module)
    if isinstance(point, Point) and point.io == "input":
        read = _input_reader(point, module, role)

        def seen_input(args: tuple, kwargs: dict) -> None:
            _seen(taps, point, keep, n_points, read(args, kwargs))

        if wrap:
            _wrap_forward(module, seen_input, None)
        else:
            module.register_forward_pre_hook(lambda m, args, kwargs: seen_input(args, kwargs), with_kwargs=True)
        return

    def seen_output(output: Any) -> None:
        _seen(taps, point, keep, n_points, output)

    if wrap:
        _wrap_forward(module, None, seen_output)
    else:
        module.register_forward_hook(lambda m, args, output: seen_output(output))


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own (a user's, FSDP2's, a parallel style's)."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _wrap_forward(
    module: nn.Module,
    before: Callable[[tuple, dict], None] | None,
    after: Callable[[Any], None] | None,
) -> None:
    """Tap ``module`` (a shadow's, with no hooks) by wrapping its ``forward``, not with a hook.

    What the module's call returns is what its forward returns (it has no hooks
    to change it), so the tap reads the same value as a forward hook would, and
    the call keeps ``nn.Module``'s hook-free fast path (a hook sends every call
    through the slow path, several microseconds each). ``before`` sees the
    call's ``(args, kwargs)`` (an input tap), ``after`` its output.
    """
    forward = module.forward

    @functools.wraps(forward)
    def tapped(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(args, kwargs)
        output = forward(*args, **kwargs)
        if after is not None:
            after(output)
        return output

    module.__dict__["forward"] = tapped


class NodeTap(nn.Module):
    """Identity module inserted after an FX node; its tap reads the node's value."""

    def forward(self, x: Any) -> Any:
        return x


def with_node_taps(module: nn.Module, nodes: list[str]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A GraphModule like ``module`` (a shadow of one) with a :class:`NodeTap` after each named node.

    Returns it and the :class:`NodeTap` of each node, by node name (the tap
    after ``nodes[i]`` is its submodule ``_funcdistill_tap_<i>``).
    """
    from torch.fx import Graph, GraphModule

    graph: Graph = copy.deepcopy(cast(GraphModule, module).graph)
    by_name = {n.name: n for n in graph.nodes}
    names = {}
    for i, node_name in enumerate(nodes):
        names[node_name] = tap = f"_funcdistill_tap_{i}"
        module.add_module(tap, NodeTap())
        with graph.inserting_after(by_name[node_name]):
            graph.call_module(tap, (by_name[node_name],))
    tapped = GraphModule(module, graph, class_name=type(module).__name__)
    return tapped, {node: tapped.get_submodule(tap) for node, tap in names.items()}


class PointError(RuntimeError):
    """A point cannot be read in this call (raised by its tap, during the forward; not the model's error)."""


class Stop(BaseException):
    """Raised by the tap of a truncated model's last needed point to stop its forward early.

    A ``BaseException``, so ``except Exception`` in model code does not swallow it.
    """


def _seen(taps: Taps, point: str | Point, keep: int | str | None, n_points: int, value: Any) -> None:
    record = taps.record
    if record is None:
        return  # a forward outside a distill call (e.g. a checkpoint recompute)
    counts = record.counts
    n = counts.get(point, 0)
    counts[point] = n + 1
    sink = record.values
    if sink is None:
        return  # the dry run only counts
    if keep == ALL:
        sink.setdefault(point, []).append(value)
    elif n == (keep or 0):
        sink[point] = value
    else:
        return
    if taps.guard is not None:
        taps.guard(value)
    versions = record.versions
    if versions is not None:
        if isinstance(value, torch.Tensor):
            versions.append((point, value, value._version))
        else:
            versions.extend((point, t, t._version) for t in _tensors(value))
    if keep == ALL:
        return
    stop = record.stop
    if stop is not None and len(sink) >= n_points and stop.issubset(sink):
        raise Stop


def _tensors(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def check_versions(versions: list[tuple[Any, torch.Tensor, int]], role: str) -> None:
    """Refuse values that the forward modified in place after they were read (eager calls only).

    A module's output that a later ``ReLU(inplace=True)`` or ``x += y`` changes,
    or an input that its own module changes, is no longer the value the point
    names; returning it would be a silent wrong result.
    """
    for _, t, version in versions:
        if t._version != version:
            break
    else:
        return
    changed = list(dict.fromkeys(point for point, t, version in versions if t._version != version))
    if changed:
        raise RuntimeError(
            f"the {role}'s forward modified the value of {', '.join(map(repr, changed))} in place after "
            "it was read (an in-place op such as ReLU(inplace=True), x += y or x.mul_()), so it is no "
            "longer what the point names. Map the module that does the in-place op, or make that op "
            "out of place (for example set inplace=False on the module before calling distill)."
        )


def _input_reader(point: Point, module: nn.Module, role: str) -> Callable[[tuple, dict], Any]:
    """What ``io="input"`` reads from a call's ``(args, kwargs)``.

    Without ``arg``: the one positional argument, or the tuple of them; a call
    with no positional argument is an error (an empty tuple would be a silent
    wrong value: a loss summed over it is 0).
    """
    arg = point.arg
    if arg is None:
        return lambda args, kwargs: (
            args[0] if len(args) == 1 else tuple(args) if args else _no_positional(point, module, role, kwargs)
        )
    if isinstance(arg, int):
        return lambda args, kwargs: (
            args[arg] if arg < len(args) else _missing(point, module, role, len(args), list(kwargs))
        )
    position = _positions(module).get(arg)

    def read(args: tuple, kwargs: dict) -> Any:
        if arg in kwargs:
            return kwargs[arg]
        if position is not None and position < len(args):
            return args[position]
        return _missing(point, module, role, len(args), list(kwargs))

    return read


def _positions(module: nn.Module) -> dict[str, int]:
    """The position of each parameter of ``module.forward`` that can be passed positionally."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = _names.forward_signature(module) or []
    return {p.name: i for i, p in enumerate(q for q in params if q.kind in kinds)}


def _missing(point: Point, module: nn.Module, role: str, n_args: int, keywords: list[str] | None = None) -> Any:
    got = f"{n_args} positional argument(s)" + (f" and keyword(s) {keywords}" if keywords else "")
    raise PointError(
        f"{role} {point!r}: the {type(module).__name__} at {name_of(point)!r} was called with {got}, "
        f"without argument {point.arg!r}; map an argument that the forward passes."
    )


def _no_positional(point: Point, module: nn.Module, role: str, kwargs: dict) -> Any:
    where = f"{role} {point!r}: the {type(module).__name__} at {name_of(point)!r} was called with"
    if not kwargs:
        raise PointError(f"{where} no arguments, so it has no input to read; map another point.")
    keywords = tuple(kwargs)
    raise PointError(
        f"{where} keyword arguments only {keywords}, and io='input' without arg reads the positional ones; "
        f"read one keyword with {Point(point.name, io='input', call=point.call, arg=keywords[0])!r}"
        + (" (or another of them)." if len(keywords) > 1 else ".")
    )


def finish(sink: dict[Any, Any], points: tuple[str | Point, ...]) -> None:
    """Turn the per-call lists of ``call="all"`` and negative points into their values, in place."""
    for point in points:
        keep = select(point)
        if keep != ALL or point not in sink:
            continue
        calls, call = sink[point], point.call if isinstance(point, Point) else None
        if call == ALL:
            sink[point] = tuple(calls)
        elif isinstance(call, int) and len(calls) >= -call:
            sink[point] = calls[call]
        else:  # fewer calls than the negative index needs: count_problem says so
            del sink[point]


def count_problems(points: tuple[str | Point, ...], counts: dict[Any, int], role: str, model: nn.Module) -> list[str]:
    """What the call counts say is wrong (a module run several times with no call selected, ...)."""
    found = (count_problem(p, counts.get(p, 0), role, model) for p in points)
    return [p for p in found if p is not None]


def count_problem(point: str | Point, n: int, role: str, model: nn.Module) -> str | None:
    """What is wrong with a point whose module ran ``n`` times, or ``None``."""
    call = point.call if isinstance(point, Point) else None
    where = f"{role} module {name_of(point)!r}"
    forward = f"in one forward pass of the {role} {_roles.model_name(model)}"
    if call is None and n > 1:
        return f"{where} runs {n} times {forward}, so its {what(point)} is ambiguous. " + _SELECT_FIX.format(
            name=name_of(point)
        )
    if isinstance(call, int) and n > 0 and not (-n <= call < n):
        return (
            f"{where} runs {n} times {forward}, so {point!r} selects a call that never happens; "
            f"valid calls are 0..{n - 1} (or -{n}..-1 from the end)."
        )
    return None


def what(point: str | Point) -> str:
    """``"output"`` or ``"input"``: what a point reads, for messages."""
    return "input" if isinstance(point, Point) and point.io == "input" else "output"


def arg_hint(point: str | Point) -> str:
    """How to narrow an input point to one argument, for messages about its value."""
    if isinstance(point, Point) and point.io == "input" and point.arg is None:
        return f", or read one argument: Point({name_of(point)!r}, io='input', arg=...)"
    return ""
