"""Properties of funcdistill.align on random texts, tokenised by real tokenizers trained locally.

Texts mix ASCII words, punctuation, accented and CJK characters, emoji,
combining marks, runs of whitespace (spaces, tabs, newlines, no-break and
ideographic spaces) and empty strings, in padded batches. The tokenizers
(tests/toy_tokenizers.py) are a byte-level BPE with and without
``trim_offsets``, a WordPiece with ``[CLS]``/``[SEP]`` and a Unigram with
Metaspace markers. For every pair:

- each character covered by the grouped tokens of both sides is in the same
  group on both sides, and a character covered by one side only is whitespace;
- groups partition the aligned text: each covered character is in exactly one
  group per side, groups come in text order with at least one token per side,
  and no group could be split further (no cut is common to both sides inside it);
- tokens outside the masks, padding and special tokens are -1;
- the same tokenizer on both sides gives the identity: one group per token,
  except the pieces of one character, which form one group.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from funcdistill.align import align, group_logprobs
from tests.toy_tokenizers import NAMES, encode_batch

WORDS = [
    "the",
    "hello",
    "world",
    "fox",
    "naïve",
    "café",
    "東京",
    "大阪",
    "😀",
    "🎉",
    "x",
    "a\u0301",
    "жук",
    "Q9",
    "déjà",
]
PUNCT = [".", ",", "!", "(", ")", "—", "#", "'"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \t ", "\xa0", "\u3000"]

texts = st.lists(st.sampled_from(WORDS + PUNCT + SPACES), max_size=14).map("".join)
batches = st.lists(texts, min_size=1, max_size=4)
pairs = st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES))


def covered(offsets, group, row):
    """``{character: group}`` of one row's grouped tokens; fails if a character is in two groups."""
    out: dict[int, int] = {}
    for (s, e), g in zip(offsets[row].tolist(), group[row].tolist()):
        if g < 0:
            continue
        for c in range(s, e):
            assert out.setdefault(c, g) == g, f"character {c} is in groups {out[c]} and {g}"
    return out


def tokens_of(offsets, group, row):
    """One row's grouped tokens as ``(position, start, end, group)``, in order."""
    return [(k, s, e, g) for k, ((s, e), g) in enumerate(zip(offsets[row].tolist(), group[row].tolist())) if g >= 0]


def check_groups(side, offsets, group, last, mask, row):
    """Groups of one side: numbered 0.. in order, each non-empty, ``last`` its last token, padding after."""
    toks = tokens_of(offsets, group, row)
    numbers = [g for *_, g in toks]
    count = int(mask[row].sum())
    assert numbers == sorted(numbers) and set(numbers) == set(range(count)), (side, numbers)
    assert mask[row].tolist() == [True] * count + [False] * (mask.shape[1] - count)
    for g in range(count):
        assert last[row, g] == max(k for k, *_, h in toks if h == g), (side, g)
    assert (last[row, count:] == 0).all()


def check_minimal(t_offsets, t_group, s_offsets, s_group, row, count):
    """Inside a group, no cut of the teacher's meets a cut of the student's (the groups are the finest)."""

    def inner_cuts(offsets, group, g):
        toks = [(s, e) for _, s, e, h in tokens_of(offsets, group, row) if h == g]
        return [(e0, s1) for (_, e0), (s1, _) in itertools.pairwise(toks) if e0 <= s1]

    for g in range(count):
        for a, b in inner_cuts(t_offsets, t_group, g):
            for c, d in inner_cuts(s_offsets, s_group, g):
                assert b < c or d < a, f"group {g} could be cut at [{a}, {b}] ∩ [{c}, {d}]"


def check_alignment(batch, t_name, s_name, t_offsets, t_mask, s_offsets, s_mask, a):
    for row, text in enumerate(batch):
        for side, off, grp, last, m in (
            ("teacher", t_offsets, a.teacher_group, a.teacher_last, t_mask),
            ("student", s_offsets, a.student_group, a.student_last, s_mask),
        ):
            check_groups(side, off, grp, last, a.mask, row)
            assert (grp[row][~m[row]] == -1).all(), f"{side}: a token outside the mask is in a group"
            empty = off[row, :, 0] == off[row, :, 1]
            if (side, "wordpiece") in (("teacher", t_name), ("student", s_name)):
                assert (grp[row][empty] == -1).all(), f"{side}: a special token is in a group"
        t_cov = covered(t_offsets, a.teacher_group, row)
        s_cov = covered(s_offsets, a.student_group, row)
        for c in t_cov.keys() & s_cov.keys():
            assert t_cov[c] == s_cov[c], f"{text!r}: character {c} is in teacher group {t_cov[c]}, student {s_cov[c]}"
        count = int(a.mask[row].sum())
        spans = [sorted(c for cov in (t_cov, s_cov) for c, h in cov.items() if h == g) for g in range(count)]
        spans = [chars for chars in spans if chars]  # a group of trimmed whitespace tokens covers no character
        for before, after in itertools.pairwise(spans):  # groups come in text order, on both sides
            assert before[-1] < after[0], (text, before, after)
        check_minimal(t_offsets, a.teacher_group, s_offsets, a.student_group, row, count)
    return t_cov, s_cov


