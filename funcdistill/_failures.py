"""What a model's failed forward says: which model failed, on what inputs, and what to do.

A distill call runs two models on the same inputs, so torch's own error (a
shape mismatch, a dtype mismatch) does not say which of them failed. The
side (:mod:`funcdistill._side`) passes every ``Exception`` of a forward
here. funcdistill's own errors (raised in its modules, such as a tap's
:class:`~funcdistill._taps.PointError`, or marked with :func:`mark`) and ``BaseException`` (the truncation
signal, ``KeyboardInterrupt``) are never wrapped. A dtype mismatch between the
inputs and the model's state is a ``TypeError`` with advice that works for both
models; any other error is raised again as an exception of the same builtin
type whose message names the model and the inputs' shapes, chained to the
original (``raise ... from error``). An error of another type keeps its type
and gets the same text as a note (:pep:`678`, Python 3.11+).
"""

from __future__ import annotations

from typing import Any

import torch

from funcdistill._pytree import tree_leaves

__all__: list[str] = []

_MARK = "_funcdistill_raised"
# exceptions raised again as the same type with a longer message; others get a note
_PLAIN = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, NotImplementedError, AssertionError)
_SHOWN = 6  # inputs described in a message


def mark(error: BaseException) -> BaseException:
    """Mark ``error`` as funcdistill's own: a forward that raises it is not wrapped again."""
    setattr(error, _MARK, True)
    return error


def raised_by_funcdistill(error: BaseException) -> bool:
    """Whether ``error`` is funcdistill's own, not the model's: marked, or raised by funcdistill's code.

    Errors raised in funcdistill's modules during a forward (a tap, an FSDP
    unit's gather) already say what is wrong.
    """
    if getattr(error, _MARK, False):
        return True
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return name == "funcdistill" or name.startswith("funcdistill.")


def dtype_error(
    error: Exception,
    role: str,
    model: str,
    dtypes: dict[str, torch.dtype | None],
    args: tuple,
    kwargs: dict,
) -> TypeError | None:
    """A ``TypeError`` for a forward that failed on inputs of another dtype than its state, or ``None``.

    ``dtypes`` holds ``"state"`` (the failed model's floating dtype as it ran),
    ``"student"`` (the student's) and ``"teacher"`` (the teacher's, as it runs
    on the student's inputs: ``None`` when ``teacher_dtype`` casts them). The
    advice makes *both* models run: the inputs in the student's dtype, with
    ``teacher_dtype`` for a teacher of another dtype.

    >>> f32, f64 = torch.float32, torch.float64
    >>> error = dtype_error(RuntimeError("mismatch"), "teacher", "Net",
    ...                     {"state": f32, "student": f32, "teacher": f32}, (torch.zeros(1, dtype=f64),), {})
    >>> str(error).split("; ")[1]
    "convert the inputs to the student's dtype, x.to(torch.float32)."
    """
    state = dtypes.get("state")
    inputs = next(
        (x.dtype for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.is_floating_point()), None
    )
    if state is None or inputs is None or state == inputs:
        return None
    student, teacher = dtypes.get("student") or state, dtypes.get("teacher")
    if role == "teacher" and inputs == student:
        fix = (
            f"pass distill(..., teacher_dtype={inputs}) to run the teacher in the inputs' (the student's) "
            f"dtype, or convert the teacher (teacher.to({inputs}))"
        )
    elif role in ("teacher", "student"):
        fix = f"convert the inputs to the student's dtype, x.to({student})"
        if teacher is not None and teacher != student:
            fix += f", and pass distill(..., teacher_dtype={student}) so that the teacher runs in it too"
        if role == "student":
            fix += f"; or convert the student (student.to({inputs}))"
    else:
        fix = f"convert the {role} to the inputs' dtype ({inputs}), or its inputs to {state}"
    first = str(error).splitlines()[0] if str(error) else ""
    return TypeError(
        f"the {role} {model} failed on inputs of dtype {inputs} while its state is {state} "
        f"({type(error).__name__}: {first}); {fix}."
    )


def failed(error: Exception, role: str, model: str, args: tuple, kwargs: dict) -> BaseException:
    """``error`` with a message that names the model that failed and its inputs.

    An exception of one of the plain builtin types comes back as a new one of
    that type (to raise ``from error``); any other comes back itself, with the
    message as a note.

    >>> error = failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "student", "Net",
    ...                (torch.zeros(2, 5),), {})
    >>> print(error)  # doctest: +NORMALIZE_WHITESPACE
    the student Net failed on its inputs (input 0: shape (2, 5), torch.float32): RuntimeError: mat1
    and mat2 shapes cannot be multiplied. A distill function passes the same inputs to the teacher and
    the student: check that the student takes inputs of these shapes.
    """
    text = (
        f"the {role} {model} failed on its inputs ({describe_inputs(args, kwargs)}): "
        f"{type(error).__name__}: {error}. "
        + (
            "A distill function passes the same inputs to the teacher and the student: check that the "
            f"{role} takes inputs of these shapes."
            if role in ("teacher", "student")
            else f"Check what the {role} is called with."
        )
    )
    if type(error) in _PLAIN:
        return mark(type(error)(text))
    add_note = getattr(error, "add_note", None)  # Python 3.11+; on 3.10 the error goes through as it is
    if add_note is not None:
        add_note(f"funcdistill: {text}")
    return mark(error)


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """The inputs of a call for messages: each one's shape and dtype, or its type.

    >>> describe_inputs((torch.zeros(2, 3),), {"mask": None, "ids": [torch.zeros(4, dtype=torch.long)]})
    'input 0: shape (2, 3), torch.float32; mask=None; ids=list of shape (4,), torch.int64'
    """
    items = [(f"input {i}: ", x) for i, x in enumerate(args)] + [(f"{k}=", x) for k, x in kwargs.items()]
    shown = [label + _describe(x) for label, x in items[:_SHOWN]]
    if len(items) > _SHOWN:
        shown.append(f"... ({len(items)} inputs in all)")
    return "; ".join(shown) or "no inputs"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, {x.dtype}"
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x) if len(repr(x)) <= 40 else type(x).__name__
    tensors = [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]
    if not tensors:
        return type(x).__name__
    shapes = ", ".join(f"shape {tuple(t.shape)}, {t.dtype}" for t in tensors[:3])
    return f"{type(x).__name__} of {shapes}" + (f", ... ({len(tensors)} tensors)" if len(tensors) > 3 else "")
