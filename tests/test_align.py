"""funcdistill.align: aligning two tokenizations (`align`), using the alignment (`at_groups`,
`group_logprobs`) and the shared vocabulary (`shared_vocab`).

The tokenizers are real ones trained locally (tests/toy_tokenizers.py); the
references are float64 Python loops. The random properties (random texts) are
in property_tests/test_align_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from funcdistill.align import Alignment, align, at_groups, group_logprobs, shared_vocab
from tests.toy_tokenizers import encode_batch, tokenizer

pytestmark = pytest.mark.usefixtures("seed")


def spans(*rows):
    """Offsets ``(B, T, 2)`` from rows of ``(start, end)`` pairs (rows padded with ``(0, 0)``)."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [(0, 0)] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(
        len(rows), width, 2
    )


def texts_of(text, offsets, group, g):
    """The texts of the tokens of group ``g`` of row 0."""
    return [text[s:e] for (s, e), k in zip(offsets[0].tolist(), group[0].tolist()) if k == g]


def grouped(text, t_name, s_name):
    """For each group of ``text`` tokenised by the two toy tokenizers, the texts of its teacher and student tokens."""
    _, t_off, t_mask = encode_batch(t_name, [text])
    _, s_off, s_mask = encode_batch(s_name, [text])
    a = align(t_off, s_off, teacher_mask=t_mask, student_mask=s_mask)
    return [
        (texts_of(text, t_off, a.teacher_group, g), texts_of(text, s_off, a.student_group, g))
        for g in range(int(a.mask.sum()))
    ]


# --- align: the rules, on hand-made spans -----------------------------------------------------------


def test_identical_offsets_give_one_group_per_token():
    off = spans([(0, 5), (5, 11), (11, 12)])
    a = align(off, off)
    assert a.teacher_group.tolist() == a.student_group.tolist() == [[0, 1, 2]]
    assert a.teacher_last.tolist() == a.student_last.tolist() == [[0, 1, 2]]
    assert a.mask.tolist() == [[True, True, True]]
    assert all(t.dtype == torch.int64 for t in a[:4]) and a.mask.dtype == torch.bool


def test_a_whitespace_gap_does_not_split_a_group():
    # 'hello world': 'hello', 'Ġworld' covering ' world' (no trim_offsets), against 'world' without the space,
    # and against 'Ġworld' trimmed to 'world' (trim_offsets): the same groups
    for teacher in ([(0, 5), (5, 11)], [(0, 5), (6, 11)]):
        a = align(spans(teacher), spans([(0, 2), (2, 5), (6, 11)]))
        assert a.teacher_group.tolist() == [[0, 1]] and a.student_group.tolist() == [[0, 0, 1]]
        assert a.teacher_last.tolist() == [[0, 1]] and a.student_last.tolist() == [[1, 2]]


def test_whitespace_tokens_join_the_group_after_them_trimmed_or_not():
    # 'hello  world': 'hello', 'Ġ', 'Ġworld' against 'hello', 'world'; trim_offsets empties the 'Ġ' to (6, 6)
    student = spans([(0, 5), (7, 12)])
    for teacher in ([(0, 5), (5, 6), (6, 12)], [(0, 5), (6, 6), (7, 12)]):
        a = align(spans(teacher), student)
        assert a.teacher_group.tolist() == [[0, 1, 1]], teacher
        assert a.student_group.tolist() == [[0, 1]]


def test_pieces_of_one_character_stay_in_one_group():
    # '東x': a byte-level side splits '東' into three pieces, each with the span (0, 1)
    pieces = spans([(0, 1), (0, 1), (0, 1), (1, 2)])
    a = align(pieces, spans([(0, 1), (1, 2)]))
    assert a.teacher_group.tolist() == [[0, 0, 0, 1]] and a.teacher_last.tolist() == [[2, 3]]
    # with itself too: character offsets cannot tell where inside '東' the pieces were cut
    assert align(pieces, pieces).teacher_group.tolist() == [[0, 0, 0, 1]]
    # a piece that covers the end of one character and the next: 'naÃ' (0, 3) and '¯' (2, 3) of 'naï'
    a = align(spans([(0, 3), (2, 3), (3, 5)]), spans([(0, 1), (1, 2), (2, 3), (3, 5)]))
    assert a.teacher_group.tolist() == [[0, 0, 1]] and a.student_group.tolist() == [[0, 0, 0, 1]]


