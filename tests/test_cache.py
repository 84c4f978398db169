"""TeacherCache: cached teacher outputs stand in for the teacher (offline distillation).

The online distill call and the teacher's own forward are the independent
references: a cache must give the pairs and gradients they give, without the
teacher's FLOPs. Files are damaged by hand to check that the cache notices.
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

import funcdistill as fd
from funcdistill.cache import TeacherCache, TeacherOutputs, TopK, _build
from funcdistill.losses import topk_kl_loss
from tests.conftest import flops

N = 50
CLASSES = 7


def mlp(seed: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


@pytest.fixture
def models():
    return mlp(0, 32).eval(), mlp(1, 12)


def mapping(t, s):
    return fd.Mapping(t, s).add("1", "1", payload=0.5).add("", "", payload=1.0)


@pytest.fixture
def data():
    return torch.randn(N, 6, generator=torch.Generator().manual_seed(2))


def build(fn, t, data, folder, **kw):
    return TeacherCache.build(fn, fd.state(t), data, folder, **{"batch_size": 8, "progress": False, **kw})


class Counting(torch.utils.data.Dataset):
    """Items ``(x, label)``; records which samples were read; can fail at one sample."""

    def __init__(self, x: torch.Tensor, fail_at: int | None = None):
        self.x, self.fail_at, self.read = x, fail_at, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"disk error at sample {i}")
        self.read.append(i)
        return self.x[i], i % CLASSES


# ---------------------------------------------------------------- it stands in for the teacher


def test_cached_pairs_equal_online_pairs_and_the_teachers_forward(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.tensor([31, 2, 17, 49, 8])
    x = data[idx]
    cached = fn(cache[idx], fd.state(s), x)
    online = fn(fd.state(t), fd.state(s), x)
    assert [p.payload for p in cached] == [0.5, 1.0]
    for c, o in zip(cached, online):
        torch.testing.assert_close(c.teacher, o.teacher)
        assert torch.equal(c.student, o.student)
    # independent of funcdistill: the teacher's own forward
    with torch.no_grad():
        torch.testing.assert_close(cached[0].teacher, t[1](t[0](x)))
        torch.testing.assert_close(cached[1].teacher, t(x))
    assert len(cache) == N and cache.points == ("'1'", "''") and cache.draws == 0


def test_the_cache_holds_the_teachers_forward_on_the_build_batches(models, data, tmp_path):
    t, s = models
    cache = build(fd.distill(t, s, mapping(t, s)), t, data, tmp_path / "c")  # batches of 8, stored in float32
    for lo in range(0, N, 8):
        rows = range(lo, min(lo + 8, N))
        batch = torch.stack([data[i] for i in rows])  # as the build collates it
        hidden, logits = cache[rows].values
        with torch.no_grad():  # the same samples in the same batch, in one process: the same sums, bit for bit
            assert torch.equal(hidden, t[1](t[0](batch)))
            assert torch.equal(logits, t(batch))


def test_gradients_equal_online_gradients(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.arange(10, 26)
    x, y = data[idx], idx % CLASSES

    def loss(ss, teacher):
        (h_t, h_s, w_h), (z_t, z_s, w_z) = fn(teacher, ss, x)
        kd = F.kl_div(F.log_softmax(z_s / 2, -1), F.log_softmax(z_t / 2, -1), log_target=True, reduction="batchmean")
        return w_h * (h_t[:, :12] - h_s).pow(2).mean() + w_z * kd + F.cross_entropy(z_s, y)

    ss = fd.state(s)
    g_cached = grad(loss)(ss, cache[idx])
    g_online = grad(loss)(ss, fd.state(t))
    assert sorted(g_cached) == sorted(ss)
    for name in ss:
        torch.testing.assert_close(g_cached[name], g_online[name])
        assert g_cached[name].abs().sum() > 0


def test_the_teacher_does_not_run(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.arange(16)
    outputs, x, ss = cache[idx], data[idx], fd.state(s)
    student_only = flops(s, x)
    assert flops(fn, outputs, ss, x) == student_only
    assert flops(fn, fd.state(t), ss, x) > student_only  # the online call does run it
    # with the backward: the student's forward and backward, written out by hand
    g_flops = flops(grad(lambda p: sum(b.pow(2).sum() + 0 * a.sum() for a, b, _ in fn(outputs, p, x))), ss)

    def by_hand(p):
        h = F.relu(F.linear(x, p["0.weight"], p["0.bias"]))
        return h.pow(2).sum() + F.linear(h, p["2.weight"], p["2.bias"]).pow(2).sum()

    assert g_flops == flops(grad(by_hand), ss)


def test_vmap_over_stacked_students_and_over_samples(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.arange(5, 13)
    outputs, x = cache[idx], data[idx]
    students = [mlp(10 + k, 12) for k in range(3)]
    stacked = torch.func.stack_module_state(students)[0]

    def loss(ss, teacher, xb):
        return sum(
            w * (a[..., :12] - b).pow(2).mean() if a.shape != b.shape else w * (a - b).pow(2).mean()
            for a, b, w in fn(teacher, ss, xb)
        )

    batched = vmap(grad(loss), in_dims=(0, None, None))(stacked, outputs, x)
    for k, student in enumerate(students):
        one = grad(loss)(fd.state(student), fd.state(t), x)
        for name in one:
            torch.testing.assert_close(batched[name][k], one[name])
    # per sample: the outputs are a pytree whose leaves vmap slices
    per_sample = vmap(lambda o, xi: fn(o, fd.state(s), xi)[1].teacher, in_dims=(0, 0))(outputs, x)
    torch.testing.assert_close(per_sample, t(x).detach())


@pytest.mark.compile
def test_compiled_step_takes_cached_outputs(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    cache = build(fn, t, data, tmp_path / "c")

    def step(ss, teacher, x):
        ((z_t, z_s, _),) = fn(teacher, ss, x)
        return (z_t - z_s).pow(2).mean()

    compiled = torch.compile(grad(step), fullgraph=True, backend="eager")
    idx = torch.arange(8)
    got = compiled(fd.state(s), cache[idx], data[idx])
    want = grad(step)(fd.state(s), fd.state(t), data[idx])
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    other = fd.distill(t, s, fd.Mapping(t, s).add("0", "0"))
    with pytest.raises(Exception, match=r"maps teacher point\(s\) '0', which it does not hold"):
        torch.compile(lambda o, ss, x: other(o, ss, x)[0].teacher, fullgraph=True, backend="eager")(
            cache[idx], fd.state(s), data[idx]
        )


def test_teacher_dtype_and_mutable_behave_as_online(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, teacher_dtype=torch.bfloat16, mutable=True)
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.arange(4)
    (pairs, buffers) = fn(cache[idx], fd.state(s), data[idx])
    (online, _) = fn(fd.state(t), fd.state(s), data[idx])
    assert pairs[0].teacher.dtype == torch.float32  # cast to the student's dtype, as online
    torch.testing.assert_close(pairs[0].teacher, online[0].teacher)
    assert buffers.teacher == {}


# ---------------------------------------------------------------- storage


def test_half_precision_storage_within_its_rounding(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    full = build(fn, t, data, tmp_path / "full")
    # the bound docs/cache.md gives: u * |x| in the normal range (from tiny), u * tiny below it
    for dtype, u, tiny in ((torch.float16, 2.0**-11, 2.0**-14), (torch.bfloat16, 2.0**-8, 2.0**-126)):
        half = build(fn, t, data, tmp_path / str(dtype), dtype=dtype)
        idx = torch.arange(N)
        for a, b in zip(half[idx].values, full[idx].values):  # the same build batches: only the storage differs
            assert a.dtype == torch.float32  # read back in the teacher's dtype
            assert ((a - b).abs() <= u * b.abs().clamp(min=tiny)).all()
            assert ((a - b).abs() <= u * b.abs().amax(dim=1, keepdim=True)).all()  # u times the sample's largest
            assert not torch.equal(a, b)
        # the data bytes halve; the headers stay
        assert half.nbytes < 0.6 * full.nbytes


def test_per_pair_dtype(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c", dtype={1: torch.float16})
    full = build(fn, t, data, tmp_path / "full")
    idx = torch.arange(N)
    # the same build batches: pair 0 (kept in float32) is the same, bit for bit; pair 1 is rounded
    assert torch.equal(cache[idx].values[0], full[idx].values[0])
    assert not torch.equal(cache[idx].values[1], full[idx].values[1])


def test_topk_storage_matches_the_formula_and_feeds_a_topk_loss(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    k, T = 3, 2.0
    cache = build(fn, t, data, tmp_path / "c", topk={1: k}, topk_temperature=T)
    idx = torch.tensor([3, 40, 11])
    hidden, top = cache[idx].values
    # the cache holds the teacher's forward on the build's batches of 8; this 3-sample forward may sum in
    # another order: float32 rounding, a few ulps of values below 10 (2.4e-7 seen), so a 1e-6 tolerance
    torch.testing.assert_close(hidden, fn(fd.state(t), fd.state(s), data[idx])[0].teacher, rtol=0, atol=1e-6)
    assert isinstance(top, TopK) and top.indices.dtype == torch.int64
    # independently: float64 softmax of the teacher's logits, sorted (the same rounding gap, plus the
    # float32 log_softmax of the build: 1e-6)
    with torch.no_grad():
        logp = torch.log_softmax(t(data[idx]).double() / T, -1)
    want = logp.sort(dim=-1, descending=True).values
    torch.testing.assert_close(top.logprobs.double(), want[:, :k], rtol=0, atol=1e-6)
    # the indices point at those values (compared by value: two logits within rounding may swap)
    torch.testing.assert_close(logp.gather(-1, top.indices), want[:, :k], rtol=0, atol=1e-6)
    # the pair's teacher output is the TopK; a top-k KL written from the formula consumes it
    pairs = fn(cache[idx], fd.state(s), data[idx])
    z_s = pairs[1].student.detach()
    log_ps = torch.log_softmax(z_s.double(), -1)
    manual = sum(
        float(top.logprobs[b, i].double().exp() * (top.logprobs[b, i].double() - log_ps[b, top.indices[b, i]]))
        for b in range(3)
        for i in range(k)
    )
    got = topk_kl_loss(*pairs[1].teacher, z_s, reduction="sum")
    assert abs(float(got) - manual) < 1e-4
    # storage: k values and k small indices per sample instead of 7 floats
    full = build(fn, t, data, tmp_path / "full")
    assert cache._index["entries"][1]["leaves"][0]["index_dtype"] == "int16"
    assert cache.nbytes < full.nbytes


def test_topk_of_a_non_logits_output_is_refused(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    with pytest.raises(ValueError, match=r"topk=9 for the teacher output at '', which has 7 classes; use 1..7"):
        build(fn, t, data, tmp_path / "c", topk={1: 9})
    with pytest.raises(ValueError, match=r"topk keys are pair indices 0..1 of the mapping, got 2"):
        build(fn, t, data, tmp_path / "d", topk={2: 3})


def test_bytes_and_files(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c", shard_size=16)
    files = sorted(os.listdir(tmp_path / "c"))
    assert files == ["build.lock", "index.json"] + [f"shard-0000{i}.safetensors" for i in range(4)]
    assert cache.nbytes == sum((tmp_path / "c" / f).stat().st_size for f in files if f.endswith(".safetensors"))
    assert cache.bytes_per_sample == cache.nbytes / N
    # the shards are plain safetensors files: safetensors itself reads them
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "c" / "shard-00001.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(shard["p1.0"], t(data[16:32]))


# ---------------------------------------------------------------- nothing lost, nothing wrong


def test_a_crashed_build_resumes_reading_only_the_missing_samples(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    x = torch.randn(130, 6, generator=torch.Generator().manual_seed(5))
    kw = dict(batch_size=10, shard_size=20)
    failing = Counting(x, fail_at=80)
    with pytest.raises(RuntimeError, match="disk error at sample 80"):
        build(fn, t, failing, tmp_path / "c", **kw)
    assert sorted(set(failing.read)) == list(range(80))
    with pytest.raises(ValueError, match=r"build in .* is unfinished; run TeacherCache.build again"):
        TeacherCache.open(tmp_path / "c")
    kept = {f: (tmp_path / "c" / f).stat().st_mtime_ns for f in os.listdir(tmp_path / "c") if f.startswith("shard")}
    assert len(kept) == 4

    resumed = Counting(x)
    cache = build(fn, t, resumed, tmp_path / "c", **kw)
    assert resumed.read == list(range(80, 130))
    for f, mtime in kept.items():
        assert (tmp_path / "c" / f).stat().st_mtime_ns == mtime  # finished shards were not rewritten

    whole = build(fn, t, Counting(x), tmp_path / "whole", **kw)
    idx = torch.arange(130)
    for a, b in zip(cache[idx].values, whole[idx].values):
        assert torch.equal(a, b)
    # building a finished cache again reads nothing
    again = Counting(x)
    build(fn, t, again, tmp_path / "c", **kw)
    assert again.read == []


def test_a_shard_written_but_not_recorded_is_redone(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    failing = Counting(data, fail_at=30)
    with pytest.raises(RuntimeError):
        build(fn, t, failing, tmp_path / "c", shard_size=10)
    # a kill between the data file and the progress file: a stray shard file the progress does not list
    (tmp_path / "c" / "shard-00003.safetensors").write_bytes(b"partial")
    resumed = Counting(data)
    cache = build(fn, t, resumed, tmp_path / "c", shard_size=10)
    assert resumed.read == list(range(30, N))
    cache.verify()


def test_random_bytes_in_a_shard_are_detected(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    build(fn, t, data, tmp_path / "c", shard_size=16)
    path = tmp_path / "c" / "shard-00001.safetensors"
    raw = bytearray(path.read_bytes())
    gen = torch.Generator().manual_seed(0)
    for pos in torch.randint(len(raw) - 40, len(raw), (8,), generator=gen).tolist():  # in the tensor data
        raw[pos] ^= 0x5A
    path.write_bytes(bytes(raw))
    cache = TeacherCache.open(tmp_path / "c")  # sizes are fine
    cache[torch.arange(16)]  # shard 0 is intact
    with pytest.raises(ValueError, match=r"shard .*shard-00001\.safetensors is damaged: its SHA-256"):
        cache[torch.tensor([3, 20])]
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is damaged"):
        TeacherCache.open(tmp_path / "c").verify()


def test_a_truncated_shard_is_detected_when_opened(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    build(fn, t, data, tmp_path / "c", shard_size=16)
    path = tmp_path / "c" / "shard-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"shard .*shard-00002\.safetensors has \d+ bytes where the index records"):
        TeacherCache.open(tmp_path / "c")
    path.unlink()
    with pytest.raises(ValueError, match=r"shard .*shard-00002\.safetensors is missing"):
        TeacherCache.open(tmp_path / "c")


def test_a_damaged_index_is_a_clear_error(models, data, tmp_path):
    t, s = models
    build(fd.distill(t, s), t, data, tmp_path / "c")
    (tmp_path / "c" / "index.json").write_text('{"format": "funcdistill.Teach')
    with pytest.raises(ValueError, match=r"cannot read the index .*index\.json .*damaged"):
        TeacherCache.open(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"no teacher cache at .*nowhere"):
        TeacherCache.open(tmp_path / "nowhere")


def test_a_checksum_with_verify_off_is_not_read(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    build(fn, t, data, tmp_path / "c")
    path = tmp_path / "c" / "shard-00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    TeacherCache.open(tmp_path / "c", verify=False)[torch.arange(3)]  # the caller chose not to check


# ---------------------------------------------------------------- what it was built for


def test_another_mapping_is_refused(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)  # the final outputs only
    cache = build(fn, t, data, tmp_path / "c")
    idx = torch.arange(4)
    other = fd.distill(t, s, fd.Mapping(t, s).add("1", "1").add("", ""))
    with pytest.raises(
        ValueError,
        match=r"holds the teacher outputs at ''; this distill function also maps teacher point\(s\) '1', which it does not hold\. Build a cache",
    ):
        other(cache[idx], fd.state(s), data[idx])
    # the same teacher points with other student points are fine: the teacher outputs are the same
    s2 = mlp(4, 12)
    ((z, _, _),) = fd.distill(t, s2)(cache[idx], fd.state(s2), data[idx])
    torch.testing.assert_close(z, t(data[idx]).detach())
    # a cache with more points serves a mapping with fewer
    wide = build(other, t, data, tmp_path / "wide")
    ((z2, _, _),) = fn(wide[idx], fd.state(s), data[idx])
    torch.testing.assert_close(z2, z)


def test_another_teacher_is_refused(models, data, tmp_path):
    t, s = models
    cache = build(fd.distill(t, s), t, data, tmp_path / "c")
    idx = torch.arange(4)
    wider = mlp(0, 40).eval()
    with pytest.raises(
        ValueError,
        match=r"was built for another teacher: teacher state entry '0.weight' was \[32, 6\] float32 when the cache was built, this teacher's is \[40, 6\] float32",
    ):
        fd.distill(wider, s)(cache[idx], fd.state(s), data[idx])
    boxed = nn.Sequential(nn.Sequential(*t)).eval()
    with pytest.raises(
        ValueError,
        match=r"another teacher: the teacher it was built for has a state entry '0.weight' that this teacher lacks",
    ):
        fd.distill(boxed, s)(cache[idx], fd.state(s), data[idx])
    # other weights: refused when the state is given, and by a build into the same folder
    retrained = mlp(9, 32).eval()
    with pytest.raises(ValueError, match=r"built with another teacher state: the SHA-256"):
        TeacherCache.open(tmp_path / "c", teacher_state=fd.state(retrained))
    TeacherCache.open(tmp_path / "c", teacher_state=fd.state(t))
    with pytest.raises(
        ValueError, match=r"already holds a teacher cache .* teacher weights: the teacher state differs"
    ):
        build(fd.distill(retrained, s), retrained, data, tmp_path / "c")
    with pytest.raises(
        ValueError, match=r"""other settings: teacher points of the mapping: \['""'\] then, \['"1"'\] now"""
    ):
        build(fd.distill(t, s, fd.Mapping(t, s).add("1", "1")), t, data, tmp_path / "c")


def test_a_training_teacher_is_refused(models, data, tmp_path):
    t, s = models
    with pytest.raises(ValueError, match=r"the teacher has modules in training mode, .* \(teacher\.eval\(\)\)"):
        build(fd.distill(t.train(), s), t, data, tmp_path / "c")


# ---------------------------------------------------------------- augmentation


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A pure augmentation: random shift and scale drawn from ``g``."""
    shift = torch.randn(x.shape, generator=g) * 0.1
    return x * (1 + torch.rand((), generator=g)) + shift


