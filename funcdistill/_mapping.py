"""The immutable :class:`Mapping` of teacher/student point pairs and their payloads."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from funcdistill import _names
from funcdistill._frozen import Frozen, init
from funcdistill._point import Point
from funcdistill._pytree import register_node
from funcdistill._roles import check_distinct, model_name

__all__ = ["Mapping", "Pair"]


class Pair(NamedTuple):
    """One mapping entry, or one pair of outputs returned by a distill function.

    In a :class:`Mapping`, ``teacher`` and ``student`` are point names; in the
    result of a distill function they are the captured outputs.
    """

    teacher: Any
    """The teacher point name, or the teacher output at that point."""
    student: Any
    """The student point name, or the student output at that point."""
    payload: Any = None
    """What was put in the mapping with this pair (a loss, a weight, an adapter)."""


class Mapping(Frozen):
    """Immutable list of teacher/student point pairs, each with a payload.

    A point is a qualified submodule name (``'features.5.conv'``), ``''`` for the
    whole model (its final output), a node name when the model is a
    :class:`torch.fx.GraphModule`, or a module reference (resolved to its name at
    :meth:`add` time, which needs the models): the output of a module that runs
    once. A :class:`~funcdistill.Point` reads one call of a module that runs
    several times, all its calls, or its input (``Point(name, io="input",
    call=k)``); the mapping keeps a plain point as its name.

    A Mapping is a pytree whose leaves are the payloads (the names are static
    metadata): ``optree.tree_map(f, mapping, namespace="funcdistill")`` and
    torch's ``tree_map(f, mapping)`` (``torch.utils._pytree``) map the payloads.

    Args:
        teacher: the teacher model, needed to resolve module references and to
            check names as they are added; optional.
        student: the student model, likewise.

    Example:
        >>> from torch import nn
        >>> t, s = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
        >>> m = Mapping(t, s).add(t[0], "0", payload=nn.MSELoss())
        >>> m2 = m.add("", "", payload=1.0)
        >>> len(m), len(m2)
        (1, 2)
        >>> [p.teacher for p in m2]
        ['0', '']
    """

    __slots__ = ("_teacher", "_student", "_names", "_payloads")
    _immutable_hint = " Use add() or replace(), which return a new Mapping."
    _teacher: nn.Module | None
    _student: nn.Module | None
    _names: tuple[tuple[str | Point, str | Point], ...]
    _payloads: tuple[Any, ...]

    def __init__(self, teacher: nn.Module | None = None, student: nn.Module | None = None):
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None and not isinstance(model, nn.Module):
                raise TypeError(f"Mapping({role}=...) must be an nn.Module or None, got {type(model).__name__}.")
        check_distinct(teacher, student)
        _init(self, teacher, student, (), ())

    @classmethod
    def _build(cls, teacher, student, names, payloads) -> Mapping:
        new = object.__new__(cls)
        _init(new, teacher, student, tuple(names), tuple(payloads))
        return new

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher model given to the constructor, or ``None``."""
        return self._teacher

    @property
    def student(self) -> nn.Module | None:
        """The student model given to the constructor, or ``None``."""
        return self._student

    @property
    def names(self) -> tuple[tuple[str | Point, str | Point], ...]:
        """The ``(teacher_point, student_point)`` pairs, in order: names, or Points for the others."""
        return self._names

    def add(self, teacher_module: Any, student_module: Any, payload: Any = None) -> Mapping:
        """Return a new Mapping with one more pair; the original is unchanged.

        Args:
            teacher_module: a teacher point: name, ``''``, module reference or
                :class:`~funcdistill.Point`.
            student_module: a student point, likewise.
            payload: anything returned with the pair (a loss, a weight, an adapter).

        Raises:
            TypeError: a point is neither a string, a module nor a Point.
            ValueError: a point does not belong to its model (the message
                suggests close names, and says when teacher and student look
                swapped), or a Point reads what its module does not have (the
                input of an FX node, a ``forward`` parameter it does not take).
        """
        t = _names.resolve(teacher_module, "teacher", self._teacher, self._student)
        s = _names.resolve(student_module, "student", self._student, self._teacher)
        return Mapping._build(
            self._teacher,
            self._student,
            self._names + ((t, s),),
            self._payloads + (payload,),
        )

    def payload(self) -> list[Any]:
        """The payloads, in insertion order."""
        return list(self._payloads)

    def replace(self, *, payloads: Any) -> Mapping:
        """Return a new Mapping with the same pairs and new payloads; the original is unchanged.

        Raises:
            ValueError: the number of payloads differs from the number of pairs.
        """
        payloads = tuple(payloads)
        if len(payloads) != len(self._names):
            raise ValueError(
                f"replace() got {len(payloads)} payloads for a mapping of "
                f"{len(self._names)} pairs; give one payload per pair."
            )
        return Mapping._build(self._teacher, self._student, self._names, payloads)

    def __iter__(self) -> Iterator[Pair]:
        for (t, s), p in zip(self._names, self._payloads):
            yield Pair(t, s, p)

    def __getitem__(self, index: int) -> Pair:
        (t, s), p = self._names[index], self._payloads[index]
        return Pair(t, s, p)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return (
            self._teacher is other._teacher
            and self._student is other._student
            and self._names == other._names
            and len(self._payloads) == len(other._payloads)
            and all(_same(a, b) for a, b in zip(self._payloads, other._payloads))
        )

    __hash__ = None  # type: ignore[assignment]  # payloads may be unhashable

    def __repr__(self) -> str:
        pairs = ", ".join(f"({t!r}, {s!r}, {p!r})" for (t, s), p in zip(self._names, self._payloads))
        models = ""
        if self._teacher is not None or self._student is not None:
            t, s = (None if m is None else model_name(m) for m in (self._teacher, self._student))
            models = f"teacher={t}, student={s}, "
        return f"Mapping({models}pairs=[{pairs}])"

    def __copy__(self) -> Mapping:
        return self

    def __deepcopy__(self, memo: dict) -> Mapping:
        # the models are referred to, not owned: a copy keeps them, unless they were
        # copied in the same deepcopy (a distill function, a checkpoint), then it takes the copies
        teacher, student = (memo.get(id(m), m) for m in (self._teacher, self._student))
        return Mapping._build(teacher, student, self._names, copy.deepcopy(self._payloads, memo))

    def __reduce__(self):
        return (Mapping._build, (self._teacher, self._student, self._names, self._payloads))


def _init(obj: Mapping, teacher, student, names, payloads) -> None:
    init(obj, _teacher=teacher, _student=student, _names=names, _payloads=payloads)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an incomparable payload is simply not equal
        return False


# A Mapping is a pytree: its leaves are the payloads; the models and the names are static metadata.
def _flatten(m: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return m._payloads, (m._teacher, m._student, m._names)


def _unflatten(meta: tuple[Any, ...], payloads: tuple[Any, ...]) -> Mapping:
    teacher, student, names = meta
    return Mapping._build(teacher, student, names, payloads)


register_node(Mapping, _flatten, _unflatten, name="funcdistill.Mapping", drop_none=True)
