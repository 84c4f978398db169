"""Distil across tokenizers: a byte-level BPE teacher and a Unigram student that share no vocabulary.

The teacher's tokenizer is a byte-level BPE (``Ġ`` marks a leading space, as
in GPT-2, Llama 3 or Qwen), the student's a Unigram model (``▁``, as in
Llama 2 or T5). Both are trained here, in well under a second, with the
``tokenizers`` library on one generated corpus, and both models are
:class:`transformers.LlamaForCausalLM` built from configs with random weights
(nothing is downloaded). Their token ids mean different things, so no
same-vocabulary loss applies. Instead, each step:

1. tokenises the same text with both tokenizers, keeping each token's
   character span (``return_offsets_mapping=True``);
2. aligns the two tokenisations with :func:`funcdistill.align.align`: a group
   is a smallest piece of text that both cover with whole tokens;
3. compares the two models' next-token distributions at the last token of
   each group, where both have read the same text, with
   :func:`funcdistill.losses.hybrid_loss` (GOLD): a generalized JSD over the
   tokens whose strings exist in both vocabularies
   (:func:`funcdistill.align.shared_vocab`), plus ULD's sorted-probability
   distance over the rest.

Off-policy, the text is a fixed corpus; on-policy, it is what the student
generates, decoded and re-tokenised for the teacher. The example also checks
the alignment: a student given the teacher's own tokenizer gets, through the
same cross-tokenizer code, the same-vocabulary generalized JSD.

A distill function runs both models on the same inputs, so each model is
wrapped in :class:`OwnInputs`, which takes its own side from a dict holding
both sides' token ids.

Run it with ``python examples/cross_tokenizer.py`` (it needs ``transformers``
and ``tokenizers``, from the ``test`` extra).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `funcdistill` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import funcdistill as fd
from funcdistill.align import Alignment, align, at_groups, shared_vocab
from funcdistill.losses import generalized_jsd_loss, hybrid_loss

__all__ = [
    "Batch",
    "Models",
    "OwnInputs",
    "Tokenizers",
    "build_models",
    "corpus",
    "decoded_offsets",
    "encode",
    "main",
    "objective",
    "prepare",
    "rollout",
    "same_vocabulary_check",
    "train_off_policy",
    "train_on_policy",
    "train_tokenizers",
    "wrap",
]

SPECIALS = ("<pad>", "<eos>", "<unk>")
_ONSETS = ("", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr", "kl", "sh", "ñ", "þ")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "é", "ü", "ø")
_CODAS = ("", "", "n", "r", "s", "l", "m", "k")


def corpus(lines: int = 2000, *, words: int = 3000, seed: int = 0) -> list[str]:
    """Sentences of a made-up language: Zipf-distributed words, some accents, whitespace runs and newlines.

    Example:
        >>> corpus(2, seed=0)[0]
        'um denous vairkléktru fulpobespül  trisges!'
    """
    rng = random.Random(seed)

    def word() -> str:
        syllables = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))

    lexicon = [word() for _ in range(words)]
    weights = [1 / rank for rank in range(1, words + 1)]
    separators = (" ",) * 12 + ("  ", ", ", "\n")
    out = []
    for _ in range(lines):
        sentence = rng.choices(lexicon, weights, k=rng.randint(5, 14))
        if rng.random() < 0.3:
            sentence[0] = sentence[0].capitalize()
        text = sentence[0] + "".join(rng.choice(separators) + w for w in sentence[1:])
        out.append(text + rng.choice(".?!"))
    return out


class Tokenizers(NamedTuple):
    """The teacher's and the student's tokenizers (``transformers.PreTrainedTokenizerFast``)."""

    teacher: Any
    student: Any


def _wrap(tokenizer: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # decode must give the text back as the tokens spell it
    )


def train_tokenizers(texts: list[str], *, teacher_vocab: int = 2000, student_vocab: int = 3000) -> Tokenizers:
    """A byte-level BPE (teacher) and a Unigram with ``▁`` spaces (student), trained on ``texts``.

    The BPE's post-processor keeps each token's leading space in its span
    (``trim_offsets=False``), as the Unigram's does; ``align`` would accept
    trimmed spans too (the space then belongs to no token).

    Example:
        >>> tok = train_tokenizers(corpus(500), teacher_vocab=500, student_vocab=600)
        >>> tok.teacher.tokenize("Soun, vairkléktru"), tok.student.tokenize("Soun, vairkléktru")
        (['S', 'oun', ',', 'ĠvairklÃ©ktru'], ['▁S', 'oun', ',', '▁vairkléktru'])
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from a later subprocess
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=teacher_vocab, special_tokens=list(SPECIALS), initial_alphabet=alphabet, show_progress=False
        ),
    )
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=student_vocab, special_tokens=list(SPECIALS), unk_token="<unk>", show_progress=False
        ),
    )
    unigram.model = _in_stable_order(unigram)
    return Tokenizers(_wrap(bpe), _wrap(unigram))


