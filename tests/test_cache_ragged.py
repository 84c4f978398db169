"""Ragged token caches: token samples of any length, only their real tokens stored, read back padded with a mask.

A real ``transformers`` Llama teacher and student built from configs (nothing
is downloaded). The reference is always the online call on the same samples,
collated with :func:`funcdistill.cache.pad_tokens` as the student's batch is.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import funcdistill as fd
from funcdistill.cache import TeacherCache, TeacherOutputs, TopK, pad_tokens
from funcdistill.cache._layout import _index_dtype
from funcdistill.losses import fused_linear_topk_kl_loss, topk_kl_loss
from tests.conftest import flops

V = 96
N = 13
POINTS = ("lm_head", "model.layers.0")  # full logits, and a hidden state (a FitNets-style pair)
# float32 storage: the cache holds the teacher's forward on the build's batches (4 samples padded to their
# longest), the reference a forward on another batch; the kernels may sum in another order, which moves
# logits of magnitude ~1 by a few float32 ulps (measured: under 1e-6), far below 1e-5
ATOL = 1e-5


def llama(hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models():
    teacher, student = llama(32, 2, 0).eval(), llama(16, 1, 1)
    mapping = fd.Mapping(teacher, student)
    for p in POINTS:
        mapping = mapping.add(p, p)
    return teacher, student, fd.distill(teacher, student, mapping)


@pytest.fixture(scope="module")
def samples():
    """13 token samples of 1 to 20 tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 20, *torch.randint(1, 21, (N - 2,), generator=g).tolist()]
    return [torch.randint(3, V, (n,), generator=g) for n in lengths]


def build(fn, teacher, data, folder, **kwargs):
    options = {"batch_size": 4, "shard_size": 5, "progress": False, **kwargs}
    return TeacherCache.build(fn, fd.state(teacher), data, folder, **options)


@pytest.fixture(scope="module")
def caches(models, samples, tmp_path_factory):
    teacher, _, fn = models
    root = tmp_path_factory.mktemp("ragged")
    full = build(fn, teacher, samples, root / "full")
    top = build(fn, teacher, samples, root / "top", topk={0: 8}, dtype={0: torch.bfloat16})
    return full, top


IDX = torch.tensor([4, 1, 0, 9, 12])  # three shards, the longest (20) and the shortest (1) samples


def online(models, samples, idx=IDX):
    teacher, student, fn = models
    ids, attention = pad_tokens([samples[i] for i in idx])
    return fn(fd.state(teacher), fd.state(student), input_ids=ids, attention_mask=attention), ids, attention


# ---------------------------------------------------------------- the pairs


def test_ragged_pairs_equal_the_online_pairs_token_for_token(models, samples, caches):
    _, student, fn = models
    full, _ = caches
    want, ids, attention = online(models, samples)
    out = full[IDX]
    assert torch.equal(out.mask, attention.bool())
    got = fn(out, fd.state(student), input_ids=ids, attention_mask=attention)
    for (t_online, s_online, _), (t_cached, s_cached, _) in zip(want, got):
        assert t_cached.shape == t_online.shape  # (batch, longest, ...)
        torch.testing.assert_close(t_cached[out.mask], t_online[out.mask], rtol=0, atol=ATOL)
        assert not t_cached[~out.mask].any()  # the padding holds zeros
        torch.testing.assert_close(s_cached, s_online, rtol=0, atol=0)  # the student ran on the same batch
    assert full.tokens == sum(len(s) for s in samples)
    assert f"samples={N}, tokens={full.tokens}," in repr(full) and repr(full).endswith(" bytes/token)")


