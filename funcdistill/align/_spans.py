"""One batch's spans: which tokens take part in the alignment, the gaps where a tokenization may cut, the merge.

:func:`funcdistill.align.align` looks at the spans of the whole batch at once
(tensor operations: which tokens take part, which spans go backwards), then
merges each row's two lists of gaps in plain Python.

**Cuts.** Between two consecutive tokens of one tokenization, the text may be
cut anywhere in the *gap* ``[end of the first, start of the second]``: the
characters in the gap belong to no token (whitespace that a pre-tokenizer drops
or that ``trim_offsets`` trims, characters a normaliser removes, tokens outside
the mask). Two tokenizations cut the text at the same place when their gaps
intersect, so a difference made only of uncovered characters (``'Ġworld'``
covering ``' world'`` on one side, ``'world'`` on the other) never splits a
group. Two tokens that share a character (a byte-level tokenizer's pieces of
one multi-byte character, all given that character's span) have no gap
between them: character offsets cannot say where inside the character they
were cut, so they always stay in one group.

**The merge.** A group starts at the next token of each side and grows, on the
side whose cut lies further left, one token at a time, until the two sides'
cuts after their last tokens intersect: the groups are the smallest spans on
which the two tokenizations agree, each with at least one token per side.
Leading tokens of one side that end before the other side's first token, and
trailing tokens after the last group, are outside the aligned text (-1).
"""

from __future__ import annotations

import torch

__all__: list[str] = []

END = 1 << 62  # the gap after a row's last token reaches past any text


def _before(x: torch.Tensor, fill: int) -> torch.Tensor:
    """``x`` shifted one step right along the last dimension, ``fill`` first."""
    return torch.cat([torch.full_like(x[..., :1], fill), x[..., :-1]], dim=-1)


def _neighbours(solid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the index of the previous token with a non-empty span (-1: none) and of the next (T: none)."""
    length = solid.shape[-1]
    index = torch.arange(length, device=solid.device).expand_as(solid)
    previous = _before(torch.where(solid, index, -1), -1).cummax(-1).values
    after = torch.where(solid, index, length).flip(-1)
    following = _before(after, length).cummin(-1).values.flip(-1)
    return previous, following


def taking_part(starts: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the tokens that take part in the alignment (spans checked by :func:`backwards` first).

    A counted token with a non-empty span takes part. A counted token with an
    empty span takes part only between two such tokens, in order (a whitespace
    token that ``trim_offsets`` emptied); elsewhere it is a special token
    (``(0, 0)``) and stays outside every group.

    >>> spans = torch.tensor([[[0, 0], [0, 5], [6, 6], [6, 11], [0, 0]]])
    >>> taking_part(spans[..., 0], spans[..., 1], torch.ones(1, 5, dtype=torch.bool))
    tensor([[False,  True,  True,  True, False]])
    """
    solid = counts & (ends > starts)
    length = solid.shape[-1]
    previous, following = _neighbours(solid)
    prev_end = ends.gather(-1, previous.clamp(min=0))
    next_start = starts.gather(-1, following.clamp(max=max(length - 1, 0)))
    empty = counts & (ends == starts) & (previous >= 0) & (following < length)
    empty &= (prev_end <= starts) & (starts <= next_start)
    in_order = starts >= _before(torch.where(empty, starts, -1), -1).cummax(-1).values
    return solid | (empty & in_order)


def backwards(starts: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor) -> list[str]:
    """What is wrong with each row whose counted spans go backwards: ``"row b: token k spans ..."``, in row order.

    A span must not end before it starts, and a token with a non-empty span
    must neither start nor end before the one before it (one text per row).

    >>> spans = torch.tensor([[[0, 5], [3, 4]], [[0, 1], [1, 2]]])
    >>> backwards(spans[..., 0], spans[..., 1], torch.ones(2, 2, dtype=torch.bool))
    ['row 0: token 1 spans (3, 4), which ends before token 0 (0, 5) does']
    """
    reversed_ = counts & (ends < starts)
    solid = counts & (ends > starts)
    previous, _ = _neighbours(solid)
    prev = previous.clamp(min=0)
    prev_start, prev_end = starts.gather(-1, prev), ends.gather(-1, prev)
    early_start = solid & (previous >= 0) & (starts < prev_start)
    early_end = solid & (previous >= 0) & (ends < prev_end)
    rows = (reversed_ | early_start | early_end).any(-1).nonzero().flatten().tolist()
    problems = []
    for b in rows:
        if reversed_[b].any():
            k = int(reversed_[b].nonzero()[0])
            problems.append(f"row {b}: token {k} spans ({starts[b, k]}, {ends[b, k]}), which ends before it starts")
            continue
        k = int((early_start[b] | early_end[b]).nonzero()[0])
        a, which = int(previous[b, k]), "starts" if early_start[b, k] else "ends"
        problems.append(
            f"row {b}: token {k} spans ({starts[b, k]}, {ends[b, k]}), which {which} before token {a} "
            f"({starts[b, a]}, {ends[b, a]}) does"
        )
    return problems


def align_row(
    t_lo: list[int], t_hi: list[int], s_lo: list[int], s_hi: list[int], t_first: int, s_first: int
) -> tuple[int, list[int], int, list[int]]:
    """The groups of one row, from the gaps after each side's taking-part tokens.

    ``t_lo[i]``/``t_hi[i]``: the gap after the teacher's ``i``-th taking-part
    token (its end, the next one's start; ``END`` after the last); empty
    (``lo > hi``) where no cut fits. ``t_first``: the start of the teacher's
    first one. Returns, per side, the index of the first grouped token and of
    each group's last token (group ``g`` holds the tokens after group
    ``g - 1``'s last, up to its own).

    >>> # 'hello world': 'hello', 'Ġworld' (covering ' world') against 'he', 'llo', 'world'
    >>> align_row([5, 11], [5, END], [2, 5, 11], [2, 6, END], 0, 0)
    (0, [0, 1], 0, [1, 2])
    """
    n, m = len(t_lo), len(s_lo)
    if not n or not m:
        return 0, [], 0, []
    i = _lead(t_lo, t_hi, s_first)
    j = _lead(s_lo, s_hi, t_hi[i - 1] if i else t_first) if i < n else 0
    first_t, first_s = i, j
    t_lasts: list[int] = []
    s_lasts: list[int] = []
    while i < n and j < m:
        a, b, c, d = t_lo[i], t_hi[i], s_lo[j], s_hi[j]
        if a > b:
            i += 1
        elif c > d:
            j += 1
        elif b < c:
            i += 1
        elif d < a:
            j += 1
        else:  # the two cuts meet: the group ends here
            t_lasts.append(i)
            s_lasts.append(j)
            i += 1
            j += 1
    return first_t, t_lasts, first_s, s_lasts


def _lead(lo: list[int], hi: list[int], other_start: int) -> int:
    """How many leading tokens lie wholly before the other side's first token (up to a cut)."""
    first = 0
    for i, end in enumerate(lo):
        if end > other_start:
            break
        if lo[i] <= hi[i]:
            first = i + 1
    return first
