"""How ``cache[indices]`` reads (funcdistill/cache/_read.py): every path gives the stored rows, as fresh copies.

The reference is independent of the reader: the shard files loaded with
safetensors itself and concatenated, indexed with plain ``tensor[idx]``. Each
key is also checked to take the path it is meant to (a spy on ``_read``), so a
path that stopped being taken would fail here rather than pass unexercised.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import funcdistill as fd
from funcdistill import _outputs
from funcdistill.cache import TeacherCache, _read

N = 50
SHARD = 16  # shards of 16, 16, 16 and 2 samples: the last one partial


def stored(cache: TeacherCache) -> dict[str, torch.Tensor]:
    """Every stored tensor of a cache, its shards read with safetensors and concatenated."""
    records = json.loads((cache.path / "index.json").read_text())["shards"]
    parts = [safetensors.torch.load_file(str(cache.path / r["file"])) for r in records]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@pytest.fixture
def data():
    return torch.randn(N, 6, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def models():
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 7)).eval()
    return t, nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 7))


@pytest.fixture
def fn(models):
    t, s = models
    return fd.distill(t, s, fd.Mapping(t, s).add("1", "1").add("", ""))  # stored as p0.0 ("1") and p1.0 ("")


def build(fn, data, folder, **kw):
    return TeacherCache.build(fn, fd.state(fn.teacher_model), data, folder, batch_size=8, progress=False, **kw)


@pytest.fixture
def paths(monkeypatch):
    """The ``_read`` functions each read calls, by name, in order."""
    taken: list[str] = []

    def spy(name, real):
        def called(*args):
            taken.append(name)
            return real(*args)

        return called

    for name in ("run", "one_shard", "across"):
        monkeypatch.setattr(_read, name, spy(name, getattr(_read, name)))
    return taken


def check(cache, key, want, idx, paths, path):
    """``cache[key]`` gives ``want``'s rows ``idx`` (both points, exactly), through ``path``, as fresh copies."""
    paths.clear()
    out = cache[key]
    assert paths == path
    for i, value in enumerate(out.values):
        expected = want[f"p{i}.0"][idx]
        assert value.dtype == expected.dtype and value.is_contiguous()
        assert torch.equal(value, expected), (key, i)
        value.add_(1.0)  # the caller's copy: writing into it changes no later read
    for i, value in enumerate(cache[key].values):
        assert torch.equal(value, want[f"p{i}.0"][idx])


RUNS = [  # consecutive samples: one slice per shard they span
    (range(3, 9), slice(3, 9)),  # within shard 0
    (range(14, 18), slice(14, 18)),  # across the first boundary
    (range(10, 50), slice(10, 50)),  # across all four shards, to the end of the last, partial one
    (slice(47, None), slice(47, 50)),  # within the last, partial shard (and its boundary)
    (slice(None), slice(0, 50)),
    (slice(-5, None), slice(45, 50)),
    ([16, 17, 18], slice(16, 19)),
    (torch.arange(30, 34), slice(30, 34)),
    (torch.arange(15, 17, dtype=torch.int32), slice(15, 17)),
]


@pytest.mark.parametrize(("key", "rows"), RUNS, ids=[str(k) for k, _ in RUNS])
def test_a_run_is_read_as_slices(fn, data, tmp_path, paths, key, rows):
    cache = build(fn, data, tmp_path / "c", shard_size=SHARD)
    check(cache, key, stored(cache), rows, paths, ["run"])
    with _Ops() as ops:
        cache[key]
    assert "index_select" not in ops.names and ops.names.count("clone") + ops.names.count("cat") == 2  # a copy each


GATHERS = [  # anything else: one index_select per stored tensor in one shard, grouped by shard across several
    ([33, 33, 34], ["one_shard"]),  # repeats
    ([5, 4], ["one_shard"]),  # consecutive, but descending
    ([3, 5, 4], ["one_shard"]),  # as many as its span, unsorted
    ([48, 49, 49], ["one_shard"]),  # in the last, partial shard
    ([7], ["one_shard"]),
    ([], ["one_shard"]),
    (range(2, 20, 3), ["across"]),
    (range(49, 10, -7), ["across"]),
    ([49, 0, 8, 7, 33, 33, 16], ["across"]),  # unsorted, repeated, every shard
    ([15, 16], ["run"]),  # (a run across the boundary, for contrast)
    ([16, 15], ["across"]),
]


