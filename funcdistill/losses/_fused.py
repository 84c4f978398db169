r"""Fused linear + divergence losses: the heads are applied chunk by chunk, the full logits never exist.

At 4,096 tokens and a 32,000-class vocabulary one fp32 logits tensor is
500 MiB, and a loss over two models' logits holds several such tensors at
once (logits, softmaxes, their gradient). The losses here take the models'
last hidden states and head weights instead, and process ``chunk_size``
tokens at a time: a chunk's logits are computed, its loss and its gradients
(for the student's hidden states, head weight and bias) are taken at once,
and the logits are dropped before the next chunk. Only the accumulated
gradients are saved for the backward pass, which just scales them. Peak
memory then grows with ``chunk_size * V`` instead of ``tokens * V``.

How the gradient is carried: a :class:`torch.autograd.Function` whose
forward computes each chunk's gradient for its logits in closed form and
applies the head's chain rule by hand. ``torch.utils.checkpoint`` cannot be
used (it relies on saved-tensor hooks, which :func:`torch.func.grad` does not
support), and a ``torch.func`` transform inside the forward breaks
``torch.compile`` under ``torch.func.grad`` as soon as the hidden states come
from a model (an internal functorch assertion in torch 2.13). So these losses work

* in a ``loss.backward()`` loop and under :func:`torch.func.grad` /
  :func:`torch.func.grad_and_value`;
* under :func:`torch.func.vmap` (the Function's vmap rule is generated, so a
  vmapped call is the chunked loss of each batch element; ``vmap`` of
  ``grad`` and ``grad`` of ``vmap`` work too);
* under ``torch.compile(fullgraph=True)``, without a graph break.

Limits, each an error or a documented choice rather than a wrong result:

* **First-order gradients only.** A second derivative (``jacrev`` of ``grad``,
  ``create_graph=True``) raises instead of returning zeros.
* **The teacher side is a constant**, as a teacher in :func:`funcdistill.distill`
  is: no gradient reaches the teacher's hidden states, head weight or bias, nor
  tensor hyper-parameters (``beta``, ``temperature``).
* ``reduction="none"`` is refused: per-token losses would need the logits
  again in the backward pass to give the head weight its gradient.
* The gradients are computed in the forward pass whenever a student tensor
  requires a gradient; under ``torch.no_grad()`` only the value is computed.

Dtypes: each head runs in its own dtype (hidden states, weight and bias of
one side must share it), the rest of the loss in the wider of the two sides'
dtypes, which is also the dtype of the result; the sums over chunks and the
head gradients accumulate in at least float32. No token at all gives 0 and
zero gradients, as in the unfused losses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import check_fraction, check_positive, check_reduction, check_tensors
from funcdistill.losses._compiled import check_compiled, chunk_kernel, use_compiled
from funcdistill.losses._divergence import check_topk, jsd_rows, kl_rows, log_mixture, log_probs, topk_rows
from funcdistill.losses._tokens import (
    IGNORE_INDEX,
    check_leading,
    check_vocab,
    compute_dtype,
    counted_tokens,
    token_weights,
)

__all__ = ["fused_linear_jsd_loss", "fused_linear_topk_kl_loss"]

Number = float | torch.Tensor
FUSED_REDUCTIONS = ("mean", "sum")

# parts(row_chunks, constants, student_logits, weights) -> (per-token losses, the gradient of
# sum(weights * per-token losses) for the logits, made with `_weighted`; None when weights is None)
Parts = Callable[
    [tuple[torch.Tensor, ...], tuple[Any, ...], torch.Tensor, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor | None],
]


class _Chunking(NamedTuple):
    """What the chunked Function computes (Python values only, hashable for torch.compile)."""

    parts: Parts
    chunk_size: int
    sliced: int  # how many of the teacher-side tensors are split by token (the others are constants)
    classes: int  # the first rows of the student's head to use (vocab_size)
    dtype: torch.dtype  # the dtype the loss is computed in and returned as (the wider side's)
    compiled: bool = False  # each chunk through torch.compile (decided by _compiled.use_compiled)


def _first(x: Any, n: int) -> Any:
    """The first ``n`` rows of ``x`` (``x`` itself when it has ``n``, or is None)."""
    return x if x is None or x.shape[0] == n else x[:n]


def _chunks(chunking: _Chunking, hidden: torch.Tensor, weights: torch.Tensor, teacher: tuple[Any, ...]):
    """Per chunk: the hidden states, the token weights (0 = not counted), the sliced teacher tensors, constants."""
    constants = teacher[chunking.sliced :]
    for start in range(0, hidden.shape[0], chunking.chunk_size):
        stop = min(start + chunking.chunk_size, hidden.shape[0])
        rows = tuple(t[start:stop] for t in teacher[: chunking.sliced])
        yield hidden[start:stop], weights[start:stop], rows, constants


def _chunk(parts, dtype, hidden, head, bias, weights, rows, constants, need_grad):
    """One chunk: ``sum(weights * per_token_loss)`` and, if asked, the weighted gradient for its logits."""
    logits = F.linear(hidden, head, bias).to(dtype)
    per_token, grad_logits = parts(rows, constants, logits, weights if need_grad else None)
    return _weighted(per_token, weights).sum(), grad_logits  # a token that does not count adds exactly 0


def _weighted(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``values`` (tokens, ...) times each token's weight, exactly 0 for a token that does not count (weight 0).

    ``values``: a chunk's per-token losses, or their gradient for the logits;
    a token that does not count gives exactly 0 even where they are not
    finite. In the weights' dtype (at least float32), not rounded to the
    logits'. The parts weigh their gradient themselves, as the last step that
    makes a ``(chunk, V)`` tensor (before a scatter, in the top-k KL): a
    separate weighting pass afterwards costs ``torch.compile`` one more
    ``(chunk, V)`` buffer wherever it fuses the pass into the kernel that
    reads the logits (as Inductor does on one thread).
    """
    counted = (weights != 0).reshape(-1, *([1] * (values.dim() - 1)))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(counted, values, zero) * weights.reshape(counted.shape)


