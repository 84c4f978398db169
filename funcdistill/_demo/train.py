"""Functional training for the demo: digits data, two MLPs, Adam on dicts, one pure loss.

Every model here is trained through explicit state dicts and pure functions:
:func:`funcdistill.state` gives the starting weights, :func:`funcdistill.distill`
gives the teacher/student logits, :func:`torch.func.grad_and_value` gives the
gradients, and :func:`adam_update` returns new dicts. Nothing is mutated, so
the same loss trains one student, or K students stacked with
:func:`torch.func.stack_module_state` in one :func:`torch.func.vmap`-ed step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import funcdistill
from funcdistill.losses import kd_loss

__all__: list[str] = []

Params = dict[str, torch.Tensor]
EpochCallback = Callable[[int, list[float]], None]

IMAGE_PIXELS = 64  # 8x8 images
CLASSES = 10
TEACHER_HIDDEN = (256, 256)
STUDENT_HIDDEN = (112,)  # about ten times fewer parameters than the teacher
TEACHER_LR = 1e-3
TEST_FRACTION = 0.3


# ---------------------------------------------------------------- data


class Digits(NamedTuple):
    """scikit-learn's 8x8 handwritten digits, split for the demo.

    The teacher trains on the whole training split; the students get only
    ``labelled_*``, a few labelled images per class drawn from it.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    labelled_x: torch.Tensor
    labelled_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(*, seed: int, labels_per_class: int) -> Digits:
    """Load the digits bundled with scikit-learn (no download) and split them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)  # pixel values are 0..16
    y = torch.tensor(labels, dtype=torch.long)
    train, test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    train_x, train_y = x[train], y[train]
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    picked = torch.cat([order[train_y[order] == c][:labels_per_class] for c in range(CLASSES)])
    return Digits(train_x, train_y, train_x[picked], train_y[picked], x[test], y[test])


# ---------------------------------------------------------------- models


def mlp(hidden: Sequence[int], *, seed: int) -> nn.Sequential:
    """A ReLU MLP from 64 pixels to 10 logits, initialised from ``seed`` (global RNG untouched)."""
    sizes = [IMAGE_PIXELS, *hidden, CLASSES]
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters())


def initial_params(model: nn.Module) -> Params:
    """A detached copy of the model's starting weights, as a state dict."""
    return {k: v.detach().clone() for k, v in funcdistill.state(model).items()}


# ---------------------------------------------------------------- optimiser
#
# Why a hand-written Adam on dicts rather than torch.optim: the weights live in
# plain dicts that flow through pure functions, and grad_and_value returns the
# gradients as dicts too. A pure update (old dicts in, new dicts out) needs no
# Parameter objects, no .grad fields and no zero_grad, and because Adam is
# elementwise the very same function updates one student or a stack of K
# students from stack_module_state, one slice per student.


class AdamState(NamedTuple):
    """Adam's step count and moment estimates, one tensor per parameter."""

    step: int
    mean: Params
    square: Params


def adam_init(params: Params) -> AdamState:
    """Zero moments for ``params``."""
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    return AdamState(0, zeros, dict(zeros))


def adam_update(
    params: Params,
    grads: Params,
    opt: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, AdamState]:
    """One Adam step (Kingma & Ba 2015); returns new params and optimiser state."""
    b1, b2 = betas
    step = opt.step + 1
    mean = {k: b1 * opt.mean[k] + (1 - b1) * g for k, g in grads.items()}
    square = {k: b2 * opt.square[k] + (1 - b2) * g.square() for k, g in grads.items()}
    c1, c2 = 1 - b1**step, 1 - b2**step
    new = {k: p - lr * (mean[k] / c1) / ((square[k] / c2).sqrt() + eps) for k, p in params.items()}
    return new, AdamState(step, mean, square)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``n`` examples."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions along the last-but-one dimension."""
    return (logits.argmax(-1) == y).float().mean(-1)


# ---------------------------------------------------------------- teacher