def test_ragged_topk_equals_the_online_topk_within_bfloat16(models, samples, caches):
    _, student, fn = models
    _, top = caches
    want, ids, attention = online(models, samples)
    out = top[IDX]
    (t_top, z_s, _), (h_t, _, _) = fn(out, fd.state(student), input_ids=ids, attention_mask=attention)
    assert isinstance(t_top, TopK) and t_top.indices.dtype == torch.int64
    m = out.mask
    exact, indices = want[0].teacher.log_softmax(-1).topk(8)
    assert torch.equal(t_top.indices[m], indices[m])
    # bfloat16 rounds to nearest: relative error <= 2**-8 (docs/cache.md), plus the float32 batch noise above
    assert ((t_top.logprobs[m] - exact[m]).abs() <= 2**-8 * exact[m].abs() + ATOL).all()
    pad = t_top.logprobs[~m]
    assert pad.numel() and torch.isneginf(pad).all() and not t_top.indices[~m].any()  # unused slots: -inf, index 0
    torch.testing.assert_close(h_t[m], want[1].teacher[m], rtol=0, atol=ATOL)  # the pair stored in full
    # the losses on the padded batch with the mask equal the losses on the real tokens alone
    loss = topk_kl_loss(*t_top, z_s, mask=m)
    alone = topk_kl_loss(t_top.logprobs[m], t_top.indices[m], z_s[m])
    torch.testing.assert_close(loss, alone)
    hidden = torch.randn(*m.shape, 16)
    weight = fd.state(student)["lm_head.weight"]
    fused = fused_linear_topk_kl_loss(*t_top, hidden, weight, mask=m, chunk_size=8)
    torch.testing.assert_close(fused, topk_kl_loss(*t_top, hidden @ weight.T, mask=m), rtol=1e-5, atol=1e-6)
    # the -inf padding is masked out of the gradients too: finite, and zero at the padding
    for loss_fn in (
        lambda h: fused_linear_topk_kl_loss(*t_top, h, weight, mask=m, chunk_size=8),
        lambda h: topk_kl_loss(*t_top, h @ weight.T, mask=m),
    ):
        grad = torch.func.grad(loss_fn)(hidden)
        assert torch.isfinite(grad).all() and not grad[~m].any() and grad[m].abs().sum() > 0


def test_a_cached_call_costs_the_student_alone(models, samples, caches):
    _, student, fn = models
    full, _ = caches
    ids, attention = pad_tokens([samples[i] for i in IDX])
    out = full[IDX]
    with torch.no_grad():
        cached = flops(fn, out, fd.state(student), input_ids=ids, attention_mask=attention)
        alone = flops(student, input_ids=ids, attention_mask=attention)
    assert cached == alone > 0


def test_dict_samples_and_padded_dict_samples_give_the_same_cache(models, samples, caches, tmp_path):
    teacher, _, fn = models
    full, _ = caches
    dicts = []
    for i, s in enumerate(samples):  # every other one already padded on the right to 24 tokens
        pad = 24 - len(s) if i % 2 else 0
        ids = torch.cat([s, torch.full((pad,), 7)])
        dicts.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(s) + [0] * pad, "labels": ids})
    again = build(fn, teacher, dicts, tmp_path / "d")
    a, b = again[IDX], full[IDX]
    assert torch.equal(a.mask, b.mask)
    for x, y in zip(a.values, b.values):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)
    ids, attention = pad_tokens(dicts[:3], pad_id=5)
    assert ids[0, 1:].eq(5).all() and attention.sum(1).tolist() == [len(s) for s in samples[:3]]


# ---------------------------------------------------------------- what is stored


def test_bytes_stored_are_the_real_tokens_times_the_bytes_per_token(caches, samples):
    full, top = caches
    tokens = sum(len(s) for s in samples)
    shards = full._shards  # 5, 5 and 3 samples
    offsets = sum((r["count"] + 1) * 8 for r in shards)  # int64 offsets, count + 1 per shard
    per_token_full = (V + 32) * 4  # float32 logits and hidden states
    per_token_top = 8 * (2 + 2) + 32 * 4  # bfloat16 log-probabilities, int16 indices (V <= 32768); hidden
    for cache, per_token in ((full, per_token_full), (top, per_token_top)):
        headers = 0
        for r in cache._shards:
            with open(cache.path / r["file"], "rb") as f:
                headers += 8 + struct.unpack("<Q", f.read(8))[0]  # safetensors: header length, then the header
        assert cache.nbytes - headers == tokens * per_token + offsets
        assert sum(r["tokens"] for r in cache._shards) == tokens


def test_indices_take_the_smallest_integer_dtype_that_holds_the_vocabulary():
    assert _index_dtype(32_768) == torch.int16
    assert _index_dtype(32_769) == torch.uint16  # safetensors >= 0.4 with torch >= 2.3 store it
    assert _index_dtype(65_536) == torch.uint16
    assert _index_dtype(65_537) == torch.int32
    assert _index_dtype(151_936) == torch.int32


class _Head(nn.Module):
    """Token ids to logits over a vocabulary, and the mean embedding (a per-sample output)."""

    def __init__(self, vocab: int, dim: int = 4):
        super().__init__()
        self.embed, self.head, self.pool = nn.Embedding(vocab, dim), nn.Linear(dim, vocab), nn.Identity()

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        weights = attention_mask[..., None].to(h.dtype)
        self.pool((h * weights).sum(1) / weights.sum(1))
        return self.head(h)


