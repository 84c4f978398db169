"""``distill``: build a pure function that returns paired teacher/student outputs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from collections.abc import Mapping as AbcMapping
from typing import Any, NamedTuple

import torch
from torch import nn

from funcdistill import _names, _payloads, _roles
from funcdistill._frozen import Frozen, init
from funcdistill._mapping import Mapping, Pair
from funcdistill._outputs import TeacherOutputs, teacher_values
from funcdistill._payloads import BoundPayload
from funcdistill._point import Point
from funcdistill._pytree import tree_leaves
from funcdistill._side import Side
from funcdistill._state import state
from funcdistill._tensors import cast_floating

__all__ = ["BoundPayload", "BufferUpdateWarning", "Buffers", "DistillFn", "distill"]


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
    mutable: bool | None = None,
    truncate: bool = True,
    teacher_dtype: torch.dtype | None = None,
) -> DistillFn:
    """Return a pure function that runs both models and pairs their outputs.

    The returned ``fn(teacher_state, student_state, *args, **kwargs)`` runs the
    teacher and then the student on the same inputs, using the given state
    dicts (:func:`funcdistill.state`; a missing entry is taken from the model),
    as :func:`torch.func.functional_call` would, and returns a tuple of :class:`Pair` ``(teacher_output, student_output,
    payload)``, one per mapping pair, in order. Outputs keep their pytree
    structure (tuples, dicts, ``ModelOutput``). In place of the teacher state
    it also takes a teacher cache's stored outputs, ``fn(cache[idx],
    student_state, *args)`` (:class:`funcdistill.TeacherCache`): the teacher
    then does not run.

    ``fn`` is pure: it never changes the modules or the tensors it is given,
    and it composes with :func:`torch.func.grad`, :func:`torch.func.vmap`,
    :func:`torch.func.jacrev` and :func:`torch.compile`. It may be called from
    several threads at once. Every entry of a state is checked against the
    model (name, shape, dtype, device), with one error naming each culprit.
    Models sharded with FSDP2 (``fully_shard``) run on their ``DTensor``
    shards, each unit gathered only while it runs, and gradients with respect
    to the shards come back as shards averaged over the ranks (see the
    Distributed page of the documentation). Tensor-parallel models
    (``parallelize_module``, alone or with FSDP2 on a 2-D mesh) run with
    their parallel styles, and their mapped values come back as full tensors
    on every rank.

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
        mutable: ``True``: also return the buffers each model ran with
            (BatchNorm running statistics, updated by modules in training
            mode), as ``(pairs, Buffers(teacher, student))``; thread them into
            the next call (``{**student_state, **buffers.student}``), or in a
            ``loss.backward()`` loop write them back into the model
            (``student.load_state_dict(buffers.student, strict=False)``).
            ``False``: return only the pairs and drop such updates (torch's
            BatchNorm then runs without its running statistics: the same
            batch statistics, nothing cloned or updated).
            ``None`` (the default): like ``False``, but a call that drops
            updates warns and says what to do. Buffers passed in are never
            updated in place.
        truncate: stop a teacher whose modules are all in eval mode right
            after its deepest mapped point, from its first call on, so layers
            the mapping does not need never run (unless ``''`` is mapped). A
            shape-only dry run (no FLOPs), once per input signature, checks
            that every mapped point runs exactly once; where it cannot run
            (control flow that depends on values), the teacher runs in full.
            A teacher with a module in training mode always runs in full, so
            its dropout draws and BatchNorm updates are those of a plain
            forward.
        teacher_dtype: run the teacher in this floating dtype (e.g.
            ``torch.bfloat16``): floating inputs and teacher state are cast to
            it (pass a teacher state already in that dtype to cast it once),
            and teacher outputs are cast back to the dtype of the paired student
            output, so pairs reach the loss in the student's dtype.

    Raises:
        TypeError: a model or the mapping has the wrong type.
        ValueError: the mapping names an unknown point, or was built for other models.

    The function raises, when called: ``TypeError`` for a state that is not a
    dict, non-string keys, a one-shot iterator input, inputs whose dtype
    a model cannot take (with advice that runs both models), or a mapped value
    that is not tensors (a transformers cache: pass ``use_cache=False``);
    ``ValueError`` for state entries the model does not have or with another
    shape, dtype or device (saying when it looks like the other model's
    state), ``student.state_dict()`` in a grad-enabled call (pass
    :func:`funcdistill.state`), and an adapter left out of a differentiated
    student state; ``RuntimeError`` for a mapped module that never runs, runs
    several times with no call selected (map one call with
    :class:`~funcdistill.Point`), or runs fewer times than a Point's call
    index needs, and for an input point of a module called with keywords
    only. A model's own error in its forward comes back saying which model
    failed and the inputs' shapes, chained to the original.

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
        teacher,
        student,
        mapping,
        nograd_teacher=nograd_teacher,
        mutable=mutable,
        truncate=truncate,
        teacher_dtype=teacher_dtype,
    )


