"""Ragged token caches: bytes per real token of top-k storage, and what padding would cost.

Exact byte counts of real caches built here (no timing): a tiny token
teacher (an embedding of width 8 and an output head over the vocabulary) over
token samples of 16 to 512 tokens (mean about 100), stored as top-k
log-probabilities. ``bytes per real token`` is the cache's ``nbytes`` (the
shard files: safetensors headers, the packed top-k, the per-sample offsets)
over the real tokens it holds; ``ideal`` is ``k`` times the bytes of one value
and one index. The padding rows compare the same samples padded to 512
tokens (a cache of one shape, as before ragged caches) with the ragged cache.

>>> lengths = sample_lengths(50, seed=0)
>>> int(lengths.min()) >= 16 and int(lengths.max()) <= 512
True
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

import funcdistill as fd
from benchmarks.report import Section

__all__ = ["ragged_section", "sample_lengths"]

LONGEST = 512
GOAL_BYTES = 400  # top-64 at V = 151,936
GOAL_OVERHEAD = 1.02


class TokenHead(nn.Module):
    """Token ids to logits ``(batch, tokens, vocabulary)`` through an embedding of width ``dim``."""

    def __init__(self, vocab: int, dim: int = 8):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def sample_lengths(n: int, *, seed: int) -> torch.Tensor:
    """``n`` sample lengths from 16 to 512 tokens, mean about 100: 16 plus an exponential of mean 85, clipped."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.empty(n, dtype=torch.float64).exponential_(1 / 85, generator=g)
    return (16 + extra).round().clamp(max=LONGEST).to(torch.int64)


def _samples(vocab: int, lengths: torch.Tensor, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=g) for n in lengths]


def _cache(vocab: int, data: Any, folder: str, *, inputs: int = 1, **options: Any) -> fd.TeacherCache:
    torch.manual_seed(0)
    teacher, student = TokenHead(vocab).eval(), TokenHead(vocab, 2)
    fn = fd.distill(teacher, student)
    return fd.TeacherCache.build(fn, fd.state(teacher), data, folder, inputs=inputs, progress=False, **options)


def ragged_section(cfg: Any) -> Section:
    """Bytes per real token of top-k at two vocabularies; padding to 512 vs packing."""
    sec = Section(
        "Ragged token cache: bytes per real token",
        ["scenario", "measure", "value", "target", "met", "note"],
        intro=(
            "Exact bytes of caches built here (no timing). A tiny token teacher (embedding of width 8, "
            "output head over the vocabulary) over token samples of 16 to 512 tokens (16 + an exponential "
            "of mean 85, clipped; mean about 100), stored as top-k log-probabilities. `bytes per real "
            "token`: the cache's `nbytes` (shard files: safetensors headers, packed top-k, int64 per-sample "
            "offsets) over its real tokens. `ideal`: k x (value bytes + index bytes), the packed top-k "
            "alone. Indices take the smallest integer dtype that holds the vocabulary (int16 up to 32,768, "
            "uint16 up to 65,536, int32 above)."
        ),
    )
    n = 24 if cfg.quick else 64
    lengths = sample_lengths(n, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as root:
        for vocab in (32_000, 151_936):
            data = _samples(vocab, lengths, cfg.seed)
            for k in (20, 64, 128):
                _per_token_row(sec, vocab, k, torch.bfloat16, data, f"{root}/v{vocab}-k{k}")
        # float16 values take the bytes of bfloat16 ones
        _per_token_row(sec, 151_936, 64, torch.float16, data, f"{root}/fp16")
        _padding_rows(sec, cfg, root)
    return sec


def _per_token_row(sec: Section, vocab: int, k: int, dtype: torch.dtype, data: list, folder: str) -> None:
    cache = _cache(vocab, data, folder, topk=k, dtype=dtype, batch_size=2)
    assert cache.tokens is not None
    per_token = cache.nbytes / cache.tokens
    index = cache._entries[0]["leaves"][0]["index_dtype"]
    ideal = k * (dtype.itemsize + _itemsize(index))
    goal = vocab == 151_936 and k == 64
    sec.add(
        scenario=f"top-{k}, V = {vocab:,}, {str(dtype).removeprefix('torch.')} values, {index} indices",
        measure="bytes per real token",
        value=f"{per_token:.1f}",
        target=f"<= {GOAL_BYTES}" if goal else "",
        met=("yes" if per_token <= GOAL_BYTES else "no") if goal else "",
        note=f"ideal {ideal}; {per_token / ideal:.4f}x ideal; {cache.tokens:,} tokens in {len(cache)} samples",
    )


def _itemsize(name: str) -> int:
    return getattr(torch, name).itemsize


def _padding_rows(sec: Section, cfg: Any, root: str) -> None:
    vocab, k, dtype = 32_000, 64, torch.bfloat16
    lengths = sample_lengths(48 if cfg.quick else 160, seed=cfg.seed + 1)
    data = _samples(vocab, lengths, cfg.seed + 1)
    ragged = _cache(vocab, data, f"{root}/ragged", topk=k, dtype=dtype, batch_size=4)
    padded_data = [_padded(s) for s in data]  # (ids, mask) of one shape: a cache of samples of one shape
    padded = _cache(vocab, padded_data, f"{root}/padded", inputs=2, topk=k, dtype=dtype, batch_size=4)
    assert ragged.tokens is not None
    ideal = ragged.tokens * k * (dtype.itemsize + 2)
    scenario = f"top-{k}, V = {vocab:,}, bfloat16, {len(data)} samples, mean {float(lengths.float().mean()):.0f} tokens"
    sec.add(
        scenario=scenario,
        measure="ragged cache / ideal packed bytes",
        value=f"{ragged.nbytes / ideal:.4f}",
        target=f"<= {GOAL_OVERHEAD}",
        met="yes" if ragged.nbytes / ideal <= GOAL_OVERHEAD else "no",
        note=f"{ragged.nbytes:,} bytes for {ragged.tokens:,} real tokens (ideal {ideal:,})",
    )
    sec.add(
        scenario=scenario,
        measure=f"padded to {LONGEST} / ragged cache (file bytes)",
        value=f"{padded.nbytes / ragged.nbytes:.2f}",
        note=f"{padded.nbytes:,} bytes padded; {len(data) * LONGEST / ragged.tokens:.2f}x the tokens",
    )


def _padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(LONGEST, dtype=torch.int64)
    out[: len(ids)] = ids
    return out, (torch.arange(LONGEST) < len(ids)).to(torch.int64)
