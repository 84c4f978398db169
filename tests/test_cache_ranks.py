"""TeacherCache.build under torch.distributed: 2 processes, gloo, CPU.

One process group runs every check (a spawn costs seconds); each rank writes
what each check raised, and one test per check reads it. Each rank writes its
own shards; ranks given different builds are refused before anything is
written; a teacher sharded with FSDP2 is cached as its unsharded copy would be;
a build lock held by another process stops every rank, naming the holder; a
rank whose dataset fails mid-build stops every rank, and the build resumes.
"""

from __future__ import annotations

import copy
import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import funcdistill as fd
from tests.cache_jobs import Skippable
from tests.conftest import free_port, init_gloo
from tests.test_cache_concurrency import Job

WORLD, N, SHARD = 2, 40, 8
CHECKS: dict[str, object] = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def setup(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(5, 15), nn.ReLU(), nn.Linear(15, 3)).eval()  # odd rows: uneven FSDP shards
    student = nn.Sequential(nn.Linear(5, 3))
    return teacher, student, torch.randn(N, 5, generator=torch.Generator().manual_seed(1))


class Recorded(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, fail_at: int | None = None):
        self.x, self.read, self.fail_at = x, [], fail_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise OSError(f"disk error at sample {i}")
        self.read.append(i)
        return self.x[i]


def build(teacher: nn.Module, student: nn.Module, data, folder: Path, **kw) -> fd.TeacherCache:
    options = {"batch_size": 4, "shard_size": SHARD, "progress": False, **kw}
    return fd.TeacherCache.build(fd.distill(teacher, student), fd.state(teacher), data, folder, **options)


# --- the checks (run on every rank) -------------------------------------------------


