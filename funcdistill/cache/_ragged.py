"""A ragged cache: token samples of any length, their per-token outputs packed per shard, padded on reading.

A cache built from token samples (:mod:`~funcdistill.cache._tokens`) stores
only the real tokens. In each shard, a per-token tensor holds the real
tokens of its samples one after the other, ``(tokens, ...)``, and the tensor
``offsets`` (``int64``, ``count + 1`` entries, from 0) says where each sample's
tokens are: sample ``first + i`` holds rows ``offsets[i] .. offsets[i + 1] - 1``.
The index records each shard's ``tokens`` (its packed length) and the format
``version`` 3. :func:`gather` reads a batch back padded on the right to its
longest sample (zeros at the padding; a top-k pair's padding holds
log-probability ``-inf``, an unused slot, and index 0, as a served teacher's
does), with the mask of the real tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from funcdistill._pytree import torch_pytree

__all__: list[str] = []

OFFSETS = "offsets"
"""The name of the per-sample offsets tensor in a ragged shard."""


def offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Where each sample's tokens start in the packed tensors, then their end: ``(len(lengths) + 1,)`` ``int64``.

    Example:
        >>> offsets(torch.tensor([3, 1, 2]))
        tensor([0, 3, 4, 6])
    """
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int64)


def check_offsets(found: torch.Tensor, record: dict, folder: Path) -> None:
    """Raise unless a shard's offsets start at 0, grow by at least one token per sample and end at its ``tokens``.

    Raises:
        ValueError: naming the shard and what is wrong.
    """
    name, count, tokens = folder / record["file"], record["count"], record["tokens"]
    problem = None
    if found.dtype != torch.int64 or list(found.shape) != [count + 1]:
        problem = (
            f"its offsets are {str(found.dtype).removeprefix('torch.')} {list(found.shape)}, not int64 [{count + 1}]"
        )
    elif int(found[0]) != 0:
        problem = f"its offsets start at {int(found[0])}, not 0"
    elif count and int((found[1:] - found[:-1]).min()) < 1:
        problem = "its offsets give a sample no token (they must grow by at least 1 per sample)"
    elif int(found[-1]) != tokens:
        problem = f"its offsets end at {int(found[-1])}, where the index records tokens {tokens} (the packed length)"
    if problem is not None:
        raise ValueError(
            f"teacher cache shard {name} is damaged: {problem}. Rebuild the cache (delete the folder and run "
            "TeacherCache.build again)."
        )


def gather(
    indices: torch.Tensor,
    shard_size: int,
    load: Callable[[int], dict[str, torch.Tensor]],
    token_names: list[str],
    sample_names: list[str],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The stored tensors of samples ``indices``, per-token ones padded to the longest, and the mask of real tokens.

    Args:
        indices: sample indices, 1-D ``int64``, in range.
        shard_size: samples per shard.
        load: shard number -> its tensors (memory-mapped, checked).
        token_names: the per-token (packed) tensors to read.
        sample_names: the per-sample tensors to read.

    Returns:
        name -> tensor (``(batch, longest, ...)`` per token, ``(batch, ...)``
        per sample), and the bool mask ``(batch, longest)``.
    """
    shard = indices // shard_size
    rows = indices - shard * shard_size
    starts, lengths = torch.zeros_like(indices), torch.zeros_like(indices)
    groups = []
    for s in torch.unique(shard).tolist() or [0]:  # no index: shard 0's tensors give the shapes
        where = (shard == s).nonzero().flatten()
        tensors = load(s)
        off, r = tensors[OFFSETS], rows[where]
        starts[where], lengths[where] = off[r], off[r + 1] - off[r]
        groups.append((where, tensors))
    longest = int(lengths.max()) if len(indices) else 0
    steps = torch.arange(longest)
    mask = steps < lengths[:, None]
    token_rows = starts[:, None] + steps  # the packed row of each real position
    out: dict[str, torch.Tensor] = {}
    for name in token_names + sample_names:
        per_token = name in token_names
        parts = []
        for where, tensors in groups:
            t = tensors[name]
            if per_token:
                m = mask[where]
                real = _widened(t.index_select(0, token_rows[where][m]))
                placed = real.new_full((*m.shape, *t.shape[1:]), _padding(name))
                placed[m] = real
                parts.append(placed)
            else:
                parts.append(_widened(t.index_select(0, rows[where])))
        out[name] = _scatter(parts, [w for w, _ in groups], len(indices))
    return out, mask


def _padding(name: str) -> float:
    """The value at the padding: ``-inf`` for top-k log-probabilities (unused slots, as a served teacher pads), else 0."""
    return float("-inf") if name.endswith(".logprobs") else 0.0


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``uint16`` top-k indices as ``int32`` (torch has no ``index_put`` for ``uint16``; they are read as ``int64``)."""
    return t.to(torch.int32) if t.dtype == torch.uint16 else t


def _scatter(parts: list[torch.Tensor], wheres: list[torch.Tensor], n: int) -> torch.Tensor:
    """The rows of ``parts`` put back at their batch positions ``wheres`` (one part: as it is)."""
    if len(parts) == 1:
        return parts[0]
    out = parts[0].new_zeros((n, *parts[0].shape[1:]))
    for part, where in zip(parts, wheres):
        out[where] = part
    return out


def per_token(
    forward: Callable[[tuple, dict[str, Any]], dict[Any, Any]],
    captured: dict[Any, Any],
    call: tuple[tuple, dict[str, Any]],
    mask: torch.Tensor,
) -> dict[Any, list[bool]]:
    """Which output leaves of each teacher point are per token: those whose second dimension follows the padding.

    The first sample alone, padded to one token more than the batch, runs
    once more (a probe, through ``forward``): a leaf ``(batch, T, ...)`` on
    the batch (``captured``, from the call ``call``) and ``(1, T + 1, ...)`` on
    the probe is per token; any other leaf is per sample (a pooled output,
    say), even where its size happens to be ``T``.
    """
    longest = mask.shape[1]

    def widen(a: Any) -> Any:  # the first row, one padding position more (token id 0, mask 0)
        return torch.nn.functional.pad(a[:1], (0, 1)) if isinstance(a, torch.Tensor) and a.dim() == 2 else a

    args, kwargs = call
    probe = forward(tuple(map(widen, args)), {k: widen(v) for k, v in kwargs.items()})

    def follows(a: Any, b: Any) -> bool:
        tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
        return tensors and a.shape[1] == longest and b.shape[1] == longest + 1

    leaves = torch_pytree.tree_leaves
    return {p: [follows(a, b) for a, b in zip(leaves(captured[p]), leaves(probe[p]))] for p in captured}
