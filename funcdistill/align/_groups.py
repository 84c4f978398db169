"""Using an `Alignment` in a loss: the logits at each group's last token, and group-merged log-probabilities.

Both are differentiable tensor functions with no data-dependent control flow:
they run under :func:`torch.func.grad`, :func:`torch.func.vmap` (one row per
call: ``(T, V)`` logits with ``(G,)`` indices) and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["at_groups", "group_logprobs"]


def at_groups(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The logits at each group's last token: ``(..., T, V)`` and ``(..., G)`` give ``(..., G, V)``.

    There both models have read the same text, so their next-token
    distributions are comparable (by a loss that allows two vocabularies, such
    as :func:`funcdistill.losses.uld_loss`, with the alignment's ``mask``).

    Args:
        logits: ``(..., T, V)`` one model's logits.
        last: ``(..., G)`` integer positions, ``Alignment.teacher_last`` or
            ``Alignment.student_last`` for the matching side.

    Returns:
        ``(..., G, V)``: row ``g`` is ``logits[..., last[..., g], :]``.

    Example:
        >>> import torch
        >>> logits = torch.arange(12.0).reshape(1, 3, 4)
        >>> at_groups(logits, torch.tensor([[2, 0]]))
        tensor([[[ 8.,  9., 10., 11.],
                 [ 0.,  1.,  2.,  3.]]])
    """
    _check("at_groups", logits=logits, last=last)
    if last.dim() != logits.dim() - 1 or last.shape[:-1] != logits.shape[:-2]:
        raise ValueError(
            f"at_groups: last must have the leading dimensions of logits without T and V: logits "
            f"{tuple(logits.shape)} (..., T, V) needs last (..., G) with ... = {tuple(logits.shape[:-2])}, "
            f"got {tuple(last.shape)}; pass the Alignment's teacher_last with the teacher's logits."
        )
    return torch.take_along_dim(logits, last.long().unsqueeze(-1), dim=-2)


def group_logprobs(logits: torch.Tensor, ids: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group-merged log-probabilities: ``(..., G)``, each group's sum of its tokens' log-probabilities.

    Token ``j`` is predicted at position ``j - 1`` (causal language models), so
    the log-probability of group ``g`` is the sum, over its tokens ``j``, of
    ``log_softmax(logits)[j - 1, ids[j]]``: the probability of the group's text
    is the product of its tokens' conditional probabilities, comparable across
    tokenizers. Tokens of group -1 add nothing, and neither does a token at
    position 0 (nothing predicts it: keep it outside the groups, as a BOS token
    or a prompt is). Groups without tokens (padding) get 0.

    Args:
        logits: ``(..., T, V)`` one model's logits.
        ids: ``(..., T)`` integer token ids of the same model (the inputs).
        group: ``(..., T)`` integer group of each token,
            ``Alignment.teacher_group`` or ``Alignment.student_group``.
        num_groups: ``G``, the number of groups (``Alignment.mask.shape[-1]``).

    Returns:
        ``(..., G)`` log-probabilities in ``logits``' dtype.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 4)  # uniform: every token has probability 1/4
        >>> group_logprobs(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 0]]), 1).exp()
        tensor([[0.0625]])
    """
    _check("group_logprobs", logits=logits, ids=ids, group=group)
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 0:
        raise TypeError(
            f"group_logprobs: num_groups must be an int >= 0 (the Alignment's mask.shape[-1]), got {num_groups!r}."
        )
    for name, value in (("ids", ids), ("group", group)):
        if value.shape != logits.shape[:-1]:
            raise ValueError(
                f"group_logprobs: {name} must have the shape of logits without V, {tuple(logits.shape[:-1])}, "
                f"got {tuple(value.shape)}; pass the same side's {name} as its logits."
            )
    group = group.long()
    counted = group[..., 1:] >= 0
    ids = torch.where(counted, ids[..., 1:].long(), 0).unsqueeze(-1)
    prev = logits[..., :-1, :]
    token = prev.gather(-1, ids).squeeze(-1) - torch.logsumexp(prev, dim=-1)
    token = torch.where(counted, token, 0)
    slot = torch.where(counted, group[..., 1:], num_groups)
    out = token.new_zeros(*token.shape[:-1], num_groups + 1)
    return out.scatter_add(-1, slot, token)[..., :num_groups]


def _check(fn: str, **tensors: Any) -> None:
    """Raise a TypeError naming the first argument that is not a tensor, or not integers (all but logits)."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(value).__name__}.")
        floating = value.dtype.is_floating_point
        if name == "logits" and not floating:
            raise TypeError(f"{fn}: logits must be a floating tensor, got {value.dtype}.")
        if name != "logits" and (floating or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{fn}: {name} must hold integers (e.g. torch.long), got {value.dtype}.")
    if tensors["logits"].dim() < 2:
        raise ValueError(f"{fn}: logits must have shape (..., T, V), got {tuple(tensors['logits'].shape)}.")
