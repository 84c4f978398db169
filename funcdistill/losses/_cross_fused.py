r"""The losses across tokenizers from hidden states and heads, chunk by chunk: never ``tokens x V`` for either model.

:func:`fused_linear_uld_loss` and :func:`fused_linear_hybrid_loss` are
:func:`~funcdistill.losses.uld_loss` and :func:`~funcdistill.losses.hybrid_loss`
of ``hidden @ weight.T (+ bias)`` on each side, computed with the chunked
machinery of :mod:`funcdistill.losses._fused`: ``chunk_size`` positions at a
time, each chunk's logits (``chunk x V_T`` and ``chunk x V_S``), softmaxes and
sorts dropped before the next, the student's gradients computed in the forward
pass in closed form. The limits are that module's: first-order gradients only,
the teacher side (hidden states, head, ids, tensor hyper-parameters) a
constant, no ``reduction="none"``.

The closed-form gradient of the sorted distance: with ``d = sorted p_S - sorted p_T``
(rank by rank, zero-padded) and ``order`` the student's sort permutation, the
gradient for the student's probability of class ``order[i]`` is ``sign(d[i])``
(``sign(0) = 0``, as the autograd of ``abs`` gives), and the softmax's chain
rule takes it to the logits. For the hybrid the exact part's gradient (the
generalized JSD's, on the gathered shared columns) is added back at the shared
ids, and the ULD part's is 0 there (those columns are set to 0 before sorting).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import check_positive
from funcdistill.losses._compiled import check_compiled, use_compiled
from funcdistill.losses._cross import check_hybrid_options, check_shared_ids, is_zero, probs, sorted_gap
from funcdistill.losses._fused import (
    _check_head,
    _check_reduction,
    _chunk_tokens,
    _chunked_loss,
    _Chunking,
    _jsd_with_grad,
    _through_softmax,
    _weighted,
    _weights,
)
from funcdistill.losses._tokens import IGNORE_INDEX, check_leading, compute_dtype, counted_tokens

__all__ = ["fused_linear_hybrid_loss", "fused_linear_uld_loss"]

Number = float | torch.Tensor


def _uld_with_grad(p_t: torch.Tensor, p_s: torch.Tensor, need_grad: bool):
    """Per-position ULD and, if asked, its gradient for the student's probabilities ``p_s``."""
    gap, order = sorted_gap(p_t, p_s)
    per_token = gap.abs().sum(-1)
    if not need_grad:
        return per_token, None
    return per_token, torch.zeros_like(p_s).scatter(-1, order, gap[..., : p_s.shape[-1]].sign())


