"""TeacherCache.build under torch.distributed: 2 processes, gloo, CPU; each rank writes its own shards."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import funcdistill as fd

WORLD, N, SHARD = 2, 40, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(5, 3))
    return teacher, student, torch.randn(N, 5, generator=torch.Generator().manual_seed(1))


class Recorded(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x, self.read = x, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.read.append(i)
        return self.x[i]


def worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        teacher, student, x = setup()
        data = Recorded(x)
        cache = fd.TeacherCache.build(
            fd.distill(teacher, student),
            fd.state(teacher),
            data,
            folder,
            batch_size=4,
            shard_size=SHARD,
            progress=False,
        )
        with torch.no_grad():  # every rank sees every shard; built in batches of 4, so float32 rounding apart
            ok = torch.allclose(cache[torch.arange(N)].values[0], teacher(x), atol=1e-5)
        Path(folder, f"read-{rank}.json").write_text(json.dumps({"read": sorted(set(data.read)), "ok": ok}))
    finally:
        dist.destroy_process_group()


def test_each_rank_builds_its_shards_and_all_open_the_whole_cache(tmp_path):
    folder = tmp_path / "cache"
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    results = [json.loads((folder / f"read-{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["ok"] for r in results)
    # shard s (samples 8s .. 8s+7) is built by rank s % 2; both read the first batch for the layout
    assert results[0]["read"] == [*range(0, 8), *range(16, 24), *range(32, 40)]
    assert results[1]["read"] == [*range(0, 4), *range(8, 16), *range(24, 32)]
    index = json.loads((folder / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{i}.safetensors" for i in range(5)]
    assert not list(folder.glob("progress-rank*.json"))
