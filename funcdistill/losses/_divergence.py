r"""Token-level divergences for language models: generalized JSD, skew KL, top-k KL.

Conventions shared by the three (and by the fused losses of
:mod:`funcdistill.losses._fused`):

* logits of any leading shape ``(..., V)``: every position of the leading
  shape is a token, and the divergence sums over the vocabulary ``V``;
* ``mask`` (bool, leading shape, ``True`` = the token counts) and/or
  ``labels`` with ``ignore_index``; ``reduction="mean"`` is the sum over the
  vocabulary averaged over the counted tokens, and no token at all gives 0
  with a zero gradient (see :mod:`funcdistill.losses._tokens`);
* teacher and student may have different dtypes (a bfloat16 teacher, a
  float32 student): the loss is computed in and returned as the wider one;
* ``temperature`` ``T`` divides both models' logits before the softmax, and
  the loss is **not** multiplied by :math:`T^2` (as in TRL's GKD trainer);
  multiply by ``T ** 2`` yourself for Hinton's gradient scale, which is what
  :func:`~funcdistill.losses.kd_loss` does;
* teacher and student vocabularies of different sizes raise, and
  ``vocab_size=V`` compares the first ``V`` classes of both (the softmax is
  then taken over those ``V`` classes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import (
    check_fraction,
    check_integer,
    check_positive,
    check_reduction,
    check_tensors,
    kl_terms,
)
from funcdistill.losses._module import TokenLossModule, check_temperature, reduction_in
from funcdistill.losses._tokens import (
    IGNORE_INDEX,
    TOKEN_REDUCTIONS,
    check_leading,
    check_vocab,
    compute_dtype,
    counted_tokens,
    reduce_tokens,
)

__all__ = ["GeneralizedJSDLoss", "SkewKLLoss", "generalized_jsd_loss", "skew_kl_loss", "topk_kl_loss"]

Number = float | torch.Tensor


# ---------------------------------------------------------------- per-token terms (shared with the fused losses)


def log_probs(logits: torch.Tensor, temperature: Number) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dimension (no division when ``T`` is the number 1)."""
    if not isinstance(temperature, torch.Tensor) and temperature == 1:
        return F.log_softmax(logits, dim=-1)
    return F.log_softmax(logits / temperature, dim=-1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row (summed over the last dimension)."""
    return kl_terms(log_p, log_q).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight: Number) -> torch.Tensor:
    """``log(weight * a + (1 - weight) * b)`` from log-probabilities, stably.

    A weight of exactly 0 or 1 (a number) returns one side. Log-probabilities
    of ``-inf`` are clamped to the dtype's lowest value first, so a class that
    both sides give probability 0 has a finite gradient (0) rather than ``nan``.
    Two dtypes are brought to the wider one first (its lowest value does not
    fit the narrower).
    """
    if not isinstance(weight, torch.Tensor):
        if weight == 0:
            return log_b
        if weight == 1:
            return log_a
    dtype = compute_dtype(log_a, log_b)
    log_a, log_b = log_a.to(dtype), log_b.to(dtype)
    low = torch.finfo(dtype).min
    log_w = torch.log(weight) if isinstance(weight, torch.Tensor) else math.log(weight)
    log_1mw = torch.log1p(-weight) if isinstance(weight, torch.Tensor) else math.log1p(-weight)
    return torch.logaddexp(log_a.clamp_min(low) + log_w, log_b.clamp_min(low) + log_1mw)


def jsd_rows(log_t: torch.Tensor, log_s: torch.Tensor, beta: Number) -> torch.Tensor:
    """Generalized JSD per row; ``beta`` 0 / 1 are the forward / reverse KL (a tensor beta: a ``where``)."""
    if not isinstance(beta, torch.Tensor):
        if beta == 0:
            return kl_rows(log_t, log_s)
        if beta == 1:
            return kl_rows(log_s, log_t)
    log_m = log_mixture(log_t, log_s, beta)
    mixed = beta * kl_rows(log_t, log_m) + (1 - beta) * kl_rows(log_s, log_m)
    if not isinstance(beta, torch.Tensor):
        return mixed
    return torch.where(beta == 0, kl_rows(log_t, log_s), torch.where(beta == 1, kl_rows(log_s, log_t), mixed))


def skew_rows(log_t: torch.Tensor, log_s: torch.Tensor, alpha: Number, reverse: bool) -> torch.Tensor:
    """Skew KL per row: ``KL(p_T || a p_T + (1-a) p_S)``, or reversed ``KL(p_S || (1-a) p_T + a p_S)``."""
    if reverse:
        return kl_rows(log_s, log_mixture(log_t, log_s, 1 - alpha))
    return kl_rows(log_t, log_mixture(log_t, log_s, alpha))


def topk_rows(
    topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, log_s: torch.Tensor, renormalize: bool
) -> torch.Tensor:
    """Forward KL on the teacher's top-k support per row (a ``-inf`` log-probability is an unused slot).

    Computed in ``log_s``'s dtype; the indices may have any integer dtype (``gather`` needs int64).
    """
    topk_logprobs = topk_logprobs.to(log_s.dtype)
    if renormalize:
        topk_logprobs = topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    return kl_rows(topk_logprobs, log_s.gather(-1, topk_indices.long()))


# ---------------------------------------------------------------- argument checks


def pair_log_probs(
    loss: str, teacher_logits: Any, student_logits: Any, temperature: Any, vocab_size: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two logits tensors and return their log-probabilities at ``temperature``, in the wider dtype."""
    check_tensors(loss, teacher_logits=teacher_logits, student_logits=student_logits)
    check_leading(loss, teacher_logits, student_logits, "logits")
    classes = check_vocab(loss, teacher_logits.shape[-1], student_logits.shape[-1], vocab_size)
    check_positive(loss, "temperature", temperature, allow_tensor=True)
    dtype = compute_dtype(teacher_logits, student_logits)
    teacher_logits, student_logits = (x[..., :classes].to(dtype) for x in (teacher_logits, student_logits))
    return log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)


