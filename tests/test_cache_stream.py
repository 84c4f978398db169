"""Streaming builds: a TeacherCache built from an iterable of samples, of declared or unknown length.

The reference is the build of the same samples as a map-style dataset (in the
same batches, so the teacher runs the same kernels on the same rows and the
outputs agree bit for bit). Reads are counted by the streams themselves
(:class:`tests.cache_jobs.Skippable` records every sample it yields); a real
crash is a ``tests.cache_jobs`` process killed with ``SIGKILL`` mid-stream.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import pytest
import torch
from torch import nn

import funcdistill as fd
from funcdistill.cache import TeacherCache, _source
from tests import cache_jobs
from tests.cache_jobs import Skippable
from tests.test_cache_concurrency import Job

N, SHARD, BATCH = 37, 8, 4  # 4 full shards and a short one; shards are 2 batches


@pytest.fixture
def models():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return teacher, nn.Sequential(nn.Linear(6, 3))


@pytest.fixture
def x():
    return torch.randn(N, 6, generator=torch.Generator().manual_seed(3))


def build(models, data, folder, **kw):
    t, s = models
    options = {"batch_size": BATCH, "shard_size": SHARD, "progress": False, **kw}
    return TeacherCache.build(fd.distill(t, s), fd.state(t), data, folder, **options)


def outputs(cache) -> torch.Tensor:
    return cache[torch.arange(len(cache))].values[0]


class Iterable(torch.utils.data.IterableDataset):
    """A re-iterable stream (each ``iter`` starts again), without ``skip``; counts the samples it yields."""

    def __init__(self, x: torch.Tensor):
        self.x, self.read = x, []

    def __iter__(self):
        for i, row in enumerate(self.x):
            self.read.append(i)
            yield row


def generator(x: torch.Tensor, read: list[int] | None = None):
    for i, row in enumerate(x):
        if read is not None:
            read.append(i)
        yield row


STREAMS = {
    "generator": lambda x: generator(x),
    "IterableDataset": lambda x: Iterable(x),
    "skip": lambda x: Skippable(x),
    "start function": lambda x: lambda start: iter(x[start:]),
    "tuples (x, label)": lambda x: ((row, i % 3) for i, row in enumerate(x)),
}


@pytest.mark.parametrize("kind", list(STREAMS))
@pytest.mark.parametrize("samples", [None, N])
def test_a_stream_gives_the_cache_of_the_map_style_dataset(models, x, tmp_path, kind, samples):
    reference = build(models, x, tmp_path / "map")
    cache = build(models, STREAMS[kind](x), tmp_path / "stream", samples=samples)
    assert len(cache) == N
    assert torch.equal(outputs(cache), outputs(reference))  # the same batches: the same kernels on the same rows
    index = json.loads((tmp_path / "stream" / "index.json").read_text())
    assert index["samples"] == N and [s["count"] for s in index["shards"]] == [8, 8, 8, 8, 5]


@pytest.mark.parametrize("n", [SHARD * 2, SHARD * 2 + 1, 3, 1])
def test_an_unknown_length_is_counted_at_any_boundary(models, x, tmp_path, n):
    # the end right after a full shard (found by the peek), one sample into a shard, inside the first batch
    cache = build(models, generator(x[:n]), tmp_path / "c")
    assert len(cache) == n
    assert torch.equal(outputs(cache), outputs(build(models, x[:n], tmp_path / "map")))


def test_a_stream_is_read_once_in_order(models, x, tmp_path):
    read: list[int] = []
    build(models, generator(x, read), tmp_path / "c")
    assert read == list(range(N))  # the layout's first batch is shard 0's first batch: not read twice


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (N + 3, rf"the stream ended after {N} samples, but samples={N + 3} was declared; pass the number"),
        (N - 1, rf"the stream yields more than the samples={N - 1} declared; .*itertools.islice\(stream, {N - 1}\)"),
        (SHARD * 2, r"the stream yields more than the samples=16 declared"),
    ],
)
def test_a_stream_that_does_not_match_its_declared_length_is_refused(models, x, tmp_path, samples, message):
    with pytest.raises(ValueError, match=message):
        build(models, generator(x), tmp_path / "c", samples=samples)
    with pytest.raises(ValueError, match="is unfinished"):  # never an index over a wrong count
        TeacherCache.open(tmp_path / "c")


def test_augmentation_draws_of_a_stream(models, x, tmp_path):
    def augment(row, g):
        return row + 0.1 * torch.randn(row.shape, generator=g)

    kw = {"augment": augment, "draws": 2, "seed": 1}
    cache = build(models, generator(x), tmp_path / "c", **kw)  # the seeds follow the sample count
    reference = build(models, x, tmp_path / "map", **kw)
    idx, draws = torch.arange(N), torch.arange(N) % 2
    assert torch.equal(cache[idx, draws].values[0], reference[idx, draws].values[0])


def test_bad_streams_and_lengths_are_refused(models, x, tmp_path):
    with pytest.raises(ValueError, match=r"the stream is empty \(it yielded no sample\)"):
        build(models, iter(()), tmp_path / "c")
    with pytest.raises(ValueError, match=r"samples must be a positive int .* got 0"):
        build(models, generator(x), tmp_path / "c", samples=0)
    with pytest.raises(ValueError, match=rf"samples=5, but the map-style dataset has len\(dataset\) = {N}"):
        build(models, x, tmp_path / "c", samples=5)
    with pytest.raises(TypeError, match=r"dataset must be a map-style dataset .* or a function start -> iterable"):
        build(models, 3.0, tmp_path / "c")
    with pytest.raises(TypeError, match=r"returned a int for start=0, not an iterable of the samples"):
        build(models, lambda start: 0, tmp_path / "c")
    with pytest.raises(TypeError, match=r"dataset is a DataLoader, which yields batches, not samples; pass its data"):
        build(models, torch.utils.data.DataLoader(x, batch_size=4), tmp_path / "c")
    assert build(models, x, tmp_path / "ok", samples=N).__len__() == N  # a map-style dataset's own length


def test_the_checksum_of_a_sample_sees_every_value():
    import numpy as np

    big = np.zeros(10_000, dtype=np.float32)
    changed = big.copy()
    changed[5_000] = 1  # in the middle, which a NumPy repr leaves out
    assert _source.digest((big, 1)) != _source.digest((changed, 1))
    assert _source.digest((torch.zeros(3), 1)) != _source.digest((torch.zeros(3), 2))  # labels count too
    assert _source.digest(torch.zeros(3)) != _source.digest(torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------- resume


def test_a_resumed_stream_reads_none_of_the_finished_samples(models, x, tmp_path):
    first: list[int] = []
    with pytest.raises(RuntimeError, match="disk error at sample 21"):
        build(models, Skippable(x, first, fail_at=21), tmp_path / "c")
    assert first == list(range(21))  # shards 0 and 1 (0 .. 15) finished, shard 2 stopped in its second batch
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-*")}
    assert sorted(kept) == ["shard-00000.safetensors", "shard-00001.safetensors"]

    again: list[int] = []
    cache = build(models, Skippable(x, again), tmp_path / "c")
    assert again == list(range(16, N))  # positioned by skip(16): no finished sample read again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-0000[01]*")} == kept
    assert torch.equal(outputs(cache), outputs(build(models, x, tmp_path / "map")))


def test_a_stream_positioned_wrong_on_resume_is_refused(models, x, tmp_path):
    with pytest.raises(RuntimeError, match="disk error"):
        build(models, Skippable(x, fail_at=21), tmp_path / "c")
    off_by_one = lambda start: iter(x[start + 1 :])  # noqa: E731 - a start function with a bug
    with pytest.raises(
        ValueError,
        match=r"the stream changed: sample 16, the first of shard 2, is not the sample that followed shard 1 when "
        r"that shard was built \(their SHA-256 differ\)\. A resumed build must read the same samples",
    ):
        build(models, off_by_one, tmp_path / "c")
    changed = x.clone()
    changed[16] += 1  # the data changed under the build
    with pytest.raises(ValueError, match="the stream changed: sample 16"):
        build(models, Skippable(changed), tmp_path / "c")
    assert torch.equal(outputs(build(models, Skippable(x), tmp_path / "c")), outputs(build(models, x, tmp_path / "m")))


@pytest.mark.parametrize("kind", ["re-iterable", "one-shot iterator"])
def test_a_stream_without_skip_is_resumed_by_reading_and_dropping(models, x, tmp_path, caplog, kind):
    with pytest.raises(RuntimeError, match="disk error"):
        build(models, Skippable(x, fail_at=21), tmp_path / "c")
    read: list[int] = []
    stream = Iterable(x) if kind == "re-iterable" else generator(x, read)  # a new generator, from the start
    with caplog.at_level(logging.WARNING, logger="funcdistill.cache"):
        cache = build(models, stream, tmp_path / "c")
    read = stream.read if kind == "re-iterable" else read
    assert read == list(range(N))  # the documented cost: the 16 finished samples are read (not run) again
    assert f"reading and dropping 16 samples of the stream (a {kind} dataset) to reach sample 16" in caplog.text
    assert torch.equal(outputs(cache), outputs(build(models, x, tmp_path / "map")))


@pytest.mark.parametrize("make", [Iterable, generator], ids=["IterableDataset", "generator"])
def test_dropped_samples_that_changed_are_refused(models, x, tmp_path, make):
    with pytest.raises(RuntimeError, match="disk error"):
        build(models, Skippable(x, fail_at=21), tmp_path / "c")
    changed = x.clone()
    changed[9] += 1  # inside finished shard 1
    with pytest.raises(
        ValueError,
        match=r"the stream changed: samples 8 \.\. 15, read again to reach a later shard, are not the samples the "
        r"finished shard of them was built from",
    ):
        build(models, make(changed), tmp_path / "c")


def test_a_one_shot_iterator_cannot_go_back(x):
    reader = _source.source(generator(x), None).reader()
    assert len(reader.read(0, 5)) == 5
    with pytest.raises(
        ValueError, match=r"a one-shot iterator \(a generator\), read up to sample 5; it cannot go back"
    ):
        reader.read(2, 1)


def test_the_reader_learns_where_a_positioned_stream_ends(x):
    reader = _source.source(Skippable(x), None).reader()
    assert reader.read(40, 4) == [] and (reader.exact, reader.upper) == (None, 40)  # the end is at 40 or before
    assert len(reader.read(32, 8)) == N - 32 and reader.exact == N  # read up to it: exactly there
    assert reader.peek(N) is None and torch.equal(reader.read(N - 1, 1)[0], x[N - 1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_killed_stream_build_resumes_without_reading_its_finished_samples(tmp_path):
    folder, reads = tmp_path / "cache", tmp_path / "reads.txt"
    job = Job(
        tmp_path,
        "stream",
        "stream",
        str(folder),
        "--reads",
        str(reads),
        "--pause-at",
        "28",
        "--signal",
        str(tmp_path / "signal"),
        "--go",
        str(tmp_path / "go"),
    )
    try:
        job.until(lambda: (tmp_path / "signal").exists(), "the build pauses at sample 28")
        assert job.proc.poll() is None, job.stderr()
        job.proc.send_signal(signal.SIGKILL)  # a crash in the middle of shard 3 (samples 24 .. 31)
        assert job.finish() == -signal.SIGKILL
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    assert [int(line) for line in reads.read_text().split()] == list(range(28))
    progress = json.loads((folder / "progress-rank0.json").read_text())["shards"]
    assert sorted(progress) == [f"shard-0000{i}.safetensors" for i in range(3)]

    t = cache_jobs.teacher(0)
    read: list[int] = []
    cache = TeacherCache.build(
        fd.distill(t, cache_jobs.student()),
        fd.state(t),
        Skippable(cache_jobs.data(), read),
        folder,
        batch_size=4,
        shard_size=cache_jobs.SHARD,
        progress=False,
    )
    assert read == list(range(24, cache_jobs.N))  # from shard 3 on: none of the 24 finished samples
    assert len(cache) == cache_jobs.N
    with torch.no_grad():  # built in batches of 4 in two processes, so compared within float32 rounding
        torch.testing.assert_close(outputs(cache), cache_jobs.teacher(0)(cache_jobs.data()))
    assert os.listdir(folder).count("index.json") == 1 and not list(folder.glob("progress-*"))


# ---------------------------------------------------------------- Hugging Face datasets streaming


@pytest.fixture
def hf_stream(x, tmp_path, monkeypatch):
    """A ``datasets`` streaming dataset of ``x``'s rows from a local JSON Lines file (no network)."""
    datasets = pytest.importorskip("datasets", reason="datasets is not in the test extra (heavy); see docs/cache.md")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"x": row.tolist(), "i": i}) + "\n" for i, row in enumerate(x)))
    ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    return ds.with_format("torch")