def _in_stable_order(unigram: Any) -> Any:
    """The trained Unigram model, numbered and scored the same way in every run.

    The trainer finds the same pieces every time, but it numbers them in the
    order of a hash map (which changes between processes), its sums change the
    last digits of their scores, and the characters it must keep but did not
    learn get the lowest score plus 1e-4 per character, in hash-map order.
    Here those characters all get the lowest score, every score is rounded to
    1e-9, and the pieces are sorted by score, then by text: the ids, and so the
    example's numbers, are the same in every run.
    """
    from tokenizers import models

    trained = json.loads(unigram.to_str())["model"]
    specials, pieces = trained["vocab"][: len(SPECIALS)], trained["vocab"][len(SPECIALS) :]
    lowest = round(min(score for _, score in pieces), 9)
    band = lowest + 1e-4 * sum(len(text) == 1 for text, _ in pieces)  # where the kept characters are

    def score(text: str, value: float) -> float:
        return lowest if len(text) == 1 and value <= band else round(value, 9)

    pieces = sorted(((text, score(text, value)) for text, value in pieces), key=lambda p: (-p[1], p[0]))
    return models.Unigram([tuple(p) for p in specials] + pieces, unk_id=trained["unk_id"], byte_fallback=False)


class Models(NamedTuple):
    """A Llama teacher (eval mode) and a narrower, shallower student, each with its own vocabulary."""

    teacher: nn.Module
    student: nn.Module


def _llama(vocab: int, hidden: int, layers: int, pad: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad,
        bos_token_id=None,
        eos_token_id=pad + 1,
    )
    return LlamaForCausalLM(config)


def build_models(
    tokenizers: Tokenizers, *, teacher_hidden: int = 64, student_hidden: int = 32, seed: int = 0
) -> Models:
    """A random Llama per tokenizer (vocabulary sizes from the tokenizers; no download).

    The teacher's head gets larger weights than a fresh one, so that its
    next-token distributions are far from uniform, as a trained model's are.
    """
    torch.manual_seed(seed)
    teacher = _llama(len(tokenizers.teacher), teacher_hidden, 2, tokenizers.teacher.pad_token_id)
    with torch.no_grad():
        nn.init.normal_(teacher.lm_head.weight, std=0.5)
    student = _llama(len(tokenizers.student), student_hidden, 1, tokenizers.student.pad_token_id)
    return Models(teacher.eval(), student.train())


class OwnInputs(nn.Module):
    """A causal LM that takes its own side's inputs from a dict holding both sides'.

    A distill function passes the same inputs to the teacher and the student;
    across tokenizers each model has its own token ids, so the call gets
    ``{"teacher": {...}, "student": {...}}`` and each model reads its part.

    Example:
        >>> wrapped = OwnInputs(nn.Linear(2, 3), "student")
        >>> wrapped({"student": {"input": torch.zeros(1, 2)}, "teacher": {}}).shape
        torch.Size([1, 3])
    """

    def __init__(self, lm: nn.Module, side: str) -> None:
        super().__init__()
        self.lm = lm
        self.side = side

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]]) -> Any:
        return self.lm(**inputs[self.side])


def encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and character offsets ``(B, T, 2)``, right-padded (no special tokens)."""
    enc = tokenizer(texts, padding=True, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    return {key: enc[key] for key in ("input_ids", "attention_mask", "offset_mapping")}


class Batch(NamedTuple):
    """Both sides' model inputs and their alignment."""

    inputs: dict[str, dict[str, torch.Tensor]]
    alignment: Alignment


def prepare(
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    *,
    teacher_mask: torch.Tensor | None = None,
    student_mask: torch.Tensor | None = None,
) -> Batch:
    """Align two encodings of the same texts (:func:`encode`); the masks default to the attention masks."""
    alignment = align(
        teacher["offset_mapping"],
        student["offset_mapping"],
        teacher_mask=teacher["attention_mask"].bool() if teacher_mask is None else teacher_mask,
        student_mask=student["attention_mask"].bool() if student_mask is None else student_mask,
    )
    model_inputs = {  # use_cache=False: no key/value cache in the outputs
        side: {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "use_cache": False}
        for side, enc in (("teacher", teacher), ("student", student))
    }
    return Batch(model_inputs, alignment)