def check_topk(loss: str, topk_logprobs: Any, topk_indices: Any, leading: torch.Size, classes: int) -> None:
    """The teacher's stored top-k: same shape ``(*leading, k)`` with ``k <= classes``, integer indices (of any
    integer dtype: a cache stores them as int16 or uint16), floating log-probabilities."""
    check_tensors(loss, teacher_topk_logprobs=topk_logprobs, teacher_topk_indices=topk_indices)
    check_integer(loss, "teacher_topk_indices", topk_indices, "class indices")
    if not topk_logprobs.dtype.is_floating_point:
        raise TypeError(f"{loss}: teacher_topk_logprobs must be floating point, got {topk_logprobs.dtype}.")
    if topk_logprobs.shape != topk_indices.shape:
        raise ValueError(
            f"{loss}: teacher_topk_logprobs and teacher_topk_indices shapes differ: "
            f"{tuple(topk_logprobs.shape)} vs {tuple(topk_indices.shape)}."
        )
    if topk_logprobs.dim() == 0 or topk_logprobs.shape[:-1] != leading:
        raise ValueError(
            f"{loss}: the teacher's top-k has shape {tuple(topk_logprobs.shape)} but the student has "
            f"{tuple(leading)} tokens; give it shape {(*leading, 'k')}."
        )
    if topk_logprobs.shape[-1] > classes:
        raise ValueError(
            f"{loss}: teacher_topk_logprobs has {topk_logprobs.shape[-1]} entries per token but the student has "
            f"{classes} classes; a top-k names each class at most once, so k <= {classes} (keep the first "
            f"{classes} entries, or check that the student's vocabulary is the teacher's)."
        )


# ---------------------------------------------------------------- the losses