def test_augmentation_draws_replay_bit_exactly(data, tmp_path):
    ident, s = nn.Identity().eval(), nn.Linear(6, 6)  # the identity teacher's output is its augmented input
    fn = fd.distill(ident, s)
    dataset = Counting(data)
    cache = TeacherCache.build(
        fn, {}, dataset, tmp_path / "c", batch_size=8, augment=jitter, draws=3, seed=7, shard_size=16, progress=False
    )
    assert cache.draws == 3
    idx = torch.tensor([44, 3, 17, 3])
    draws = torch.tensor([2, 0, 1, 1])
    replayed = cache.replay(data[idx], idx, draws)
    stored = cache[idx, draws].values[0]
    assert torch.equal(replayed, stored)
    assert not torch.equal(stored[1], stored[3])  # two draws of sample 3 differ
    assert not torch.equal(replayed, data[idx])
    # a fresh open replays the same inputs
    again = TeacherCache.open(tmp_path / "c", augment=jitter)
    assert torch.equal(again.replay(data[idx], idx, draws), replayed)


def test_augmented_cache_trains_like_online_on_the_replayed_inputs(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s, mapping(t, s))
    cache = build(fn, t, data, tmp_path / "c", augment=jitter, draws=2)
    idx, draws = torch.arange(20, 30), torch.randint(2, (10,), generator=torch.Generator().manual_seed(1))
    x = cache.replay(data[idx], idx, draws)
    for c, o in zip(fn(cache[idx, draws], fd.state(s), x), fn(fd.state(t), fd.state(s), x)):
        torch.testing.assert_close(c.teacher, o.teacher)


