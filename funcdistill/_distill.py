"""``distill``: build a pure function that returns paired teacher/student outputs."""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as torch_pytree
from torch import nn

from funcdistill import _names
from funcdistill._capture import Capture
from funcdistill._mapping import Mapping, Pair
from funcdistill._state import PAYLOAD_PREFIX, StateSpec, state

__all__ = ["Buffers", "DistillFn", "distill"]


class Buffers(NamedTuple):
    """Buffers of both models after a call (``mutable=True``), e.g. BatchNorm statistics.

    Merge them into the state for the next step:
    ``student_state = {**student_state, **buffers.student}``.
    """

    teacher: dict[str, torch.Tensor]
    """The teacher's buffers after the call, by qualified name."""
    student: dict[str, torch.Tensor]
    """The student's buffers after the call, by qualified name."""


def distill(
    teacher: nn.Module,
    student: nn.Module,
    mapping: Mapping | None = None,
    *,
    nograd_teacher: bool = True,
    mutable: bool = False,
    truncate: bool = True,
    teacher_dtype: torch.dtype | None = None,
) -> "DistillFn":
    """Return a pure function that runs both models and pairs their outputs.

    The returned ``fn(teacher_state, student_state, *args, **kwargs)`` runs the
    teacher and then the student on the same inputs with
    :func:`torch.func.functional_call`, using the given state dicts
    (:func:`funcdistill.state`; a missing entry is taken from the model), and
    returns a tuple of :class:`Pair` ``(teacher_output, student_output,
    payload)``, one per mapping pair, in order. Outputs keep their pytree
    structure (tuples, dicts, ``ModelOutput``).

    ``fn`` is pure: it never changes the modules or the tensors it is given,
    and it composes with :func:`torch.func.grad`, :func:`torch.func.vmap`,
    :func:`torch.func.jacrev` and :func:`torch.compile`. It may be called from
    several threads at once.

    Payloads that are modules with parameters (adapters) take them from
    ``student_state['payloads.<index>.<name>']`` when present
    (``funcdistill.state(student, mapping)`` adds them); such payloads come back
    bound to that state, so calling them is differentiable with respect to it.

    Args:
        teacher: the teacher model. Never modified.
        student: the student model. Never modified.
        mapping: the pairs to return; ``None`` pairs the two final outputs.
        nograd_teacher: run the teacher under :func:`torch.no_grad`: no gradient
            reaches a teacher parameter and the teacher saves nothing for backward.
        mutable: also return the models' buffers after the call (BatchNorm
            running statistics), as ``(pairs, Buffers(teacher, student))``.
            Buffers passed in are never updated in place.
        truncate: stop the teacher right after its deepest mapped point, so
            layers the mapping does not need never run (unless ``''`` is
            mapped). The first call runs the teacher in full to check that each
            mapped point runs exactly once; later calls are truncated. The
            teacher's buffers returned with ``mutable=True`` then reflect only
            the layers that ran.
        teacher_dtype: run the teacher in this floating dtype (e.g.
            ``torch.bfloat16``): floating inputs and teacher state are cast to
            it (pass a teacher state already in that dtype to cast it once),
            and teacher outputs are cast back to the dtype of the paired student
            output, so pairs reach the loss in the student's dtype.

    Raises:
        TypeError: a model or the mapping has the wrong type.
        ValueError: the mapping names an unknown point, or was built for other models.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from funcdistill import Mapping, distill, state
        >>> t, s = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
        >>> fn = distill(t, s, Mapping().add("0", "0", payload=nn.MSELoss()))
        >>> def loss(ss, x):
        ...     return sum(c(a, b) for a, b, c in fn(state(t), ss, x))
        >>> grads = torch.func.grad(loss)(state(s), torch.randn(2, 4))
        >>> sorted(grads)
        ['0.bias', '0.weight']
    """
    return DistillFn(
        teacher, student, mapping, nograd_teacher=nograd_teacher, mutable=mutable,
        truncate=truncate, teacher_dtype=teacher_dtype,
    )


def distill_inplace(
    teacher: nn.Module, student: nn.Module, mapping: Mapping | None, *, nograd_teacher: bool = True,
    truncate: bool = True,
) -> "DistillFn":
    """A distill function whose training-mode modules update the buffers they run with, in place.

    For :mod:`funcdistill.compat` only, whose ``loss.backward()`` loops expect
    BatchNorm statistics to follow training as in a plain forward: buffers that
    are passed in, or the models' own ones for entries left out, are written.
    Such a function is not pure, which is why :func:`distill` does not offer it.
    """
    return DistillFn(
        teacher, student, mapping, nograd_teacher=nograd_teacher, mutable=False,
        truncate=truncate, teacher_dtype=None, inplace_buffers=True,
    )


