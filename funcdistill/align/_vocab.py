"""`shared_vocab`: the tokens whose strings are equal in two vocabularies.

Vocabularies spell the same text differently. Each token string is first
turned into the bytes of text it stands for, by the vocabulary's *scheme*:

- ``"byte-level"`` (GPT-2, Llama 3, Qwen): each character stands for one byte
  (``'Ġ'`` is a space, ``'Ċ'`` a newline, ``'Ã©'`` the two bytes of ``'é'``).
  Detected when some token starts with ``'Ġ'``; a token with a character
  outside the 256 byte characters (an added token) is taken as plain text.
- ``"sentencepiece"`` (Llama 2, T5, Metaspace): ``'▁'`` is a space, a
  byte-fallback token ``'<0x0A>'`` is that byte. Detected by a ``'▁'``.
- ``"wordpiece"`` (BERT): a continuation piece ``'##ing'`` is ``ing``, glued to
  the piece before it; a word-initial piece ``'walk'`` starts a word, and is
  taken as ``' walk'`` (a leading space), so it matches ``'Ġwalk'`` and
  ``'▁walk'`` but never a continuation. Detected by a ``'##'`` piece.
- ``"plain"``: the string's UTF-8 bytes.

Two tokens are shared when their bytes are equal. Where several tokens of one
vocabulary give the same bytes (a SentencePiece byte-fallback token and the
piece for the same character), the plain piece is kept over the byte token,
then the smallest id. Special tokens are compared like any other string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["shared_vocab"]

SCHEMES = ("byte-level", "sentencepiece", "wordpiece", "plain")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's map from the 256 printable characters of byte-level vocabularies to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_BYTES = _byte_alphabet()


def shared_vocab(
    teacher_vocab: Any,
    student_vocab: Any,
    *,
    teacher_scheme: str | None = None,
    student_scheme: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the tokens that mean the same text in both vocabularies.

    Args:
        teacher_vocab: the teacher's vocabulary, a ``{token string: id}`` dict
            or anything with ``get_vocab()`` (a ``tokenizers.Tokenizer``, a
            ``transformers`` tokenizer).
        student_vocab: the student's, likewise.
        teacher_scheme: how the teacher's strings spell text: ``"byte-level"``,
            ``"sentencepiece"``, ``"wordpiece"`` or ``"plain"`` (see
            :mod:`funcdistill.align._vocab`); ``None`` detects it from the strings.
        student_scheme: the student's, likewise.

    Returns:
        ``(teacher_ids, student_ids)``: two int64 tensors of the same length,
        sorted by teacher id; ``teacher_ids[k]`` and ``student_ids[k]`` stand
        for the same text. Identical vocabularies map every id to itself.

    Example:
        >>> t = {"Ġworld": 0, "hello": 1, "Ġ": 2, "ĠcafÃ©": 3}  # byte-level
        >>> s = {"▁": 5, "▁café": 6, "hel": 7, "▁world": 8}  # SentencePiece
        >>> shared_vocab(t, s)
        (tensor([0, 2, 3]), tensor([8, 5, 6]))
    """
    t_bytes = _spelled("teacher_vocab", teacher_vocab, "teacher_scheme", teacher_scheme)
    s_bytes = _spelled("student_vocab", student_vocab, "student_scheme", student_scheme)
    pairs = sorted((tid, s_bytes[text]) for text, tid in t_bytes.items() if text in s_bytes)
    teacher_ids = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    student_ids = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return teacher_ids, student_ids


def _spelled(name: str, vocab: Any, scheme_name: str, scheme: str | None) -> dict[bytes, int]:
    """``{bytes of text: id}`` for one vocabulary, one id per text (plain pieces first, then the smallest id)."""
    vocab = _vocab(name, vocab)
    if scheme is None:
        scheme = detect_scheme(vocab)
    elif scheme not in SCHEMES:
        raise ValueError(
            f"shared_vocab: {scheme_name} must be one of {', '.join(map(repr, SCHEMES))} or None, got {scheme!r}."
        )
    best: dict[bytes, tuple[int, int]] = {}
    for token, tid in vocab.items():
        text, rank = _text(token, scheme)
        if text not in best or (rank, tid) < best[text]:
            best[text] = (rank, tid)
    return {text: tid for text, (_, tid) in best.items()}


def _vocab(name: str, vocab: Any) -> Mapping[str, int]:
    """The ``{token string: id}`` dict of a dict or of a tokenizer; checked."""
    if hasattr(vocab, "get_vocab") and not isinstance(vocab, Mapping):
        vocab = vocab.get_vocab()
    if not isinstance(vocab, Mapping):
        raise TypeError(
            f"shared_vocab: {name} must be a {{token string: id}} dict or a tokenizer with get_vocab(), "
            f"got {type(vocab).__name__}."
        )
    bad = [
        (t, i)
        for t, i in vocab.items()
        if not isinstance(t, str) or not isinstance(i, int) or isinstance(i, bool) or i < 0
    ]
    if bad:
        shown = ", ".join(f"{t!r}: {i!r}" for t, i in bad[:3])
        raise TypeError(
            f"shared_vocab: {name} must map token strings to ids (ints >= 0); {len(bad)} entries do not, e.g. {shown}."
        )
    return vocab


def detect_scheme(vocab: Mapping[str, int]) -> str:
    """The scheme that a vocabulary's strings are spelled in (see the module's docstring).

    >>> detect_scheme({"Ġthe": 0, "a": 1}), detect_scheme({"▁the": 0}), detect_scheme({"##s": 0, "the": 1})
    ('byte-level', 'sentencepiece', 'wordpiece')
    """
    tokens = list(vocab)
    if any("▁" in t for t in tokens):
        return "sentencepiece"
    if any(t.startswith("Ġ") for t in tokens):
        return "byte-level"
    if any(t.startswith("##") and len(t) > 2 for t in tokens):
        return "wordpiece"
    return "plain"


def _text(token: str, scheme: str) -> tuple[bytes, int]:
    """The bytes of text that ``token`` stands for, and its rank (0 a piece, 1 a byte-fallback token)."""
    if scheme == "byte-level" and all(c in _BYTES for c in token):
        return bytes(_BYTES[c] for c in token), 0
    if scheme == "sentencepiece":
        match = _BYTE_FALLBACK.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)]), 1
        return token.replace("▁", " ").encode(), 0
    if scheme == "wordpiece":
        if token.startswith("##") and len(token) > 2:
            return token[2:].encode(), 0
        return b" " + token.encode(), 0
    return token.encode(), 0