def test_uint16_indices_for_vocabularies_up_to_65536(tmp_path):
    vocab = 40_000
    torch.manual_seed(0)
    t, s = _Head(vocab).eval(), _Head(vocab)
    fn = fd.distill(t, s, fd.Mapping(t, s).add("", ""))
    data = [torch.randint(0, vocab, (n,)) for n in (3, 9, 5)]
    cache = build(fn, t, data, tmp_path / "c", topk=4, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(cache.path / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("p0.logprobs").get_dtype() == "F16" and f.get_slice("p0.indices").get_dtype() == "U16"
    out = cache[[1, 2]]
    ids, attention = pad_tokens(data[1:])
    with torch.no_grad():
        want = t(ids, attention).log_softmax(-1).topk(4)
    assert torch.equal(out.values[0].indices[out.mask], want.indices[out.mask])


def test_a_per_sample_output_is_stored_per_sample_even_when_its_size_equals_the_length(tmp_path):
    # the pooled output has 4 entries and the first batch is padded to 4 tokens: only the probe
    # (the first sample padded to one token more) tells that it is not per token
    t, s = _Head(50, dim=4).eval(), _Head(50, dim=4)
    fn = fd.distill(t, s, fd.Mapping(t, s).add("pool", "pool").add("", ""))
    data = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 2, 3, 7, 1)]
    cache = build(fn, t, data, tmp_path / "c", batch_size=3)
    out = cache[[4, 3, 1]]
    ids, attention = pad_tokens([data[i] for i in (4, 3, 1)])
    with torch.no_grad():
        logits = t(ids, attention)
    pooled = cache._entries[0]["leaves"][0]
    assert "tokens" not in pooled and cache._entries[1]["leaves"][0]["tokens"] is True
    assert out.values[0].shape == (3, 4) and out.values[1].shape == (3, 7, 50)
    embed = t.embed(ids) * attention[..., None]
    torch.testing.assert_close(out.values[0], (embed.sum(1) / attention.sum(1, keepdim=True)).detach())
    torch.testing.assert_close(out.values[1][out.mask], logits[out.mask], rtol=0, atol=ATOL)


def test_a_ragged_build_resumes_after_a_crash(models, samples, caches, tmp_path):
    teacher, _, fn = models
    full, _ = caches

    class Crashing(list):
        armed = True

        def __getitem__(self, i):
            if i == 7 and self.armed:
                raise RuntimeError("disk gone")
            return super().__getitem__(i)

    data = Crashing(samples)
    with pytest.raises(RuntimeError, match="disk gone"):
        build(fn, teacher, data, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "build.json").read_text())["ragged"] is True
    data.armed = False
    again = build(fn, teacher, data, tmp_path / "c")
    for x, y in zip(again[IDX].values, full[IDX].values):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_stream_of_token_samples_gives_the_same_cache(models, samples, caches, tmp_path):
    teacher, _, fn = models
    full, _ = caches
    streamed = build(fn, teacher, ({"input_ids": s} for s in samples), tmp_path / "s", samples=None)
    assert len(streamed) == N and streamed.tokens == full.tokens
    a, b = streamed[IDX], full[IDX]
    assert torch.equal(a.mask, b.mask)
    for x, y in zip(a.values, b.values):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same batches, the same forwards


# ---------------------------------------------------------------- refused


