"""Teacher and student in messages: a model's name, the other role, one model given twice, swapped models.

Every message about the two models says these things the same way: a model
is named by its class (``Net``), one model cannot be both teacher and student,
and a point or a mapping that fits the other model says that teacher and
student look swapped, and how to fix it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__: list[str] = []

Role = str  # "teacher" or "student"

TEACHER_FIRST = "Mapping.add and distill take the teacher first"
"""The fix :func:`swapped` gives unless told another."""

SAME_MODEL = (
    "the same model was passed as teacher and student; distill from a separate "
    "teacher (copy.deepcopy(model) for self-distillation)."
)


def model_name(model: nn.Module) -> str:
    """How a message names a model: its class name.

    Example:
        >>> model_name(nn.Linear(2, 2))
        'Linear'
    """
    return type(model).__name__


def other_role(role: Role) -> Role:
    """The other model's role.

    Example:
        >>> other_role("teacher")
        'student'
    """
    return "student" if role == "teacher" else "teacher"


def check_distinct(teacher: Any, student: Any) -> None:
    """Refuse one model given as both teacher and student.

    Raises:
        ValueError: ``teacher is student``.

    Example:
        >>> check_distinct(nn.Linear(2, 2), nn.Linear(2, 2))
    """
    if teacher is not None and teacher is student:
        raise ValueError(SAME_MODEL)


def swapped(evidence: str, *, fix: str = TEACHER_FIRST, certain: bool = False) -> str:
    """The hint that teacher and student are the other way round: what shows it, and the fix.

    Args:
        evidence: what shows it, e.g. that a name given for one model is a
            module of the other.
        fix: what to do.
        certain: both models are known to be crossed; the message then
            begins with the diagnosis (``"teacher and student are swapped: ..."``).

    Example:
        >>> swapped("'fc' is a module of the student")
        "'fc' is a module of the student: teacher and student look swapped (Mapping.add and distill take the teacher first)."
        >>> swapped("the mapping has them the other way round", fix="Pass them by keyword.", certain=True)
        'teacher and student are swapped: the mapping has them the other way round. Pass them by keyword.'
    """
    if certain:
        return f"teacher and student are swapped: {evidence}. {fix}"
    return f"{evidence}: teacher and student look swapped ({fix})."
