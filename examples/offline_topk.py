"""Offline LLM distillation from a ragged top-k teacher cache: the teacher runs once, before training.

The route DistillKit-style pipelines take, end to end and on this machine:

1. a byte-level BPE tokenizer is trained locally with ``tokenizers`` on a
   small made-up corpus, and cuts it into token samples of different lengths;
2. a Llama teacher (:class:`transformers.LlamaForCausalLM` from a config,
   random weights: nothing is downloaded) runs once over them:
   :meth:`funcdistill.TeacherCache.build` pads each batch, calls the teacher
   and stores only the real tokens' top-k log-probabilities (``bfloat16``)
   and indices, packed;
3. a smaller Llama student trains from the cache alone: each batch is
   collated with :func:`funcdistill.cache.pad_tokens` (as the build padded),
   ``cache[idx]`` gives the teacher's top-k padded alike with its ``mask``,
   and the loss is :func:`funcdistill.losses.fused_linear_topk_kl_loss` on the
   student's final hidden states and head weight (the student's logits are
   never made whole; it runs with ``logits_to_keep=1``). Its value equals
   :func:`funcdistill.losses.topk_kl_loss` on the student's full logits,
   which the script checks on the first batch.

Run it with ``python examples/offline_topk.py`` (it needs ``transformers``,
``tokenizers`` and ``safetensors``, from the ``test`` extra). It prints the
loss on a held batch before and after training.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from typing import Any

import torch

import funcdistill as fd
from funcdistill.cache import pad_tokens
from funcdistill.losses import fused_linear_topk_kl_loss, topk_kl_loss

__all__ = ["build_cache", "corpus", "llama", "main", "tokenize", "train"]

_WORDS = "the a of to and in cat dog sat ran on under over big small red blue quick lazy fox bird tree house".split()


def corpus(lines: int = 160, *, seed: int = 0) -> list[str]:
    """Sentences of 3 to 30 words of a small vocabulary, so their token counts vary ten-fold.

    Example:
        >>> len(corpus(5)), corpus(1)[0].endswith(".")
        (5, True)
    """
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(3, 30))) + "." for _ in range(lines)]


def tokenize(texts: list[str], *, vocab: int = 300) -> tuple[Any, list[torch.Tensor]]:
    """A byte-level BPE trained on ``texts`` (locally, in milliseconds), and each text as a token sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok, [torch.tensor(e.ids) for e in tok.encode_batch(texts)]


def llama(vocab: int, hidden: int, layers: int, *, seed: int) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def build_cache(teacher: torch.nn.Module, student: torch.nn.Module, samples: list[torch.Tensor], folder: str, k: int):
    """The distill function (the teacher's logits paired with the student's final hidden states) and its cache."""
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "model.norm"))
    cache = fd.TeacherCache.build(
        fn, fd.state(teacher), samples, folder, batch_size=32, topk=k, dtype=torch.bfloat16, progress=False
    )
    return fn, cache


def train(fn: Any, cache: fd.TeacherCache, student: torch.nn.Module, samples: list[torch.Tensor], *, epochs: int):
    """Adam on the student from the cache alone; the loss on a held batch (the first 32 samples) before and after."""
    held = torch.arange(32)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = pad_tokens([samples[i] for i in idx])  # as the build padded them
        out = cache[idx]
        ((top, hidden, _),) = fn(
            out, fd.state(student), input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1
        )
        return fused_linear_topk_kl_loss(*top, hidden, student.lm_head.weight, mask=out.mask)

    with torch.no_grad():
        before = float(loss_on(held))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(samples), generator=torch.Generator().manual_seed(steps)).split(16):
            loss_on(idx).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    with torch.no_grad():
        after = float(loss_on(held))
    return before, after, steps


def check_fused_equals_unfused(fn: Any, cache: fd.TeacherCache, student: torch.nn.Module, samples: list) -> float:
    """The fused loss on hidden states equals ``topk_kl_loss`` on the student's full logits (returns the gap)."""
    idx = torch.arange(8)
    input_ids, attention_mask = pad_tokens([samples[i] for i in idx])
    out = cache[idx]
    with torch.no_grad():
        ((top, hidden, _),) = fn(out, fd.state(student), input_ids=input_ids, attention_mask=attention_mask)
        fused = fused_linear_topk_kl_loss(*top, hidden, student.lm_head.weight, mask=out.mask)
        unfused = topk_kl_loss(*top, student.lm_head(hidden), mask=out.mask)
    return abs(float(fused) - float(unfused))


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16, help="top-k log-probabilities stored per token")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    texts = corpus()
    tok, samples = tokenize(texts)
    lengths = [len(s) for s in samples]
    print(f"{len(samples)} token samples of {min(lengths)} to {max(lengths)} tokens, vocabulary {tok.get_vocab_size()}")
    teacher = llama(tok.get_vocab_size(), 64, 2, seed=0).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # sharper next-token distributions, as a trained model's are
    student = llama(tok.get_vocab_size(), 32, 1, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        fn, cache = build_cache(teacher, student, samples, folder, args.k)
        print(
            f"cache: {cache.tokens:,} real tokens, {cache.nbytes:,} bytes "
            f"({cache.nbytes / cache.tokens:.1f} per token; top-{args.k}, bfloat16)"
        )
        gap = check_fused_equals_unfused(fn, cache, student, samples)
        assert gap < 1e-4, gap
        print(f"fused loss = topk_kl_loss on the full logits (difference {gap:.1e})")
        before, after, steps = train(fn, cache, student, samples, epochs=args.epochs)
    print(f"offline top-k KL on a held batch: {before:.4f} -> {after:.4f} after {steps} steps")
    return before, after


if __name__ == "__main__":
    main()