def test_special_tokens_padding_and_masked_tokens_are_outside_every_group():
    # BOS (0, 0), 'ab', 'cd', EOS (0, 0), padding; the student's first token is masked out
    teacher = spans([(0, 0), (0, 2), (2, 4), (0, 0), (0, 0)])
    t_mask = torch.tensor([[True, True, True, True, False]])
    student = spans([(0, 2), (2, 4)])
    a = align(teacher, student, teacher_mask=t_mask, student_mask=torch.tensor([[0, 1]]))
    assert a.teacher_group.tolist() == [[-1, -1, 0, -1, -1]]  # 'ab' lies wholly before the student's aligned text
    assert a.student_group.tolist() == [[-1, 0]]
    assert a.teacher_last.tolist() == [[2]] and a.student_last.tolist() == [[1]]


def test_tokens_beyond_the_other_side_are_outside_the_aligned_text():
    a = align(spans([(0, 3), (4, 7), (8, 9)]), spans([(4, 7)]))
    assert a.teacher_group.tolist() == [[-1, 0, -1]] and a.student_group.tolist() == [[0]]


def test_rows_with_fewer_groups_are_padded():
    a = align(spans([(0, 1), (1, 2), (2, 3)], [(0, 3)], []), spans([(0, 1), (1, 3)], [(0, 1), (1, 3)], []))
    assert a.mask.tolist() == [[True, True], [True, False], [False, False]]
    assert a.teacher_last.tolist() == [[0, 2], [0, 0], [0, 0]]
    assert a.student_last.tolist() == [[0, 1], [1, 0], [0, 0]]
    assert a.teacher_group.tolist() == [[0, 1, 1], [0, -1, -1], [-1, -1, -1]]
    assert a.student_group.tolist() == [[0, 1], [0, 0], [-1, -1]]


def test_an_empty_batch_and_empty_rows():
    a = align(torch.zeros(0, 4, 2, dtype=torch.int64), torch.zeros(0, 3, 2, dtype=torch.int64))
    assert [tuple(t.shape) for t in a] == [(0, 4), (0, 3), (0, 0), (0, 0), (0, 0)]
    a = align(torch.zeros(2, 0, 2, dtype=torch.int32), torch.zeros(2, 0, 2, dtype=torch.int32))
    assert [tuple(t.shape) for t in a] == [(2, 0), (2, 0), (2, 0), (2, 0), (2, 0)]


def test_the_alignment_is_a_pytree_of_tensors():
    a = align(spans([(0, 1)]), spans([(0, 1)]))
    leaves, spec = torch.utils._pytree.tree_flatten(a)
    assert isinstance(a, Alignment) and len(leaves) == 5
    assert torch.utils._pytree.tree_unflatten(leaves, spec) == a


# --- align: on real tokenizers --------------------------------------------------------------------


def test_real_tokenizers_group_the_same_words():
    text = "hello  world, 東京 café"
    assert grouped(text, "bpe", "wordpiece") == [
        (["hello"], ["hello"]),
        ([" ", " world"], ["world"]),
        ([","], [","]),
        ([" ", "東京"], ["東京"]),
        ([" caf", "é"], ["café"]),
    ]
    # Metaspace's prepended '▁' spans (0, 1), inside 'he' (0, 2): one group; trimmed 'Ġ' tokens have empty spans
    assert grouped(text, "unigram", "bpe_trim") == [
        (["h", "he", "l", "l", "o"], ["hello"]),
        ([" "], [""]),
        ([" world"], ["world"]),
        ([","], [","]),
        ([" "], [""]),
        (["東", "京"], ["東京"]),
        ([" ", "c", "a", "f"], ["caf"]),
        (["é"], ["é"]),
    ]


def test_trim_offsets_changes_only_whitespace_at_the_edges():
    # trim_offsets empties the spans of whitespace tokens and moves 'Ġhello' from ' hello' to 'hello': the groups'
    # words stay the same; whitespace-only groups at the ends of the text, which only one side covers, go
    def words(groups):
        def solid(texts):
            return [t.strip() for t in texts if t.strip()]

        return [(solid(t), solid(s)) for t, s in groups if solid(t) or solid(s)]

    text = "  hello  world\tthere  "
    for other in ("wordpiece", "unigram"):
        untrimmed, trimmed = grouped(text, "bpe", other), grouped(text, "bpe_trim", other)
        assert words(untrimmed) == words(trimmed), other
        assert words(trimmed)[0] == (["hello"], ["hello"] if other == "wordpiece" else ["he", "l", "l", "o"])