def test_a_datasets_stream_is_positioned_by_its_skip(hf_stream, x):
    src = _source.source(hf_stream, None)
    assert src.kind == _source.SKIP
    reader = src.reader()
    rows = reader.read(30, 4) + reader.read(10, 2)  # positioned by the dataset's own .skip(n), forward and back
    assert [int(r["i"]) for r in rows] == [30, 31, 32, 33, 10, 11]
    assert torch.allclose(rows[0]["x"], x[30])  # JSON holds the float32 values' decimal form


def test_a_cache_built_from_a_datasets_stream(models, hf_stream, tmp_path):
    rows = torch.stack([r["x"] for r in hf_stream])  # what the stream yields, as a map-style dataset
    cache = build(models, lambda start: (r["x"] for r in hf_stream.skip(start)), tmp_path / "c")
    assert len(cache) == N
    assert torch.equal(outputs(cache), outputs(build(models, rows, tmp_path / "map")))


def test_a_datasets_stream_of_token_samples_is_built_directly(tmp_path, monkeypatch):
    """``TeacherCache.build(fn, state, ds, path)`` on a ``datasets`` stream whose rows have ``input_ids``: the ragged
    cache of the same samples as a list, shard for shard (positioned by the stream's own ``skip`` on resume)."""
    datasets = pytest.importorskip("datasets", reason="datasets is not in the test extra (heavy); see docs/cache.md")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vocab = 40
    teacher = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab)).eval()
    student = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, vocab))
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("1", "1"))
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, vocab, (int(n),), generator=g) for n in torch.randint(1, 9, (11,), generator=g)]
    path = tmp_path / "tokens.jsonl"
    path.write_text(
        "".join(json.dumps({"input_ids": s.tolist(), "source": f"doc{i}"}) + "\n" for i, s in enumerate(samples))
    )
    ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    options = {"batch_size": 3, "shard_size": 6, "topk": 4, "progress": False}
    streamed = TeacherCache.build(fn, fd.state(teacher), ds, tmp_path / "s", **options)
    mapped = TeacherCache.build(fn, fd.state(teacher), samples, tmp_path / "m", **options)
    assert len(streamed) == len(samples) and streamed.tokens == mapped.tokens == sum(len(s) for s in samples)
    a, b = streamed[torch.arange(len(samples))], mapped[torch.arange(len(samples))]
    assert torch.equal(a.mask, b.mask)
    for x, y in zip(a.values[0], b.values[0]):
        assert torch.equal(x, y)  # the same samples in the same batches: the same forwards, bit for bit


def test_ranks_that_saw_streams_of_different_lengths_are_refused():
    ranks = [
        {"problem": None, "exact": 37, "lower": 37, "upper": None},
        {"problem": None, "exact": 30, "lower": 30, "upper": None},
    ]
    with pytest.raises(
        ValueError,
        match=r"the ranks read streams of different lengths \(rank 0 read 37 samples, saw it end at 37; rank 1 read "
        r"30 samples, saw it end at 30\); every rank must be given the same stream",
    ):
        _source.settle(None, ranks)
    ranks[1] = {"problem": None, "exact": None, "lower": 16, "upper": 32}  # nothing at 32: the end is there or before
    with pytest.raises(ValueError, match="the ranks read streams of different lengths"):
        _source.settle(None, ranks)
    assert _source.settle(None, [{"problem": None, "exact": None, "lower": 16, "upper": 16}]) == 16