@given(batch=batches, names=pairs)
def test_groups_cover_the_same_characters_and_partition_the_text(batch, names):
    t_name, s_name = names
    _, t_offsets, t_mask = encode_batch(t_name, batch)
    _, s_offsets, s_mask = encode_batch(s_name, batch)
    a = align(t_offsets, s_offsets, teacher_mask=t_mask, student_mask=s_mask)
    check_alignment(batch, t_name, s_name, t_offsets, t_mask, s_offsets, s_mask, a)
    for row, text in enumerate(batch):
        t_cov = covered(t_offsets, a.teacher_group, row)
        s_cov = covered(s_offsets, a.student_group, row)
        for c in t_cov.keys() ^ s_cov.keys():
            assert text[c].isspace(), f"{text!r}: {text[c]!r} at {c} is covered by one side only"
        if text.strip() and t_cov and s_cov:
            solid = {c for c, ch in enumerate(text) if not ch.isspace()}
            assert solid <= t_cov.keys() and solid <= s_cov.keys(), f"{text!r}: a character is in no group"


@given(batch=batches, names=pairs, data=st.data())
def test_masked_tokens_are_outside_and_the_groups_still_agree(batch, names, data):
    t_name, s_name = names
    _, t_offsets, t_mask = encode_batch(t_name, batch)
    _, s_offsets, s_mask = encode_batch(s_name, batch)
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    t_mask = t_mask & (torch.rand(t_mask.shape, generator=gen) < 0.8)
    s_mask = s_mask & (torch.rand(s_mask.shape, generator=gen) < 0.8)
    a = align(t_offsets, s_offsets, teacher_mask=t_mask, student_mask=s_mask)
    check_alignment(batch, t_name, s_name, t_offsets, t_mask, s_offsets, s_mask, a)


@given(batch=batches, name=st.sampled_from(NAMES))
def test_the_same_tokenizer_gives_the_identity(batch, name):
    ids, offsets, mask = encode_batch(name, batch)
    a = align(offsets, offsets, teacher_mask=mask, student_mask=mask)
    assert torch.equal(a.teacher_group, a.student_group) and torch.equal(a.teacher_last, a.student_last)
    for row in range(len(batch)):
        toks = tokens_of(offsets, a.teacher_group, row)
        expected, previous_end = -1, None
        for _, s, e, g in toks:  # a new group at each token, unless it shares a character with the one before
            expected += previous_end is None or s >= previous_end
            previous_end = e
            assert g == expected
        solid = [k for k, (s, e) in enumerate(offsets[row].tolist()) if e > s and mask[row, k]]
        assert all(a.teacher_group[row, k] >= 0 for k in solid), "a token with text is in no group"
    # where each group is one token, group log-probabilities are token log-probabilities
    logits = torch.randn(*ids.shape, 500, generator=torch.Generator().manual_seed(0))
    merged = group_logprobs(logits, ids, a.teacher_group, a.mask.shape[1])
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    for row in range(len(batch)):
        for g in range(int(a.mask[row].sum())):
            positions = (a.teacher_group[row] == g).nonzero().flatten().tolist()
            want = sum((token[row, k - 1] for k in positions if k > 0), torch.tensor(0.0))
            assert torch.allclose(merged[row, g], want, atol=1e-4)  # float32 sums of a few logs


def test_trimmed_and_untrimmed_offsets_of_one_tokenizer_give_the_identity():
    # the same tokens, 'Ġ...' spans with and without their leading space: groups agree on every word
    batch = ["  hello  world\tthere  ", "x  y", "", " 東京 😀 café "]
    ids, untrimmed, mask = encode_batch("bpe", batch)
    ids_trim, trimmed, mask_trim = encode_batch("bpe_trim", batch)
    assert torch.equal(ids, ids_trim)
    a = align(untrimmed, trimmed, teacher_mask=mask, student_mask=mask_trim)
    assert torch.equal(a.teacher_group, a.student_group)
    solid = (trimmed[..., 1] > trimmed[..., 0]) & mask
    assert (a.student_group[solid] >= 0).all()