class DistillFn:
    """The pure function made by :func:`distill`; see there."""

    __slots__ = (
        "mapping", "nograd_teacher", "mutable", "teacher_dtype", "_teacher", "_student",
        "_payload_keys", "_bound", "_plan",
    )
    mapping: Mapping
    nograd_teacher: bool
    mutable: bool
    teacher_dtype: torch.dtype | None
    _teacher: "_Side"
    _student: "_Side"
    _payload_keys: frozenset[str]
    _bound: dict[int, "_Side"]
    _plan: tuple[tuple[str, str, Any], ...]

    def __init__(
        self, teacher, student, mapping, *, nograd_teacher, mutable, truncate, teacher_dtype,
        inplace_buffers=False,
    ):
        _check_models(teacher, student)
        mapping = _check_mapping(mapping, teacher, student)
        if teacher_dtype is not None and not (
            isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point
        ):
            raise TypeError(
                f"teacher_dtype must be a floating torch.dtype such as torch.bfloat16, got {teacher_dtype!r}."
            )
        set_ = object.__setattr__
        set_(self, "mapping", mapping)
        set_(self, "nograd_teacher", bool(nograd_teacher))
        set_(self, "mutable", bool(mutable))
        set_(self, "teacher_dtype", teacher_dtype)
        set_(self, "_teacher", _Side(
            "teacher", teacher, [t for t, _ in mapping.names],
            truncate=truncate, dtype=teacher_dtype, clone_buffers=not inplace_buffers,
        ))
        set_(self, "_student", _Side(
            "student", student, [s for _, s in mapping.names], clone_buffers=not inplace_buffers
        ))
        bound = {}
        for i, payload in enumerate(mapping.payload()):
            if isinstance(payload, nn.Module) and state(payload):
                bound[i] = _Side(f"payload {i}", payload, [], clone_buffers=not inplace_buffers)
        set_(self, "_bound", bound)
        set_(self, "_plan", tuple((t, s, p) for (t, s), p in zip(mapping.names, mapping.payload())))
        set_(self, "_payload_keys", _payload_keys(bound, self._student))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a distill function is immutable; call distill() again.")

    def __repr__(self) -> str:
        return (
            f"<distill fn: teacher={_names.describe(self._teacher.model)}, "
            f"student={_names.describe(self._student.model)}, {len(self.mapping)} pairs, "
            f"nograd_teacher={self.nograd_teacher}>"
        )

    def __call__(self, teacher_state: AbcMapping[str, torch.Tensor], student_state: AbcMapping[str, torch.Tensor], *args: Any, **kwargs: Any):
        payload_state = {}
        if self._payload_keys:
            payload_state, student_state = self._split(student_state)
        if self.nograd_teacher:
            with torch.no_grad():
                t_full, t_out = self._teacher.run(teacher_state, args, kwargs)
        else:
            t_full, t_out = self._teacher.run(teacher_state, args, kwargs)
        s_full, s_out = self._student.run(student_state, args, kwargs)
        if self.teacher_dtype is None and not self._bound:
            pairs = tuple([Pair(t_out[t], s_out[s], p) for t, s, p in self._plan])
        else:
            pairs = tuple([
                Pair(self._teacher_value(t_out[t], s_out[s]), s_out[s], self._payload(i, p, payload_state))
                for i, (t, s, p) in enumerate(self._plan)
            ])
        if not self.mutable:
            return pairs
        return pairs, Buffers(self._teacher.spec.buffers(t_full), self._student.spec.buffers(s_full))

    def _teacher_value(self, teacher_out: Any, student_out: Any) -> Any:
        if self.teacher_dtype is None:
            return teacher_out
        dtypes = [
            x.dtype for x in torch_pytree.tree_leaves(student_out)
            if isinstance(x, torch.Tensor) and x.is_floating_point()
        ]
        return _cast(teacher_out, dtypes[0] if dtypes else torch.get_default_dtype())

    def _split(self, student_state):
        if not isinstance(student_state, AbcMapping):  # the student side reports the type error
            return {}, student_state
        keys = self._payload_keys
        payload_state = {k: v for k, v in student_state.items() if k in keys}
        if not payload_state:
            return {}, student_state
        rest = {k: v for k, v in student_state.items() if k not in keys}
        return payload_state, rest

    def _payload(self, i: int, payload: Any, payload_state: dict) -> Any:
        side = self._bound.get(i)
        if side is None:
            return payload
        prefix = f"{PAYLOAD_PREFIX}.{i}."
        own = {k[len(prefix):]: v for k, v in payload_state.items() if k.startswith(prefix)}
        return BoundPayload(side, own)


