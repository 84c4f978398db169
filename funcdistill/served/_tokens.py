"""A batch of token sequences as a server takes it (one id list per sequence) and as training holds it (padded).

The served teacher takes either a list of 1-D integer tensors of any lengths
(padded here on the right, as a ragged cache read pads them) or a padded
``(batch, tokens)`` tensor of ids with its attention mask (right or left
padding: each row's real tokens must be one contiguous run). Each sequence is
sent without its padding, so its log-probabilities are those of the sequence
alone, and they are put back at the positions of its real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__: list[str] = []


class Batch(NamedTuple):
    """Each sequence's real token ids (what the server gets) and the bool mask of their places in the padded batch."""

    prompts: list[list[int]]
    mask: torch.Tensor


def batch(input_ids: Any, attention_mask: Any = None) -> Batch:
    """The prompts and mask of a list of 1-D id tensors, or of a padded id tensor and its attention mask.

    Example:
        >>> batch([torch.tensor([5, 6, 7]), torch.tensor([8])])
        Batch(prompts=[[5, 6, 7], [8]], mask=tensor([[ True,  True,  True],
                [ True, False, False]]))
        >>> batch(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])).prompts
        [[5, 6], [7, 8, 9]]
    """
    if isinstance(input_ids, torch.Tensor):
        return _padded(input_ids, attention_mask)
    if attention_mask is not None:
        raise ValueError(
            "attention_mask= goes with a padded (batch, tokens) tensor of input ids; a list of sequences "
            "needs none (each is sent as it is)."
        )
    if not isinstance(input_ids, Sequence) or isinstance(input_ids, (str, bytes)) or not input_ids:
        raise TypeError(
            "input_ids must be a non-empty list of 1-D integer tensors (token ids of any lengths) or a padded "
            f"(batch, tokens) integer tensor, got {_kind(input_ids)}."
        )
    rows = []
    for i, seq in enumerate(input_ids):
        if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.is_floating_point() or seq.is_complex():
            raise TypeError(f"sequence {i} must be a 1-D integer tensor of token ids, got {_kind(seq)}.")
        rows.append(seq.tolist())
    _nonempty(rows)
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(int(lengths.max())) < lengths[:, None]
    return Batch(rows, mask)


def scatter(batch: Batch, rows: list[torch.Tensor], fill: float | int) -> torch.Tensor:
    """Per-sequence ``(T_i, k)`` tensors put at their tokens' places in a ``(batch, tokens, k)`` tensor, ``fill`` elsewhere."""
    k = rows[0].shape[-1]
    out = torch.full((*batch.mask.shape, k), fill, dtype=rows[0].dtype)
    out[batch.mask] = torch.cat(rows)
    return out


def _padded(input_ids: torch.Tensor, attention_mask: Any) -> Batch:
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be a (batch, tokens) integer tensor, got {_kind(input_ids)}.")
    if attention_mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.bool)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of the shape of input_ids {list(input_ids.shape)}, got {_kind(attention_mask)}."
        )
    else:
        mask = attention_mask.detach().cpu().bool()
    starts = mask.int().diff(dim=1, prepend=torch.zeros(mask.shape[0], 1, dtype=torch.int)).clamp(min=0).sum(dim=1)
    broken = [i for i, runs in enumerate(starts.tolist()) if runs > 1]
    if broken:
        raise ValueError(
            f"the attention mask of row(s) {broken} has gaps: a row's real tokens must be one contiguous run (right "
            "or left padding). A mask of the tokens that count for the loss goes to the loss (mask=), not here."
        )
    ids = input_ids.detach().cpu()
    rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
    _nonempty(rows)
    return Batch(rows, mask)


def _nonempty(rows: list[list[int]]) -> None:
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"sequence(s) {empty} have no tokens; a server scores at least one token per sequence.")


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
