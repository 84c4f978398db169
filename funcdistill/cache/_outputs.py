"""The value ``cache[indices]`` returns: stored teacher outputs that stand in for the teacher state.

:class:`TeacherOutputs` is an immutable pytree (its leaves are the stored
tensors; what they were built for is static metadata), so it passes through
:func:`torch.func.vmap`, :func:`torch.func.grad` and ``torch.compile`` like a
state dict. A distill function given one in place of the teacher state does
not run the teacher: :func:`teacher_outputs` checks that the cache holds every
teacher point of the function's mapping and was built for a teacher with the
same state layout, and returns the outputs keyed as the function's plan keys
its teacher points.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcdistill._frozen import Frozen, init
from funcdistill._pytree import register_node, tree_map
from funcdistill._verdict import constant_under_compile
from funcdistill.cache import _fingerprint
from funcdistill.cache._keys import display, point_key

__all__ = ["BuiltFor", "TeacherOutputs", "TopK", "teacher_outputs"]


class TopK(NamedTuple):
    """The ``k`` largest teacher log-probabilities of a logits pair, and their class indices.

    What a top-k cache gives as the teacher output of that pair, for
    :func:`funcdistill.losses.topk_kl_loss` (``topk_kl_loss(*pair.teacher, pair.student)``).
    """

    logprobs: torch.Tensor
    """``log_softmax`` of the teacher logits at the ``k`` largest entries, largest first."""
    indices: torch.Tensor
    """Their positions along the last dimension (``int64``)."""


class BuiltFor(Frozen):
    """What a cache was built for: its path, the teacher points it holds, the teacher's state layout.

    ``keys`` are the points' stable keys, as the index records them (what a
    distill function's points are matched by); ``points`` shows them as
    ``repr`` strings, for messages.
    """

    __slots__ = ("path", "keys", "points", "teacher", "_accepted")
    _immutable_name = "a teacher cache's record"
    path: str
    keys: tuple[str, ...]
    points: tuple[str, ...]
    teacher: tuple[str, _fingerprint.Structure]
    _accepted: dict[int, tuple[Any, tuple[int, ...]]]

    def __init__(self, path: str, keys: tuple[str, ...], teacher: tuple[str, _fingerprint.Structure]):
        keys = tuple(keys)
        init(self, path=path, keys=keys, points=tuple(map(display, keys)), teacher=teacher, _accepted={})

    def positions(self, fn: Any) -> tuple[int, ...]:
        """For each pair of ``fn``, where its teacher output is among the stored ones (checked once per ``fn``)."""
        seen = self._accepted.get(id(fn))
        if seen is not None and seen[0] is fn:
            return seen[1]
        positions = _check(self, fn)
        self._accepted[id(fn)] = (fn, positions)
        return positions

    def __repr__(self) -> str:
        return f"BuiltFor(path={self.path!r}, points={list(self.points)}, teacher={self.teacher[0]})"


class TeacherOutputs(Frozen):
    """Teacher outputs of a batch of samples, read from a :class:`~funcdistill.TeacherCache`.

    Pass it to a distill function in place of the teacher state:
    ``fn(cache[idx], student_state, *inputs)`` returns the pairs
    ``fn(teacher_state, student_state, *inputs)`` would, without running the
    teacher. ``values`` holds one output per cached teacher point, in the order
    of ``built_for.points``; a top-k pair's output is a :class:`TopK`.
    """

    __slots__ = ("values", "built_for")
    _immutable_name = "TeacherOutputs"
    _immutable_hint = " Index the cache again, or use tree_map for a changed copy."
    values: tuple[Any, ...]
    built_for: BuiltFor

    def __init__(self, values: tuple[Any, ...], built_for: BuiltFor):
        if not isinstance(built_for, BuiltFor):
            raise TypeError(f"TeacherOutputs(built_for=...) must be a BuiltFor, got {type(built_for).__name__}.")
        if len(values) != len(built_for.points):
            raise ValueError(
                f"TeacherOutputs got {len(values)} values for {len(built_for.points)} cached points "
                f"({', '.join(built_for.points)}); give one value per point."
            )
        init(self, values=tuple(values), built_for=built_for)

    def to(self, *args: Any, **kwargs: Any) -> TeacherOutputs:
        """A copy with every tensor moved or cast by ``Tensor.to(*args, **kwargs)`` (top-k indices keep their dtype)."""

        def move(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if x.is_floating_point():
                return x.to(*args, **kwargs)
            return x.to(device=_device(args, kwargs, x))

        return tree_map(move, self)

    def __repr__(self) -> str:
        shapes = [
            "None" if v is None else str(list(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
            for v in self.values
        ]
        pairs = ", ".join(f"{p}: {s}" for p, s in zip(self.built_for.points, shapes))
        return f"TeacherOutputs({pairs})"


def _device(args: tuple, kwargs: dict, x: torch.Tensor) -> torch.device:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return x.device


def teacher_outputs(outputs: TeacherOutputs, fn: Any) -> dict[Any, Any]:
    """The stored outputs keyed as ``fn``'s plan keys its teacher points (the distill function's hook).

    Raises:
        ValueError: the cache does not hold a teacher point of ``fn``'s mapping,
            or was built for a teacher with another state layout.
    """
    if torch.compiler.is_compiling():
        positions = _traced_positions(outputs.built_for, fn)
    else:
        positions = outputs.built_for.positions(fn)
    values = outputs.values
    return {t: values[i] for (t, _, _), i in zip(fn._plan, positions)}


def _check(built_for: BuiltFor, fn: Any) -> tuple[int, ...]:
    where = f"the teacher cache at {built_for.path}"
    missing = _fingerprint.missing_points(built_for.keys, fn)
    if missing:
        raise ValueError(
            f"{where} holds the teacher outputs at {', '.join(built_for.points)}; this distill function "
            f"also maps teacher point(s) {', '.join(map(display, missing))}, which it does not hold. Build a cache with "
            "this distill function (TeacherCache.build(fn, ...)), or distill with the mapping the cache "
            "was built for."
        )
    difference = _fingerprint.structure_difference(built_for.teacher, fn)
    if difference is not None:
        raise ValueError(
            f"{where} was built for another teacher: {difference}. Use a distill function of the teacher "
            "the cache was built for, or build a cache for this teacher (TeacherCache.build(fn, ...))."
        )
    return tuple(built_for.keys.index(point_key(t)) for t, _, _ in fn._plan)


# traced code calls the check at trace time and keeps its result as a constant of the graph
_traced_positions = constant_under_compile(lambda built_for, fn: built_for.positions(fn))


def _flatten(outputs: TeacherOutputs) -> tuple[tuple[Any, ...], BuiltFor]:
    return outputs.values, outputs.built_for


def _unflatten(built_for: BuiltFor, values: tuple[Any, ...]) -> TeacherOutputs:
    new = object.__new__(TeacherOutputs)
    init(new, values=tuple(values), built_for=built_for)
    return new


register_node(TeacherOutputs, _flatten, _unflatten, name="funcdistill.cache.TeacherOutputs")