class BoundPayload:
    """A payload module bound to the state passed to a distill call.

    Distill functions return these in place of payload modules that have
    parameters or buffers (adapters); they are not built by hand. Calling one
    runs the module with :func:`torch.func.functional_call` on the
    ``payloads.<index>.*`` entries of that call's student state (missing
    entries come from the module itself).
    """

    __slots__ = ("_side", "_state")
    _side: "_Side"
    _state: dict[str, torch.Tensor]

    def __init__(self, side: Any, state: dict[str, torch.Tensor]):  # made by DistillFn only
        object.__setattr__(self, "_side", side)
        object.__setattr__(self, "_state", state)

    @property
    def module(self) -> nn.Module:
        """The payload module as it was put in the mapping."""
        return self._side.model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._side.run(self._state, args, kwargs)[1][""]

    def __repr__(self) -> str:
        return f"BoundPayload({self._side.model!r})"


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a pytree to ``dtype`` (a no-op for those already in it)."""
    return torch_pytree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


class _Side:
    """One model of a distill function: its capture and its state spec."""

    __slots__ = ("role", "model", "capture", "spec", "dtype")

    def __init__(
        self, role: str, model: nn.Module, points: list[str], *,
        truncate: bool = False, dtype: torch.dtype | None = None, clone_buffers: bool = True,
    ):
        self.role = role
        self.model = model
        self.dtype = dtype
        self.capture = Capture(model, tuple(points) or ("",), role, truncate=truncate)
        self.spec = StateSpec(role, model, self.capture.run_module, clone_buffers=clone_buffers)

    def run(self, given, args, kwargs):
        full = self.spec.complete(given)
        if self.dtype is not None:
            full, args, kwargs = _cast((full, args, kwargs), self.dtype)
        _, captured = self.capture.run(full, args, kwargs)
        return full, captured


def _check_models(teacher: Any, student: Any) -> None:
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"distill({role}=...) must be an nn.Module, got {type(model).__name__}.")
    if teacher is student:
        raise ValueError(
            "the same model was passed as teacher and student; distill from a separate "
            "teacher (copy.deepcopy(model) for self-distillation)."
        )


def _check_mapping(mapping: Any, teacher: nn.Module, student: nn.Module) -> Mapping:
    if mapping is None:
        return Mapping(teacher, student).add("", "")
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"mapping must be a funcdistill.Mapping, got {type(mapping).__name__}"
            + (" (convert it with .to_functional())" if hasattr(mapping, "to_functional") else "")
            + "."
        )
    if len(mapping) == 0:
        raise ValueError("the mapping is empty: add at least one pair (mapping.add('', '') pairs the outputs).")
    mt, ms = mapping.teacher, mapping.student
    if (mt is not None and mt is student) or (ms is not None and ms is teacher):
        raise ValueError(
            "the mapping was built as Mapping(teacher, student) with the models that "
            "distill() got the other way round: teacher and student look swapped. "
            "Pass distill(teacher=..., student=...) as the mapping has them."
        )
    for role, built, given in (("teacher", mt, teacher), ("student", ms, student)):
        if built is not None and built is not given:
            raise ValueError(
                f"the mapping was built for another {role} ({_names.describe(built)} at "
                f"{id(built):#x}) than the one passed to distill ({_names.describe(given)} "
                f"at {id(given):#x}); build the mapping with the models you distill."
            )
    for t, s in mapping.names:
        _names.resolve(t, "teacher", teacher, student)
        _names.resolve(s, "student", student, teacher)
    return mapping


def _payload_keys(bound: dict[int, _Side], student: _Side) -> frozenset[str]:
    keys = frozenset(
        f"{PAYLOAD_PREFIX}.{i}.{name}"
        for i, side in bound.items()
        for name in side.spec.owners
    )
    clash = keys & student.spec.owners.keys()
    if clash:
        raise ValueError(
            f"the student has state named {sorted(clash)[0]!r}, which is where funcdistill "
            f"keeps the parameters of payload modules ('{PAYLOAD_PREFIX}.<index>.<name>'); "
            f"rename the student's {PAYLOAD_PREFIX!r} submodule."
        )
    return keys
