"""Small real tokenizers of different kinds, trained locally with ``tokenizers`` on one tiny corpus.

Nothing is downloaded: each is trained in a few milliseconds the first time it
is asked for (then kept for the session). They differ the way real model
families do: a byte-level BPE (GPT-2, Llama 3, Qwen style) with and without
``trim_offsets``, a WordPiece (BERT style, with ``[CLS]``/``[SEP]`` added by its
post-processor and whitespace dropped) and a Unigram with Metaspace ``'▁'``
markers (SentencePiece style). ``encode_batch`` gives what a fast tokenizer
gives with ``return_offsets_mapping=True`` and padding.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, hello there; the world is wide.",
    "naïve café résumé déjà vu —東京 大阪 and emoji 😀 🎉 ok",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\nand  double  spaces",
    "numbers 12345 and symbols #@! (parens) [brackets]",
] * 8

NAMES = ("bpe", "bpe_trim", "wordpiece", "unigram")


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    """One of the toy tokenizers by name (``NAMES``)."""
    if name in ("bpe", "bpe_trim"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=name == "bpe_trim")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok.train_from_iterator(
            CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
        )
    elif name == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        special = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
        tok.train_from_iterator(
            CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special, show_progress=False)
        )
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
    elif name == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            CORPUS,
            trainers.UnigramTrainer(vocab_size=250, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False),
        )
    else:
        raise ValueError(f"no toy tokenizer {name!r}; the names are {NAMES}")
    return tok


def encode_batch(name: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, offsets, mask)`` of ``texts``, right-padded: ``(B, T)``, ``(B, T, 2)`` (padding ``(0, 0)``), ``(B, T)`` bool."""
    encodings = tokenizer(name).encode_batch(texts)
    width = max((len(e.ids) for e in encodings), default=0)
    ids = torch.zeros(len(texts), width, dtype=torch.int64)
    offsets = torch.zeros(len(texts), width, 2, dtype=torch.int64)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for b, e in enumerate(encodings):
        n = len(e.ids)
        if n:
            ids[b, :n] = torch.tensor(e.ids)
            offsets[b, :n] = torch.tensor(e.offsets)
            mask[b, :n] = True
    return ids, offsets, mask
