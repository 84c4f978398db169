"""`Alignment` and `align`: the groups of tokens on which two tokenizations of one text agree.

A teacher and a student with different tokenizers cut the same text at
different places. Their tokens can still be compared on *groups*: the smallest
spans of text that both tokenizations cover with whole tokens. `align` finds
them from the character offsets that a fast tokenizer returns
(``return_offsets_mapping=True``); the rules (gaps, characters split into
bytes, tokens outside the aligned text) are those of :mod:`funcdistill.align._spans`.

It runs once per batch, in data preparation, on integer tensors: tensor
operations over the whole batch (checks, which tokens take part), then a
two-pointer merge in plain Python over each row's two lists of gaps. The `Alignment` it
returns is a NamedTuple of tensors (a pytree), which a loss then uses under
:func:`torch.func.grad`, :func:`torch.func.vmap` and ``torch.compile``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcdistill.align._spans import END, align_row, backwards, taking_part

__all__ = ["Alignment", "align"]

_OFFSETS_HINT = (
    "pass the offsets of a fast tokenizer called with return_offsets_mapping=True and padding, "
    "e.g. torch.tensor(batch['offset_mapping'])"
)


class Alignment(NamedTuple):
    """The groups of two tokenizations of the same texts (``B`` rows, ``G`` groups at most per row).

    A *group* is a span of text that both tokenizations cover with whole
    tokens: group ``g`` of a row holds consecutive teacher tokens and
    consecutive student tokens that cover the same characters (up to
    characters that one side leaves out, such as whitespace). Groups are
    numbered from 0 in text order; a row with fewer than ``G`` groups is padded.

    Attributes:
        teacher_group: ``(B, T_teacher)`` int64, the group of each teacher
            token; -1 outside the aligned text (padding, special tokens,
            tokens outside the mask).
        student_group: ``(B, T_student)`` int64, likewise for the student.
        teacher_last: ``(B, G)`` int64, the position of each group's last
            teacher token (0 for padding groups): there the teacher has read
            the same text as the student at ``student_last``.
        student_last: ``(B, G)`` int64, likewise for the student.
        mask: ``(B, G)`` bool, ``True`` for real groups, ``False`` for padding.

    Example:
        >>> import torch
        >>> from funcdistill.align import align
        >>> a = align(torch.tensor([[[0, 5], [5, 11]]]), torch.tensor([[[0, 2], [2, 5], [6, 11]]]))
        >>> a.teacher_group, a.student_group
        (tensor([[0, 1]]), tensor([[0, 0, 1]]))
        >>> a.teacher_last, a.student_last, a.mask
        (tensor([[0, 1]]), tensor([[1, 2]]), tensor([[True, True]]))
    """

    teacher_group: torch.Tensor
    student_group: torch.Tensor
    teacher_last: torch.Tensor
    student_last: torch.Tensor
    mask: torch.Tensor


def align(
    teacher_offsets: torch.Tensor,
    student_offsets: torch.Tensor,
    *,
    teacher_mask: torch.Tensor | None = None,
    student_mask: torch.Tensor | None = None,
) -> Alignment:
    """Align two tokenizations of the same texts by their character offsets.

    Groups are the maximal refinement on which both tokenizations agree: a
    group ends where both cut the text at the same place, so group ``g``
    covers the same characters in both. The rules:

    - **Gaps do not split groups.** Characters between two tokens of one side
      (whitespace that the pre-tokenizer drops or ``trim_offsets`` trims, a
      character the normaliser removes, a token outside the mask) belong to
      no token, and a cut may fall anywhere among them: ``'Ġworld'`` covering
      ``' world'`` and ``'world'`` covering ``'world'`` start the same group,
      with or without ``trim_offsets``.
    - **Pieces of one character stay together.** A byte-level tokenizer gives
      every piece of a multi-byte character that character's span; character
      offsets cannot say where inside it the pieces were cut, so they are
      always in one group (with identical tokenizers too: there each group is
      one token, except that the pieces of such a character form one group).
    - **Special tokens are outside.** A token with an empty span (``(0, 0)``:
      BOS, EOS, CLS) is in no group, except a whitespace token that
      ``trim_offsets`` emptied, between two tokens of its row.
    - **The aligned text is what both cover.** Tokens of one side that lie
      wholly before the other side's first token or after its last are -1.

    Args:
        teacher_offsets: ``(B, T_teacher, 2)`` integer character spans
            ``[start, end)`` of the teacher's tokens, as a fast tokenizer
            returns them (``return_offsets_mapping=True``). Along a row the
            spans must go forward (one text per row).
        student_offsets: ``(B, T_student, 2)``, likewise for the student, on
            the same texts (same characters; to align only the assistant text of
            two chat templates, subtract each side's start of that text from its
            offsets and mask the other tokens out).
        teacher_mask: ``(B, T_teacher)`` bool or 0/1 integers, ``True`` where a
            teacher token counts (the attention mask, an assistant span);
            ``None``: every token.
        student_mask: ``(B, T_student)``, likewise for the student.

    Returns:
        The `Alignment`, int64 and bool tensors on ``teacher_offsets``' device.

    Raises:
        TypeError: an argument is not a tensor, or not of an integer (or bool) dtype.
        ValueError: a shape is wrong, or spans go backwards (every such row named).

    Example:
        >>> import torch
        >>> # 'hello  world': 'hello', 'Ġ', 'Ġworld' against 'hel', 'lo', 'world' (spaces dropped)
        >>> t = torch.tensor([[[0, 5], [5, 6], [6, 12]]])
        >>> s = torch.tensor([[[0, 3], [3, 5], [7, 12]]])
        >>> align(t, s).teacher_group, align(t, s).student_group
        (tensor([[0, 1, 1]]), tensor([[0, 0, 1]]))
    """
    t_mask = _check(teacher_offsets, "teacher_offsets", teacher_mask, "teacher_mask")
    s_mask = _check(student_offsets, "student_offsets", student_mask, "student_mask")
    if teacher_offsets.shape[0] != student_offsets.shape[0]:
        raise ValueError(
            f"align: teacher_offsets and student_offsets hold {teacher_offsets.shape[0]} and "
            f"{student_offsets.shape[0]} rows; give both tokenizations of the same batch of texts."
        )
    sides = []
    problems = []
    for name, offsets, mask in (
        ("teacher_offsets", teacher_offsets, t_mask),
        ("student_offsets", student_offsets, s_mask),
    ):
        starts, ends = offsets[..., 0].long(), offsets[..., 1].long()
        problems += [f"{name} {problem}" for problem in backwards(starts, ends, mask)]
        sides.append(_Compact.of(starts, ends, taking_part(starts, ends, mask)))
    if problems:
        raise ValueError(
            "align: the spans must go forward along a row (one text per row, character spans [start, end) "
            "as a fast tokenizer returns them; mask out the second text of a pair):\n  " + "\n  ".join(problems)
        )
    t, s = sides
    rows = [
        align_row(t.lo[b][: t.n[b]], t.hi[b][: t.n[b]], s.lo[b][: s.n[b]], s.hi[b][: s.n[b]], t.first[b], s.first[b])
        for b in range(len(t.n))
    ]
    t_group, t_last, mask = t.groups([(r[0], r[1]) for r in rows])
    s_group, s_last, _ = s.groups([(r[2], r[3]) for r in rows])
    return Alignment(t_group, s_group, t_last, s_last, mask)


class _Compact(NamedTuple):
    """One side's taking-part tokens, moved to the front of each row (positions, gaps as lists for the merge)."""

    positions: torch.Tensor  # (B, T): the positions of the taking-part tokens first, then T
    n: list[int]  # how many take part, per row
    lo: list[list[int]]  # the gap after each: its token's end ...
    hi: list[list[int]]  # ... and the next one's start (END after the last)
    first: list[int]  # the start of each row's first

    @classmethod
    def of(cls, starts: torch.Tensor, ends: torch.Tensor, part: torch.Tensor) -> _Compact:
        batch, length = part.shape
        index = torch.arange(length, device=part.device).expand(batch, length)
        positions = torch.where(part, index, length).sort(-1).values
        n = part.sum(-1)
        safe = positions.clamp(max=max(length - 1, 0))
        lo, next_start = ends.gather(-1, safe), starts.gather(-1, safe)
        hi = torch.cat([next_start[:, 1:], torch.full_like(next_start[:, :1], END)], dim=-1)
        hi = torch.where(index == (n - 1).unsqueeze(-1), END, hi)
        first = next_start[:, 0].tolist() if length else [0] * batch
        return cls(positions, n.tolist(), lo.tolist(), hi.tolist(), first)

    def groups(self, rows: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's group ``(B, T)``, each group's last position ``(B, G)`` and the groups' mask ``(B, G)``."""
        batch, length = self.positions.shape
        device = self.positions.device
        width = max((len(lasts) for _, lasts in rows), default=0)
        lasts = torch.tensor([lasts + [length] * (width - len(lasts)) for _, lasts in rows], dtype=torch.int64)
        lasts = lasts.reshape(batch, width).to(device)
        first = torch.tensor([f for f, _ in rows], dtype=torch.int64, device=device).reshape(batch, 1)
        count = torch.tensor([len(ls) for _, ls in rows], dtype=torch.int64, device=device).reshape(batch, 1)
        mask = torch.arange(width, device=device) < count
        index = torch.arange(length, device=device).expand(batch, length).contiguous()
        group = torch.searchsorted(lasts, index) if width else torch.zeros_like(index)
        end = lasts.gather(-1, (count - 1).clamp(min=0)) if width else torch.zeros_like(first)
        group = torch.where((index >= first) & (index <= end) & (count > 0), group, -1)
        out = torch.full((batch, length + 1), -1, dtype=torch.int64, device=device)
        out.scatter_(1, self.positions, group)
        last = self.positions.gather(-1, lasts.clamp(max=max(length - 1, 0))) if length else lasts
        return out[:, :length], torch.where(mask, last, 0), mask


def _check(offsets: Any, name: str, mask: Any, mask_name: str) -> torch.Tensor:
    """Check one side's offsets and mask; return the mask as bool (all True when None)."""
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"align: {name} must be a tensor, got {type(offsets).__name__}; {_OFFSETS_HINT}.")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"align: {name} must hold integer character offsets (e.g. torch.long), got {offsets.dtype}.")
    if offsets.dim() != 3 or offsets.shape[-1] != 2:
        hint = (
            f"add the batch dimension: {name}[None]" if offsets.dim() == 2 and offsets.shape[-1] == 2 else _OFFSETS_HINT
        )
        raise ValueError(f"align: {name} must have shape (B, T, 2), got {tuple(offsets.shape)}; {hint}.")
    if mask is None:
        return torch.ones(offsets.shape[:2], dtype=torch.bool, device=offsets.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"align: {mask_name} must be a tensor or None, got {type(mask).__name__}.")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"align: {mask_name} must be bool or 0/1 integers (an attention mask), got {mask.dtype}.")
    if mask.shape != offsets.shape[:2]:
        raise ValueError(
            f"align: {mask_name} must have shape (B, T) = {tuple(offsets.shape[:2])}, the first two dimensions "
            f"of {name}, got {tuple(mask.shape)}."
        )
    return mask.bool()
