"""The cross-tokenizer example (examples/cross_tokenizer.py): a byte-level BPE teacher, a Unigram student.

Tokenizers trained locally with ``tokenizers`` and Llamas built from configs;
nothing is downloaded. The example itself runs as a script (as a user runs
it); its pieces are checked here on smaller tokenizers.
"""

from __future__ import annotations

import doctest
import functools
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import funcdistill as fd
from examples import cross_tokenizer as ex
from funcdistill.align import shared_vocab

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def texts():
    return ex.corpus(500)


@pytest.fixture(scope="module")
def tokenizers(texts):
    return ex.train_tokenizers(texts, teacher_vocab=500, student_vocab=600)


def test_example_runs_and_the_losses_fall():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cross_tokenizer.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for loop in ("off-policy", "on-policy"):
        found = re.search(rf"{loop} hybrid loss, mean of \d+ steps: (\d+\.\d+) -> (\d+\.\d+) after", result.stdout)
        assert found, result.stdout
        assert float(found[2]) < 0.9 * float(found[1]), found[0]
    # the script asserts the same-tokenizer check itself (values and gradients); here only that it ran
    assert re.search(
        r"same tokenizer: cross-tokenizer hybrid (\d\.\d+), same-vocabulary generalized JSD \1", result.stdout
    )


def test_tokenizers_are_the_same_in_every_run(tokenizers):
    # the Unigram trainer numbers its pieces in hash-map order, which changes from process to process
    script = (
        "from examples import cross_tokenizer as ex; "
        "tok = ex.train_tokenizers(ex.corpus(500), teacher_vocab=500, student_vocab=600); "
        "print(tok.teacher.backend_tokenizer.to_str()); print(tok.student.backend_tokenizer.to_str())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    here = [tokenizers.teacher.backend_tokenizer.to_str(), tokenizers.student.backend_tokenizer.to_str()]
    assert out.stdout.splitlines() == here


def test_docstring_examples():
    result = doctest.testmod(ex, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_decoded_offsets_are_the_tokenizers_offsets(tokenizers, texts, side):
    tok = getattr(tokenizers, side)
    for text in texts[:50]:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        decoded, spans = ex.decoded_offsets(tok, enc["input_ids"])
        assert decoded == text
        # Where the tokenizer's spans overlap, decoding gives each token the part only it completes: the byte
        # pieces of a split character share that character's span (all but the last get an empty span), and
        # Metaspace's prepended '▁' gets the first character, like the token after it (it gets (0, 0)).
        # Every other token must get the tokenizer's own span.
        theirs = [tuple(o) for o in enc["offset_mapping"]]
        for i, (mine, span) in enumerate(zip(spans, theirs)):
            overlaps = any(max(span[0], o[0]) < min(span[1], o[1]) for j, o in enumerate(theirs) if j != i)
            if overlaps:
                assert span[0] <= mine[0] <= mine[1] <= span[1], (text, i, mine, span)
            else:
                assert mine == span, (text, i)


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_decoded_offsets_of_any_ids_cover_the_text_in_order(tokenizers, side):
    tok = getattr(tokenizers, side)
    g = torch.Generator().manual_seed(0)
    specials = set(tok.all_special_ids)
    for _ in range(20):
        ids = [i for i in torch.randint(0, len(tok), (12,), generator=g).tolist() if i not in specials]
        text, spans = ex.decoded_offsets(tok, ids)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert all(start <= end for start, end in spans)


def test_byte_pieces_of_a_character_get_one_span(tokenizers):
    tok = tokenizers.teacher
    ids = tok.convert_tokens_to_ids(["Ġ", "Ã", "©", "Ã", "©"])  # ' éé', each é as its two bytes
    assert ex.decoded_offsets(tok, ids) == (" éé", [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3)])


def test_rollout_aligns_only_the_generated_text(tokenizers, texts):
    models = ex.build_models(tokenizers, teacher_hidden=32, student_hidden=16)
    torch.manual_seed(0)
    batch = ex.rollout(models, tokenizers, texts[:3], prompt_tokens=3, new_tokens=6)
    a = batch.alignment
    student_ids = batch.inputs["student"]["input_ids"]
    assert student_ids.shape == (3, 9) and a.mask.any()
    assert (a.student_group[:, :3] == -1).all()  # the prompt is never aligned
    # each group covers the same characters of the decoded text on both sides, all after the prompt
    teacher_spans = ex.encode(tokenizers.teacher, [tokenizers.student.decode(r) for r in student_ids])["offset_mapping"]
    student_spans = torch.tensor([ex.decoded_offsets(tokenizers.student, r.tolist())[1] for r in student_ids])
    for row in range(3):
        prompt_end = student_spans[row, 2, 1]
        for g in range(int(a.mask[row].sum())):
            t = teacher_spans[row][a.teacher_group[row] == g]
            s = student_spans[row][a.student_group[row] == g]
            assert t[0, 0] >= prompt_end and s[0, 0] >= prompt_end
            assert t[-1, 1] == s[-1, 1]  # groups end together (starts may differ by a space one side trims)


def test_check_tolerance_is_far_below_an_off_by_one_alignment(tokenizers, texts):
    """The same-tokenizer check's 1e-5 tolerance: the student's positions shifted by one are off by far more."""
    same = ex.Tokenizers(tokenizers.teacher, tokenizers.teacher)
    cross, plain = ex.same_vocabulary_check(same, texts[:4])
    assert cross == pytest.approx(plain, rel=1e-5)
    teacher, student = ex.wrap(ex.build_models(same))
    enc = ex.encode(tokenizers.teacher, texts[:4])
    batch = ex.prepare(enc, enc)
    a = batch.alignment
    wrong = batch._replace(alignment=a._replace(student_last=(a.student_last - 1).clamp(min=0)))  # one token early
    objective = functools.partial(ex.objective, fd.distill(teacher, student), shared_vocab(*same), fd.state(teacher))
    with torch.no_grad():
        right = objective(fd.state(student), batch, reduction="none")[a.mask]
        off = objective(fd.state(student), wrong, reduction="none")[a.mask]
    relative = ((off - right).abs() / right.abs()).max()
    assert relative > 100 * 1e-5, relative  # about 1e-2 here: a random student's distributions vary little