def test_a_padded_batch_from_a_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    texts = ["hello world", "", "the lazy dog  jumps"]
    sides = []
    for name in ("bpe", "wordpiece"):
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer(name), pad_token="[PAD]")
        batch = fast(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")
        sides.append((batch["offset_mapping"], batch["attention_mask"]))
    a = align(sides[0][0], sides[1][0], teacher_mask=sides[0][1], student_mask=sides[1][1])
    assert a.mask.sum(1).tolist() == [2, 0, 4]
    assert a.student_group[0, :4].tolist() == [-1, 0, 1, -1]  # [CLS] hello world [SEP]
    assert (a.teacher_group[1] == -1).all() and (a.student_group[1] == -1).all()


# --- align: errors --------------------------------------------------------------------------------


def test_offsets_that_are_not_integer_tensors_are_refused():
    good = spans([(0, 1)])
    with pytest.raises(TypeError, match=r"align: teacher_offsets must be a tensor, got list; .*return_offsets_mapping"):
        align([[(0, 1)]], good)
    with pytest.raises(TypeError, match=r"align: student_offsets must hold integer character offsets .*torch.float32"):
        align(good, good.float())


def test_offsets_of_the_wrong_shape_are_refused():
    good = spans([(0, 1)])
    with pytest.raises(ValueError, match=r"teacher_offsets must have shape \(B, T, 2\), got \(1, 2\); add the batch"):
        align(good[0], good)
    with pytest.raises(ValueError, match=r"student_offsets must have shape \(B, T, 2\), got \(1, 1, 3\)"):
        align(good, torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"hold 1 and 2 rows; give both tokenizations of the same batch"):
        align(good, spans([(0, 1)], [(0, 1)]))


def test_masks_of_the_wrong_shape_or_dtype_are_refused():
    good = spans([(0, 1), (1, 2)])
    with pytest.raises(ValueError, match=r"teacher_mask must have shape \(B, T\) = \(1, 2\), .* got \(2,\)"):
        align(good, good, teacher_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"student_mask must be bool or 0/1 integers .*torch.float32"):
        align(good, good, student_mask=torch.ones(1, 2))
    with pytest.raises(TypeError, match=r"student_mask must be a tensor or None, got list"):
        align(good, good, student_mask=[[1, 1]])


def test_offsets_that_go_backwards_are_refused_with_every_row_named():
    good = spans([(0, 2), (2, 4)], [(0, 2), (2, 4)])
    bad = spans([(0, 2), (2, 4), (0, 2)], [(3, 1)])  # a second text in row 0, a reversed span in row 1
    with pytest.raises(ValueError, match=r"spans must go forward") as info:
        align(good, bad)
    message = str(info.value)
    assert "student_offsets row 0: token 2 spans (0, 2), which starts before token 1 (2, 4) does" in message
    assert "student_offsets row 1: token 0 spans (3, 1), which ends before it starts" in message
    assert "teacher_offsets" not in message
    # a masked-out second text is fine
    align(good[:1], bad[:1], student_mask=torch.tensor([[True, True, False]]))


# --- at_groups ------------------------------------------------------------------------------------


def test_at_groups_takes_each_groups_last_position():
    logits = torch.randn(2, 5, 7)
    last = torch.tensor([[4, 0, 2], [1, 1, 0]])
    out = at_groups(logits, last)
    expected = torch.stack([torch.stack([logits[b, last[b, g]] for g in range(3)]) for b in range(2)])
    assert torch.equal(out, expected)
    assert torch.equal(vmap(at_groups)(logits, last), out)
    w = torch.randn(2, 3, 7)
    g = grad(lambda x: (at_groups(x, last) * w).sum())(logits)
    expected_g = torch.zeros_like(logits)
    for b in range(2):
        for k in range(3):
            expected_g[b, last[b, k]] += w[b, k]
    assert torch.allclose(g, expected_g)  # sums of at most three float32 products: rounding only


def test_at_groups_refuses_mismatched_arguments():
    with pytest.raises(ValueError, match=r"at_groups: last must have the leading dimensions .* got \(3, 2\)"):
        at_groups(torch.randn(2, 5, 7), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"at_groups: last must hold integers .*torch.float32"):
        at_groups(torch.randn(2, 5, 7), torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"at_groups: logits must be a floating tensor"):
        at_groups(torch.zeros(2, 5, 7, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))


# --- group_logprobs -------------------------------------------------------------------------------


def reference_group_logprobs(logits, ids, group, num_groups):
    """float64 loop: the value and its gradient with respect to the logits, d/dlogits of sum over groups."""
    B, T, V = logits.shape
    out = [[0.0] * num_groups for _ in range(B)]
    d = torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for j in range(1, T):
            g = int(group[b, j])
            if g < 0:
                continue
            row = [float(x) for x in logits[b, j - 1]]
            top = max(row)
            lse = top + math.log(sum(math.exp(x - top) for x in row))
            out[b][g] += row[int(ids[b, j])] - lse
            for v in range(V):
                d[b, j - 1, v] += (v == int(ids[b, j])) - math.exp(row[v] - lse)
    return torch.tensor(out, dtype=torch.float64).reshape(B, num_groups), d


def test_group_logprobs_equal_a_float64_reference_with_its_gradient():
    logits = torch.randn(3, 6, 5, dtype=torch.float64)
    ids = torch.randint(0, 5, (3, 6))
    group = torch.tensor([[-1, 0, 0, 1, 2, 2], [-1, -1, 0, 0, 0, -1], [-1, 0, 1, 2, 3, -1]])
    ids[1, 5] = -100  # a label-style id on a token outside the groups is never looked up
    value, d = reference_group_logprobs(logits, ids, group, 4)
    assert torch.allclose(group_logprobs(logits, ids, group, 4), value, atol=1e-12)
    g = grad(lambda x: group_logprobs(x, ids, group, 4).sum())(logits)
    assert torch.allclose(g, d, atol=1e-12)


def test_group_logprobs_are_token_logprobs_when_each_group_is_one_token():
    logits = torch.randn(2, 5, 9)
    ids = torch.randint(0, 9, (2, 5))
    group = torch.tensor([[-1, 0, 1, 2, 3]] * 2)
    tokens = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(group_logprobs(logits, ids, group, 4), tokens, atol=1e-6)  # float32 rounding of logsumexp


def test_group_logprobs_under_vmap_and_in_low_precision():
    logits = torch.randn(3, 6, 5)
    ids = torch.randint(0, 5, (3, 6))
    group = torch.tensor([[-1, 0, 0, 1, 1, 2]] * 3)
    batched = group_logprobs(logits, ids, group, 3)
    assert torch.allclose(vmap(group_logprobs, in_dims=(0, 0, 0, None))(logits, ids, group, 3), batched)
    low = group_logprobs(logits.bfloat16(), ids, group, 3)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), batched, atol=0.1)  # bfloat16 keeps ~3 significant digits of sums near -5


