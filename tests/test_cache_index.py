"""A teacher cache's files are checked before they are trusted, and its format does not drift.

``index.json`` is edited by hand to check that ``TeacherCache.open`` refuses
each kind of damage with a message naming the file and the field, instead of
reading the wrong samples; the on-disk point keys are pinned; values that a
storage dtype cannot hold are refused by the build; every key kind that
``cache[...]`` does not take is a ``TypeError`` naming those it does.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import funcdistill as fd
from funcdistill.cache import TeacherCache
from tests.test_cache import CLASSES, N, build, jitter, mapping, mlp

SHARD = 8  # 50 samples: shards of 8, the last of 2


@pytest.fixture
def made(tmp_path):
    """A cache of 7 shards (the hidden features and the logits), and the teacher's outputs on every sample."""
    t, s = mlp(0, 32).eval(), mlp(1, 12)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    build(fd.distill(t, s, mapping(t, s)), t, x, tmp_path / "c", shard_size=SHARD)
    with torch.no_grad():
        logits = t(x)
    return tmp_path / "c", logits


def edit(folder, change):
    """Rewrite ``index.json`` with ``change(index)`` applied, as a hand edit would."""
    path = folder / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


DAMAGED = r"the teacher cache index .*index\.json is damaged: "


# ---------------------------------------------------------------- the index is checked against itself


def test_a_halved_shard_size_is_refused_not_read_as_other_samples(made):
    folder, logits = made
    # rows are found by shard_size: the intact index gives sample 4 (a float32 round trip: exact)
    assert torch.equal(TeacherCache.open(folder)[[4]].values[1], logits[[4]])
    edit(folder, lambda ix: ix.update(shard_size=SHARD // 2))
    with pytest.raises(
        ValueError,
        match=DAMAGED + r".*field 'shards' has 7 records, where samples 50 in shards of 4 need 13"
        r".*field 'shards\[1\]\.first' is 8, where shard_size 4 puts shard 1 at 4.*Rebuild the cache",
    ):
        TeacherCache.open(folder)


def test_swapped_shard_records_are_refused(made):
    folder, _ = made

    def swap(ix):
        ix["shards"][0], ix["shards"][1] = ix["shards"][1], ix["shards"][0]

    edit(folder, swap)
    with pytest.raises(
        ValueError, match=DAMAGED + r"field 'shards\[0\]\.first' is 8, where shard_size 8 puts shard 0 at 0"
    ):
        TeacherCache.open(folder)


def test_swapped_shard_files_are_refused_by_their_headers(made):
    folder, _ = made

    def swap_files(ix):  # first and count stay in order; the files (with their sizes and checksums) swap
        a, b = ix["shards"][0], ix["shards"][1]
        for field in ("file", "bytes", "sha256"):
            a[field], b[field] = b[field], a[field]

    edit(folder, swap_files)
    with pytest.raises(
        ValueError,
        match=r"does not match its index .*index\.json: shard-00001\.safetensors holds the samples from 8 "
        r"\(its header\), where shards\[0\]\.first is 0; shard-00000\.safetensors holds the samples from 0",
    ):
        TeacherCache.open(folder)


def test_raised_samples_are_refused_not_an_index_error_later(made):
    folder, _ = made
    edit(folder, lambda ix: ix.update(samples=60))
    with pytest.raises(ValueError, match=DAMAGED + r"field 'samples' is 60, but the shards' counts add up to 50"):
        TeacherCache.open(folder)


def test_a_changed_count_is_refused(made):
    folder, _ = made
    edit(folder, lambda ix: ix["shards"][6].update(count=3))
    with pytest.raises(ValueError, match=DAMAGED + r".*field 'shards\[6\]\.count' is 3, where shard 6 holds 2 samples"):
        TeacherCache.open(folder)


@pytest.mark.parametrize("field", ["shards", "entries", "points", "shard_size", "samples", "teacher"])
def test_a_missing_field_is_named(made, field):
    folder, _ = made
    edit(folder, lambda ix: ix.pop(field))
    with pytest.raises(ValueError, match=DAMAGED + rf"field '{field}' is missing"):
        TeacherCache.open(folder)


def test_several_problems_in_one_message(made):
    folder, _ = made

    def damage(ix):
        ix["draws"] = -1
        ix["shards"][2].pop("sha256")
        ix["entries"][0]["leaves"][0]["stored"] = "float17"

    edit(folder, damage)
    with pytest.raises(
        ValueError,
        match=DAMAGED + r"field 'draws' is -1, not an int >= 0; field 'entries\[0\]\.leaves\[0\]\.stored' is "
        r"'float17', not a dtype name; field 'shards\[2\]\.sha256' is missing\.",
    ):
        TeacherCache.open(folder)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "ABSOLUTE", "sub/shard-00000.safetensors", ".."])
