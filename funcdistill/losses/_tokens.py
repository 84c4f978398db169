"""Token plumbing shared by the LLM losses: which tokens count, how per-token losses reduce, vocabulary sizes.

Language-model losses compare one distribution per token. Three questions are
the same for all of them, and are answered here once:

* **Which tokens count.** ``mask`` is a bool tensor over the leading (token)
  shape, ``True`` where the token counts; ``labels`` with ``ignore_index``
  (``-100``, as in :func:`torch.nn.functional.cross_entropy`) is a shortcut
  for ``mask = labels != ignore_index``. Both may be given; a token then
  counts where both say so.
* **How the per-token losses reduce.** ``"mean"``: the sum over the counted
  tokens divided by their number; ``"sum"``: the sum over the counted tokens;
  ``"none"``: one value per token, 0 where it does not count. No token at all
  (a ``(0, V)`` batch, or a mask that counts none) gives 0 and a zero gradient
  for every reduction, never ``nan``.
* **Which dtype.** The loss is computed in, and returned as, the wider of the
  two sides' dtypes (:func:`torch.promote_types`: a bfloat16 teacher and a
  float32 student give float32, as does the reverse); gradients come back in
  each input's own dtype.
* **Vocabularies of different sizes.** Models of one family often pad their
  embedding to a multiple of 64 or 128 rows (152,064 vs 151,936): an error
  by default, and ``vocab_size=V`` compares the first ``V`` classes of both.

Every decision looks at shapes and dtypes only, never at tensor values.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from funcdistill.losses._checks import check_integer, check_tensors

__all__: list[str] = []

IGNORE_INDEX = -100
TOKEN_REDUCTIONS = ("none", "mean", "sum")


def counted_tokens(loss: str, leading: torch.Size, mask: Any, labels: Any, ignore_index: Any) -> torch.Tensor | None:
    """The bool tensor of counted tokens (shape ``leading``), or None when every token counts."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{loss}: ignore_index must be an int, got {type(ignore_index).__name__}.")
    counted = None
    if mask is not None:
        check_tensors(loss, mask=mask)
        if mask.dtype != torch.bool:
            raise TypeError(
                f"{loss}: mask must be a bool tensor (True = the token counts), got {mask.dtype}; "
                "for a 0/1 attention mask pass attention_mask.bool()."
            )
        _check_token_shape(loss, "mask", mask, leading)
        counted = mask
    if labels is not None:
        check_tensors(loss, labels=labels)
        check_integer(loss, "labels", labels, "token ids")
        _check_token_shape(loss, "labels", labels, leading)
        keep = labels != ignore_index
        counted = keep if counted is None else counted & keep
    return counted


def _check_token_shape(loss: str, name: str, value: torch.Tensor, leading: torch.Size) -> None:
    if value.shape != leading:
        raise ValueError(
            f"{loss}: {name} has shape {tuple(value.shape)} but the logits have {tuple(leading)} tokens "
            f"(their shape without the last, vocabulary, dimension); give {name} shape {tuple(leading)}. "
            "For a causal LM, logits[:, :-1] predict tokens [:, 1:]: shift the mask or labels the same way."
        )


def check_vocab(loss: str, teacher_classes: int, student_classes: int, vocab_size: Any) -> int:
    """The number of classes to compare: both sizes when equal, else ``vocab_size`` (checked)."""
    if vocab_size is None:
        if teacher_classes != student_classes:
            smaller = min(teacher_classes, student_classes)
            raise ValueError(
                f"{loss}: teacher and student vocabularies differ: {teacher_classes} vs {student_classes} "
                f"classes. If one embedding is only padded (extra rows past the tokenizer's vocabulary), pass "
                f"vocab_size={smaller} to compare the first {smaller} classes of both; models with different "
                "tokenizers cannot be compared token by token."
            )
        return teacher_classes
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"{loss}: vocab_size must be an int or None, got {type(vocab_size).__name__}.")
    if not 1 <= vocab_size <= min(teacher_classes, student_classes):
        raise ValueError(
            f"{loss}: vocab_size must be between 1 and the smaller vocabulary "
            f"({min(teacher_classes, student_classes)}), got {vocab_size}."
        )
    return vocab_size


def check_leading(loss: str, teacher: torch.Tensor, student: torch.Tensor, what: str) -> None:
    """Both tensors have at least one dimension and the same leading (token) shape."""
    for side, value in (("teacher", teacher), ("student", student)):
        if value.dim() == 0:
            raise ValueError(f"{loss}: the {side}'s {what} must have a last dimension, got a 0-d tensor.")
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"{loss}: teacher and student token shapes differ: {tuple(teacher.shape[:-1])} vs "
            f"{tuple(student.shape[:-1])} (the {what}' shapes without their last dimension, "
            f"{tuple(teacher.shape)} and {tuple(student.shape)})."
        )


def reduce_tokens(per_token: torch.Tensor, counted: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-token losses over the counted tokens (``reduction`` already checked).

    A token that does not count contributes exactly 0 to the value, even when
    its loss is ``inf`` or ``nan``, and 0 to the gradient when its logits are finite.
    """
    if counted is not None:
        per_token = torch.where(counted, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # no token: the sum is 0 and so is the mean (not 0 / 0); a count of 0 becomes 1, decided on shapes alone
    count = max(per_token.numel(), 1) if counted is None else counted.sum().clamp_min(1)
    return total / count


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a token loss computes in and returns: the widest of its inputs' (``torch.promote_types``)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def token_weights(
    counted: torch.Tensor | None, leading: torch.Size, reduction: str, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-token weights ``w`` with ``reduce_tokens(x, counted, reduction) == (w * x).sum()`` (0 = not counted)."""
    if counted is None:
        ones = torch.ones(leading, dtype=dtype, device=device)
        return ones / max(ones.numel(), 1) if reduction == "mean" else ones
    weights = counted.to(dtype)
    return weights / counted.sum().clamp_min(1) if reduction == "mean" else weights