@pytest.mark.compile
def test_group_logprobs_and_at_groups_compile_without_graph_break():
    logits = torch.randn(2, 6, 5)
    ids = torch.randint(0, 5, (2, 6))
    a = align(spans([(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7)]), spans([(0, 2), (2, 4), (4, 7)]))
    group, last = a.teacher_group.expand(2, -1), a.teacher_last.expand(2, -1)

    def f(x):
        return group_logprobs(x, ids, group, 3).sum() + at_groups(x, last).square().sum()

    assert torch.allclose(torch.compile(grad(f), fullgraph=True)(logits), grad(f)(logits), atol=1e-5)


def test_group_logprobs_refuses_mismatched_arguments():
    logits, ids, group = (
        torch.randn(2, 4, 5),
        torch.zeros(2, 4, dtype=torch.int64),
        torch.zeros(2, 4, dtype=torch.int64),
    )
    with pytest.raises(
        ValueError, match=r"group_logprobs: ids must have the shape of logits without V, \(2, 4\), got \(2, 3\)"
    ):
        group_logprobs(logits, ids[:, :3], group, 1)
    with pytest.raises(ValueError, match=r"group_logprobs: group must have the shape"):
        group_logprobs(logits, ids, group[0], 1)
    with pytest.raises(
        TypeError, match=r"num_groups must be an int >= 0 \(the Alignment's mask.shape\[-1\]\), got True"
    ):
        group_logprobs(logits, ids, group, True)
    with pytest.raises(TypeError, match=r"group_logprobs: ids must hold integers"):
        group_logprobs(logits, ids.float(), group, 1)


