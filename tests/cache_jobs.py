"""Jobs that tests/test_cache_concurrency.py runs in processes of their own (``python -m tests.cache_jobs``).

``build FOLDER SEED [--pause-at I | --pause-index] --signal FILE --go FILE [--after FILE] [--timeout S]``
    builds a cache of the teacher made with ``SEED`` into ``FOLDER`` (once
    ``--after`` exists: a job started with another imports meanwhile); with
    ``--pause-at`` it creates ``--signal`` when it reads sample ``I`` and waits
    for ``--go`` to exist before going on (a slow dataset); with
    ``--pause-index`` it does so after every shard is written, just before the
    index (a slow file system).
``stream FOLDER --reads FILE [--pause-at I] --signal FILE --go FILE``
    builds the cache of teacher 0 from a stream positioned by ``.skip(n)``
    (:class:`Skippable`) of unknown length, appending each sample it reads to
    ``--reads``; with ``--pause-at`` it pauses at sample ``I`` as ``build`` does.
``hold FOLDER``
    holds ``FOLDER``'s build lock, prints ``held``, and keeps it until its
    standard input closes (or it is killed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import funcdistill as fd

N, SHARD = 48, 8


def teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def student() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(6, 3))


def data() -> torch.Tensor:
    return torch.randn(N, 6, generator=torch.Generator().manual_seed(2))


def wait_for(go: Path, limit_s: float = 60.0) -> None:
    """Until ``go`` exists (at most ``limit_s`` seconds, so that a test that failed early does not hang)."""
    end = time.monotonic() + limit_s
    while not go.exists() and time.monotonic() < end:
        time.sleep(0.02)


class Paused(torch.utils.data.Dataset):
    """The samples; at sample ``at`` it signals and waits for the go."""

    def __init__(self, x: torch.Tensor, at: int | None, signal: Path, go: Path):
        self.x, self.at, self.signal, self.go = x, at, signal, go

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.at and not self.signal.exists():
            self.signal.touch()
            wait_for(self.go)
        return self.x[i]


class Skippable:
    """A stream positioned by ``.skip(n)``, as ``datasets.IterableDataset`` is; records every sample it yields.

    ``read`` collects the indices read (and ``log``, when given, gets one line
    per sample, flushed: it survives a kill); at ``pause_at`` it signals and
    waits for the go, at ``fail_at`` it raises.
    """

    def __init__(self, x, read=None, *, start=0, log=None, pause_at=None, fail_at=None, signal=None, go=None):
        self.x, self.start, self.log = x, start, log
        self.read = [] if read is None else read
        self.pause_at, self.fail_at, self.signal, self.go = pause_at, fail_at, signal, go

    def skip(self, n: int) -> Skippable:
        kw = {"log": self.log, "pause_at": self.pause_at, "fail_at": self.fail_at, "signal": self.signal}
        return Skippable(self.x, self.read, start=self.start + n, go=self.go, **kw)

    def __iter__(self):
        for i in range(self.start, len(self.x)):
            if i == self.fail_at:
                raise RuntimeError(f"disk error at sample {i}")
            if i == self.pause_at and not self.signal.exists():
                self.signal.touch()
                wait_for(self.go)
            self.read.append(i)
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(f"{i}\n")
            yield self.x[i]


def stream(args: argparse.Namespace) -> None:
    t = teacher(0)
    samples = Skippable(data(), log=args.reads, pause_at=args.pause_at, signal=Path(args.signal), go=Path(args.go))
    fd.TeacherCache.build(
        fd.distill(t, student()), fd.state(t), samples, args.folder, batch_size=4, shard_size=SHARD, progress=False
    )
    print("built", flush=True)


def build(args: argparse.Namespace) -> None:
    from funcdistill.cache import _build

    signal, go = Path(args.signal), Path(args.go)
    if args.pause_index:
        write_index = _build._write_index

        def paused(*a, **kw):  # every shard is written and listed; the index is not yet
            signal.touch()
            wait_for(go)
            return write_index(*a, **kw)

        _build._write_index = paused
    if args.after:
        wait_for(Path(args.after))
    t = teacher(args.seed)
    fd.TeacherCache.build(
        fd.distill(t, student()),
        fd.state(t),
        Paused(data(), args.pause_at, signal, go),
        args.folder,
        batch_size=4,
        shard_size=SHARD,
        progress=False,
        **({} if args.timeout is None else {"timeout": args.timeout}),
    )
    print("built", flush=True)


def hold(args: argparse.Namespace) -> None:
    from funcdistill.cache import _lock, _ranks

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _lock.held(folder, _ranks.Ranks(0, 1, False), timeout=0):
        print("held", flush=True)
        sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.cache_jobs")
    jobs = parser.add_subparsers(dest="job", required=True)
    b = jobs.add_parser("build")
    b.add_argument("folder")
    b.add_argument("seed", type=int)
    b.add_argument("--pause-at", type=int)
    b.add_argument("--pause-index", action="store_true")
    b.add_argument("--signal", default="/nonexistent/signal")
    b.add_argument("--go", default="/nonexistent/go")
    b.add_argument("--after")
    b.add_argument("--timeout", type=float)
    st = jobs.add_parser("stream")
    st.add_argument("folder")
    st.add_argument("--reads", required=True)
    st.add_argument("--pause-at", type=int)
    st.add_argument("--signal", default="/nonexistent/signal")
    st.add_argument("--go", default="/nonexistent/go")
    h = jobs.add_parser("hold")
    h.add_argument("folder")
    args = parser.parse_args()
    {"build": build, "stream": stream, "hold": hold}[args.job](args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
