"""One training step of a distillation, written in each style the benchmark compares.

Every style computes the same loss (:func:`benchmarks.losses.step_loss`: a
feature pair, a logits pair and cross-entropy) on the same models and batch.
A *loss function* (``() -> loss``) builds the graph; a *step* also zeroes the
student's gradients and runs backward. Styles that register hooks or enter a
context get their own copies of the models, so they never slow the others.

A builder returns a :class:`Style` (its loss function and the models whose
gradients a step clears), or a string saying why the style is unavailable here
(the benchmark prints it as the row's note).

>>> import torch
>>> from benchmarks.models import mlp_student, mlp_teacher
>>> case = Case(mlp_teacher(), mlp_student(), torch.randn(4, 64), torch.tensor([0, 1, 2, 3]))
>>> torch.allclose(floor_loss(case).loss(), funcdistill_loss(case).loss())
True
>>> floor_loss(case).step()  # zero_grad, loss, backward
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

import funcdistill as fd
from benchmarks import features
from benchmarks.losses import kd_loss, similarity_loss, step_loss
from benchmarks.models import Features

__all__ = [
    "Case",
    "Style",
    "compat_loss",
    "floor_loss",
    "forgotten_nograd_loss",
    "full_teacher_truncated_loss",
    "funcdistill_grad_step",
    "funcdistill_loss",
    "hooks_loss",
    "student_alone_loss",
    "torch_func_vmap_step",
    "torchdistill_loss",
    "trains_buffers",
    "truncated_floor_loss",
    "truncated_funcdistill_loss",
    "truncated_mapping",
]

LossFn = Callable[[], torch.Tensor]


class Case:
    """A teacher (eval mode), a student (train mode), a batch and the mapped feature point.

    Args:
        teacher, student: models with ``forward_features`` (:mod:`benchmarks.models`).
        x, y: inputs and integer targets.
        point: the feature point mapped on both models (their last
            ``points`` entry before the logits when ``None``).
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, *, point: str | None = None
    ):
        self.teacher = teacher.eval()
        self.student = student.train()
        self.x, self.y = x, y
        self.point = point or teacher.points[-2]
        self.exits = contextlib.ExitStack()

    def pairs(self, tf: dict, sf: dict) -> tuple:
        """The ``(teacher, student, loss)`` triples of the hand-written styles."""
        p = self.point
        return ((tf[p], sf[p], similarity_loss), (tf[""], sf[""], kd_loss))

    def mapping(self, teacher: nn.Module, student: nn.Module) -> fd.Mapping:
        """The same pairs as a :class:`funcdistill.Mapping`."""
        p = self.point
        return fd.Mapping(teacher, student).add(p, p, similarity_loss).add("", "", kd_loss)

    def copies(self) -> tuple[nn.Module, nn.Module]:
        """Private copies of both models (same weights, same modes)."""
        return copy.deepcopy(self.teacher), copy.deepcopy(self.student)


class Style(NamedTuple):
    """One way of writing the step: its loss function, the models it trains, what follows backward."""

    loss: LossFn
    zero: tuple[nn.Module, ...]
    after: Callable[[], None] | None = None

    def step(self) -> None:
        """Clear the gradients of ``zero``, build the loss, run backward, then ``after()``."""
        for model in self.zero:
            model.zero_grad(set_to_none=True)
        self.loss().backward()
        if self.after is not None:
            self.after()


def trains_buffers(model: nn.Module) -> bool:
    """Whether a module of ``model`` in training mode has buffers (BatchNorm running statistics).

    >>> trains_buffers(nn.BatchNorm1d(2)), trains_buffers(nn.BatchNorm1d(2).eval()), trains_buffers(nn.Linear(2, 2))
    (True, False, False)
    """
    return any(m.training and next(iter(m.buffers(recurse=False)), None) is not None for m in model.modules())


def _fd_style(case: Case, mapping: fd.Mapping, teacher_state: dict | None = None, **distill_kwargs: Any) -> Style:
    """``fn(state(teacher), state(student), x)`` then the loss, in the recommended ``.backward()`` loop.

    A student with buffers in training mode (BatchNorm) gets ``distill(..., mutable=True)``
    and, after backward, ``student.load_state_dict(buffers.student, strict=False)``: its
    statistics follow training as in the floor's plain train-mode forward.
    """
    t, s, x, y = case.teacher, case.student, case.x, case.y
    if not trains_buffers(s):
        fn = fd.distill(t, s, mapping, **distill_kwargs)

        def loss() -> torch.Tensor:
            pairs = fn(fd.state(t) if teacher_state is None else teacher_state, fd.state(s), x)
            return step_loss(pairs, pairs[-1].student, y)

        return Style(loss, (s,))
    fn = fd.distill(t, s, mapping, mutable=True, **distill_kwargs)
    box: dict[str, dict[str, torch.Tensor]] = {}

    def loss_mutable() -> torch.Tensor:
        pairs, buffers = fn(fd.state(t) if teacher_state is None else teacher_state, fd.state(s), x)
        box["student"] = buffers.student
        return step_loss(pairs, pairs[-1].student, y)

    def keep_statistics() -> None:
        s.load_state_dict(box.pop("student"), strict=False)

    return Style(loss_mutable, (s,), keep_statistics)


