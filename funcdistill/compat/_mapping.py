"""The mutable :class:`Mapping` of the compatibility shim, a thin holder of a functional one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from funcdistill import Mapping as FunctionalMapping
from funcdistill import Pair, Point

__all__ = ["Mapping"]


class Mapping:
    """Mutable mapping between modules of a teacher and a student (context-manager API).

    It behaves like the ``Mapping`` of the context-manager API: :meth:`add`
    changes it in place and returns ``None``. Underneath it holds an immutable
    :class:`funcdistill.Mapping`, which every :meth:`add` replaces;
    :meth:`to_functional` returns it and :meth:`from_functional` wraps one, so
    the two convert into each other without loss.

    A point is a qualified module name (``'features.5.conv'``), ``''`` for the
    whole model, a module reference, or an FX node name when the model is a
    :class:`torch.fx.GraphModule`. Names are checked as they are added (the
    error suggests close names and says when teacher and student look swapped).

    Args:
        teacher: the teacher model (``None`` only when the names are checked
            later, by :class:`funcdistill.compat.distill`).
        student: the student model (likewise).

    Example:
        >>> from torch import nn
        >>> t, s = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
        >>> m = Mapping(t, s)
        >>> m.add(t[0], "0", payload=nn.MSELoss())
        >>> m.add("", "")
        >>> len(m), m.payload()[1]
        (2, None)
        >>> Mapping.from_functional(m.to_functional()).to_functional() == m.to_functional()
        True
    """

    __slots__ = ("_functional",)

    def __init__(self, teacher: nn.Module | None, student: nn.Module | None):
        self._functional = FunctionalMapping(teacher, student)

    @classmethod
    def from_functional(cls, mapping: FunctionalMapping) -> Mapping:
        """Wrap an immutable :class:`funcdistill.Mapping` (it is not copied).

        Raises:
            TypeError: ``mapping`` is not a :class:`funcdistill.Mapping`.

        Example:
            >>> import funcdistill
            >>> m = Mapping.from_functional(funcdistill.Mapping().add("", "", payload=1.0))
            >>> m.payload()
            [1.0]
        """
        if not isinstance(mapping, FunctionalMapping):
            raise TypeError(f"Mapping.from_functional() takes a funcdistill.Mapping, got {type(mapping).__name__}.")
        new = object.__new__(cls)
        new._functional = mapping
        return new

    def to_functional(self) -> FunctionalMapping:
        """The immutable :class:`funcdistill.Mapping` with the same models, pairs and payloads.

        Later :meth:`add` calls do not change the returned value.

        Example:
            >>> m = Mapping(None, None)
            >>> m.add("a", "b")
            >>> [tuple(p) for p in m.to_functional()]
            [('a', 'b', None)]
        """
        return self._functional

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher model given to the constructor."""
        return self._functional.teacher

    @property
    def student(self) -> nn.Module | None:
        """The student model given to the constructor."""
        return self._functional.student

    @property
    def names(self) -> tuple[tuple[str | Point, str | Point], ...]:
        """The ``(teacher_point, student_point)`` pairs, in order: names, or Points for the others."""
        return self._functional.names

    def add(self, teacher_module: Any, student_module: Any, payload: Any = None) -> None:
        """Add a pair to this mapping, in place.

        Args:
            teacher_module: teacher point: module name, ``''``, FX node name or module reference.
            student_module: student point, likewise.
            payload: anything returned with the pair's outputs (a loss, a weight,
                an adapter module).

        Raises:
            TypeError: a point is neither a string nor a module.
            ValueError: a point does not belong to its model.
        """
        self._functional = self._functional.add(teacher_module, student_module, payload)

    def payload(self) -> list[Any]:
        """The payloads, in the order the pairs were added."""
        return self._functional.payload()

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._functional)

    def __len__(self) -> int:
        return len(self._functional)

    def __repr__(self) -> str:
        return "compat." + repr(self._functional)