def objective(
    fn: fd.DistillFn,
    shared: tuple[torch.Tensor, torch.Tensor],
    teacher_state: dict[str, torch.Tensor],
    student_params: dict[str, torch.Tensor],
    batch: Batch,
    *,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """The hybrid loss (GOLD) at the aligned positions: each group's last token on either side."""
    (pair,) = fn(teacher_state, student_params, batch.inputs)
    a = batch.alignment
    teacher_logits = at_groups(pair.teacher.logits, a.teacher_last)
    student_logits = at_groups(pair.student.logits, a.student_last)
    return hybrid_loss(teacher_logits, student_logits, *shared, beta=beta, mask=a.mask, reduction=reduction)


def wrap(models: Models) -> tuple[OwnInputs, OwnInputs]:
    """Both models wrapped to read their own side of the inputs (:class:`OwnInputs`)."""
    return OwnInputs(models.teacher, "teacher"), OwnInputs(models.student, "student")


def train_off_policy(
    models: Models,
    tokenizers: Tokenizers,
    texts: list[str],
    *,
    steps: int = 20,
    lr: float = 1e-2,
    batch: int = 8,
    beta: float = 0.5,
) -> list[float]:
    """Pure steps (``torch.func.grad_and_value``, then Adam) on a corpus tokenised twice; the loss before each step."""
    teacher, student = wrap(models)
    fn = fd.distill(teacher, student)
    shared = shared_vocab(tokenizers.teacher, tokenizers.student)
    step = torch.func.grad_and_value(functools.partial(objective, fn, shared, fd.state(teacher), beta=beta))
    params = {k: v.detach().clone() for k, v in fd.state(student, buffers=False).items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)  # updates the copies in `params` in place
    losses = []
    for i in range(steps):
        texts_i = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        data = prepare(encode(tokenizers.teacher, texts_i), encode(tokenizers.student, texts_i))
        grads, loss = step(params, data)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()
        losses.append(float(loss))
    return losses


def _agreeing(prefix: str, text: str) -> int:
    """How many leading characters ``prefix`` and ``text`` have in common."""
    n = min(len(prefix), len(text))
    return next((i for i in range(n) if prefix[i] != text[i]), n)


def decoded_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's character span in it, by incremental decoding.

    Token ``j`` ends where the decoded ``ids[: j + 1]`` stops agreeing with
    the whole text. A token that ends inside a character (one byte of a
    multi-byte character, in a byte-level vocabulary) gets an empty span,
    which puts it in no group; the token that completes the character covers it.

    Example:
        >>> tok = train_tokenizers(corpus(500), teacher_vocab=500, student_vocab=600)
        >>> ids = tok.teacher.convert_tokens_to_ids(["Ġ", "k", "Ã", "©"])  # 'é' as its two bytes
        >>> decoded_offsets(tok.teacher, ids)
        (' ké', [(0, 1), (1, 2), (2, 2), (2, 3)])
    """
    text = tokenizer.decode(ids)
    spans, end = [], 0
    for j in range(1, len(ids) + 1):
        agreed = max(end, _agreeing(tokenizer.decode(ids[:j]), text))
        spans.append((end, agreed))
        end = agreed
    return text, spans


def rollout(
    models: Models, tokenizers: Tokenizers, texts: list[str], *, prompt_tokens: int = 4, new_tokens: int = 12
) -> Batch:
    """The student continues the first ``prompt_tokens`` of each text; its text is re-tokenised for the teacher.

    The student keeps the ids it sampled, with spans from
    :func:`decoded_offsets`; the teacher gets the decoded text tokenised by
    its own tokenizer. Only the generated text counts: on each side, the
    tokens that start at or after the end of the prompt's text.
    """
    tok = tokenizers.student
    prompts = torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:prompt_tokens] for t in texts])
    with torch.no_grad():
        sequences = models.student.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=tok.all_special_ids,  # text only: no <unk>, <pad> or <eos>
        )
    decoded = [decoded_offsets(tok, row.tolist()) for row in sequences]
    offsets = torch.tensor([spans for _, spans in decoded])
    student = {"input_ids": sequences, "attention_mask": torch.ones_like(sequences), "offset_mapping": offsets}
    teacher = encode(tokenizers.teacher, [text for text, _ in decoded])
    prompt_end = offsets[:, prompt_tokens - 1, 1:]  # (B, 1): where the prompt's text ends

    def generated(enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return enc["attention_mask"].bool() & (enc["offset_mapping"][..., 0] >= prompt_end)

    return prepare(teacher, student, teacher_mask=generated(teacher), student_mask=generated(student))


def train_on_policy(
    models: Models,
    tokenizers: Tokenizers,
    texts: list[str],
    *,
    steps: int = 10,
    lr: float = 1e-2,
    batch: int = 8,
    beta: float = 0.5,
) -> list[float]:
    """On-policy steps: the live student generates, ``loss.backward()`` and Adam update it; the loss of each step."""
    teacher, student = wrap(models)
    fn = fd.distill(teacher, student)
    shared = shared_vocab(tokenizers.teacher, tokenizers.student)
    optimizer = torch.optim.Adam(models.student.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        data = rollout(models, tokenizers, [texts[(i * batch + j) % len(texts)] for j in range(batch)])
        loss = objective(fn, shared, fd.state(teacher), fd.state(student), data, beta=beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def same_vocabulary_check(tokenizers: Tokenizers, texts: list[str], *, beta: float = 0.5) -> tuple[float, float]:
    """A student given the teacher's own tokenizer: the cross-tokenizer loss and the same-vocabulary one.

    The cross-tokenizer path (tokenise twice, ``align``, ``shared_vocab``,
    ``at_groups``, ``hybrid_loss``) must then find the identity alignment
    (group ``g`` is the ``g``-th token), every token shared and no ULD part,
    and so give the generalized JSD of the two models' logits at every token:
    token by token, in the mean, and in the gradients. Raises if not; returns
    the two means. The texts must not split a character into byte pieces
    (those form one group, with identical tokenizers too).
    """
    teacher, student = wrap(build_models(Tokenizers(tokenizers.teacher, tokenizers.teacher)))
    fn = fd.distill(teacher, student)
    enc = encode(tokenizers.teacher, texts)
    data = prepare(enc, encode(tokenizers.teacher, texts))
    a = data.alignment
    spans = enc["offset_mapping"]
    counted = enc["attention_mask"].bool() & (spans[..., 1] > spans[..., 0])
    if not (torch.equal(a.teacher_last, a.student_last) and a.teacher_last[a.mask].equal(counted.nonzero()[:, 1])):
        raise AssertionError("the alignment of a tokenisation with itself is not the identity")
    shared = shared_vocab(tokenizers.teacher, tokenizers.teacher)
    cross_fn = functools.partial(objective, fn, shared, fd.state(teacher), batch=data, beta=beta)

    def same_fn(params: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        (pair,) = fn(fd.state(teacher), params, data.inputs)
        return generalized_jsd_loss(
            pair.teacher.logits, pair.student.logits, beta=beta, mask=counted, reduction=reduction
        )

    params = {k: v.detach() for k, v in fd.state(student, buffers=False).items()}
    cross_grads, cross = torch.func.grad_and_value(cross_fn)(params)
    same_grads, same = torch.func.grad_and_value(same_fn)(params)
    with torch.no_grad():
        per_token = cross_fn(params, reduction="none")[a.mask], same_fn(params, reduction="none")[counted]
    # The same float32 logits reach the same JSD by two routes (the shared columns gathered, here all of them,
    # and renormalised; or the full softmax), so they differ by rounding only: about 1e-7 relative per token.
    # 1e-5 leaves room for a different order of summation; a wrong alignment compares the distributions of
    # other positions and is off by far more, token by token (one position off: about 1e-2 here, even with a
    # random student whose distributions vary little; tests/test_cross_tokenizer.py measures it).
    torch.testing.assert_close(*per_token, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cross, same, rtol=1e-5, atol=1e-7)
    for name in same_grads:  # gradients: the backward sums in other orders too, so 1e-4
        torch.testing.assert_close(cross_grads[name], same_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    return float(cross), float(same)


def _trend(losses: list[float], n: int = 3) -> str:
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    return f"mean of {n} steps: {first:.4f} -> {last:.4f} after {len(losses)} steps"


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Train off-policy and on-policy from fresh students, then check the alignment; print the losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="off-policy training steps (default: 20)")
    parser.add_argument("--on-policy-steps", type=int, default=10, help="on-policy training steps (default: 10)")
    args = parser.parse_args(argv)
    texts = corpus()
    tokenizers = train_tokenizers(texts)
    shared = len(shared_vocab(tokenizers.teacher, tokenizers.student)[0])
    print(
        f"teacher: byte-level BPE, {len(tokenizers.teacher):,} tokens; student: Unigram, "
        f"{len(tokenizers.student):,} tokens; {shared:,} token strings in both"
    )
    off = train_off_policy(build_models(tokenizers), tokenizers, texts, steps=args.steps)
    print(f"off-policy hybrid loss, {_trend(off)}")
    torch.manual_seed(0)  # the student's samples
    on = train_on_policy(build_models(tokenizers), tokenizers, texts[1000:], steps=args.on_policy_steps)
    print(f"on-policy hybrid loss, {_trend(on)}")
    cross, same = same_vocabulary_check(tokenizers, texts[:8])
    print(f"same tokenizer: cross-tokenizer hybrid {cross:.6f}, same-vocabulary generalized JSD {same:.6f}")
    return {"off_policy": off, "on_policy": on}


if __name__ == "__main__":
    main()
