"""Argument checks and reductions shared by the losses in :mod:`funcdistill.losses`.

Every check here looks only at Python values, shapes and dtypes, never at tensor
data, so a loss that uses them stays free of data-dependent control flow and
works under :func:`torch.func.vmap` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__: list[str] = []

REDUCTIONS = ("none", "mean", "sum")
REDUCTIONS_BATCHMEAN = ("none", "mean", "sum", "batchmean")


def check_reduction(loss: str, reduction: Any, valid: tuple[str, ...] = REDUCTIONS) -> str:
    """Return ``reduction`` if it is one of ``valid``; otherwise raise a ValueError."""
    if not isinstance(reduction, str) or reduction not in valid:
        raise ValueError(f"{loss}: reduction must be one of {', '.join(map(repr, valid))}, got {reduction!r}.")
    return reduction


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a tensor of per-item losses (``reduction`` already checked).

    ``"batchmean"`` divides the sum by the size of the first dimension (the
    batch), as :func:`torch.nn.functional.kl_div` does.
    """
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.mean()
    batch = per_item.shape[0] if per_item.dim() > 0 else 1
    return per_item.sum() / batch


def check_tensors(loss: str, **tensors: Any) -> None:
    """Raise a TypeError naming the first argument that is not a tensor."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            hint = ""
            if isinstance(value, (tuple, list)):
                hint = " (a module that returns a tuple: pass its first element, e.g. output[0])"
            elif hasattr(value, "keys"):
                hint = " (a model output object: pass the field you mean, e.g. output.logits)"
            raise TypeError(f"{loss}: {name} must be a tensor, got {type(value).__name__}{hint}.")


def check_integer(loss: str, name: str, value: torch.Tensor, what: str) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` holds integers (any width, signed or not).

    ``what`` says what the integers are (``"class indices"``, ``"token ids"``);
    a loss that indexes with them converts them to ``torch.long`` itself.
    """
    dtype = value.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{loss}: {name} must hold integer {what} (e.g. torch.long), got {dtype}.")


def check_same_shape(loss: str, teacher: torch.Tensor, student: torch.Tensor, hint: str = "") -> None:
    """Raise a ValueError when the two tensors' shapes differ (no silent broadcasting)."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"{loss}: teacher and student shapes differ: {tuple(teacher.shape)} vs "
            f"{tuple(student.shape)}.{' ' + hint if hint else ''}"
        )


def check_positive(loss: str, name: str, value: Any, *, allow_tensor: bool = False) -> None:
    """Check a positive finite number (or, with ``allow_tensor``, a 0-d tensor, unchecked)."""
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"{loss}: a tensor {name} must be 0-d (one value per call; vmap over a "
                f"1-d tensor for a sweep), got shape {tuple(value.shape)}."
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kinds = "a positive number or a 0-d tensor" if allow_tensor else "a positive number"
        raise TypeError(f"{loss}: {name} must be {kinds}, got {type(value).__name__}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{loss}: {name} must be a positive finite number, got {value!r}.")


def check_weight(loss: str, name: str, value: Any) -> None:
    """Check a loss weight: a finite number >= 0 or a 0-d tensor (unchecked)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{loss}: a tensor {name} must be 0-d, got shape {tuple(value.shape)}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a number or a 0-d tensor, got {type(value).__name__}.")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{loss}: {name} must be a finite number >= 0, got {value!r}.")


def check_fraction(loss: str, name: str, value: Any) -> None:
    """A number in [0, 1], or a 0-d tensor (its value unchecked)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{loss}: a tensor {name} must be 0-d, got shape {tuple(value.shape)}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a number in [0, 1] or a 0-d tensor, got {type(value).__name__}.")
    if not (0 <= value <= 1 and math.isfinite(value)):
        raise ValueError(f"{loss}: {name} must be in [0, 1], got {value!r}.")


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log q)``, with 0 where ``p == 0``.

    Safe for ``log_p == -inf`` (a masked class) in the forward and the backward
    pass: the difference is replaced before it is multiplied, so no ``nan``
    appears in either direction.
    """
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