def test_augmentation_errors(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    cache = build(fn, t, data, tmp_path / "c", augment=jitter, draws=2)
    with pytest.raises(
        IndexError, match=r"holds 2 augmentation draws per sample: index it with cache\[indices, draws\]"
    ):
        cache[torch.arange(3)]
    with pytest.raises(IndexError, match=r"draws must be in 0..1, got 2"):
        cache[torch.arange(3), torch.tensor([0, 1, 2])]
    with pytest.raises(IndexError, match=r"give one draw per index: 3 indices, 2 draws"):
        cache[torch.arange(3), torch.tensor([0, 1])]
    with pytest.raises(ValueError, match=r"replay needs the augmentation the cache was built with"):
        TeacherCache.open(tmp_path / "c").replay(data[:2], [0, 1], [0, 0])
    with pytest.raises(
        ValueError, match=r"built with the augmentation (tests\.)?test_cache\.jitter, not builtins\.abs"
    ):
        TeacherCache.open(tmp_path / "c", augment=abs)
    with pytest.raises(ValueError, match=r"draws=3 needs augment=\.\.\."):
        build(fn, t, data, tmp_path / "d", draws=3)


# ---------------------------------------------------------------- indexing, datasets, copies


def test_indexing_forms_and_errors(models, data, tmp_path):
    t, s = models
    cache = build(fd.distill(t, s), t, data, tmp_path / "c", shard_size=8)
    with torch.no_grad():
        want = t(data)
    # across shards, in any order, with repeats
    idx = [49, 0, 8, 7, 33, 33, 16]
    torch.testing.assert_close(cache[idx].values[0], want[idx])
    torch.testing.assert_close(cache[torch.tensor(idx, dtype=torch.int32)].values[0], want[idx])
    torch.testing.assert_close(cache[range(3, 9)].values[0], want[3:9])
    torch.testing.assert_close(cache[40:].values[0], want[40:])
    with pytest.raises(IndexError, match=r"sample indices must be in 0..49, got 50"):
        cache[[1, 50]]
    with pytest.raises(IndexError, match=r"sample indices must be in 0..49, got -1"):
        cache[[-1]]
    with pytest.raises(TypeError, match=r"cache\[\[i\]\] for one sample"):
        cache[3]
    with pytest.raises(TypeError, match=r"must be a 1-D integer tensor, .* got a Tensor of torch.float32, shape \[1\]"):
        cache[torch.tensor([1.0])]
    with pytest.raises(IndexError, match=r"built without augmentation: index it with cache\[indices\] only"):
        cache[torch.arange(2), torch.zeros(2, dtype=torch.long)]


def test_dataset_items_and_bad_arguments(models, data, tmp_path):
    t, s = models
    fn = fd.distill(t, s)
    cache = build(fn, t, Counting(data), tmp_path / "c")  # (x, label) items: the label is ignored
    torch.testing.assert_close(cache[[5]].values[0], t(data[5:6]).detach())
    with pytest.raises(TypeError, match=r"each dataset item must be the model input .* got dict"):
        build(fn, t, [{"x": data[0]}], tmp_path / "d")
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        build(fn, t, data, tmp_path / "e", batch_size=0)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype such as torch.float16, got torch.int8"):
        build(fn, t, data, tmp_path / "e", dtype=torch.int8)
    with pytest.raises(TypeError, match=r"takes a distill function .* got Sequential"):
        TeacherCache.build(t, fd.state(t), data, tmp_path / "e")
    with pytest.raises(ValueError, match=r"dataset is empty"):
        build(fn, t, data[:0], tmp_path / "e")


def test_outputs_are_an_immutable_pytree(models, data, tmp_path):
    t, s = models
    cache = build(fd.distill(t, s, mapping(t, s)), t, data, tmp_path / "c")
    out = cache[[1, 2]]
    assert isinstance(out, TeacherOutputs)
    with pytest.raises(AttributeError, match=r"TeacherOutputs is immutable: cannot set 'values'"):
        out.values = ()
    with pytest.raises(AttributeError, match=r"a TeacherCache is immutable"):
        cache.path = "x"
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2
    doubled = torch.utils._pytree.tree_unflatten([2 * v for v in leaves], spec)
    assert torch.equal(doubled.values[1], 2 * out.values[1]) and doubled.built_for is out.built_for
    assert out.to(torch.float64).values[0].dtype == torch.float64
    assert "TeacherOutputs('1': [2, 32], '': [2, 7])" == repr(out)


def test_a_cache_pickles_and_reopens(models, data, tmp_path):
    t, s = models
    cache = build(fd.distill(t, s), t, data, tmp_path / "c")
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy[[4, 9]].values[0], cache[[4, 9]].values[0])