def train_teacher(
    teacher: nn.Module, data: Digits, *, epochs: int, batch_size: int, seed: int, on_epoch: EpochCallback
) -> Params:
    """Train the teacher on the whole training split with cross-entropy; return its weights."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(teacher, params, (x,)), y)

    step = grad_and_value(loss)
    params = initial_params(teacher)
    opt = adam_init(params)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in batches(len(data.train_y), batch_size, order):
            grads, _ = step(params, data.train_x[idx], data.train_y[idx])
            params, opt = adam_update(params, grads, opt, lr=TEACHER_LR)
        with torch.no_grad():
            acc = accuracy(functional_call(teacher, params, (data.test_x,)), data.test_y)
        on_epoch(epoch, [float(acc)])
    return params


# ---------------------------------------------------------------- students


def student_loss(fn: funcdistill.DistillFn) -> Callable[..., torch.Tensor]:
    """The one pure loss every student is trained with.

    ``loss(student_params, teacher_state, x, y, temperature, kd_weight)`` is
    ``(1 - kd_weight) * cross_entropy + kd_weight * kd_loss``. With
    ``kd_weight = 0`` the teacher's logits are computed but contribute no
    gradient: that is the student trained alone, by the same code.
    """

    def loss(
        student_params: Params,
        teacher_state: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        temperature: torch.Tensor | float,
        kd_weight: torch.Tensor | float,
    ) -> torch.Tensor:
        ((teacher_logits, student_logits, _),) = fn(teacher_state, student_params, x)
        hard = F.cross_entropy(student_logits, y)
        soft = kd_loss(teacher_logits, student_logits, temperature=temperature, reduction="batchmean")
        return (1 - kd_weight) * hard + kd_weight * soft

    return loss


def sweep_step(fn: funcdistill.DistillFn) -> Callable[..., tuple[Params, torch.Tensor]]:
    """Gradients and losses of K stacked students in one vmapped call.

    ``step(stacked_params, teacher_state, x, y, temperatures, kd_weights)``:
    the student weights, temperatures and KD weights carry a leading dimension
    of size K; the teacher state and the batch do not (``in_dims=None``), so
    vmap runs the teacher once per step, not K times.
    """
    return vmap(grad_and_value(student_loss(fn)), in_dims=(0, None, None, None, 0, 0))


def build_cache(
    teacher: nn.Module, student: nn.Module, teacher_params: Params, data: Digits, folder: str, *, batch_size: int
) -> funcdistill.TeacherCache:
    """Store the teacher's logits on the labelled images once (offline distillation)."""
    fn = funcdistill.distill(teacher.eval(), student)
    return funcdistill.TeacherCache.build(
        fn, teacher_params, data.labelled_x, folder, batch_size=batch_size, progress=False
    )


def train_students(
    teacher: nn.Module,
    student: nn.Module,
    teacher_params: Params,
    data: Digits,
    *,
    temperatures: Sequence[float],
    kd_weights: Sequence[float],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    vectorize: bool,
    on_epoch: EpochCallback,
    cache: funcdistill.TeacherCache | None = None,
) -> list[Params]:
    """Train K students from the same initial weights on the same batches.

    Student ``i`` uses ``temperatures[i]`` and ``kd_weights[i]``. With
    ``vectorize=False`` each student takes its own plain step on every batch;
    with ``vectorize=True`` all of them take one vmapped step
    (:func:`sweep_step`) over weights stacked by
    :func:`torch.func.stack_module_state`. With a ``cache`` of the teacher's
    logits on the labelled images (:func:`build_cache`), each step reads them,
    ``cache[idx]``, in place of the teacher state, and the teacher does not
    run. Returns each student's final weights.
    """
    fn = funcdistill.distill(teacher, student)
    k = len(temperatures)
    x, y = data.labelled_x, data.labelled_y
    order = torch.Generator().manual_seed(seed + 1)
    if vectorize:
        stacked, _ = stack_module_state([student] * k)  # the MLP has no buffers
        params = {name: t.detach() for name, t in stacked.items()}
        opt = adam_init(params)
        step = sweep_step(fn)
        temps = torch.tensor(temperatures, dtype=torch.float32)
        weights = torch.tensor(kd_weights, dtype=torch.float32)
        evaluate = vmap(lambda p: functional_call(student, p, (data.test_x,)))
        for epoch in range(epochs):
            for idx in batches(len(y), batch_size, order):
                teacher_in = teacher_params if cache is None else cache[idx]
                grads, _ = step(params, teacher_in, x[idx], y[idx], temps, weights)
                params, opt = adam_update(params, grads, opt, lr=lr)
            with torch.no_grad():
                on_epoch(epoch, accuracy(evaluate(params), data.test_y).tolist())
        return [{name: t[i] for name, t in params.items()} for i in range(k)]

    plain_step = grad_and_value(student_loss(fn))
    start = initial_params(student)
    members = [(start, adam_init(start)) for _ in range(k)]
    for epoch in range(epochs):
        for idx in batches(len(y), batch_size, order):
            teacher_in = teacher_params if cache is None else cache[idx]
            for i, (p, o) in enumerate(members):
                grads, _ = plain_step(p, teacher_in, x[idx], y[idx], temperatures[i], kd_weights[i])
                members[i] = adam_update(p, grads, o, lr=lr)
        with torch.no_grad():
            logits = [functional_call(student, p, (data.test_x,)) for p, _ in members]
        on_epoch(epoch, [float(accuracy(z, data.test_y)) for z in logits])
    return [p for p, _ in members]