def generalized_jsd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    beta: Number = 0.5,
    temperature: Number = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024).

    "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", ICLR 2024, arXiv:2306.13649, as TRL's ``GKDTrainer`` computes
    it. With :math:`p_T, p_S` the softmaxes of ``logits / T`` and
    :math:`m = \beta p_T + (1-\beta) p_S`, per token

    .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_T \| m) + (1-\beta)\,\mathrm{KL}(p_S \| m).

    The formula vanishes at both ends, so, as in TRL, ``beta=0`` is defined as
    the forward KL :math:`\mathrm{KL}(p_T \| p_S)` and ``beta=1`` as the
    reverse KL :math:`\mathrm{KL}(p_S \| p_T)` (the directions the divergence
    leans towards as ``beta`` approaches them). ``beta=0.5`` is the
    Jensen-Shannon divergence. No :math:`T^2` factor is applied.

    Args:
        teacher_logits: the teacher's logits, ``(..., V)``; every leading position is a token.
        student_logits: the student's logits, same leading shape.
        beta: mixture weight in [0, 1], a number or a 0-d tensor (a tensor
            computes all three cases and picks one with ``torch.where``).
        temperature: ``T > 0``, dividing both logits; a number or a 0-d tensor.
        mask: bool tensor of the leading shape, ``True`` where the token counts.
        labels: token ids of the leading shape; tokens equal to ``ignore_index`` do not count.
        ignore_index: the label of tokens that do not count (default ``-100``).
        vocab_size: compare only the first ``vocab_size`` classes (for a padded
            vocabulary); by default vocabularies of different sizes raise.
        reduction: ``"mean"`` (sum over the vocabulary, mean over counted
            tokens), ``"sum"`` or ``"none"`` (one value per token, 0 where not counted).
            No counted token gives 0 (and a zero gradient) for each.

    Returns:
        The loss, in the wider of the two logits' dtypes (computed in it).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes do not fit, or a value is out of range.

    Example:
        >>> import torch
        >>> t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.zeros(1, 3)
        >>> abs(float(generalized_jsd_loss(t, t))) < 1e-6
        True
        >>> from funcdistill.losses import kd_loss
        >>> torch.allclose(generalized_jsd_loss(t, s, beta=0.0), kd_loss(t, s))
        True
    """
    name = "generalized_jsd_loss"
    check_reduction(name, reduction, TOKEN_REDUCTIONS)
    log_t, log_s = pair_log_probs(name, teacher_logits, student_logits, temperature, vocab_size)
    check_fraction(name, "beta", beta)
    counted = counted_tokens(name, log_t.shape[:-1], mask, labels, ignore_index)
    return reduce_tokens(jsd_rows(log_t, log_s, beta), counted, reduction)


def skew_kl_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    alpha: Number = 0.1,
    reverse: bool = False,
    temperature: Number = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Skew KL divergence of DistiLLM (Ko et al., 2024).

    "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    ICML 2024, arXiv:2402.03898. Per token, with :math:`p_T, p_S` the softmaxes
    of ``logits / T``:

    * skew KL (default): :math:`\mathrm{KL}(p_T \,\|\, \alpha p_T + (1-\alpha) p_S)`;
    * skew reverse KL (``reverse=True``): :math:`\mathrm{KL}(p_S \,\|\, (1-\alpha) p_T + \alpha p_S)`.

    ``alpha=0`` gives the forward (or reverse) KL; mixing in a little of the
    other distribution keeps the divergence and its gradient bounded where the
    student gives a class almost no probability. No :math:`T^2` factor.

    Args:
        teacher_logits: the teacher's logits, ``(..., V)``.
        student_logits: the student's logits, same leading shape.
        alpha: skew in [0, 1] (the paper uses 0.1), a number or a 0-d tensor.
        reverse: the skew reverse KL instead of the skew KL.
        temperature: ``T > 0``, dividing both logits.
        mask: bool tensor of the leading shape, ``True`` where the token counts.
        labels: token ids; tokens equal to ``ignore_index`` do not count.
        ignore_index: the label of tokens that do not count (default ``-100``).
        vocab_size: compare only the first ``vocab_size`` classes.
        reduction: ``"mean"`` (over counted tokens; 0 when none counts), ``"sum"`` or ``"none"``.

    Returns:
        The loss, in the wider of the two inputs' dtypes (computed in it).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes do not fit, or a value is out of range.

    Example:
        >>> import torch
        >>> t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.zeros(1, 3)
        >>> float(skew_kl_loss(t, s, alpha=1.0))
        0.0
        >>> float(skew_kl_loss(t, s)) < float(generalized_jsd_loss(t, s, beta=0.0))
        True
    """
    name = "skew_kl_loss"
    check_reduction(name, reduction, TOKEN_REDUCTIONS)
    log_t, log_s = pair_log_probs(name, teacher_logits, student_logits, temperature, vocab_size)
    check_fraction(name, "alpha", alpha)
    if not isinstance(reverse, bool):
        raise TypeError(f"{name}: reverse must be True or False, got {type(reverse).__name__}.")
    counted = counted_tokens(name, log_t.shape[:-1], mask, labels, ignore_index)
    return reduce_tokens(skew_rows(log_t, log_s, alpha, reverse), counted, reduction)