def test_ranks_write_their_own_shards_and_rank_0_the_index(models, data, tmp_path, monkeypatch):
    t, s = models
    fn = fd.distill(t, s)
    reads = {}
    for rank in (1, 0):  # rank 0 finishes last, as after the barrier
        monkeypatch.setattr(_build.Ranks, "current", classmethod(lambda cls, r=rank: cls(r, 2, False)))
        dataset = Counting(data)
        if rank == 1:
            _build.build(
                _build.Options(
                    fn,
                    fd.state(t),
                    dataset,
                    tmp_path / "c",
                    batch_size=8,
                    inputs=1,
                    dtype=None,
                    topk=None,
                    topk_temperature=1.0,
                    augment=None,
                    draws=1,
                    seed=0,
                    shard_size=16,
                    device=None,
                    progress=False,
                )
            )
            assert not (tmp_path / "c" / "index.json").exists()
        else:
            build(fn, t, dataset, tmp_path / "c", shard_size=16)
        reads[rank] = sorted(set(dataset.read))
    # shards of 16: rank 0 builds 0 and 2, rank 1 builds 1 and 3 (and both read the first batch for the layout)
    assert reads[0] == list(range(16)) + list(range(32, 48))
    assert reads[1] == list(range(8)) + list(range(16, 32)) + list(range(48, 50))
    cache = TeacherCache.open(tmp_path / "c")
    torch.testing.assert_close(cache[torch.arange(N)].values[0], t(data).detach())


