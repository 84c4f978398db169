"""Teacher outputs: the teacher side's values for a call, from a source other than a live teacher.

A distill function given a :class:`TeacherOutputs` in place of the teacher
state does not run the teacher: it takes the values from it. Whatever makes
them (a teacher cache, ``TeacherCache``; a served teacher or a teacher
of another tokenizer later) records what they were built for, a
:class:`BuiltFor`: the teacher points they hold, by their stable keys
(:mod:`funcdistill._keys`), and the teacher's class and state layout (its
*structure*). :func:`teacher_values` checks that against the distill function
(once per function) and gives the values keyed by its teacher points, as a
run of the live teacher gives them.

:class:`TeacherOutputs` is an immutable pytree (its leaves are the values; what
they were built for is static metadata), so it passes through
:func:`torch.func.vmap`, :func:`torch.func.grad` and ``torch.compile`` like a
state dict. :class:`TopK` is a ``NamedTuple``, which optree and torch already
treat as a pytree.

The core never imports the cache; the cache imports these (and re-exports the public ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from funcdistill import _sharded
from funcdistill._frozen import Frozen, init
from funcdistill._keys import display, point_key
from funcdistill._pytree import register_node, tree_map
from funcdistill._state import state
from funcdistill._verdict import constant_under_compile

if TYPE_CHECKING:
    from funcdistill._distill import DistillFn

__all__ = ["BuiltFor", "Structure", "TeacherOutputs", "TopK", "dtype_name", "teacher_record", "teacher_values"]

Structure = tuple[tuple[str, tuple[int, ...], str], ...]
"""Name, shape and dtype name of every state entry of a teacher, in :func:`funcdistill.state` order."""


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
    """What teacher outputs were built for: their source, the teacher points they hold, the teacher's state layout.

    ``path`` is a cache's folder, or a served teacher's URL (then ``model`` is
    the served model's name); ``keys`` are the points' stable keys, as the
    index records them (what a distill function's points are matched by);
    ``points`` shows them as ``repr`` strings, for messages; ``teacher`` is
    the teacher's class name and the name, shape and dtype of each of its
    state entries, or ``None`` for a served teacher, which has no state here
    (so nothing about the local teacher's layout is checked).
    """

    __slots__ = ("path", "keys", "points", "teacher", "model", "_accepted")
    _immutable_name = "a teacher cache's record"
    path: str
    keys: tuple[str, ...]
    points: tuple[str, ...]
    teacher: tuple[str, Structure] | None
    model: str | None
    _accepted: dict[int, tuple[Any, tuple[tuple[int, ...], tuple[tuple[Any, int], ...]]]]

    def __init__(
        self, path: str, keys: tuple[str, ...], teacher: tuple[str, Structure] | None, *, model: str | None = None
    ):
        keys = tuple(keys)
        init(self, path=path, keys=keys, points=tuple(map(display, keys)), teacher=teacher, model=model, _accepted={})

    def positions(self, fn: DistillFn) -> tuple[int, ...]:
        """For each pair of ``fn``, where its teacher output is among the stored ones (checked once per ``fn``)."""
        return self._accept(fn)[0]

    def picks(self, fn: DistillFn) -> tuple[tuple[Any, int], ...]:
        """Each distinct teacher point of ``fn`` and where its output is among the stored ones (checked once per ``fn``)."""
        return self._accept(fn)[1]

    def _accept(self, fn: DistillFn) -> tuple[tuple[int, ...], tuple[tuple[Any, int], ...]]:
        seen = self._accepted.get(id(fn))
        if seen is not None and seen[0] is fn:
            return seen[1]
        positions = _check(self, fn)
        picks = tuple({t: i for (t, _), i in zip(fn.mapping.names, positions)}.items())
        self._accepted[id(fn)] = (fn, (positions, picks))
        return positions, picks

    def __repr__(self) -> str:
        if self.teacher is None:
            return f"BuiltFor(path={self.path!r}, points={list(self.points)}, model={self.model!r})"
        return f"BuiltFor(path={self.path!r}, points={list(self.points)}, teacher={self.teacher[0]})"


class TeacherOutputs(Frozen):
    """Teacher outputs of a batch of samples, read from a :class:`~funcdistill.TeacherCache`.

    Pass it to a distill function in place of the teacher state:
    ``fn(cache[idx], student_state, *inputs)`` returns the pairs
    ``fn(teacher_state, student_state, *inputs)`` would, without running the
    teacher. ``values`` holds one output per cached teacher point, in the order
    of ``built_for.points``; a top-k pair's output is a :class:`TopK`.

    ``mask`` is ``None`` for samples of one shape. For token samples of
    different lengths (a ragged cache), the per-token values are padded on
    the right to the batch's longest sample and ``mask`` is a bool tensor
    ``(batch, tokens)``, ``True`` at the real tokens: the ``mask`` the token
    losses take. It is a leaf of the pytree, as the values are.
    """

    __slots__ = ("values", "built_for", "mask")
    _immutable_name = "TeacherOutputs"
    _immutable_hint = " Index the cache again, or use tree_map for a changed copy."
    values: tuple[Any, ...]
    built_for: BuiltFor
    mask: torch.Tensor | None

    def __init__(self, values: tuple[Any, ...], built_for: BuiltFor, mask: torch.Tensor | None = None):
        if not isinstance(built_for, BuiltFor):
            raise TypeError(f"TeacherOutputs(built_for=...) must be a BuiltFor, got {type(built_for).__name__}.")
        if len(values) != len(built_for.points):
            raise ValueError(
                f"TeacherOutputs got {len(values)} values for {len(built_for.points)} cached points "
                f"({', '.join(built_for.points)}); give one value per point."
            )
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 2):
            got = f"a {mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
            raise TypeError(
                f"TeacherOutputs(mask=...) must be None or a bool tensor (batch, tokens), True at the real "
                f"tokens, got {got}; for a 0/1 attention mask pass attention_mask.bool()."
            )
        init(self, values=tuple(values), built_for=built_for, mask=mask)

    def to(self, *args: Any, **kwargs: Any) -> TeacherOutputs:
        """A copy with every tensor moved or cast by ``Tensor.to(*args, **kwargs)`` (top-k indices and the mask keep their dtype)."""

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
        mask = "" if self.mask is None else f", mask: {list(self.mask.shape)}"
        return f"TeacherOutputs({pairs}{mask})"


def _device(args: tuple, kwargs: dict, x: torch.Tensor) -> torch.device:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return x.device


def teacher_values(outputs: TeacherOutputs, fn: DistillFn) -> dict[Any, Any]:
    """The values of ``outputs`` keyed by ``fn``'s teacher points, as a run of its live teacher gives them.

    Raises:
        ValueError: the outputs do not hold a teacher point of ``fn``'s mapping,
            or were built for a teacher with another state layout.
    """
    values = outputs.values
    if torch.compiler.is_compiling():
        positions = _traced_positions(outputs.built_for, fn)
        return {t: values[i] for (t, _), i in zip(fn.mapping.names, positions)}
    return {t: values[i] for t, i in outputs.built_for.picks(fn)}  # the pairs' lookups made once per fn


def _check(built_for: BuiltFor, fn: DistillFn) -> tuple[int, ...]:
    served = built_for.teacher is None
    where = (
        f"the served teacher at {built_for.path} (model {built_for.model!r})"
        if served
        else f"the teacher cache at {built_for.path}"
    )
    missing = [k for k in dict.fromkeys(map(point_key, fn.teacher_points)) if k not in built_for.keys]
    if missing:
        fix = (
            "Make the served teacher with this distill function (ServedTeacher(fn, ...))"
            if served
            else "Build a cache with this distill function (TeacherCache.build(fn, ...))"
        )
        raise ValueError(
            f"{where} holds the teacher outputs at {', '.join(built_for.points)}; this distill function "
            f"also maps teacher point(s) {', '.join(map(display, missing))}, which it does not hold. {fix}, "
            f"or distill with the mapping the {'served teacher' if served else 'cache'} was built for."
        )
    if served:  # a served teacher's weights live in the server: there is no local state layout to compare
        return tuple(built_for.keys.index(point_key(t)) for t, _ in fn.mapping.names)
    assert built_for.teacher is not None  # a cache always records its teacher
    difference = _structure_difference(built_for.teacher, teacher_record(fn.teacher_model))
    if difference is not None:
        raise ValueError(
            f"{where} was built for another teacher: {difference}. Use a distill function of the teacher "
            "the cache was built for, or build a cache for this teacher (TeacherCache.build(fn, ...))."
        )
    return tuple(built_for.keys.index(point_key(t)) for t, _ in fn.mapping.names)


def _structure_difference(recorded: tuple[str, Structure], given: tuple[str, Structure]) -> str | None:
    """The first way the ``given`` teacher (class, structure) differs from the ``recorded`` one, or ``None``."""
    (cls, entries), (given_cls, given_entries) = recorded, given
    if cls != given_cls:
        return f"it was built for a {cls} teacher, this distill function's teacher is a {given_cls}"
    built = {name: (shape, dtype) for name, shape, dtype in entries}
    now = {name: (shape, dtype) for name, shape, dtype in given_entries}
    for name in built:
        if name not in now:
            return f"the teacher it was built for has a state entry {name!r} that this teacher lacks"
        if built[name] != now[name]:
            (s0, d0), (s1, d1) = built[name], now[name]
            return (
                f"teacher state entry {name!r} was {list(s0)} {d0} when the cache was built, "
                f"this teacher's is {list(s1)} {d1}"
            )
    extra = next((name for name in now if name not in built), None)
    if extra is not None:
        return f"this teacher has a state entry {extra!r} that the teacher it was built for lacks"
    return None


def teacher_record(model: nn.Module) -> tuple[str, Structure]:
    """What :attr:`BuiltFor.teacher` holds for a teacher: its class name and its state's structure.

    The class of an FSDP2 model is that of the model it shards (``Net``, not
    ``FSDPNet``).

    Example:
        >>> teacher_record(nn.Linear(2, 3))
        ('Linear', (('weight', (3, 2), 'float32'), ('bias', (3,), 'float32')))
    """
    cls = _sharded._plain_name(model) if _sharded._fsdp() is not None else type(model).__name__
    return cls, tuple((name, tuple(t.shape), dtype_name(t.dtype)) for name, t in state(model).items())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` as ``'float16'``: how a structure (and a cache's index) names a dtype."""
    return str(dtype).removeprefix("torch.")


# traced code calls the check at trace time and keeps its result as a constant of the graph
_traced_positions = constant_under_compile(lambda built_for, fn: built_for.positions(fn))


def _flatten(outputs: TeacherOutputs) -> tuple[tuple[Any, ...], tuple[BuiltFor, bool]]:
    """The values, then the mask when there is one (samples of one shape flatten as they always did)."""
    if outputs.mask is None:
        return outputs.values, (outputs.built_for, False)
    return (*outputs.values, outputs.mask), (outputs.built_for, True)


def _unflatten(context: tuple[BuiltFor, bool], children: tuple[Any, ...]) -> TeacherOutputs:
    built_for, masked = context
    new = object.__new__(TeacherOutputs)
    values, mask = (children[:-1], children[-1]) if masked else (children, None)
    init(new, values=tuple(values), built_for=built_for, mask=mask)
    return new


# torch's serialized name stays the public path the class is shown at, as before it moved into the core
register_node(TeacherOutputs, _flatten, _unflatten, name="funcdistill.cache.TeacherOutputs")