def topk_kl_loss(
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    renormalize: bool = False,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Forward KL on the teacher's top-k classes, for stored (offline) teacher outputs.

    Distilling from stored logits keeps only the teacher's ``k`` most likely
    classes per token (their log-probabilities under the full softmax, and
    their indices), as DistillKit and Axolotl store them. The loss is the
    forward KL restricted to that support,

    .. math:: \sum_{i \in \mathrm{top}k} p_{T,i} \,(\log p_{T,i} - \log p_{S,i}),

    where :math:`\log p_S` comes from the student's *full* softmax. With
    ``k = V`` it is the full forward KL. ``renormalize=True`` rescales the
    teacher's ``k`` probabilities to sum to 1 first (the stored mass outside
    the top-k is then spread over it). A ``-inf`` log-probability marks an
    unused slot and contributes 0. There is no temperature: the teacher's full
    distribution is not stored, so store its log-probabilities at the
    temperature you distil at.

    Indices must be in ``[0, V)`` and distinct within a token; ``k > V`` raises,
    while an index out of range raises (CPU) or gives an undefined result (GPU),
    and a class repeated within ``k <= V`` entries counts twice, since those can
    only be checked by reading the data. The indices may have any integer dtype
    (a teacher cache stores int16 or uint16); they are converted to int64 for
    indexing. The loss is computed in the wider of the two inputs' dtypes.

    Args:
        teacher_topk_logprobs: the teacher's log-probabilities, ``(..., k)``.
        teacher_topk_indices: their class indices, ``(..., k)``, ``k <= V``, of any integer dtype.
        student_logits: the student's logits, ``(..., V)``, same leading shape.
        renormalize: renormalize the teacher's ``k`` probabilities to sum to 1.
        mask: bool tensor of the leading shape, ``True`` where the token counts.
        labels: token ids; tokens equal to ``ignore_index`` do not count.
        ignore_index: the label of tokens that do not count (default ``-100``).
        reduction: ``"mean"`` (over counted tokens; 0 when none counts), ``"sum"`` or ``"none"``.

    Returns:
        The loss, in the wider of the two inputs' dtypes (computed in it).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes do not fit, or ``k > V``.

    Example:
        >>> import torch
        >>> t, s = torch.tensor([[2.0, 0.0, -1.0]]), torch.zeros(1, 3)
        >>> logprobs, indices = t.log_softmax(-1).topk(3)
        >>> from funcdistill.losses import kd_loss
        >>> torch.allclose(topk_kl_loss(logprobs, indices, s), kd_loss(t, s))
        True
    """
    name = "topk_kl_loss"
    check_reduction(name, reduction, TOKEN_REDUCTIONS)
    check_tensors(name, student_logits=student_logits)
    if student_logits.dim() == 0:
        raise ValueError(f"{name}: student_logits must have a last (vocabulary) dimension, got a 0-d tensor.")
    leading = student_logits.shape[:-1]
    check_topk(name, teacher_topk_logprobs, teacher_topk_indices, leading, student_logits.shape[-1])
    if not isinstance(renormalize, bool):
        raise TypeError(f"{name}: renormalize must be True or False, got {type(renormalize).__name__}.")
    counted = counted_tokens(name, leading, mask, labels, ignore_index)
    log_s = log_probs(student_logits.to(compute_dtype(teacher_topk_logprobs, student_logits)), 1)
    per_token = topk_rows(teacher_topk_logprobs, teacher_topk_indices, log_s, renormalize)
    return reduce_tokens(per_token, counted, reduction)


# ---------------------------------------------------------------- module forms


class GeneralizedJSDLoss(TokenLossModule):
    """:func:`generalized_jsd_loss` as a module; call it as ``loss(teacher_logits, student_logits, mask=...)``.

    Args:
        beta: mixture weight in [0, 1] (0: forward KL, 1: reverse KL).
        temperature: ``T > 0``, dividing both logits.
        vocab_size: compare only the first ``vocab_size`` classes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = GeneralizedJSDLoss(beta=0.5)
        >>> abs(float(loss(torch.ones(2, 4, 5), torch.ones(2, 4, 5)))) < 1e-6
        True
    """

    beta: Number
    temperature: Number
    vocab_size: int | None
    reduction: str
    _function = staticmethod(generalized_jsd_loss)
    _checks = (
        ("beta", check_fraction),
        ("temperature", check_temperature),
        ("reduction", reduction_in(TOKEN_REDUCTIONS)),
    )

    def __init__(
        self,
        beta: Number = 0.5,
        temperature: Number = 1.0,
        *,
        vocab_size: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__(beta=beta, temperature=temperature, vocab_size=vocab_size, reduction=reduction)


class SkewKLLoss(TokenLossModule):
    """:func:`skew_kl_loss` as a module; call it as ``loss(teacher_logits, student_logits, mask=...)``.

    Args:
        alpha: skew in [0, 1].
        reverse: the skew reverse KL.
        temperature: ``T > 0``, dividing both logits.
        vocab_size: compare only the first ``vocab_size`` classes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = SkewKLLoss(alpha=0.1, reverse=True)
        >>> float(loss(torch.ones(3, 5), torch.ones(3, 5)))
        0.0
    """

    alpha: Number
    reverse: bool
    temperature: Number
    vocab_size: int | None
    reduction: str
    _function = staticmethod(skew_kl_loss)
    _checks = (
        ("alpha", check_fraction),
        ("temperature", check_temperature),
        ("reduction", reduction_in(TOKEN_REDUCTIONS)),
    )

    def __init__(
        self,
        alpha: Number = 0.1,
        reverse: bool = False,
        temperature: Number = 1.0,
        *,
        vocab_size: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__(
            alpha=alpha, reverse=reverse, temperature=temperature, vocab_size=vocab_size, reduction=reduction
        )