def test_missing_safetensors_says_what_to_install(models, data, tmp_path, monkeypatch):
    t, s = models
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(
        ModuleNotFoundError, match=r'needs safetensors, which is not installed: pip install "funcdistill\[cache\]"'
    ):
        build(fd.distill(t, s), t, data, tmp_path / "c")


class Structured(nn.Module):
    """A teacher whose output is a tuple with a None entry and a dict."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h), None, {"hidden": h, "count": torch.ones(x.shape[0], dtype=torch.long)}


def test_structured_outputs_and_point_values(data, tmp_path):
    torch.manual_seed(0)
    t, s = Structured().eval(), Structured()
    m = fd.Mapping(t, s).add("", "").add(fd.Point("head", io="input"), fd.Point("head", io="input"))
    fn = fd.distill(t, s, m)
    cache = build(fn, t, data, tmp_path / "c", dtype=torch.float16)
    idx = torch.tensor([9, 0, 33])
    cached, online = fn(cache[idx], fd.state(s), data[idx]), fn(fd.state(t), fd.state(s), data[idx])
    assert cache.points == ("''", "Point('head', io='input')")
    (z, none, d), (z_on, _, d_on) = cached[0].teacher, online[0].teacher
    assert none is None and sorted(d) == ["count", "hidden"]
    assert d["count"].dtype == torch.long and torch.equal(d["count"], d_on["count"])  # integers stored as they are
    torch.testing.assert_close(z, z_on, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(cached[1].teacher, online[1].teacher, rtol=2e-3, atol=1e-3)


def test_outputs_are_an_optree_node(models, data, tmp_path):
    import optree

    t, s = models
    out = build(fd.distill(t, s, mapping(t, s)), t, data, tmp_path / "c")[[0, 1]]
    leaves = optree.tree_leaves(out, namespace="funcdistill")
    assert [tuple(v.shape) for v in leaves] == [(2, 32), (2, 7)]
    halved = optree.tree_map(lambda v: v / 2, out, namespace="funcdistill")
    assert isinstance(halved, TeacherOutputs) and torch.equal(halved.values[0], out.values[0] / 2)


def test_progress_bar_counts_samples(models, data, tmp_path, capsys):
    pytest.importorskip("tqdm")
    t, s = models
    TeacherCache.build(fd.distill(t, s), fd.state(t), data, tmp_path / "c", batch_size=8)
    err = capsys.readouterr().err
    assert "teacher cache" in err and f"{N}/{N}" in err


def test_the_benchmark_section_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("benchmarks.cache"))
    assert result.attempted > 0 and result.failed == 0
