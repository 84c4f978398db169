"""Contrastive representation distillation (CRD), with its memory banks as explicit state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from funcdistill.losses._checks import (
    REDUCTIONS,
    check_fraction,
    check_integer,
    check_positive,
    check_reduction,
    check_tensors,
    reduce,
)
from funcdistill.losses._module import LossModule, check_module, check_temperature, reduction_in

__all__ = ["CRDLoss", "CRDState", "crd_head", "crd_init", "crd_loss", "crd_negatives"]


class CRDState(NamedTuple):
    """The memory banks of :func:`crd_loss`: pass one in, get the next one back.

    A pytree (a named tuple of tensors), so it threads through
    :func:`torch.func.grad` (``has_aux=True``), ``torch.compile`` and
    checkpoints like any other state. Build one with :func:`crd_init`.

    Attributes:
        student_memory: ``(num_samples, D)``, one row per training sample: the
            momentum average of the student's embeddings of that sample; the
            teacher's embeddings are contrasted with these rows.
        teacher_memory: ``(num_samples, D)``, the same for the teacher's
            embeddings; the student's embeddings are contrasted with these rows.
        student_log_z: 0-d, the logarithm of the normalising constant ``Z`` of
            the student's scores; ``-inf`` (``Z = 0``) until the first call
            estimates it, then fixed. (Kept as a logarithm: ``Z`` itself
            overflows float32 at small temperatures.)
        teacher_log_z: 0-d, the same for the teacher's scores.
    """

    student_memory: torch.Tensor
    teacher_memory: torch.Tensor
    student_log_z: torch.Tensor
    teacher_log_z: torch.Tensor


def crd_init(
    num_samples: int,
    embed_dim: int = 128,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CRDState:
    """The initial :class:`CRDState` for a training set of ``num_samples`` samples.

    As in the authors' code, both memory banks start uniform in
    ``[-a, a]`` with ``a = 1 / sqrt(embed_dim / 3)`` (rows of expected norm 1),
    and the normalising constants are not yet estimated (``log Z = -inf``).

    Args:
        num_samples: the size of the training set (each sample has a row).
        embed_dim: the width ``D`` of the embeddings (the heads' output; the
            paper uses 128).
        generator: the random generator of the initial banks (``None``: the
            global one).
        dtype: floating dtype of the state (default: torch's default dtype).
        device: device of the state.

    Raises:
        TypeError: a size is not an int.
        ValueError: a size is not positive (``num_samples`` must be at least 2).

    Example:
        >>> state = crd_init(1000, 16, generator=torch.Generator().manual_seed(0))
        >>> state.student_memory.shape, float(state.student_log_z)
        (torch.Size([1000, 16]), -inf)
    """
    _check_size("crd_init", "num_samples", num_samples, minimum=2)
    _check_size("crd_init", "embed_dim", embed_dim, minimum=1)
    bound = 1.0 / math.sqrt(embed_dim / 3)

    def bank() -> torch.Tensor:
        uniform = torch.rand(num_samples, embed_dim, generator=generator, dtype=dtype, device=device)
        return uniform * (2 * bound) - bound

    unset = torch.full((), float("-inf"), dtype=dtype, device=device)
    return CRDState(bank(), bank(), unset, unset.clone())


def crd_negatives(
    index: torch.Tensor, num_samples: int, num_negatives: int, *, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw negatives for :func:`crd_loss`: ``num_negatives`` per sample, uniform over the others.

    Each row holds indices of the training set drawn uniformly with
    replacement among all samples except the row's own (the authors' code
    draws from all samples, its own included). The generator is explicit, so
    the draw is reproducible: the same generator state gives the same
    negatives. (The authors' code for CIFAR-100 can also restrict negatives to
    other classes; build such indices yourself and pass them to the loss.)

    Args:
        index: the batch's dataset indices, ``(N,)``.
        num_samples: the size of the training set.
        num_negatives: negatives per sample, ``K`` (the paper uses 16384).
        generator: the random generator (``None`` explicitly selects the global one).

    Raises:
        TypeError: ``index`` is not an integer tensor or a size is not an int.
        ValueError: ``index`` is not 1-d or a size is out of range.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> negatives = crd_negatives(torch.tensor([0, 5]), 10, 4, generator=g)
        >>> negatives.shape, bool((negatives != torch.tensor([[0], [5]])).all())
        (torch.Size([2, 4]), True)
    """
    name = "crd_negatives"
    _check_index(name, "index", index, ndim=1)
    _check_size(name, "num_samples", num_samples, minimum=2)
    _check_size(name, "num_negatives", num_negatives, minimum=1)
    shape = (index.shape[0], num_negatives)
    draw = torch.randint(0, num_samples - 1, shape, generator=generator, device=index.device)
    # skip the positive: values at or above it move up by one
    return draw + (draw >= index.unsqueeze(1)).long()


def crd_loss(
    teacher_embed: torch.Tensor,
    student_embed: torch.Tensor,
    state: CRDState,
    index: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.07,
    momentum: float | torch.Tensor = 0.5,
    eps: float = 1e-7,
    reduction: str = "mean",
) -> tuple[torch.Tensor, CRDState]:
    r"""Contrastive representation distillation of Tian, Krishnan & Isola (2020).

    "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    The embeddings of the same sample by teacher and student are a positive
    pair, those of different samples negative pairs, and a noise-contrastive
    (NCE) loss teaches a critic to tell them apart, which maximises a lower
    bound on the mutual information of the two representations. As in the
    paper, the negatives come from memory banks of past embeddings (one row per
    training sample), so ``K`` can be much larger than the batch.

    Per sample ``i`` with positive index ``index[i]`` and ``K`` negative
    indices, on unit embeddings ``s_i``, ``t_i`` and memory rows ``m``: the
    scores :math:`P = \exp(m^\top s_i / \tau) / Z` (student against the
    teacher bank; symmetrically teacher against the student bank) and the NCE
    loss :math:`-\log \frac{P_0}{P_0 + K/M + \epsilon} - \sum_{k=1}^{K}
    \log \frac{K/M}{P_k + K/M + \epsilon}`, ``M`` the number of training
    samples; the loss of ``i`` is the sum of the student's and the teacher's.

    **Functional state.** The memory banks are not hidden buffers: ``state``
    goes in and the updated state comes back, ``(loss, new_state)``. The update
    is the paper's momentum rule at the batch's indices, nothing else changes:
    ``row = normalise(momentum * row + (1 - momentum) * embedding)``, from the
    detached embeddings. ``Z`` is estimated once, at the first call (while the
    state's ``log Z`` is ``-inf``), as the mean of :math:`\exp(\cdot / \tau)` over the
    batch's scores times ``M``, and then kept, as in the authors' code.
    Indices within a batch should be distinct (the training set's indices of
    the batch's samples); with repeats, which update wins is undefined.

    Conventions: the loss normalises the embeddings itself, so the heads are
    plain linear layers (:func:`crd_head`); this is the authors' ``Embed``
    (linear, then L2 norm) with a guard against zero vectors. Given the same
    indices (their ``contrast_idx`` is ``[index, negatives]``), the loss and the
    updated banks equal torchdistill's ``CRDLoss`` and the authors' code. The
    negatives are explicit (:func:`crd_negatives` draws them), so the loss is a
    pure function of its inputs. The defaults are the paper's
    (``temperature=0.07``, ``momentum=0.5``). ``reduction="mean"`` is the
    authors' (sum over the batch divided by ``N``); ``"none"`` gives one value
    per sample.

    Args:
        teacher_embed: the teacher head's embeddings ``(N, D)``.
        student_embed: the student head's embeddings ``(N, D)``.
        state: the memory banks, a :class:`CRDState` from :func:`crd_init` or
            from the previous call.
        index: dataset indices of the batch's samples ``(N,)``, integers.
        negatives: dataset indices of the negatives ``(N, K)``, integers.
        temperature: :math:`\tau > 0` of the critic, a number or a 0-d tensor.
        momentum: memory momentum in ``[0, 1]``, a number or a 0-d tensor.
        eps: the stabilising constant of the authors' NCE loss.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
        ``(loss, new_state)``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes do not fit each other or the state, or a value is out of range.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> state = crd_init(100, 16, generator=g)
        >>> index = torch.tensor([3, 14, 15, 92])
        >>> negatives = crd_negatives(index, 100, 32, generator=g)
        >>> t, s = torch.randn(4, 16), torch.randn(4, 16)
        >>> loss, state = crd_loss(t, s, state, index, negatives)
        >>> loss.shape, bool(state.student_log_z.isfinite())
        (torch.Size([]), True)
    """
    name = "crd_loss"
    check_reduction(name, reduction)
    _check_inputs(name, teacher_embed, student_embed, state, index, negatives)
    check_positive(name, "temperature", temperature, allow_tensor=True)
    check_fraction(name, "momentum", momentum)
    check_positive(name, "eps", eps)
    index, negatives = index.long(), negatives.long()  # any integer dtype indexes (a cache may store int16)
    t = F.normalize(teacher_embed, dim=1)
    s = F.normalize(student_embed, dim=1)
    contrast = torch.cat([index.unsqueeze(1), negatives], dim=1)
    s_scores = _scores(state.teacher_memory, contrast, s, temperature)
    t_scores = _scores(state.student_memory, contrast, t, temperature)
    num_samples = state.student_memory.shape[0]
    student_log_z = _estimated_log_z(state.student_log_z, s_scores, num_samples)
    teacher_log_z = _estimated_log_z(state.teacher_log_z, t_scores, num_samples)
    noise = math.log(negatives.shape[1] / num_samples)
    per_sample = _nce(s_scores - student_log_z, noise, eps) + _nce(t_scores - teacher_log_z, noise, eps)
    new_state = CRDState(
        _momentum_update(state.student_memory, index, s, momentum),
        _momentum_update(state.teacher_memory, index, t, momentum),
        student_log_z,
        teacher_log_z,
    )
    return reduce(per_sample, reduction), new_state


def _scores(memory: torch.Tensor, contrast: torch.Tensor, embed: torch.Tensor, temperature: Any) -> torch.Tensor:
    """``memory[contrast[i, k]] . embed[i] / temperature``, shape ``(N, K + 1)``; the memory is a constant."""
    rows = memory.detach()[contrast].to(embed.dtype)
    return torch.einsum("nkd,nd->nk", rows, embed) / temperature


def _estimated_log_z(log_z: torch.Tensor, scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log_z`` once set (> -inf); else ``log(mean(exp(scores)) * num_samples)``, a constant."""
    estimate = torch.logsumexp(scores.detach().flatten(), dim=0) + math.log(num_samples / scores.numel())
    return torch.where(log_z > float("-inf"), log_z, estimate.to(log_z.dtype))


def _nce(log_p: torch.Tensor, log_noise: float, eps: float) -> torch.Tensor:
    """The NCE loss per row: column 0 is the positive, the others the negatives; ``log_p`` = log P."""
    # log(P + K/M + eps), without forming exp(log_p) (it may overflow)
    log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, math.log(math.exp(log_noise) + eps)))
    positive = log_p[:, 0] - log_denominator[:, 0]
    negative = (log_noise - log_denominator[:, 1:]).sum(dim=1)
    return -(positive + negative)


def _momentum_update(memory: torch.Tensor, index: torch.Tensor, embed: torch.Tensor, momentum: Any) -> torch.Tensor:
    """A copy of ``memory`` whose rows ``index`` are ``normalise(m * row + (1 - m) * embed)``."""
    mixed = memory[index] * momentum + embed.detach().to(memory.dtype) * (1 - momentum)
    return memory.index_copy(0, index, F.normalize(mixed, dim=1))


def _check_size(loss: str, name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{loss}: {name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{loss}: {name} must be at least {minimum}, got {value}.")


def _check_index(loss: str, name: str, value: Any, *, ndim: int) -> None:
    check_tensors(loss, **{name: value})
    check_integer(loss, name, value, "dataset indices")
    if value.dim() != ndim:
        kind = "(N,), one dataset index per sample" if ndim == 1 else "(N, K), K negative indices per sample"
        raise ValueError(f"{loss}: {name} must have shape {kind}; got shape {tuple(value.shape)}.")


def _check_inputs(
    loss: str, teacher: torch.Tensor, student: torch.Tensor, state: Any, index: torch.Tensor, negatives: torch.Tensor
) -> None:
    check_tensors(loss, teacher_embed=teacher, student_embed=student)
    if not isinstance(state, CRDState):
        raise TypeError(
            f"{loss}: state must be a CRDState (from crd_init(num_samples, embed_dim) or the previous call), "
            f"got {type(state).__name__}."
        )
    if teacher.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(
            f"{loss}: teacher and student embeddings must both be (N, D), of one shape, got "
            f"{tuple(teacher.shape)} and {tuple(student.shape)}; map the features with crd_head(width, D) first."
        )
    for field in ("student_memory", "teacher_memory"):
        memory = getattr(state, field)
        if memory.dim() != 2 or memory.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"{loss}: state.{field} has shape {tuple(memory.shape)} but the embeddings are "
                f"{tuple(teacher.shape)}; build the state with crd_init(num_samples, {teacher.shape[1]})."
            )
    _check_index(loss, "index", index, ndim=1)
    _check_index(loss, "negatives", negatives, ndim=2)
    if index.shape[0] != teacher.shape[0] or negatives.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss}: index {tuple(index.shape)} and negatives {tuple(negatives.shape)} need one row per "
            f"sample of the batch of {teacher.shape[0]}."
        )


def crd_head(in_features: int, embed_dim: int = 128) -> nn.Module:
    """An embedding head of CRD: flatten, then a linear map to ``embed_dim``.

    The paper's :math:`g^T` and :math:`g^S`; one for each side, both trained
    (the teacher's head too, while the teacher is frozen). :func:`crd_loss`
    L2-normalises their output. Give them to :class:`CRDLoss`, whose
    parameters then train with the student (``funcdistill.state(student, mapping)``).

    Args:
        in_features: width of the features (after flattening), e.g. the
            penultimate layer's.
        embed_dim: the embedding width ``D`` (the paper uses 128).

    Raises:
        TypeError: a width is not an int.
        ValueError: a width is not positive.

    Example:
        >>> crd_head(64, 16)
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=64, out_features=16, bias=True)
        )
    """
    _check_size("crd_head", "in_features", in_features, minimum=1)
    _check_size("crd_head", "embed_dim", embed_dim, minimum=1)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, embed_dim))


class CRDLoss(LossModule):
    """:func:`crd_loss` with its two embedding heads, for use as a mapping payload.

    Call it as ``loss, state = crd(teacher_feat, student_feat, state, index,
    negatives)``: it maps the features with the heads and calls
    :func:`crd_loss`. The heads are the payload's parameters, so they appear
    in ``funcdistill.state(student, mapping)`` and train with the student; the
    memory banks stay outside, in the :class:`CRDState` you thread.

    Args:
        teacher_head: maps teacher features to embeddings, e.g. ``crd_head(C_t, 128)``.
        student_head: maps student features to embeddings, e.g. ``crd_head(C_s, 128)``.
        temperature: :math:`\\tau` of the critic.
        momentum: memory momentum.
        eps: the stabilising constant of the NCE loss.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: a head is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> crd = CRDLoss(crd_head(32, 8), crd_head(4, 8))
        >>> state = crd_init(50, 8)
        >>> index = torch.arange(3)
        >>> negatives = crd_negatives(index, 50, 10, generator=torch.Generator().manual_seed(0))
        >>> loss, state = crd(torch.randn(3, 32), torch.randn(3, 4), state, index, negatives)
        >>> loss.shape
        torch.Size([])
    """

    teacher_head: nn.Module
    student_head: nn.Module
    temperature: float | torch.Tensor
    momentum: float | torch.Tensor
    eps: float
    reduction: str
    _function = staticmethod(crd_loss)
    _checks = (
        ("teacher_head", check_module("crd_head(...)")),
        ("student_head", check_module("crd_head(...)")),
        ("temperature", check_temperature),
        ("momentum", check_fraction),
        ("eps", check_positive),
        ("reduction", reduction_in(REDUCTIONS)),
    )
    _parts = ("teacher_head", "student_head")

    def __init__(
        self,
        teacher_head: nn.Module,
        student_head: nn.Module,
        *,
        temperature: float | torch.Tensor = 0.07,
        momentum: float | torch.Tensor = 0.5,
        eps: float = 1e-7,
        reduction: str = "mean",
    ):
        super().__init__(
            teacher_head=teacher_head,
            student_head=student_head,
            temperature=temperature,
            momentum=momentum,
            eps=eps,
            reduction=reduction,
        )

    def forward(
        self,
        teacher_feat: torch.Tensor,
        student_feat: torch.Tensor,
        state: CRDState,
        index: torch.Tensor,
        negatives: torch.Tensor,
    ) -> tuple[torch.Tensor, CRDState]:
        check_tensors(type(self).__name__, teacher_feat=teacher_feat, student_feat=student_feat)
        return super().forward(
            self.teacher_head(teacher_feat), self.student_head(student_feat), state, index, negatives
        )