def test_items_that_are_not_token_samples_are_refused(models, samples, tmp_path):
    teacher, _, fn = models
    mixed = [*samples[:5], torch.randn(2, 2)]
    with pytest.raises(
        TypeError,
        match=r"this build caches token samples \(its first item is one\), so every item must be one: dataset "
        r"item 5 is a float32 tensor of shape \[2, 2\]: a token sample is a 1-D integer tensor of token ids, or "
        r"a dict with 'input_ids'",
    ):
        build(fn, teacher, mixed, tmp_path / "a")
    with pytest.raises(
        TypeError, match=r"dataset item 1 is a dict without 'input_ids' \(.*did you mean 'input_id'\?\)"
    ):
        build(fn, teacher, [samples[0], {"input_id": samples[1]}], tmp_path / "b")
    with pytest.raises(TypeError, match=r"item 1 is a list: a token sample is a 1-D integer tensor"):
        pad_tokens([samples[0], [1, 2]])
    with pytest.raises(ValueError, match=r"item 0 has an attention_mask \[0, 1, 1\] that is not ones then zeros"):
        pad_tokens([{"input_ids": [4, 5, 6], "attention_mask": [0, 1, 1]}])
    with pytest.raises(ValueError, match=r"item 1 has no token; a token sample needs at least one"):
        pad_tokens([samples[0], torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"augment=\.\.\. does not apply to token samples"):
        build(fn, teacher, samples, tmp_path / "c", augment=lambda x, g: x, draws=2)
    with pytest.raises(TypeError, match=r"TeacherOutputs\(mask=\.\.\.\) must be None or a bool tensor"):
        TeacherOutputs((None, None), fd.cache.BuiltFor("x", ('"a"', '"b"'), ("Net", ())), mask=torch.ones(2, 3))


# ---------------------------------------------------------------- the index check


@pytest.fixture
def copied(caches, tmp_path):
    full, _ = caches
    folder = tmp_path / "c"
    shutil.copytree(full.path, folder)
    return folder


def edit(folder, change):
    path = folder / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


DAMAGED = r"the teacher cache index .*index\.json is damaged: "


def test_index_damage_to_the_ragged_fields_is_named(copied):
    def wrong_tokens(ix):
        ix["shards"][0]["tokens"] += 1

    edit(copied, wrong_tokens)
    with pytest.raises(
        ValueError,
        match=r"does not match its index .*: shard-00000\.safetensors: tensor 'p0\.0' is \[\d+, 96\], where the "
        r"index gives \[\d+, 96\]",
    ):
        TeacherCache.open(copied)

    def damage(ix):
        ix["shards"][0]["tokens"] = 2  # fewer than its 5 samples
        del ix["shards"][1]["tokens"]
        ix["entries"][1]["leaves"][0]["tokens"] = "yes"

    edit(copied, wrong_tokens)
    edit(copied, damage)
    with pytest.raises(
        ValueError,
        match=DAMAGED + r"field 'entries\[1\]\.leaves\[0\]\.tokens' is 'yes', not true \(a per-token leaf\); "
        r"field 'shards\[0\]\.tokens' is 2, not an int >= its count 5 \(every sample has a token\); "
        r"field 'shards\[1\]\.tokens' is missing",
    ):
        TeacherCache.open(copied)
    edit(copied, lambda ix: ix.pop("ragged"))
    with pytest.raises(ValueError, match=DAMAGED + r"field 'ragged' is missing in a format 3 index"):
        TeacherCache.open(copied)


def test_damaged_offsets_are_named_when_the_shard_is_read(copied, caches):
    from safetensors.torch import load_file, save_file

    path = copied / "shard-00001.safetensors"
    tensors = load_file(str(path))
    tensors["offsets"][2], tensors["offsets"][3] = tensors["offsets"][3], tensors["offsets"][2]
    save_file(tensors, str(path), metadata={"format": "funcdistill.TeacherCache", "first": "5"})
    cache = TeacherCache.open(copied, verify=False)  # same size, same header: only the data is wrong
    cache[[0]]
    with pytest.raises(
        ValueError,
        match=r"shard-00001\.safetensors is damaged: its offsets give a sample no token .* Rebuild the cache",
    ):
        cache[[6]]
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is damaged: its SHA-256"):
        TeacherCache.open(copied)[[6]]
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is damaged: its SHA-256"):
        cache.verify()


# ---------------------------------------------------------------- the mask is a leaf


def test_the_mask_is_a_pytree_leaf_and_fixed_shape_outputs_flatten_as_before(caches):
    from funcdistill._pytree import tree_flatten, tree_map

    full, _ = caches
    out = full[IDX]
    leaves, _ = tree_flatten(out)
    assert leaves[-1] is out.mask and len(leaves) == 3
    back = tree_map(lambda x: x, out)
    assert isinstance(back, TeacherOutputs) and torch.equal(back.mask, out.mask)
    per_sample = torch.func.vmap(lambda o: o.mask.sum(), in_dims=(0,))(out)
    assert per_sample.tolist() == out.mask.sum(1).tolist()
    plain = TeacherOutputs(out.values, out.built_for)
    assert len(tree_flatten(plain)[0]) == 2 and tree_map(lambda x: x, plain).mask is None
    assert repr(out).endswith(f"mask: {list(out.mask.shape)})")