# --- shared_vocab ---------------------------------------------------------------------------------


def test_shared_vocab_maps_identical_vocabularies_to_themselves():
    for name in ("bpe", "wordpiece", "unigram"):
        vocab = tokenizer(name).get_vocab()
        t_ids, s_ids = shared_vocab(tokenizer(name), tokenizer(name))
        assert t_ids.tolist() == s_ids.tolist() == sorted(vocab.values()), name
        assert t_ids.dtype == s_ids.dtype == torch.int64


def test_shared_vocab_across_byte_level_and_sentencepiece_markers():
    t_vocab, s_vocab = tokenizer("bpe").get_vocab(), tokenizer("unigram").get_vocab()
    t_ids, s_ids = shared_vocab(t_vocab, s_vocab)
    t_str = {i: s for s, i in t_vocab.items()}
    s_str = {i: s for s, i in s_vocab.items()}
    pairs = {t_str[t]: s_str[s] for t, s in zip(t_ids.tolist(), s_ids.tolist())}
    decode = tokenizer("bpe").decoder.decode
    for t, s in pairs.items():
        assert decode([t]) == s.replace("▁", " "), (t, s)  # the byte-level decoder agrees with the pairing
    assert pairs["Ġthe"] == "▁the" and pairs["Ġ"] == "▁" and pairs["the"] == "the"
    assert "ĠcafÃ©" not in pairs or pairs["ĠcafÃ©"] == "▁café"
    assert t_ids.tolist() == sorted(t_ids.tolist()) and len(set(s_ids.tolist())) == len(s_ids)
    # every token whose text is in both vocabularies is paired
    both = {decode([t]) for t in t_vocab if "�" not in decode([t])} & {s.replace("▁", " ") for s in s_vocab}
    assert len(pairs) >= len(both) > 50


def test_wordpiece_continuations_are_not_word_initial_pieces():
    t_ids, s_ids = shared_vocab({"Ġlo": 0, "lo": 1, "Ġw": 2}, {"##lo": 10, "lo": 11, "w": 12, "[CLS]": 13})
    assert dict(zip(t_ids.tolist(), s_ids.tolist())) == {0: 11, 1: 10, 2: 12}
    wp, bpe = tokenizer("wordpiece").get_vocab(), tokenizer("bpe").get_vocab()
    t_ids, s_ids = shared_vocab(bpe, wp)
    t_str, s_str = {i: s for s, i in bpe.items()}, {i: s for s, i in wp.items()}
    for t, s in zip(t_ids.tolist(), s_ids.tolist()):
        assert t_str[t].startswith("Ġ") != s_str[s].startswith("##"), (t_str[t], s_str[s])


def test_shared_vocab_prefers_a_piece_over_a_byte_fallback_token():
    t_ids, s_ids = shared_vocab({"A": 0, "Ċ": 1, "Ġ": 2}, {"<0x41>": 3, "<0x0A>": 4, "A": 9, "▁": 10})
    assert (t_ids.tolist(), s_ids.tolist()) == ([0, 1, 2], [9, 4, 10])


def test_shared_vocab_schemes_can_be_given():
    # a tiny WordPiece vocabulary without '##' pieces would be read as plain strings
    assert shared_vocab({"Ġa": 0}, {"a": 1})[0].tolist() == []
    assert shared_vocab({"Ġa": 0}, {"a": 1}, student_scheme="wordpiece")[1].tolist() == [1]


def test_shared_vocab_refuses_what_is_not_a_vocabulary():
    with pytest.raises(
        TypeError, match=r"shared_vocab: student_vocab must be a \{token string: id\} dict or a tokenizer"
    ):
        shared_vocab({"a": 0}, ["a"])
    with pytest.raises(
        TypeError, match=r"teacher_vocab must map token strings to ids .* 2 entries do not, e.g. 'b': -1, 'c': 'x'"
    ):
        shared_vocab({"a": 0, "b": -1, "c": "x"}, {"a": 0})
    with pytest.raises(ValueError, match=r"teacher_scheme must be one of 'byte-level', .* got 'bytelevel'"):
        shared_vocab({"a": 0}, {"a": 0}, teacher_scheme="bytelevel")