def distill_inplace(
    teacher: nn.Module,
    student: nn.Module,
    mapping: Mapping | None,
    *,
    nograd_teacher: bool = True,
) -> DistillFn:
    """A distill function whose training-mode modules update the buffers they run with, in place.

    For :mod:`funcdistill.compat` only, whose ``loss.backward()`` loops expect
    BatchNorm statistics to follow training as in a plain forward: buffers that
    are passed in, or the models' own ones for entries left out, are written.
    Such a function is not pure, which is why :func:`distill` does not offer it.
    """
    return DistillFn(
        teacher,
        student,
        mapping,
        nograd_teacher=nograd_teacher,
        mutable=False,
        truncate=True,
        teacher_dtype=None,
        inplace_buffers=True,
    )


class DistillFn(Frozen):
    """The pure function made by :func:`distill`; see there.

    Its teacher side is also open to funcdistill's own modules that make or
    take teacher outputs without running the student (the teacher cache):
    :attr:`teacher_model`, :attr:`teacher_points` and :meth:`run_teacher`.
    These are package-internal, not a stable public API.
    """

    __slots__ = (
        "mapping",
        "nograd_teacher",
        "mutable",
        "truncate",
        "teacher_dtype",
        "_inplace",
        "_teacher",
        "_student",
        "_payload_keys",
        "_bound",
        "_pairs",
    )
    _immutable_name = "a distill function"
    _immutable_hint = " Call distill() again for other settings."
    mapping: Mapping
    nograd_teacher: bool
    mutable: bool | None
    truncate: bool
    teacher_dtype: torch.dtype | None
    _inplace: bool
    _teacher: Side
    _student: Side
    _payload_keys: frozenset[str]
    _bound: dict[int, Side]
    _pairs: tuple[tuple[str, str, Any], ...]

    def __init__(
        self,
        teacher,
        student,
        mapping,
        *,
        nograd_teacher,
        mutable,
        truncate,
        teacher_dtype,
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
        if mutable is not None and not isinstance(mutable, bool):
            raise TypeError(f"mutable must be True, False or None, got {mutable!r}.")
        clone = not inplace_buffers
        t = Side(
            teacher,
            tuple(t for t, _ in mapping.names) or ("",),
            "teacher",
            truncate=truncate,
            clone_buffers=clone,
            dtype=teacher_dtype,
        )
        s = Side(student, tuple(s for _, s in mapping.names) or ("",), "student", clone_buffers=clone, other=t)
        bound = {
            i: Side(payload, ("",), f"payload {i}", clone_buffers=clone)
            for i, payload in _payloads.stateful_modules(mapping.payload())
            if state(payload)
        }
        init(
            self,
            mapping=mapping,
            nograd_teacher=bool(nograd_teacher),
            mutable=mutable,
            truncate=bool(truncate),
            teacher_dtype=teacher_dtype,
            _inplace=bool(inplace_buffers),
            _teacher=t,
            _student=s,
            _bound=bound,
            _pairs=tuple((t, s, p) for (t, s), p in zip(mapping.names, mapping.payload())),
            _payload_keys=_payload_keys(bound, s),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # the shadows, swap plans and verdicts are derived: a copy rebuilds them from the (copied) models
        return (
            _rebuild,
            (
                self._teacher.model,
                self._student.model,
                self.mapping,
                {
                    "nograd_teacher": self.nograd_teacher,
                    "mutable": self.mutable,
                    "truncate": self.truncate,
                    "teacher_dtype": self.teacher_dtype,
                    "inplace_buffers": self._inplace,
                },
            ),
        )

    def __repr__(self) -> str:
        return (
            f"<distill fn: teacher={_roles.model_name(self._teacher.model)}, "
            f"student={_roles.model_name(self._student.model)}, {len(self.mapping)} pairs, "
            f"nograd_teacher={self.nograd_teacher}>"
        )

    def __call__(
        self,
        teacher_state: AbcMapping[str, torch.Tensor],
        student_state: AbcMapping[str, torch.Tensor],
        *args: Any,
        **kwargs: Any,
    ):
        _check_inputs(args, kwargs)
        payload_state: dict[str, Any] = {}
        if self._payload_keys and isinstance(student_state, AbcMapping):
            payload_state, student_state = self._split(student_state)
        keep, report = bool(self.mutable), self.mutable is None
        t_out, t_buffers, t_dropped = self._teacher_side(teacher_state, args, kwargs, buffers=keep, report=report)
        s_out, s_buffers, s_dropped = self._student.run(student_state, args, kwargs, buffers=keep, report=report)
        if t_dropped or s_dropped:
            _warn_dropped_buffers(
                self._teacher.model if t_dropped else None, self._student.model if s_dropped else None
            )
        if self.teacher_dtype is None and not self._bound:
            pairs = tuple([Pair(t_out[t], s_out[s], p) for t, s, p in self._pairs])
        else:
            pairs = tuple(
                [
                    Pair(self._teacher_value(t_out[t], s_out[s]), s_out[s], self._payload(i, p, payload_state))
                    for i, (t, s, p) in enumerate(self._pairs)
                ]
            )
        if not keep:
            return pairs
        return pairs, Buffers(t_buffers or {}, s_buffers or {})

    @property
    def teacher_model(self) -> nn.Module:
        """The live teacher module given to :func:`distill` (never modified). Package-internal."""
        return self._teacher.model

    @property
    def teacher_points(self) -> tuple[str | Point, ...]:
        """The distinct teacher points of the mapping, in mapping order: names, or Points for the others.

        Package-internal. These are the keys of :meth:`run_teacher`'s values.
        """
        return tuple(dict.fromkeys(t for t, _, _ in self._pairs))

    def run_teacher(
        self, teacher_state: AbcMapping[str, torch.Tensor] | TeacherOutputs, args: tuple, kwargs: dict[str, Any]
    ) -> dict[str | Point, Any]:
        """The teacher side of a call on these inputs: its value at each teacher point. Package-internal.

        The teacher runs as in ``fn(teacher_state, student_state, *args,
        **kwargs)``, with its truncation and ``teacher_dtype`` (the values
        are in that dtype: a call casts them when it pairs them), under
        :func:`torch.no_grad` when ``nograd_teacher``; given teacher outputs
        in place of the state, nothing runs and their values are checked and
        returned. The student never runs; buffer updates are dropped.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import funcdistill as fd
            >>> t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
            >>> fn = fd.distill(t, nn.Linear(4, 2), fd.Mapping().add("1", "").add("", ""))
            >>> fn.teacher_points
            ('1', '')
            >>> values = fn.run_teacher(fd.state(t), (torch.ones(3, 4),), {})
            >>> [tuple(values[p].shape) for p in fn.teacher_points]
            [(3, 8), (3, 2)]
        """
        return self._teacher_side(teacher_state, args, kwargs, buffers=False, report=False)[0]

    def _teacher_side(
        self, teacher_state: Any, args: tuple, kwargs: dict[str, Any], *, buffers: bool, report: bool
    ) -> tuple[dict[Any, Any], dict[str, torch.Tensor] | None, bool]:
        """The one place a call's teacher side runs, or takes its values from teacher outputs.

        Returns the values at the teacher points, the buffers it ran with
        (when ``buffers``) and whether it dropped buffer updates (when ``report``).
        """
        if isinstance(teacher_state, TeacherOutputs):  # a teacher cache stands in for the teacher
            return teacher_values(teacher_state, self), None, False
        if not self.nograd_teacher:
            return self._teacher.run(teacher_state, args, kwargs, buffers=buffers, report=report)
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return self._teacher.run(teacher_state, args, kwargs, buffers=buffers, report=report)
        enabled = torch.is_grad_enabled()  # what torch.no_grad() does, without its context object
        torch._C._set_grad_enabled(False)
        try:
            return self._teacher.run(teacher_state, args, kwargs, buffers=buffers, report=report)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _split(self, student_state: AbcMapping[str, Any]) -> tuple[dict[str, Any], AbcMapping[str, Any]]:
        payload_state, rest = _payloads.split(student_state, self._payload_keys)
        frozen = _payloads.missing_under_grad(rest, payload_state, list(self._bound))
        if frozen:
            raise ValueError(
                f"student_state is being differentiated (torch.func.grad) but has no entries for "
                f"the adapter payload(s) of pair(s) {frozen} "
                f"({', '.join(type(self._bound[i].model).__name__ for i in frozen)}), so they would "
                f"run on their own tensors and never train. Pass funcdistill.state(student, mapping), "
                f"which adds them as '{_payloads.PREFIX}.<index>.<name>'; to keep an adapter fixed, "
                "put it in the mapping as a function of its own tensors (or detach them)."
            )
        return payload_state, rest

    def _teacher_value(self, teacher_out: Any, student_out: Any) -> Any:
        if self.teacher_dtype is None:
            return teacher_out
        dtypes = [x.dtype for x in tree_leaves(student_out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        return cast_floating(teacher_out, dtypes[0] if dtypes else torch.get_default_dtype())

    def _payload(self, i: int, payload: Any, payload_state: dict) -> Any:
        side = self._bound.get(i)
        if side is None:
            return payload
        return BoundPayload(side, _payloads.own_entries(i, payload_state))


def _rebuild(teacher: nn.Module, student: nn.Module, mapping: Mapping, options: dict[str, Any]) -> DistillFn:
    return DistillFn(teacher, student, mapping, **options)


def _check_inputs(args: tuple, kwargs: dict) -> None:
    """One-shot iterators would be used up by the teacher, leaving the student nothing."""
    if all(map(_reusable, args)) and (not kwargs or all(map(_reusable, kwargs.values()))):
        return  # every call: no tuples of positions made
    for where, x in (*enumerate(args), *kwargs.items()):
        if not _reusable(x):
            what = f"positional input {where}" if isinstance(where, int) else f"keyword input {where!r}"
            raise TypeError(
                f"{what} is a one-shot {type(x).__name__}: the teacher would use it up and the "
                "student would get an empty one. Pass a list or tuple instead (list(...))."
            )


def _reusable(x: Any) -> bool:
    """Whether ``x`` can be given to both models: anything but a one-shot iterator."""
    return isinstance(x, torch.Tensor) or not isinstance(x, Iterator)


class BufferUpdateWarning(UserWarning):
    """A distill call dropped buffer updates (BatchNorm statistics) of a model in training mode.

    Issued only by a distill function built with ``mutable=None`` (the
    default). The message names the model (teacher, student or both) and some
    of its training-mode modules with buffers, and says what to do: put a
    teacher in eval mode, build the function with ``mutable=True`` to keep a
    student's updates, or with ``mutable=False`` to drop them silently. Filter
    it by this class, e.g. make it an error in a test run with
    ``warnings.simplefilter("error", funcdistill.BufferUpdateWarning)`` (or
    pytest's ``filterwarnings = ["error::funcdistill.BufferUpdateWarning"]``).

    Example:
        >>> import warnings
        >>> import torch
        >>> from torch import nn
        >>> import funcdistill as fd
        >>> t, s = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = fd.distill(t, s)(fd.state(t), fd.state(s), torch.ones(3, 2))
        >>> caught[0].category.__name__, str(caught[0].message)[:52]
        ('BufferUpdateWarning', 'the student has modules in training mode that update')
    """


def _training_buffer_modules(model: nn.Module, most: int = 2) -> str:
    """Names of up to ``most`` modules in training mode that hold buffers, norm layers first."""
    found = [
        (n, m) for n, m in model.named_modules() if m.training and next(m.buffers(recurse=False), None) is not None
    ]
    found.sort(key=lambda nm: not isinstance(nm[1], nn.modules.batchnorm._NormBase))
    shown = ", ".join(f"{repr(n) if n else 'the model itself'} ({type(m).__name__})" for n, m in found[:most])
    return shown + (f" and {len(found) - most} more" if len(found) > most else "")


def _warn_dropped_buffers(teacher: nn.Module | None, student: nn.Module | None) -> None:
    """Warn that a ``mutable=None`` call dropped the buffer updates of the given model(s)."""
    models = [(role, m) for role, m in (("teacher", teacher), ("student", student)) if m is not None]
    if len(models) == 1:
        ((role, model),) = models
        who, where, keeps = f"the {role} has", _training_buffer_modules(model), f"the {role} keeps its"
    else:
        who, keeps = "the teacher and the student have", "both keep their"
        where = "; ".join(f"{role} {_training_buffer_modules(m)}" for role, m in models)
    advice = []
    if teacher is not None:
        advice.append(
            "A teacher's statistics are normally frozen: put the teacher in eval mode (teacher.eval()), "
            "so that it normalises with its running statistics and updates nothing (if they are meant to "
            "follow the batches, distill(..., mutable=True) returns them as buffers.teacher)."
        )
    if student is not None:
        advice.append(
            "To keep the student's updates, build the function with distill(..., mutable=True), which "
            "returns (pairs, buffers): thread buffers.student into the next call's student state, or in a "
            "loss.backward() loop write them back after the step with "
            "student.load_state_dict(buffers.student, strict=False)."
        )
    advice.append("Or build it with mutable=False to drop the updates without this warning.")
    warnings.warn(
        f"{who} modules in training mode that update buffers (such as BatchNorm running statistics): "
        f"{where}. This distill function (mutable=None) returns only the pairs, so the updates are "
        f"dropped and {keeps} old statistics. " + " ".join(advice),
        BufferUpdateWarning,
        stacklevel=3,
    )


def _check_models(teacher: Any, student: Any) -> None:
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"distill({role}=...) must be an nn.Module, got {type(model).__name__}.")
    _roles.check_distinct(teacher, student)


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
            _roles.swapped(
                "the mapping was built as Mapping(teacher, student) with the models that distill() got the other way round",
                fix="pass distill(teacher=..., student=...) as the mapping has them",
            )
        )
    for role, built, given in (("teacher", mt, teacher), ("student", ms, student)):
        if built is not None and built is not given:
            raise ValueError(
                f"the mapping was built for another {role} ({_roles.model_name(built)} at "
                f"{id(built):#x}) than the one passed to distill ({_roles.model_name(given)} "
                f"at {id(given):#x}); build the mapping with the models you distill."
            )
    for t, s in mapping.names:
        _names.resolve(t, "teacher", teacher, student)
        _names.resolve(s, "student", student, teacher)
    return mapping


def _payload_keys(bound: dict[int, Side], student: Side) -> frozenset[str]:
    keys = frozenset(_payloads.key(i, name) for i, side in bound.items() for name in side.spec.live)
    clash = keys & student.spec.live.keys()
    if clash:
        raise ValueError(
            f"the student has state named {sorted(clash)[0]!r}, which is where funcdistill "
            f"keeps the parameters of payload modules ('{_payloads.PREFIX}.<index>.<name>'); "
            f"rename the student's {_payloads.PREFIX!r} submodule."
        )
    return keys
