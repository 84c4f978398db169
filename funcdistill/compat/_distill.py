"""The shim's ``distill``: a context manager (and decorator) that hands out a distillation model."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

from torch import nn

from funcdistill import Mapping as FunctionalMapping
from funcdistill._roles import model_name
from funcdistill.compat._checks import check_models, functional_mapping, unwrap
from funcdistill.compat._mapping import Mapping
from funcdistill.compat._model import DistillationModel

__all__ = ["distill"]

# Every model inside an active distill context, as (id(model), role) -> model. The
# models are held weakly, so that one whose context is never exited (entered by hand,
# or in an abandoned frame) can still be garbage-collected; its entry goes with it.
# Keyed by id rather than by the model, because a module may define __eq__.
_ACTIVE: weakref.WeakValueDictionary[tuple[int, str], nn.Module] = weakref.WeakValueDictionary()
_ROLES = ("teacher", "student")
_LOCK = threading.Lock()


class distill(contextlib.ContextDecorator):  # noqa: N801 - the reference API's name
    """Context manager that glues a teacher and a student into one distillation model.

    ``with distill(teacher, student, mapping) as model:`` gives an ``nn.Module``
    whose forward runs both models on its inputs and returns a list of
    ``(teacher_output, student_output, payload)`` tuples, one per mapping pair,
    in mapping order (``mapping=None`` pairs the final outputs). Its
    ``parameters()`` are the student's and those of payload modules (adapters),
    never the teacher's, so ``SGD(model.parameters())`` trains what it should.

    It is a thin layer over :func:`funcdistill.distill` (a variant whose
    training-mode modules update their buffers in place): the models are
    never instrumented, no hook is registered and no flag is changed, so
    leaving the context (normally or by an exception) leaves both models as
    the body left them. Inside, ``loss.backward()`` fills ``.grad``
    of the student and of adapters; with ``nograd_teacher=True`` the teacher
    runs under :func:`torch.no_grad` and its ``.grad`` stay ``None``. Modules
    in training mode update their own buffers (BatchNorm running statistics)
    in place, as in a plain forward.
    A teacher in eval mode is therefore never changed, and it stops after its
    deepest mapped point (later layers do not run); a teacher left in
    training mode runs in full and behaves as ``teacher(x)`` under
    ``no_grad`` does in plain PyTorch: BatchNorm normalises with batch
    statistics and updates its running statistics, dropout is active.

    The models may be passed in any order by keyword; a student wrapped in
    :class:`torch.nn.parallel.DistributedDataParallel` works (the wrapper's
    forward runs, so gradients are all-reduced and ``no_sync()`` is honoured),
    with a mapping built for the wrapper or for the model inside it.

    Also a decorator: ``@distill(teacher, student, mapping)`` runs the function
    inside the context; the distillation model is then ``<distill>.model``.

    Args:
        teacher: the model knowledge is transferred from.
        student: the model knowledge is transferred to.
        mapping: a :class:`funcdistill.compat.Mapping` or
            :class:`funcdistill.Mapping` built for these models (or without
            models); ``None`` pairs the final outputs.
        nograd_teacher: run the teacher under :func:`torch.no_grad`.

    Raises:
        TypeError: a model or the mapping has the wrong type.
        ValueError: the same model is teacher and student; the mapping was
            built for other models or with them swapped; a name is unknown.
        RuntimeError: (on entering) a model is already in an active distill context.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from funcdistill.compat import Mapping, distill
        >>> t, s = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
        >>> mapping = Mapping(t, s)
        >>> mapping.add(t[0], "0", payload=nn.MSELoss())
        >>> with distill(teacher=t, student=s, mapping=mapping) as model:
        ...     loss = sum(c(a, b) for a, b, c in model(torch.randn(2, 4)))
        ...     loss.backward()
        >>> s[0].weight.grad is not None, t[0].weight.grad
        (True, None)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        mapping: Mapping | FunctionalMapping | None = None,
        nograd_teacher: bool = True,
    ):
        check_models(teacher, student)
        if not isinstance(nograd_teacher, bool):
            raise TypeError(f"distill(nograd_teacher=...) must be a bool, got {type(nograd_teacher).__name__}.")
        functional_mapping(mapping, teacher, student)  # check now; built again on entering
        self.teacher = teacher
        self.student = student
        self.mapping = mapping
        self.nograd_teacher = nograd_teacher
        self._model: DistillationModel | None = None

    @property
    def model(self) -> DistillationModel:
        """The distillation model of the active context (what ``__enter__`` returned).

        Raises:
            RuntimeError: outside the context.
        """
        if self._model is None:
            raise RuntimeError(
                "distill(...).model exists only inside the context: use "
                "`with distill(...) as model:` or read it in a function decorated with it."
            )
        return self._model

    def __enter__(self) -> DistillationModel:
        mapping = functional_mapping(self.mapping, self.teacher, self.student)
        models = _claim(self.teacher, self.student)
        try:
            model = DistillationModel(self.teacher, self.student, mapping, nograd_teacher=self.nograd_teacher)
        except BaseException:
            _release(models)
            raise
        self._model = model
        return model

    def __exit__(self, *exc_info: Any) -> None:
        model, self._model = self._model, None
        if model is not None:
            model._close()
        _release([self.teacher, self.student, unwrap(self.teacher), unwrap(self.student)])
        return None

    def __repr__(self) -> str:
        return (
            f"distill(teacher={model_name(self.teacher)}, student={model_name(self.student)}, "
            f"nograd_teacher={self.nograd_teacher}, active={self._model is not None})"
        )


def _claim(teacher: nn.Module, student: nn.Module) -> list[nn.Module]:
    """Mark the models as inside a context; refuse one that already is."""
    wanted: dict[int, tuple[nn.Module, str]] = {}
    for role, model in (("teacher", teacher), ("student", student)):
        for m in (model, unwrap(model)):
            wanted.setdefault(id(m), (m, role))
    with _LOCK:
        for model, role in wanted.values():
            outer_role = _active_role(model)
            if outer_role is not None:
                raise RuntimeError(
                    f"the {role} {model_name(model)} is already the {outer_role} of an "
                    "active distill context; distill contexts cannot be nested over the "
                    "same model. Exit the outer context first, or distill a copy "
                    "(copy.deepcopy(model))."
                )
        for key, (model, role) in wanted.items():
            _ACTIVE[key, role] = model
    return [m for m, _ in wanted.values()]


def _release(models: list[nn.Module]) -> None:
    with _LOCK:
        for m in models:
            role = _active_role(m)
            if role is not None:
                del _ACTIVE[id(m), role]


def _active_role(model: nn.Module) -> str | None:
    """The role of ``model`` in an active context, or ``None``; call with ``_LOCK`` held."""
    for role in _ROLES:
        if _ACTIVE.get((id(model), role)) is model:
            return role
    return None