def floor_loss(case: Case) -> Style:
    """Hand-written: models return their features, the teacher runs under ``no_grad``."""
    t, s, x, y = case.teacher, case.student, case.x, case.y

    def loss() -> torch.Tensor:
        with torch.no_grad():
            tf = t.forward_features(x)
        sf = s.forward_features(x)
        return step_loss(case.pairs(tf, sf), sf[""], y)

    return Style(loss, (s,))


def forgotten_nograd_loss(case: Case) -> Style:
    """The floor with ``no_grad`` forgotten: the teacher's graph is built and kept."""
    t, s, x, y = case.teacher, case.student, case.x, case.y

    def loss() -> torch.Tensor:
        tf = t.forward_features(x)
        sf = s.forward_features(x)
        return step_loss(case.pairs(tf, sf), sf[""], y)

    return Style(loss, (s, t))


def student_alone_loss(case: Case) -> Style:
    """The floor's loss with the teacher's outputs computed beforehand, once (for saved bytes)."""
    with torch.no_grad():
        tf = case.teacher.forward_features(case.x)
    s, x, y = case.student, case.x, case.y

    def loss() -> torch.Tensor:
        sf = s.forward_features(x)
        return step_loss(case.pairs(tf, sf), sf[""], y)

    return Style(loss, (s,))


