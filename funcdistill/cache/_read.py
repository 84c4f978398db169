"""How ``cache[indices]`` copies stored rows out of the memory-mapped shards, one copy per stored tensor.

A read returns fresh tensors, never views of a shard: the shards are mapped
copy-on-write, so a write into a view would change what this process reads
from the cache afterwards (docs/design.md, "Reading a teacher cache"). Which
copy depends on the indices (all give the same values, dtypes and shapes, and
contiguous tensors):

- a run of consecutive samples (a range or slice of step 1, or sorted
  consecutive indices): each shard's part is one slice (``narrow``), and the
  parts are copied once (``clone``, or ``cat`` across shards);
- indices in one shard: one ``index_select`` per stored tensor;
- indices across shards: grouped by shard once for all stored tensors, one
  ``index_select`` per shard they touch and stored tensor, then joined and
  put back in the order of the indices.

With ``K`` augmentation draws a stored tensor is ``(samples, K, ...)``, read
as ``(samples * K, ...)``: ``rows`` are then ``row * K + draw``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__: list[str] = []

Shard = dict[str, torch.Tensor]
Load = Callable[[int], Shard]


def run(load: Load, size: int, start: int, stop: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The rows of samples ``start .. stop - 1`` (``start < stop``, in range), copied once per stored tensor.

    Args:
        load: shard number -> its tensors.
        size: samples per shard.
        start: first sample.
        stop: one past the last sample.
        names: the stored tensors to read.
    """
    first, last = start // size, (stop - 1) // size
    if first == last:
        tensors, row = load(first), start - first * size
        return {n: tensors[n].narrow(0, row, stop - start).clone() for n in names}
    spans = [(s, max(start, s * size) - s * size, min(stop, (s + 1) * size) - s * size) for s in range(first, last + 1)]
    shards = [(load(s), lo, hi - lo) for s, lo, hi in spans]
    return {n: torch.cat([tensors[n].narrow(0, lo, k) for tensors, lo, k in shards]) for n in names}


def one_shard(tensors: Shard, rows: torch.Tensor, names: list[str], drawn: bool) -> dict[str, torch.Tensor]:
    """``rows`` (in range) of each stored tensor of one shard, with ``drawn`` its sample and draw dimensions merged."""
    if drawn:
        return {n: tensors[n].flatten(0, 1).index_select(0, rows) for n in names}
    return {n: tensors[n].index_select(0, rows) for n in names}


def across(
    load: Load, shard: torch.Tensor, rows: torch.Tensor, names: list[str], drawn: bool
) -> dict[str, torch.Tensor]:
    """The rows of samples in several shards, in the order given.

    The indices are sorted by shard once for all stored tensors; each shard
    they touch gives one ``index_select`` per stored tensor, and the parts
    are joined and put back in the order given (two copies: no torch
    function gathers rows of several tensors at once).

    Args:
        load: shard number -> its tensors.
        shard: each sample's shard.
        rows: each sample's row in its shard (``row * K + draw`` when ``drawn``).
        names: the stored tensors to read.
        drawn: the stored tensors have a draw dimension (merged with the sample's).
    """
    by_shard, order = torch.sort(shard, stable=True)
    touched, counts = (t.tolist() for t in torch.unique_consecutive(by_shard, return_counts=True))
    parts = rows[order].split(counts)
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for s, r in zip(touched, parts):
        tensors = load(s)
        for n in names:
            pieces[n].append((tensors[n].flatten(0, 1) if drawn else tensors[n]).index_select(0, r))
    back = torch.argsort(order)
    return {n: torch.cat(p).index_select(0, back) for n, p in pieces.items()}