def test_a_shard_outside_the_folder_is_refused(made, outside):
    folder, _ = made
    target = folder.parent / "outside.safetensors"
    shutil.copy(folder / "shard-00000.safetensors", target)  # a readable file is there: it must not be read
    (folder / "sub").mkdir()
    shutil.copy(folder / "shard-00000.safetensors", folder / "sub" / "shard-00000.safetensors")
    name = str(target) if outside == "ABSOLUTE" else outside
    edit(folder, lambda ix: ix["shards"][0].update(file=name))
    with pytest.raises(
        ValueError,
        match=DAMAGED
        + rf"field 'shards\[0\]\.file' is {re.escape(repr(name))}, not a plain file name in the cache's folder",
    ):
        TeacherCache.open(folder)


# ---------------------------------------------------------------- the index is checked against the shards


def test_a_changed_shape_name_or_dtype_is_refused_by_the_headers(made):
    folder, _ = made
    edit(folder, lambda ix: ix["entries"][0]["leaves"][0].update(shape=[31]))
    with pytest.raises(
        ValueError,
        match=r"does not match its index .*: shard-00000\.safetensors: tensor 'p0\.0' is \[8, 32\], where the "
        r"index gives \[8, 31\];.*and 1 more\. Rebuild",  # 7 shards, 6 listed
    ):
        TeacherCache.open(folder)
    edit(folder, lambda ix: ix["entries"][0]["leaves"][0].update(shape=[32], name="p0.9"))
    with pytest.raises(
        ValueError,
        match=r"shard-00000\.safetensors has no tensor 'p0\.9'; shard-00000\.safetensors has tensors the index "
        r"does not list: 'p0\.0'",
    ):
        TeacherCache.open(folder)
    edit(folder, lambda ix: ix["entries"][0]["leaves"][0].update(name="p0.0", stored="float16"))
    with pytest.raises(ValueError, match=r"tensor 'p0\.0' is float32, where the index gives float16"):
        TeacherCache.open(folder)
    edit(folder, lambda ix: ix["entries"][0]["leaves"][0].update(stored="float32"))
    TeacherCache.open(folder)  # restored: opens


def test_a_damaged_point_key_is_named(made):
    folder, _ = made
    edit(folder, lambda ix: ix["points"].__setitem__(0, "Point('1')"))
    with pytest.raises(
        ValueError, match=DAMAGED + r"""field 'points\[0\]': "Point\('1'\)" is not a teacher point key"""
    ):
        TeacherCache.open(folder)


# ---------------------------------------------------------------- format version


def test_the_format_version_is_checked(made):
    folder, _ = made
    assert json.loads((folder / "index.json").read_text())["version"] == 2
    edit(folder, lambda ix: ix.update(version=4))  # format 3 is a cache of token samples (tests/test_cache_ragged.py)
    with pytest.raises(
        ValueError,
        match=r"index\.json was written by a newer funcdistill \(teacher cache format 4; this one reads "
        r"formats 2 and 3\): upgrade funcdistill",
    ):
        TeacherCache.open(folder)
    edit(folder, lambda ix: ix.update(version=1))
    with pytest.raises(
        ValueError, match=r"index\.json is teacher cache format 1, .* by their repr; .* Rebuild the cache"
    ):
        TeacherCache.open(folder)
    edit(folder, lambda ix: ix.pop("version"))
    with pytest.raises(ValueError, match=r"index\.json is damaged: its field 'version' is missing\. Rebuild the cache"):
        TeacherCache.open(folder)


def test_a_build_into_a_folder_of_another_format_says_so(made):
    folder, _ = made
    edit(folder, lambda ix: ix.update(version=1))
    t, s = mlp(0, 32).eval(), mlp(1, 12)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"index\.json is teacher cache format 1"):
        build(fd.distill(t, s, mapping(t, s)), t, x, folder, shard_size=SHARD)


# ---------------------------------------------------------------- stable keys


def test_point_keys_are_pinned():
    from funcdistill._keys import display, parse_key, point_key

    cases = [
        ("", '""'),
        ("encoder.layer.0", '"encoder.layer.0"'),
        (fd.Point("encoder.layer.0"), '"encoder.layer.0"'),  # a Point with defaults is its name
        (fd.Point("head", io="input"), '"head" io="input"'),
        (fd.Point("blocks.0", call="all"), '"blocks.0" call="all"'),
        (
            fd.Point("layer", io="input", call=-1, arg="attention_mask"),
            '"layer" io="input" call=-1 arg="attention_mask"',
        ),
        (fd.Point("fc", io="input", arg=0), '"fc" io="input" arg=0'),
        ("café", '"caf\\u00e9"'),
    ]
    for point, key in cases:
        assert point_key(point) == key
        assert parse_key(key) == (point.name if isinstance(point, fd.Point) and point.plain else point)
    assert display('"head" io="input"') == "Point('head', io='input')"
    for bad in [
        '"head"  io="input"',
        '"x" call=2 io="input"',
        '"x" io="output"',
        "'x'",
        "Point('x')",
        '"x" arg=0',
        "",
        3,
    ]:
        with pytest.raises(ValueError, match=r"is not (in the canonical form of )?a teacher point key"):
            parse_key(bad)