def _settings(fixed: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """The hyper-parameters: each ``None`` in ``fixed`` is the next 0-d tensor passed to the Function."""
    given = iter(tensors)
    return tuple(next(given) if value is None else value for value in fixed)


def _split(*values: Any) -> tuple[tuple[Any, ...], tuple[torch.Tensor, ...]]:
    """Python hyper-parameters (kept in the Function's settings) apart from tensor ones (passed, detached)."""
    fixed = tuple(None if isinstance(v, torch.Tensor) else v for v in values)
    return fixed, tuple(v.detach() for v in values if isinstance(v, torch.Tensor))


def _teacher_logits(rows: tuple, constants: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """The chunk's teacher logits (the head in its dtype, then the loss's) and the remaining constants."""
    (teacher_hidden,) = rows
    teacher_weight, teacher_bias, *rest = constants
    return F.linear(teacher_hidden, teacher_weight, teacher_bias).to(dtype), tuple(rest)


def _uld_parts(fixed: tuple, rows: tuple, constants: tuple, logits: torch.Tensor, weights: torch.Tensor | None):
    teacher_logits, tensors = _teacher_logits(rows, constants, logits.dtype)
    (temperature,) = _settings(fixed, tensors)
    p_t, p_s = probs(teacher_logits, temperature), probs(logits, temperature)
    per_token, grad_p = _uld_with_grad(p_t, p_s, weights is not None)
    if grad_p is None or weights is None:
        return per_token, None
    return per_token, _weighted(_through_softmax(p_s * grad_p, p_s, temperature), weights)


def _hybrid_parts(fixed: tuple, rows: tuple, constants: tuple, logits: torch.Tensor, weights: torch.Tensor | None):
    teacher_logits, (teacher_ids, student_ids, *tensors) = _teacher_logits(rows, constants, logits.dtype)
    exact_weight, uld_weight, beta, temperature = _settings(fixed, tuple(tensors))
    per_token = torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    need_grad = weights is not None
    grad = torch.zeros_like(logits) if need_grad else None
    if not is_zero(exact_weight):
        part, part_grad = _exact_with_grad(teacher_logits, logits, teacher_ids, student_ids, beta, temperature)
        per_token = per_token + exact_weight * part
        grad = None if grad is None else grad + exact_weight * part_grad
    if not is_zero(uld_weight):
        p_t, p_s = probs(teacher_logits, temperature), probs(logits, temperature)
        shared_t = torch.zeros(p_t.shape[-1], dtype=torch.bool, device=p_t.device).index_fill(0, teacher_ids, True)
        shared_s = torch.zeros(p_s.shape[-1], dtype=torch.bool, device=p_s.device).index_fill(0, student_ids, True)
        part, grad_p = _uld_with_grad(p_t.masked_fill(shared_t, 0), p_s.masked_fill(shared_s, 0), need_grad)
        per_token = per_token + uld_weight * part
        if grad is not None:  # the shared columns were set to 0: no gradient through them
            grad = grad + uld_weight * _through_softmax(p_s * grad_p.masked_fill(shared_s, 0), p_s, temperature)
    return per_token, None if grad is None or weights is None else _weighted(grad, weights)


def _exact_with_grad(teacher_logits, logits, teacher_ids, student_ids, beta, temperature):
    """The generalized JSD over the shared columns (each side renormalised) and its gradient for all logits."""
    scale = 1 if not isinstance(temperature, torch.Tensor) and temperature == 1 else temperature
    log_t = F.log_softmax(teacher_logits.index_select(-1, teacher_ids) / scale, dim=-1)
    log_s = F.log_softmax(logits.index_select(-1, student_ids) / scale, dim=-1)
    p_s = log_s.exp()
    per_token, grad_log_s = _jsd_with_grad(log_t, log_s, p_s, beta)
    grad_shared = _through_softmax(grad_log_s, p_s, temperature)
    return per_token, torch.zeros_like(logits).index_add(-1, student_ids, grad_shared)


def _prepare(
    loss, teacher_hidden, student_hidden, teacher_weight, student_weight, teacher_bias, student_bias, temperature
):
    """The checks both fused losses share; returns the loss's dtype."""
    _check_head(loss, "teacher", teacher_hidden, teacher_weight, teacher_bias)
    _check_head(loss, "student", student_hidden, student_weight, student_bias)
    check_leading(loss, teacher_hidden, student_hidden, "hidden states")
    check_positive(loss, "temperature", temperature, allow_tensor=True)
    return compute_dtype(teacher_hidden, student_hidden)


def _run(parts, chunk_size, dtype, counted, reduction, compiled, heads, *constants) -> torch.Tensor:
    """The chunked loss of ``parts`` over the student's head, the teacher's head and ``constants`` fixed."""
    teacher_hidden, student_hidden, teacher_weight, student_weight, teacher_bias, student_bias = heads
    leading = student_hidden.shape[:-1]
    weights = _weights(counted, leading, reduction, dtype, student_hidden.device)
    logits = leading.numel() * max(teacher_weight.shape[0], student_weight.shape[0])
    chunking = _Chunking(parts, chunk_size, 1, student_weight.shape[0], dtype, use_compiled(compiled, logits))
    return _chunked_loss(
        chunking,
        student_hidden,
        student_weight,
        student_bias,
        weights,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        *constants,
    )


def fused_linear_uld_loss(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    temperature: Number = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    compiled: bool | None = None,
) -> torch.Tensor:
    r"""ULD of two linear heads' logits (any two vocabularies), computed ``chunk_size`` positions at a time.

    Equal in value and in gradients (for the student's hidden states, head
    weight and bias) to::

        uld_loss(teacher_hidden @ teacher_weight.T + teacher_bias,
                 student_hidden @ student_weight.T + student_bias, ...)

    while only one chunk of either model's logits exists at a time (see
    :func:`~funcdistill.losses.uld_loss` for the loss, and
    :func:`~funcdistill.losses.fused_linear_jsd_loss` for the chunking and its
    limits: first-order gradients, the teacher side constant, no
    ``reduction="none"``). The heads' vocabularies ``V_T`` and ``V_S`` may differ.
    The hidden states are those at aligned positions (gather them with
    ``funcdistill.align.at_groups`` before the heads, which is what makes the
    chunking pay: the logits are never formed).

    Args:
        teacher_hidden: the teacher's last hidden states at aligned positions, ``(..., H_T)``.
        student_hidden: the student's, ``(..., H_S)``, same leading shape.
        teacher_weight: the teacher's head weight, ``(V_T, H_T)``.
        student_weight: the student's head weight, ``(V_S, H_S)``.
        temperature: ``T > 0``, dividing both logits.
        mask: bool tensor of the leading shape, ``True`` where the position counts.
        labels: token ids; positions equal to ``ignore_index`` do not count.
        ignore_index: the label of positions that do not count (default ``-100``).
        chunk_size: positions per chunk; by default 128, fewer (a power of two) where 128 positions would
            hold over 2**24 logits of the larger vocabulary.
        teacher_bias: the teacher's head bias ``(V_T,)``, if it has one.
        student_bias: the student's head bias ``(V_S,)``, if it has one.
        reduction: ``"mean"`` (over counted positions) or ``"sum"``.
        compiled: compile each chunk's work, as in :func:`~funcdistill.losses.fused_linear_jsd_loss`.

    Raises:
        TypeError: an argument has the wrong type, or one side's head tensors differ in dtype.
        ValueError: shapes do not fit, a value is out of range, or ``reduction="none"``.
        RuntimeError: a second derivative is asked for.

    Example:
        >>> import torch
        >>> from funcdistill.losses import uld_loss
        >>> ht, hs = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
        >>> wt, ws = torch.randn(11, 8), torch.randn(7, 4)  # two vocabularies
        >>> fused = fused_linear_uld_loss(ht, hs, wt, ws, chunk_size=3)
        >>> torch.allclose(fused, uld_loss(ht @ wt.T, hs @ ws.T), atol=1e-6)
        True
    """
    name = "fused_linear_uld_loss"
    reduction = _check_reduction(name, reduction)
    heads = (teacher_hidden, student_hidden, teacher_weight, student_weight, teacher_bias, student_bias)
    dtype = _prepare(name, *heads, temperature)
    chunk_size = _chunk_tokens(name, chunk_size, max(teacher_weight.shape[0], student_weight.shape[0]))
    counted = counted_tokens(name, student_hidden.shape[:-1], mask, labels, ignore_index)
    check_compiled(name, compiled)
    fixed, tensors = _split(temperature)
    parts = functools.partial(_uld_parts, fixed)
    return _run(parts, chunk_size, dtype, counted, reduction, compiled, heads, *tensors)


def fused_linear_hybrid_loss(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    *,
    exact_weight: Number = 1.0,
    uld_weight: Number = 1.0,
    beta: Number = 0.0,
    temperature: Number = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    compiled: bool | None = None,
) -> torch.Tensor:
    r"""The GOLD hybrid of two linear heads' logits, computed ``chunk_size`` positions at a time.

    Equal in value and in the student's gradients to
    ``hybrid_loss(teacher_hidden @ teacher_weight.T + teacher_bias, student_hidden @ student_weight.T +
    student_bias, teacher_ids, student_ids, ...)`` (see
    :func:`~funcdistill.losses.hybrid_loss`), one chunk of logits at a time,
    with the limits of :func:`fused_linear_uld_loss`.

    Args:
        teacher_hidden: the teacher's last hidden states at aligned positions, ``(..., H_T)``.
        student_hidden: the student's, ``(..., H_S)``, same leading shape.
        teacher_weight: the teacher's head weight, ``(V_T, H_T)``.
        student_weight: the student's head weight, ``(V_S, H_S)``.
        teacher_ids: the shared tokens' teacher ids, ``(K,)`` (from ``shared_vocab``).
        student_ids: the same tokens' student ids, ``(K,)``.
        exact_weight: weight of the exact (shared-token) part, a number >= 0 or a 0-d tensor.
        uld_weight: weight of the ULD (unshared) part, a number >= 0 or a 0-d tensor.
        beta: the exact part's mixture weight in [0, 1] (0: forward KL, 1: reverse KL).
        temperature: ``T > 0``, dividing both logits.
        mask: bool tensor of the leading shape, ``True`` where the position counts.
        labels: token ids; positions equal to ``ignore_index`` do not count.
        ignore_index: the label of positions that do not count (default ``-100``).
        chunk_size: positions per chunk; by default 128, fewer (a power of two) where 128 positions would
            hold over 2**24 logits of the larger vocabulary.
        teacher_bias: the teacher's head bias ``(V_T,)``, if it has one.
        student_bias: the student's head bias ``(V_S,)``, if it has one.
        reduction: ``"mean"`` (over counted positions) or ``"sum"``.
        compiled: compile each chunk's work, as in :func:`~funcdistill.losses.fused_linear_jsd_loss`.

    Raises:
        TypeError: an argument has the wrong type, or one side's head tensors differ in dtype.
        ValueError: shapes do not fit, a value is out of range, or ``reduction="none"``.
        RuntimeError: a second derivative is asked for.

    Example:
        >>> import torch
        >>> from funcdistill.losses import hybrid_loss
        >>> ht, hs = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
        >>> wt, ws = torch.randn(11, 8), torch.randn(7, 4)
        >>> ids = torch.tensor([0, 3, 9]), torch.tensor([6, 0, 2])  # three shared tokens
        >>> fused = fused_linear_hybrid_loss(ht, hs, wt, ws, *ids, beta=0.5, chunk_size=4)
        >>> torch.allclose(fused, hybrid_loss(ht @ wt.T, hs @ ws.T, *ids, beta=0.5), atol=1e-6)
        True
    """
    name = "fused_linear_hybrid_loss"
    reduction = _check_reduction(name, reduction)
    heads = (teacher_hidden, student_hidden, teacher_weight, student_weight, teacher_bias, student_bias)
    dtype = _prepare(name, *heads, temperature)
    check_shared_ids(name, teacher_ids, student_ids, teacher_weight.shape[0], student_weight.shape[0])
    check_hybrid_options(name, exact_weight, uld_weight, beta)
    chunk_size = _chunk_tokens(name, chunk_size, max(teacher_weight.shape[0], student_weight.shape[0]))
    counted = counted_tokens(name, student_hidden.shape[:-1], mask, labels, ignore_index)
    fixed, tensors = _split(exact_weight, uld_weight, beta, temperature)
    ids = teacher_ids.to(teacher_weight.device).long(), student_ids.to(student_weight.device).long()
    check_compiled(name, compiled)
    parts = functools.partial(_hybrid_parts, fixed)
    return _run(parts, chunk_size, dtype, counted, reduction, compiled, heads, *ids, *tensors)
