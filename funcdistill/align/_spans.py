"""One row's alignment: which tokens take part, where each tokenization may cut the text, the merge.

Plain Python on lists of ``(start, end)`` character spans: :func:`funcdistill.align.align`
calls :func:`align_row` once per row of a batch, on the rows' ``tolist()``.

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

import itertools
from collections.abc import Sequence

__all__: list[str] = []

_END = 1 << 62  # the gap after a row's last token reaches past any text


def taking_part(spans: Sequence[Sequence[int]], counts: Sequence[bool]) -> tuple[list[int], str | None]:
    """The positions of the tokens that take part in the alignment, or a problem with the spans.

    A counted token with a non-empty span takes part. A counted token with an
    empty span takes part only between two such tokens, in order (a whitespace
    token that ``trim_offsets`` emptied); elsewhere it is a special token
    (``(0, 0)``) and stays outside every group. The problem names the first
    token whose span is reversed or goes back in the text.

    >>> taking_part([(0, 0), (0, 5), (6, 6), (6, 11), (0, 0)], [True] * 5)
    ([1, 2, 3], None)
    >>> taking_part([(0, 5), (3, 4)], [True, True])[1]
    'token 1 spans (3, 4), which ends before token 0 (0, 5) does'
    """
    solid = [k for k, (s, e) in enumerate(spans) if counts[k] and e > s]
    for k, (s, e) in enumerate(spans):
        if counts[k] and e < s:
            return [], f"token {k} spans ({s}, {e}), which ends before it starts"
    for a, b in itertools.pairwise(solid):
        (s0, e0), (s1, e1) = spans[a], spans[b]
        if s1 < s0:
            return [], f"token {b} spans ({s1}, {e1}), which starts before token {a} ({s0}, {e0}) does"
        if e1 < e0:
            return [], f"token {b} spans ({s1}, {e1}), which ends before token {a} ({s0}, {e0}) does"
    part: list[int] = []
    for a, b in itertools.pairwise(solid):
        part.append(a)
        last = spans[a][1]
        for k in range(a + 1, b):
            s = spans[k][0]
            if counts[k] and spans[k][1] == s and last <= s <= spans[b][0]:
                part.append(k)
                last = s
    return part + solid[-1:], None


def _cuts(spans: Sequence[Sequence[int]], part: list[int]) -> list[tuple[int, int]]:
    """The gap after each taking-part token: ``(lo, hi)``, empty (``lo > hi``) where no cut fits."""
    starts = [spans[k][0] for k in part[1:]] + [_END]
    return [(spans[k][1], hi) for k, hi in zip(part, starts)]


def align_row(
    teacher: Sequence[Sequence[int]], t_part: list[int], student: Sequence[Sequence[int]], s_part: list[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The groups of one row: for each side, ``(first, last)`` indices into its taking-part list, per group.

    >>> # 'hello world': 'hello', 'Ġworld' (covering ' world') against 'he', 'llo', 'world'
    >>> align_row([(0, 5), (5, 11)], [0, 1], [(0, 2), (2, 5), (6, 11)], [0, 1, 2])
    ([(0, 0), (1, 1)], [(0, 1), (2, 2)])
    """
    t_cut, s_cut = _cuts(teacher, t_part), _cuts(student, s_part)
    n, m = len(t_part), len(s_part)
    i = _lead(t_part, teacher, student[s_part[0]][0], t_cut) if n and m else 0
    j = _lead(s_part, student, teacher[t_part[i]][0], s_cut) if i < n and m else 0
    t_groups: list[tuple[int, int]] = []
    s_groups: list[tuple[int, int]] = []
    while i < n and j < m:
        i0, j0 = i, j
        while True:
            (a, b), (c, d) = t_cut[i], s_cut[j]
            if a > b:
                i += 1
            elif c > d:
                j += 1
            elif b < c:
                i += 1
            elif d < a:
                j += 1
            else:
                break
        t_groups.append((i0, i))
        s_groups.append((j0, j))
        i, j = i + 1, j + 1
    return t_groups, s_groups


def _lead(part: list[int], spans: Sequence[Sequence[int]], other_start: int, cut: list[tuple[int, int]]) -> int:
    """The first taking-part index that does not lie wholly before the other side's first token."""
    first = 0
    for i, k in enumerate(part):
        if spans[k][1] > other_start:
            break
        if cut[i][0] <= cut[i][1]:
            first = i + 1
    return first