@pytest.mark.parametrize(("key", "path"), GATHERS, ids=[str(k) for k, _ in GATHERS])
def test_gathers_across_shards(fn, data, tmp_path, paths, key, path):
    cache = build(fn, data, tmp_path / "c", shard_size=SHARD)
    idx = torch.tensor(list(key), dtype=torch.int64)
    check(cache, key, stored(cache), idx, paths, path)


@pytest.mark.parametrize(
    "key",
    [torch.tensor([49, 0, 7, 7, 33]), torch.arange(50), torch.tensor([4, 3]), torch.tensor([], dtype=torch.int64)],
    ids=["shuffled", "all", "descending", "empty"],
)
def test_one_shard_takes_an_index_tensor_straight_to_index_select(fn, data, tmp_path, paths, key):
    cache = build(fn, data, tmp_path / "c")  # one shard
    check(cache, key, stored(cache), key, paths, [])
    with _Ops() as ops:
        cache[key]
    assert ops.names == ["index_select", "index_select"]  # one per stored tensor, no bounds read


def test_one_shard_other_keys_take_the_full_path(fn, data, tmp_path, paths):
    cache = build(fn, data, tmp_path / "c")
    want = stored(cache)
    check(cache, torch.tensor([9, 2], dtype=torch.int32), want, [9, 2], paths, ["one_shard"])
    check(cache, [9, 2, 2], want, [9, 2, 2], paths, ["one_shard"])
    check(cache, slice(40, 50), want, slice(40, 50), paths, ["run"])


@pytest.mark.parametrize("shard_size", [None, SHARD], ids=["one shard", "four shards"])
def test_out_of_range_and_bad_slices_are_the_same_errors(fn, data, tmp_path, shard_size):
    cache = build(fn, data, tmp_path / "c", shard_size=shard_size)
    for key, got in [
        (torch.tensor([1, 50]), 50),
        (torch.tensor([-1]), -1),
        (torch.tensor([3, -2, 60]), -2),
        (range(45, 52), 51),
        (range(-2, 3), -2),
        ([0, 50], 50),
    ]:
        with pytest.raises(IndexError, match=rf"sample indices must be in 0\.\.49, got {got}\.$"):
            cache[key]
    with pytest.raises(ValueError, match=r"step must be greater than zero"):  # torch's, as tensor slicing says
        cache[::-1]
    with pytest.raises(ValueError, match=r"slice step cannot be zero"):
        cache[::0]
    assert cache[5:3].values[0].shape == (0, 32)


def test_draws_are_gathered_in_one_shard_and_across(fn, data, tmp_path, paths):
    def jitter(x, g):
        return x + torch.randn(x.shape, generator=g)

    for shard_size, path in ((None, ["one_shard"]), (SHARD, ["across"])):
        cache = build(fn, data, tmp_path / f"c{shard_size}", augment=jitter, draws=3, shard_size=shard_size)
        want = stored(cache)
        idx, draws = torch.arange(10, 30), torch.arange(20) % 3  # consecutive samples: still a gather
        paths.clear()
        out = cache[idx, draws]
        assert paths == path
        for i, value in enumerate(out.values):
            assert torch.equal(value, want[f"p{i}.0"][idx, draws])


class _Ops(TorchFunctionMode):
    """The names of the torch functions and tensor methods called while it is active (attribute reads left out)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name != "__get__":  # reading an attribute (dtype, shape): no work on the data
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def test_a_functions_points_are_checked_once_and_a_repeated_point_read_for_each_pair(
    models, fn, data, tmp_path, monkeypatch
):
    cache = build(fn, data, tmp_path / "c")
    t, s = models
    twice = fd.distill(t, s, fd.Mapping(t, s).add("", "").add("1", "1").add("", "1"))  # "" read by pairs 0 and 2
    checks = []
    real = _outputs._check
    monkeypatch.setattr(_outputs, "_check", lambda *a: checks.append(a) or real(*a))
    idx = torch.tensor([3, 41])
    want = stored(cache)
    for _ in range(3):
        pairs = twice(cache[idx], fd.state(s), data[idx])
        assert [torch.equal(p.teacher, want[name][idx]) for p, name in zip(pairs, ["p1.0", "p0.0", "p1.0"])] == [
            True
        ] * 3
    assert len(checks) == 1  # the first call checks the cache against this function; the others look it up
    fn(cache[idx], fd.state(s), data[idx])
    assert len(checks) == 2  # another function: checked too