@check
def each_rank_builds_its_shards(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    data = Recorded(x)
    cache = build(teacher, student, data, folder)
    with torch.no_grad():  # every rank sees every shard; built in batches of 4, so float32 rounding apart
        ok = torch.allclose(cache[torch.arange(N)].values[0], teacher(x), atol=1e-5)
    Path(folder, f"read-{rank}.json").write_text(json.dumps({"read": sorted(set(data.read)), "ok": ok}))


@check
def ranks_given_other_builds_are_refused(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup(seed=rank)  # rank 1: another seed (a stale checkpoint, say)
    with pytest.raises(
        ValueError,
        match=r"the 2 ranks of this TeacherCache.build were given different builds.*\n  teacher weights \(SHA-256 "
        r"of the teacher state\): rank 0 sha256:[0-9a-f]{12}; rank 1 sha256:[0-9a-f]{12}\n.*Nothing was written",
    ):
        build(teacher, student, x, folder)
    teacher, student, x = setup()
    with pytest.raises(ValueError, match=r"number of samples \(len\(dataset\)\): rank 0 40; rank 1 39\n"):
        build(teacher, student, x[: N - rank], folder)
    with pytest.raises(ValueError, match=r"shard_size: rank 0 8; rank 1 4\n"):
        build(teacher, student, x, folder, shard_size=SHARD // (1 + rank))
    assert not folder.exists()


@check
def an_fsdp2_teacher_is_cached_as_unsharded(rank: int, folder: Path, holder: int) -> None:
    from torch.distributed.fsdp import fully_shard

    teacher, student, x = setup()
    plain = copy.deepcopy(teacher)
    fully_shard(teacher[0]), fully_shard(teacher[2]), fully_shard(teacher)
    data = x[:24]  # shards of 8: rank 0 builds two (4 teacher calls), rank 1 one (3 calls): the ranks keep step
    cache = build(teacher, student, data, folder)
    with torch.no_grad():
        reference = plain(data)
    # the full weights are gathered bit for bit, but batches of 4 here and of 24 there may take other kernels
    torch.testing.assert_close(cache[torch.arange(24)].values[0], reference)
    fd.TeacherCache.open(folder, teacher_state=fd.state(plain))  # fingerprinted as the full, unsharded weights
    fd.TeacherCache.open(folder, teacher_state=fd.state(teacher))  # and from the shards (a collective)
    with pytest.raises(ValueError, match="built with another teacher state"):
        fd.TeacherCache.open(folder, teacher_state=fd.state(setup(seed=1)[0]))
    idx = torch.tensor([3, 17])
    ((t_out, _, _),) = fd.distill(plain, student)(cache[idx], fd.state(student), data[idx])  # the unsharded fn takes it
    torch.testing.assert_close(t_out, reference[idx])


STREAM = 37  # shards 0 .. 4 (the last one short): rank 0 builds 0, 2, 4 and rank 1 builds 1, 3


@check
def a_stream_is_split_between_the_ranks(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    read: list[int] = []
    cache = build(teacher, student, Skippable(x[:STREAM], read), folder)  # of unknown length
    assert len(cache) == STREAM  # the ranks agree on the count: rank 0 saw the end, rank 1 only that 40 is past it
    Path(folder, f"read-{rank}.json").write_text(json.dumps(read))


@check
def a_stream_of_another_length_or_other_samples_stops_every_rank(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    with pytest.raises(
        ValueError,
        match=r"the stream ended after 37 samples, but samples=45 was declared; .* to count them\. \(rank 0\)",
    ):  # rank 0 finds its shard 4 short, rank 1 no sample 40: every rank raises rank 0's error (none waits)
        build(teacher, student, Skippable(x[:STREAM]), folder / "short", samples=45)
    with pytest.raises(
        ValueError,
        match=r"given different builds.*\n  the stream's first samples \(SHA-256 of the first batch\): rank 0 "
        r"[0-9a-f]{12}; rank 1 [0-9a-f]{12}\n",
    ):  # a stream shuffled with another seed on each rank, say
        build(teacher, student, Skippable(x[torch.randperm(N, generator=torch.Generator().manual_seed(rank))]), folder)
    with pytest.raises(ValueError, match=r"given different builds.*\n  the stream's first samples .*: rank 0 "):
        build(teacher, student, Skippable(x[: 0 if rank == 0 else N]), folder)  # empty on rank 0 only: none waits
    assert not list(folder.glob("*.safetensors"))


@check
def a_rank_whose_dataset_fails_stops_every_rank_and_the_build_resumes(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    failed = r"disk error at sample 8"  # sample 8 is in shard 1, rank 1's
    told = r"^rank 1 failed while building its shards, so this rank stops too: OSError: " + failed
    with pytest.raises(RuntimeError if rank == 0 else OSError, match=told if rank == 0 else failed):
        build(teacher, student, Recorded(x, fail_at=8), folder)
    assert not (folder / "index.json").exists()
    data = Recorded(x)
    cache = build(teacher, student, data, folder)  # resumed: rank 0's shards 0, 2 and 4 were kept
    assert data.read == ([] if rank == 0 else [*range(8, 16), *range(24, 32)])
    with torch.no_grad():  # built in batches of 4 here and 40 there: float32 rounding apart
        assert torch.allclose(cache[torch.arange(N)].values[0], teacher(x), atol=1e-5)


class BlocksTheIndex(Recorded):
    """Reading the last sample puts a folder where the index goes: rank 0 cannot write it at the end."""

    def __init__(self, x: torch.Tensor, folder: Path):
        super().__init__(x)
        self.folder = folder

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == len(self) - 1:
            (self.folder / "index.json").mkdir(exist_ok=True)
        return super().__getitem__(i)


@check
def an_index_rank_0_cannot_write_stops_every_rank(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    told = (
        rf"^rank 0 could not write the index of the teacher cache {folder}, so this rank stops too: IsADirectoryError"
    )
    with pytest.raises(IsADirectoryError if rank == 0 else RuntimeError, match=None if rank == 0 else told):
        build(teacher, student, BlocksTheIndex(x, folder), folder)  # the last sample is in shard 4, rank 0's


@check
def ranks_that_do_not_share_the_folder_are_refused(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    mine = folder / f"node-{rank}"  # what each rank sees of one path on a disk local to its node
    with pytest.raises(
        ValueError,
        match=rf"the 2 ranks of this TeacherCache.build do not share its folder {mine}: rank 1 does not see the "
        r"file rank 0 wrote there \(build.holder.json\), .* No shard was written\.",
    ):
        build(teacher, student, x, mine)
    assert not list(mine.glob("*.safetensors")) and not (mine / "build.holder.json").exists()  # released


@check
def a_lock_held_elsewhere_stops_every_rank(rank: int, folder: Path, holder: int) -> None:
    teacher, student, x = setup()
    with pytest.raises(TimeoutError, match=rf"gave up after 0.3 s .* by process {holder} on host"):
        build(teacher, student, x, folder / "held", timeout=0.3)


def worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, port, WORLD)
    results = {}
    holder = int(Path(out, "holder.pid").read_text())
    try:
        for name, fn in CHECKS.items():
            try:
                fn(rank, Path(out, name), holder)
                results[name] = "ok"
            except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test of this check
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    holder = Job(out, "holder", "hold", str(out / "a_lock_held_elsewhere_stops_every_rank" / "held"), stdin=True)
    try:
        holder.until(lambda: "held" in holder.stdout(), "the holder holds the lock")
        Path(out, "holder.pid").write_text(str(holder.pid))
        mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    finally:
        holder.proc.stdin.close()
        holder.finish()
    return out


@pytest.fixture(scope="module")
def results(out) -> list[dict[str, str]]:
    return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)]


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(results, name):
    for rank, res in enumerate(results):
        assert res.get(name) == "ok", f"rank {rank}:\n{res.get(name)}"


def test_each_rank_builds_its_shards_and_all_open_the_whole_cache(out, results):
    folder = out / "each_rank_builds_its_shards"
    reads = [json.loads((folder / f"read-{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["ok"] for r in reads)
    # shard s (samples 8s .. 8s+7) is built by rank s % 2; both read the first batch for the layout
    assert reads[0]["read"] == [*range(0, 8), *range(16, 24), *range(32, 40)]
    assert reads[1]["read"] == [*range(0, 4), *range(8, 16), *range(24, 32)]
    index = json.loads((folder / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{i}.safetensors" for i in range(5)]
    assert not list(folder.glob("progress-rank*.json"))


def test_a_stream_is_split_between_the_ranks_and_equals_a_one_rank_build(out, results, tmp_path):
    folder = out / "a_stream_is_split_between_the_ranks"
    reads = [json.loads((folder / f"read-{r}.json").read_text()) for r in range(WORLD)]
    # each rank: the first batch (0 .. 3, for the layout), its shards (positioned by skip), and after each full
    # shard a peek at the next sample (its checksum, for a resume); rank 1 finds nothing at 40
    assert reads[0] == [*range(0, 9), *range(16, 25), *range(32, 37)]
    assert reads[1] == [*range(0, 4), *range(8, 17), *range(24, 33)]
    shards = [set(range(s * SHARD, min(STREAM, (s + 1) * SHARD))) for s in range(5)]
    whole = [[r for r in range(WORLD) if shard <= set(reads[r])] for shard in shards]
    assert whole == [[0], [1], [0], [1], [0]]  # each shard read whole by one rank, s % 2: the stream, once
    index = json.loads((folder / "index.json").read_text())
    assert index["samples"] == STREAM and [s["count"] for s in index["shards"]] == [8, 8, 8, 8, 5]
    teacher, student, x = setup()
    one = build(teacher, student, Skippable(x[:STREAM]), tmp_path / "one")  # this process: 1 rank
    both = fd.TeacherCache.open(folder)
    # the same batches through the same kernels, but in other processes (1 thread there): float32 rounding apart
    torch.testing.assert_close(both[torch.arange(STREAM)].values[0], one[torch.arange(STREAM)].values[0])