def test_on_disk_keys_do_not_depend_on_point_repr(tmp_path, monkeypatch):
    torch.manual_seed(0)
    t, s = mlp(0, 32).eval(), mlp(1, 12)
    m = fd.Mapping(t, s).add("", "").add(fd.Point("2", io="input"), fd.Point("2", io="input"))
    fn = fd.distill(t, s, m)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    build(fn, t, x, tmp_path / "c")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["points"] == ['""', '"2" io="input"']
    assert [e["point"] for e in index["entries"]] == index["points"]
    # another repr changes neither the files nor the matching of a distill function's points
    monkeypatch.setattr(fd.Point, "__repr__", lambda self: f"P<{self.name}>")
    build(fn, t, x, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "index.json").read_text())["points"] == index["points"]
    cache = TeacherCache.open(tmp_path / "c")
    pairs = fn(cache[[3, 4]], fd.state(s), x[[3, 4]])
    with torch.no_grad():  # the input of the last Linear is the hidden layer; a float32 round trip: exact
        assert torch.equal(pairs[1].teacher, TeacherCache.open(tmp_path / "d")[[3, 4]].values[1])
        torch.testing.assert_close(pairs[1].teacher, t[1](t[0](x[[3, 4]])), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- key kinds


@pytest.mark.parametrize(
    "key",
    [None, {"x": torch.zeros(2, 6)}, torch.tensor([1.0, 2.0]), "12", 1.5, {1, 2}, [1.0, 2.0], [[1, 2]], [True, False]],
    ids=["None", "dict", "float-tensor", "str", "float", "set", "float-list", "nested-list", "bool-list"],
)
def test_other_key_kinds_are_a_type_error_naming_the_accepted_ones(made, key):
    folder, _ = made
    cache = TeacherCache.open(folder)
    with pytest.raises(
        TypeError,
        match=r"sample indices must be a 1-D integer tensor, a list or tuple of ints, a range or a slice",
    ):
        cache[key]


def test_accepted_key_kinds(made):
    folder, logits = made
    cache = TeacherCache.open(folder)
    want = logits[[7, 1, 9]]
    for key in ([7, 1, 9], (7, 1, 9), np.array([7, 1, 9]), torch.tensor([7, 1, 9], dtype=torch.int16)):
        assert torch.equal(cache[key].values[1], want)  # a float32 round trip of the same rows: exact
    assert cache[[]].values[1].shape == (0, CLASSES)


def test_draw_kinds_are_checked_the_same_way(tmp_path):
    t, s = mlp(0, 32).eval(), mlp(1, 12)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    cache = build(fd.distill(t, s), t, x, tmp_path / "c", augment=jitter, draws=2)
    with pytest.raises(
        TypeError, match=r"draws must be a 1-D integer tensor, a list or tuple of ints, a range or a slice"
    ):
        cache[[0, 1], None]
    assert cache[[0, 1], (1, 0)].values[0].shape == (2, CLASSES)


# ---------------------------------------------------------------- storage dtypes


class Scaled(nn.Module):
    """A teacher whose output is ``scale * linear(x)``: outputs of a chosen magnitude."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.scale = nn.Linear(6, CLASSES), scale

    def forward(self, x):
        return self.fc(x) * self.scale


def scaled(scale: float):
    t, s = Scaled(scale).eval(), nn.Linear(6, CLASSES)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    return fd.distill(t, s), t, x


def batched(t, x, size=8):
    """The teacher's outputs on the build's batches (what the cache holds, before the storage's rounding)."""
    with torch.no_grad():
        return torch.cat([t(x[i : i + size]) for i in range(0, len(x), size)])


def test_an_overflowing_value_is_a_build_error_naming_the_pair_and_the_value(tmp_path):
    fn, t, x = scaled(1e5)
    with torch.no_grad():
        largest = t(x[:8]).abs().amax(dim=1)  # the first batch already overflows float16 (beyond 65504)
    i = int(largest.argmax())
    with pytest.raises(
        ValueError,
        match=rf"the teacher output at '' \(pair 0\) does not fit its storage dtype float16: sample {i} has a "
        rf"value of magnitude {re.escape(f'{float(largest[i]):.4g}')}, beyond float16's largest 65504, so it would be stored as "
        r"inf\. Keep the teacher's dtype for this pair \(dtype=\{0: None\}, or no dtype\), store it in bfloat16 "
        r"\(dtype=\{0: torch\.bfloat16\}",
    ):
        build(fn, t, x, tmp_path / "half", dtype=torch.float16)
    assert not list((tmp_path / "half").glob("*.safetensors"))
    # bfloat16 has float32's range: stored, within its rounding
    cache = build(fn, t, x, tmp_path / "bf16", dtype=torch.bfloat16)
    got, want = cache[torch.arange(N)].values[0], batched(t, x)
    assert got.abs().max() > 65504 and torch.isfinite(got).all()
    assert (got - want).abs().max() > 0  # rounded ...
    assert ((got - want).abs() <= 2.0**-8 * want.abs()).all()  # ... to nearest: 2**-8 relative (all are normal)


def test_overflowing_topk_logprobs_are_a_build_error(tmp_path):
    fn, t, x = scaled(1e5)  # logit gaps of ~1e4..1e5: log-probabilities far below -65504
    with pytest.raises(
        ValueError,
        match=r"the teacher output at '' \(pair 0\), its top-k log-probabilities, does not fit its storage dtype float16",
    ):
        build(fn, t, x, tmp_path / "c", dtype=torch.float16, topk=3)


def test_a_sample_below_the_normal_range_is_a_build_error(tmp_path):
    fn, t, x = scaled(1e-7)  # every output below float16's smallest normal, 2**-14
    with pytest.raises(
        ValueError,
        match=r"the teacher output at '' \(pair 0\) does not fit its storage dtype float16: the largest magnitude of "
        r"sample \d+ is .*e-0\d, below float16's normal range \(from 6\.104e-05\), so all its values would lose their "
        r"relative precision \(those below 2\.98e-08 becoming 0\)\. .*or scale the output up\.",
    ):
        build(fn, t, x, tmp_path / "c", dtype=torch.float16)
    build(fn, t, x, tmp_path / "d", dtype=torch.bfloat16)  # float32's range


class Mixed(nn.Module):
    """Per sample: exact zeros, values of scale 1, and values of 1e-6 and 1e-9 (below float16's normal range)."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x, x * 1e-6, x * 1e-9], dim=1)


def test_zeros_and_small_values_beside_larger_ones_are_stored_within_the_documented_bound(tmp_path):
    t, s = Mixed().eval(), nn.Linear(6, 24)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(2))
    cache = build(fd.distill(t, s), t, x, tmp_path / "c", dtype=torch.float16)
    got, want = cache[torch.arange(N)].values[0], t(x)
    assert torch.equal(got[:, :6], torch.zeros(N, 6))  # exact zeros stay zero
    u, tiny = 2.0**-11, 2.0**-14
    err = (got - want).abs()
    # each value: u times its magnitude in the normal range, u * tiny (2**-25) below it; so within u times
    # its sample's largest magnitude
    assert (err <= u * torch.maximum(want.abs(), torch.tensor(tiny))).all()
    assert (err <= u * want.abs().amax(dim=1, keepdim=True)).all()
    assert (got[:, 18:] == 0).any()  # some 1e-9 values became 0, as documented


@pytest.mark.parametrize(
    "dtype, u, tiny, largest",
    [(torch.float16, 2.0**-11, 2.0**-14, 65504.0), (torch.bfloat16, 2.0**-8, 2.0**-126, 3.3895313892515355e38)],
)
def test_the_documented_rounding_of_each_storage_dtype(dtype, u, tiny, largest):
    # the numbers docs/cache.md gives: 10**6 float32 values, log-uniform over the normal range, both signs
    g = torch.Generator().manual_seed(0)
    lo, hi = np.log2(tiny), np.log2(largest)
    e = lo + (hi - lo) * torch.rand(10**6, generator=g, dtype=torch.float64)
    x = (2.0**e * torch.where(torch.rand(10**6, generator=g) < 0.5, -1.0, 1.0)).float()
    x = x[x.abs() <= largest]
    rel = (x.to(dtype).double() - x.double()).abs() / x.double().abs()
    assert rel.max() <= u and rel.max() > 0.99 * u  # the bound holds and is tight
    sub = torch.rand(10**5, generator=g, dtype=torch.float64).mul(tiny).float()  # the subnormal range
    assert ((sub.to(dtype).double() - sub.double()).abs() <= u * tiny).all()
    assert torch.finfo(dtype).max == largest
    assert torch.isinf(torch.tensor(float(largest) * (1 + u)).to(dtype))  # half an ulp beyond: inf