def _hook_into(box: dict, key: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        box[key] = output

    return hook


def hooks_loss(case: Case) -> Style:
    """Plain forward hooks on copies of the models, registered once."""
    t, s = case.copies()
    x, y, p = case.x, case.y, case.point
    box: dict[str, torch.Tensor] = {}
    t.get_submodule(p).register_forward_hook(_hook_into(box, "t"))
    s.get_submodule(p).register_forward_hook(_hook_into(box, "s"))

    def loss() -> torch.Tensor:
        with torch.no_grad():
            t_logits = t(x)
        s_logits = s(x)
        tf, sf = {p: box["t"], "": t_logits}, {p: box["s"], "": s_logits}
        return step_loss(case.pairs(tf, sf), s_logits, y)

    return Style(loss, (s,))


def torchdistill_loss(case: Case) -> Style | str:
    """torchdistill's ``ForwardHookManager`` on copies of the models."""
    manager = features.torchdistill_hook_manager()
    if isinstance(manager, str):
        return manager
    t, s = case.copies()
    x, y, p = case.x, case.y, case.point
    mt, ms = manager(x.device), manager(x.device)
    mt.add_hook(t, p, requires_input=False, requires_output=True)
    ms.add_hook(s, p, requires_input=False, requires_output=True)

    def loss() -> torch.Tensor:
        with torch.no_grad():
            t_logits = t(x)
        s_logits = s(x)
        tf = {p: mt.pop_io_dict()[p]["output"], "": t_logits}
        sf = {p: ms.pop_io_dict()[p]["output"], "": s_logits}
        return step_loss(case.pairs(tf, sf), s_logits, y)

    return Style(loss, (s,))


def compat_loss(case: Case) -> Style | str:
    """The context-manager shim (``funcdistill.compat``), entered once, on copies of the models."""
    compat = features.compat_module()
    if isinstance(compat, str):
        return compat
    t, s = case.copies()
    x, y, p = case.x, case.y, case.point
    mapping = compat.Mapping(t, s)
    mapping.add(p, p, payload=similarity_loss)
    mapping.add("", "", payload=kd_loss)
    model = case.exits.enter_context(compat.distill(teacher=t, student=s, mapping=mapping))

    def loss() -> torch.Tensor:
        out = model(x)
        return step_loss(out, out[-1][1], y)

    return Style(loss, (s,))


def funcdistill_loss(case: Case, *, teacher_state: dict | None = None, **distill_kwargs: Any) -> Style:
    """The documented ``.backward()`` idiom: ``fn(state(teacher), state(student), x)``.

    With BatchNorm in training mode, the recommended loop: ``mutable=True`` and
    ``student.load_state_dict(buffers.student, strict=False)`` after backward.
    ``teacher_state`` replaces ``state(teacher)`` (e.g. a copy cast to bfloat16).
    """
    return _fd_style(case, case.mapping(case.teacher, case.student), teacher_state, **distill_kwargs)


def funcdistill_grad_step(case: Case) -> Callable[[], None]:
    """The functional idiom: ``torch.func.grad`` over detached parameters, buffers threaded."""
    t, s, x, y = case.teacher, case.student, case.x, case.y
    fn = fd.distill(t, s, case.mapping(t, s), mutable=True)
    t_state = fd.state(t)
    params = {k: v.detach() for k, v in s.named_parameters()}
    buffers = {k: v.clone() for k, v in s.named_buffers()}

    def loss(params: dict, buffers: dict) -> tuple[torch.Tensor, dict]:
        pairs, new = fn(t_state, {**params, **buffers}, x)
        return step_loss(pairs, pairs[-1].student, y), new.student

    grad = torch.func.grad(loss, has_aux=True)

    def step() -> None:
        _, new = grad(params, buffers)
        buffers.update(new)

    return step


def truncated_floor_loss(case: Case, stop_after: str) -> Style:
    """Hand-written truncated teacher: it runs only up to ``stop_after``.

    The loss is the feature pair at ``stop_after`` plus the student's cross-entropy.
    """
    t, s, x, y = case.teacher, case.student, case.x, case.y

    def loss() -> torch.Tensor:
        with torch.no_grad():
            tf = t.forward_features(x, stop_after=stop_after)
        sf = s.forward_features(x)
        return step_loss(((tf[stop_after], sf[stop_after], similarity_loss),), sf[""], y)

    return Style(loss, (s,))


def full_teacher_truncated_loss(case: Case, stop_after: str) -> Style:
    """The truncated floor's loss with a full teacher forward (what truncation saves)."""
    t, s, x, y = case.teacher, case.student, case.x, case.y

    def loss() -> torch.Tensor:
        with torch.no_grad():
            tf = t.forward_features(x)
        sf = s.forward_features(x)
        return step_loss(((tf[stop_after], sf[stop_after], similarity_loss),), sf[""], y)

    return Style(loss, (s,))


def truncated_mapping(case: Case, stop_after: str) -> fd.Mapping:
    """The feature pair at ``stop_after``, plus the student's logits (paired with the same teacher point)."""
    t, s = case.teacher, case.student
    return fd.Mapping(t, s).add(stop_after, stop_after, similarity_loss).add(stop_after, "", None)


def truncated_funcdistill_loss(case: Case, stop_after: str, *, truncate: bool = True) -> Style | str:
    """funcdistill with the teacher truncated after ``stop_after`` (``truncate=False``: the same, untruncated)."""
    support = features.truncate_support()
    if truncate and support is not True:
        return str(support)
    kwargs = {"truncate": truncate} if support is True else {}
    return _fd_style(case, truncated_mapping(case, stop_after), **kwargs)


def torch_func_vmap_step(
    case: Case, student: nn.Module, stacked: list[dict[str, torch.Tensor]]
) -> tuple[Callable[[], None], Callable[[], dict[str, torch.Tensor]]]:
    """The vmap step over stacked students written with ``torch.func`` alone: the floor of vmap itself.

    ``vmap(grad(loss), in_dims=(0, 0, None, None))``, as funcdistill's vmap
    step, on ``stacked`` (``[parameters, buffers]`` of
    :func:`torch.func.stack_module_state`, by the student's names), with the
    same loss: :func:`torch.func.functional_call` runs ``student``'s
    ``forward_features`` (:class:`~benchmarks.models.Features`), the teacher
    runs once under ``no_grad``, unbatched, inside the vmapped function, and
    the buffers are cloned before the forward updates them (BatchNorm
    statistics, threaded from step to step).

    Returns the step, and a function that runs it once more on the current
    state without keeping its buffers, returning the stacked gradients and
    buffers by the student's names.
    """
    t, x, y = case.teacher, case.x, case.y
    model = Features(student)

    def loss(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            tf = t.forward_features(x)
        buffers = {n: v.clone() for n, v in buffers.items()}  # the forward updates them in place
        sf = torch.func.functional_call(model, {**params, **buffers}, (x,))
        return step_loss(case.pairs(tf, sf), sf[""], y), buffers

    vgrad = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(0, 0, None, None))
    state = [{f"model.{n}": v for n, v in part.items()} for part in stacked]

    def step() -> None:
        _, new = vgrad(state[0], state[1], x, y)
        state[1] = {**state[1], **new}

    def run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        grads, new = vgrad(state[0], state[1], x, y)
        return _unprefixed(grads), _unprefixed(new)

    return step, run


def _unprefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n.removeprefix("model."): v for n, v in tensors.items()}