def _chunk_value(parts, dtype, hidden, head, bias, weights, rows, constants) -> torch.Tensor:
    """One chunk's ``sum(weights * per_token_loss)`` (the function compiled for the value-only path)."""
    return _chunk(parts, dtype, hidden, head, bias, weights, rows, constants, False)[0]


def _chunk_grad(parts, dtype, hidden, head, bias, weights, rows, constants):
    """One chunk's weighted loss, the gradient for its logits (in the head's dtype) and for the bias."""
    loss, grad_logits = _chunk(parts, dtype, hidden, head, bias, weights, rows, constants, True)
    grad_logits = grad_logits.to(head.dtype)
    grad_bias = None if bias is None else grad_logits.sum(0, dtype=torch.promote_types(head.dtype, torch.float32))
    return loss, grad_logits, grad_bias


def _under_transform() -> bool:
    """A ``torch.func`` transform is active (its tensors are wrapped: the compiled chunk is not used on them)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _chunked_value(chunking, hidden, weight, bias, weights, *teacher) -> torch.Tensor:
    """The loss alone, chunk by chunk (nothing needs a gradient)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head, head_bias = _first(weight, chunking.classes), _first(bias, chunking.classes)
    step = chunk_kernel(_chunk_value, chunking.compiled and not _under_transform())
    total = hidden.new_zeros((), dtype=torch.promote_types(chunking.dtype, torch.float32))
    for h, w, rows, constants in _chunks(chunking, hidden, weights, teacher):
        total = total + step(chunking.parts, chunking.dtype, h, head, head_bias, w, rows, constants)
    return total.to(chunking.dtype)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (the gradient of head rows past ``vocab_size``)."""
    return x if x.shape[0] == rows else F.pad(x, (0,) * (2 * x.dim() - 1) + (rows - x.shape[0],))


def _select(x: Any, dim: int | None, index: int) -> Any:
    return x if dim is None else x.select(dim, index)


class _ChunkedLoss(torch.autograd.Function):
    """Loss and student gradients in one chunked forward; the backward scales the saved gradients.

    Each chunk's gradient for its logits is computed in closed form, and the
    head's chain rule is applied by hand (``grad_logits @ W``,
    ``grad_logits.T @ h``): no autograd or ``torch.func`` transform runs inside
    the forward, which keeps it traceable by ``torch.compile`` under
    ``torch.func.grad``. The forward always sees plain tensors (``torch.func``
    runs it below its transforms, and the vmap rule calls it per batch
    element), so its chunks may run compiled (:mod:`funcdistill.losses._compiled`).
    """

    @staticmethod
    def forward(chunking, student_hidden, weight, bias, weights, *teacher):  # type: ignore[override]
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        acc = torch.promote_types(weight.dtype, torch.float32)
        head, head_bias = _first(weight, chunking.classes), _first(bias, chunking.classes)
        step = chunk_kernel(_chunk_grad, chunking.compiled)
        total = hidden.new_zeros((), dtype=torch.promote_types(chunking.dtype, torch.float32))
        grad_weight = torch.zeros(head.shape, dtype=acc, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(head.shape[:1], dtype=acc, device=weight.device)
        grad_hidden = []
        for h, w, rows, constants in _chunks(chunking, hidden, weights, teacher):
            loss, grad_logits, chunk_bias = step(chunking.parts, chunking.dtype, h, head, head_bias, w, rows, constants)
            total = total + loss
            grad_hidden.append(grad_logits @ head)
            if grad_logits.dtype == acc:
                grad_weight = grad_weight.addmm_(grad_logits.T, h)  # in place: no second (V, H) tensor
            else:
                grad_weight = grad_weight.add_(grad_logits.T @ h)
            if grad_bias is not None:
                grad_bias = grad_bias.add_(chunk_bias)
            del grad_logits, chunk_bias  # freed now, not held while the next chunk's logits are made
        grad_hidden = torch.cat(grad_hidden) if grad_hidden else torch.zeros_like(hidden)
        outputs = (total.to(chunking.dtype), grad_hidden.reshape(student_hidden.shape))
        outputs += (_pad_rows(grad_weight, weight.shape[0]).to(weight.dtype),)
        return outputs if grad_bias is None else (*outputs, _pad_rows(grad_bias, bias.shape[0]).to(bias.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.n_teacher = len(inputs) - 5
        # unused outputs then get None as gradient: a gradient for a saved gradient means a second derivative
        ctx.set_materialize_grads(False)

    @staticmethod
    def vmap(info, in_dims, chunking, *inputs):
        """The chunked loss of each batch element in turn (its forward must see plain tensors to compile)."""
        each = [
            _ChunkedLoss.apply(chunking, *(_select(x, d, i) for x, d in zip(inputs, in_dims[1:])))
            for i in range(info.batch_size)
        ]
        outputs = tuple(torch.stack(parts) for parts in zip(*each))
        return outputs, (0,) * len(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *grad_saved):  # type: ignore[override]
        if any(g is not None for g in grad_saved) and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fused losses give first-order gradients only (their backward pass scales gradients computed "
                "in the forward pass); for second derivatives use generalized_jsd_loss or topk_kl_loss on the logits."
            )
        # each gradient in its input's dtype (the loss's dtype may be wider than the student's)
        grads = [None if grad_loss is None else (grad_loss * g).to(g.dtype) for g in ctx.saved_tensors]
        if len(grads) == 2:
            grads.append(None)  # no bias
        return (None, *grads, None) + (None,) * ctx.n_teacher


def _chunked_loss(
    chunking: _Chunking,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor,
    *teacher,
) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        return _chunked_value(chunking, hidden, weight, bias, weights, *teacher)
    return _ChunkedLoss.apply(chunking, hidden, weight, bias, weights, *teacher)[0]


# ---------------------------------------------------------------- closed-form gradients for the student's logits


def _times_p(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p * x``, 0 where ``p == 0`` (``x`` may then be infinite)."""
    return torch.where(p > 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


def _through_softmax(grad_log_s: torch.Tensor, p_s: torch.Tensor, temperature: Number) -> torch.Tensor:
    """The gradient for logits ``z`` from the one for ``s = log_softmax(z / T)``: ``(g - p * sum(g)) / T``."""
    grad = grad_log_s - p_s * grad_log_s.sum(-1, keepdim=True)
    return grad if not isinstance(temperature, torch.Tensor) and temperature == 1 else grad / temperature


def _jsd_with_grad(log_t: torch.Tensor, log_s: torch.Tensor, p_s: torch.Tensor, beta: Number):
    """Per-token generalized JSD and its gradient ``g`` for the student's log-probabilities, in one pass.

    Forward KL: ``g = -p_T``; reverse KL: ``g = p_S (s - t + 1)``; in between:
    ``g = (1 - beta) p_S (s - log m)`` (the derivative of ``m`` cancels out), and
    the student's term of the loss is ``sum(g)``, so it is not computed twice.
    A tensor ``beta`` computes the three and picks with ``torch.where``.
    """
    if isinstance(beta, torch.Tensor):
        ends = _jsd_with_grad(log_t, log_s, p_s, 0.0), _jsd_with_grad(log_t, log_s, p_s, 1.0)
        mixed = _mixed_jsd_with_grad(log_t, log_s, p_s, beta)  # finite at 0 and 1, where it is not picked
        return tuple(torch.where(beta == 0, f, torch.where(beta == 1, r, m)) for f, r, m in zip(*ends, mixed))
    if beta == 0:
        return kl_rows(log_t, log_s), -log_t.exp()
    if beta == 1:
        diff = _times_p(p_s, log_s - log_t)
        return diff.sum(-1), diff + p_s
    return _mixed_jsd_with_grad(log_t, log_s, p_s, beta)


def _mixed_jsd_with_grad(log_t: torch.Tensor, log_s: torch.Tensor, p_s: torch.Tensor, beta: Number):
    log_m = log_mixture(log_t, log_s, beta)
    teacher_part = kl_rows(log_t, log_m)
    grad = _times_p(p_s, log_s - log_m) * (1 - beta)
    return beta * teacher_part + grad.sum(-1), grad


# ---------------------------------------------------------------- argument checks


def _check_head(loss: str, side: str, hidden: Any, weight: Any, bias: Any) -> None:
    """``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)`` or None, all of one dtype (the head's)."""
    check_tensors(loss, **{f"{side}_hidden": hidden, f"{side}_weight": weight})
    for name, value in (("hidden", hidden), ("bias", bias)):
        if value is not None and isinstance(value, torch.Tensor) and value.dtype != weight.dtype:
            raise TypeError(
                f"{loss}: {side}_{name} is {value.dtype} but {side}_weight is {weight.dtype}; a head runs in one "
                f"dtype: pass them in one (e.g. {side}_{name}.to({side}_weight.dtype)). The two sides may differ."
            )
    if weight.dim() != 2 or hidden.dim() == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{loss}: {side}_weight must have shape (vocabulary, hidden) = (V, {hidden.shape[-1] if hidden.dim() else '?'})"
            f" to match {side}_hidden {tuple(hidden.shape)}, got {tuple(weight.shape)} (pass the lm_head weight, "
            "as nn.Linear stores it)."
        )
    if bias is not None:
        check_tensors(loss, **{f"{side}_bias": bias})
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{loss}: {side}_bias must have shape {tuple(weight.shape[:1])} to match {side}_weight, "
                f"got {tuple(bias.shape)}."
            )


CHUNK_TOKENS = 128  # tokens per chunk when chunk_size is None (see docs/design.md: fastest and within 0.15x naive)
CHUNK_LOGITS = 1 << 24  # but no more logits than this per default chunk: 64 MiB in fp32


def _chunk_tokens(loss: str, chunk_size: Any, vocab: int) -> int:
    """Tokens per chunk: ``chunk_size``, checked, or by default :data:`CHUNK_TOKENS`, fewer (a power of two)
    where that many tokens would hold over 2**24 logits of ``vocab`` classes."""
    if chunk_size is None:
        fits = 1 << max(0, (CHUNK_LOGITS // max(vocab, 1)).bit_length() - 1)
        return min(CHUNK_TOKENS, fits)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{loss}: chunk_size must be a positive int (tokens per chunk), got {type(chunk_size).__name__}."
        )
    if chunk_size < 1:
        raise ValueError(f"{loss}: chunk_size must be a positive int (tokens per chunk), got {chunk_size}.")
    return chunk_size


def _weights(
    counted: torch.Tensor | None, leading: torch.Size, reduction: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The flat per-token weights of the reduction, in at least float32 (a bfloat16 ``1 / tokens`` is rounded)."""
    wide = torch.promote_types(dtype, torch.float32)
    return token_weights(counted, leading, reduction, dtype=wide, device=device).reshape(-1)


def _check_reduction(loss: str, reduction: Any) -> str:
    if reduction == "none":
        raise ValueError(
            f"{loss}: reduction='none' is not supported: per-token losses would need the logits again in the "
            "backward pass. Use 'mean' or 'sum' (with a mask to select tokens), or the unfused loss on the logits."
        )
    return check_reduction(loss, reduction, FUSED_REDUCTIONS)


# ---------------------------------------------------------------- the losses


def _jsd_parts(
    beta: Number | None,
    temperature: Number | None,
    rows: tuple,
    constants: tuple,
    logits: torch.Tensor,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    (teacher_hidden,) = rows
    teacher_weight, teacher_bias, *tensor_params = constants
    params = iter(tensor_params)
    beta = next(params) if beta is None else beta
    temperature = next(params) if temperature is None else temperature
    teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias).to(logits.dtype)  # the wider dtype
    log_t, log_s = log_probs(teacher_logits, temperature), log_probs(logits, temperature)
    if weights is None:
        return jsd_rows(log_t, log_s, beta), None
    p_s = log_s.exp()
    per_token, grad_log_s = _jsd_with_grad(log_t, log_s, p_s, beta)
    return per_token, _weighted(_through_softmax(grad_log_s, p_s, temperature), weights)


def fused_linear_jsd_loss(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    beta: Number = 0.5,
    temperature: Number = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    compiled: bool | None = None,
) -> torch.Tensor:
    r"""Generalized JSD of two linear heads' logits, computed ``chunk_size`` tokens at a time.

    Equal in value and in gradients (for the student's hidden states, head
    weight and bias) to::

        generalized_jsd_loss(teacher_hidden @ teacher_weight.T + teacher_bias,
                             student_hidden @ student_weight.T + student_bias, ...)

    without ever holding more than one chunk's logits (see the module
    documentation for how, and for the limits: first-order gradients, teacher
    side constant, no ``reduction="none"``). The conventions (``beta`` 0 / 1,
    ``temperature``, ``mask`` / ``labels``, ``vocab_size``) are those of
    :func:`~funcdistill.losses.generalized_jsd_loss`; ``vocab_size`` keeps
    the first rows of both weights.

    Feed it the hidden states before the heads (for a ``transformers`` causal
    LM, the output of ``model.norm``) and the ``lm_head`` weights from the
    models' states.

    Args:
        teacher_hidden: the teacher's last hidden states, ``(..., H_T)``.
        student_hidden: the student's, ``(..., H_S)``, same leading shape.
        teacher_weight: the teacher's head weight, ``(V, H_T)``.
        student_weight: the student's head weight, ``(V, H_S)``.
        beta: mixture weight in [0, 1] (0: forward KL, 1: reverse KL).
        temperature: ``T > 0``, dividing both logits.
        mask: bool tensor of the leading shape, ``True`` where the token counts.
        labels: token ids; tokens equal to ``ignore_index`` do not count.
        ignore_index: the label of tokens that do not count (default ``-100``).
        chunk_size: tokens per chunk (the last chunk may be smaller); by default
            128, fewer (a power of two) where 128 tokens would hold over 2**24
            logits (``V > 131,072``). Peak memory grows with it.
        teacher_bias: the teacher's head bias ``(V,)``, if it has one.
        student_bias: the student's head bias ``(V,)``, if it has one.
        vocab_size: compare only the first ``vocab_size`` classes.
        reduction: ``"mean"`` (over counted tokens) or ``"sum"``.
        compiled: run each chunk's work through ``torch.compile`` (compiled once
            per shape family, the token count symbolic): ``None`` (default) when the
            call's logits (tokens x V) number at least 2**20, ``True`` always,
            ``False`` never.
            Eager wherever compiling is unavailable or fails, and with the
            environment variable ``FUNCDISTILL_FUSED_EAGER=1``.

    Raises:
        TypeError: an argument has the wrong type, or one side's head tensors differ in dtype.
        ValueError: shapes do not fit, a value is out of range, or ``reduction="none"``.
        RuntimeError: a second derivative is asked for.

    Example:
        >>> import torch
        >>> from funcdistill.losses import generalized_jsd_loss
        >>> ht, hs = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
        >>> wt, ws = torch.randn(11, 8), torch.randn(11, 4)
        >>> fused = fused_linear_jsd_loss(ht, hs, wt, ws, chunk_size=3)
        >>> torch.allclose(fused, generalized_jsd_loss(ht @ wt.T, hs @ ws.T), atol=1e-6)
        True
    """
    name = "fused_linear_jsd_loss"
    reduction = _check_reduction(name, reduction)
    _check_head(name, "teacher", teacher_hidden, teacher_weight, teacher_bias)
    _check_head(name, "student", student_hidden, student_weight, student_bias)
    check_leading(name, teacher_hidden, student_hidden, "hidden states")
    classes = check_vocab(name, teacher_weight.shape[0], student_weight.shape[0], vocab_size)
    check_fraction(name, "beta", beta)
    check_positive(name, "temperature", temperature, allow_tensor=True)
    chunk_size = _chunk_tokens(name, chunk_size, classes)
    check_compiled(name, compiled)
    leading = student_hidden.shape[:-1]
    counted = counted_tokens(name, leading, mask, labels, ignore_index)
    dtype = compute_dtype(teacher_hidden, student_hidden)
    weights = _weights(counted, leading, reduction, dtype, student_hidden.device)
    tensor_params = tuple(p for p in (beta, temperature) if isinstance(p, torch.Tensor))
    rows = functools.partial(
        _jsd_parts,
        None if isinstance(beta, torch.Tensor) else beta,
        None if isinstance(temperature, torch.Tensor) else temperature,
    )
    fast = use_compiled(compiled, leading.numel() * classes)
    chunking = _Chunking(rows, chunk_size, 1, classes, dtype, fast)
    return _chunked_loss(
        chunking,
        student_hidden,
        student_weight,
        student_bias,
        weights,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        _first(teacher_weight.detach(), classes),
        None if teacher_bias is None else _first(teacher_bias.detach(), classes),
        *(p.detach() for p in tensor_params),
    )


def _topk_parts(
    renormalize: bool, rows: tuple, constants: tuple, logits: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    topk_logprobs, topk_indices = rows
    log_s = log_probs(logits, 1)
    per_token = topk_rows(topk_logprobs, topk_indices, log_s, renormalize)
    if weights is None:
        return per_token, None
    topk_logprobs = topk_logprobs.to(log_s.dtype)
    if renormalize:
        topk_logprobs = topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    # d/ds of sum_k p_k (log p_k - s_{i_k}) is g = -p_k at the indices i_k, 0 elsewhere; through the softmax,
    # g - p_S * sum(g) = p_S * sum_k p_k - p_k at the i_k: one (chunk, V) tensor, updated in place at the i_k,
    # weighted before the scatter (both terms), so that the scatter's result is the chunk's last (chunk, V) tensor
    p_t = topk_logprobs.exp()
    dense = _weighted(log_s.exp() * p_t.sum(-1, keepdim=True), weights)
    return per_token, dense.scatter_add(-1, topk_indices.long(), _weighted(-p_t, weights))


def fused_linear_topk_kl_loss(
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    renormalize: bool = False,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    compiled: bool | None = None,
) -> torch.Tensor:
    r"""Top-k forward KL from stored teacher outputs, with the student's head applied chunk by chunk.

    Equal in value and gradients to
    ``topk_kl_loss(teacher_topk_logprobs, teacher_topk_indices, student_hidden @ student_weight.T + student_bias, ...)``
    (see :func:`~funcdistill.losses.topk_kl_loss` for the conventions), while
    only one chunk of the student's logits exists at a time.

    Args:
        teacher_topk_logprobs: the teacher's stored log-probabilities, ``(..., k)``.
        teacher_topk_indices: their class indices, ``(..., k)``, ``k <= V``, in ``[0, V)``, of any
            integer dtype (converted to int64 one chunk at a time).
        student_hidden: the student's last hidden states, ``(..., H)``, same leading shape.
        student_weight: the student's head weight, ``(V, H)``.
        renormalize: renormalize the teacher's ``k`` probabilities to sum to 1.
        mask: bool tensor of the leading shape, ``True`` where the token counts.
        labels: token ids; tokens equal to ``ignore_index`` do not count.
        ignore_index: the label of tokens that do not count (default ``-100``).
        chunk_size: tokens per chunk; by default 128, as in :func:`fused_linear_jsd_loss`.
        student_bias: the student's head bias ``(V,)``, if it has one.
        reduction: ``"mean"`` (over counted tokens) or ``"sum"``.
        compiled: compile each chunk's work, as in :func:`fused_linear_jsd_loss`.

    Raises:
        TypeError: an argument has the wrong type, or the student's head tensors differ in dtype.
        ValueError: shapes do not fit, ``k > V``, or ``reduction="none"``.
        RuntimeError: a second derivative is asked for.

    Example:
        >>> import torch
        >>> from funcdistill.losses import topk_kl_loss
        >>> logprobs, indices = torch.randn(6, 11).log_softmax(-1).topk(4)
        >>> hs, ws = torch.randn(6, 3), torch.randn(11, 3)
        >>> fused = fused_linear_topk_kl_loss(logprobs, indices, hs, ws, chunk_size=4)
        >>> torch.allclose(fused, topk_kl_loss(logprobs, indices, hs @ ws.T), atol=1e-6)
        True
    """
    name = "fused_linear_topk_kl_loss"
    reduction = _check_reduction(name, reduction)
    _check_head(name, "student", student_hidden, student_weight, student_bias)
    leading, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    check_topk(name, teacher_topk_logprobs, teacher_topk_indices, leading, vocab)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{name}: renormalize must be True or False, got {type(renormalize).__name__}.")
    chunk_size = _chunk_tokens(name, chunk_size, vocab)
    check_compiled(name, compiled)
    counted = counted_tokens(name, leading, mask, labels, ignore_index)
    dtype = compute_dtype(teacher_topk_logprobs, student_hidden)
    weights = _weights(counted, leading, reduction, dtype, student_hidden.device)
    k = teacher_topk_logprobs.shape[-1]
    fast = use_compiled(compiled, leading.numel() * vocab)
    chunking = _Chunking(functools.partial(_topk_parts, renormalize), chunk_size, 2, vocab, dtype, fast)
    return _chunked_loss(
        chunking,
        student_hidden,
        student_weight,
        student_bias,
        weights,
        teacher_topk_logprobs.detach().reshape(-1, k),
        teacher_topk_indices.reshape(-1, k),
    )
