"""One build at a time per cache folder: an OS file lock, and a record of who holds it.

``TeacherCache.build`` holds ``build.lock`` in the cache's folder from before
it looks at the folder until the index is written, so two jobs building into
one folder take turns: the second sees the first's finished cache (opens it,
or refuses it when it was built with other settings) instead of racing it.

The lock is :class:`filelock.FileLock`: ``flock`` on POSIX, ``LockFileEx`` on
Windows, a kernel lock that the operating system frees when its process ends,
so a crashed or killed build never leaves the folder locked (a hand-made
``O_EXCL`` marker file would stay and need a stale-lock heuristic). The lock
file itself stays in the folder (empty, harmless). The holder writes
``build.holder.json`` (host, pid, rank, start time) beside it, so a build that
waits, or times out, says who it waits for; the record is removed on release.

Under ``torch.distributed`` rank 0 alone takes the lock for all the ranks
(another rank would lock itself out). It tries in slices of a few seconds and
tells the other ranks after each (``broadcast_object_list``), so they wait
with it without hitting the process group's timeout, and all raise the same
error when ``timeout`` expires. Once it holds the lock, every rank checks that
it sees the record rank 0 wrote, so that ranks whose folder is not one shared
folder (a disk local to each node) are refused before any shard is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from funcdistill.cache import _store

__all__: list[str] = []

LOCK = "build.lock"
HOLDER = "build.holder.json"
SLICE_S = 5.0  # rank 0 tells the other ranks how the wait goes at least this often
SHARED_WAIT_S = 10.0  # how long a rank looks for rank 0's record before it says the folder is not shared
_HELD, _WAIT, _EXPIRED, _FAILED = "held", "wait", "expired", "failed"
log = logging.getLogger("funcdistill.cache")


def _filelock() -> Any:
    try:
        import filelock
    except ImportError:
        raise ModuleNotFoundError(
            'a teacher cache build needs filelock, which is not installed: pip install "funcdistill[cache]" '
            "(or pip install filelock)."
        ) from None
    return filelock


@contextlib.contextmanager
def held(folder: Path, ranks: Any, *, timeout: float | None) -> Iterator[None]:
    """Hold the build lock of ``folder`` (rank 0 for all ranks) while the body runs.

    Args:
        folder: the cache's folder (it exists).
        ranks: the :class:`~funcdistill.cache._ranks.Ranks` of the build.
        timeout: seconds to wait for another build to finish; ``None`` waits as long as it takes.

    Raises:
        TimeoutError: (on every rank) ``timeout`` expired; the message names the holder.
        ValueError: (on every rank) a rank does not see the holder record rank 0
            wrote: the ranks do not share ``folder``.
    """
    filelock = _filelock()
    mine = ranks.rank == 0 or not ranks.distributed
    lock = filelock.FileLock(str(folder / LOCK)) if mine else None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        first = True
        while True:
            state, message, error = _HELD, "", None
            if lock is not None:
                try:
                    state, message = _attempt(lock, folder, deadline, first, timeout)
                except Exception as e:  # noqa: BLE001 - re-raised here, and told to the other ranks
                    state, message, error = _FAILED, f"{type(e).__name__}: {e}", e
            state, message = ranks.broadcast((state, message))
            if error is not None:
                raise error
            if state == _FAILED:
                raise RuntimeError(f"rank 0 could not take the build lock of the teacher cache {folder}: {message}")
            if state == _EXPIRED:
                raise TimeoutError(message)
            if state == _HELD:
                break
            first = False
        if lock is not None:
            with contextlib.suppress(OSError):  # who holds it is for messages only
                _store.write_json(folder / HOLDER, _me(ranks))
        if ranks.distributed:
            _check_shared(folder, ranks)
        yield
    finally:
        if lock is not None and lock.is_locked:
            with contextlib.suppress(OSError):
                (folder / HOLDER).unlink()
            lock.release()


def _attempt(lock: Any, folder: Path, deadline: float | None, first: bool, timeout: float | None) -> tuple[str, str]:
    """One try at the lock (at once the first time, then up to ``SLICE_S`` seconds)."""
    filelock = _filelock()
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    wait = 0.0 if first else SLICE_S if left is None else min(SLICE_S, left)
    try:
        lock.acquire(timeout=wait, poll_interval=0.05)
        return _HELD, ""
    except filelock.Timeout:
        pass
    if first:
        log.warning(
            "%s is being built by %s; waiting for that build to finish (timeout=%s).", folder, holder(folder), timeout
        )
    if deadline is not None and time.monotonic() >= deadline:
        return _EXPIRED, (
            f"gave up after {timeout} s waiting for the build lock of the teacher cache {folder}: another build "
            f"of it is running, by {holder(folder)}. Wait for it (a larger timeout=, or timeout=None to wait as "
            "long as it takes), or build into another folder. The lock is freed when that process ends, so a "
            "build that crashed does not hold it."
        )
    return _WAIT, ""


def _check_shared(folder: Path, ranks: Any) -> None:
    """Refuse, on every rank, a folder that is not one folder for all the ranks (a disk local to each node).

    Every rank reads the holder record rank 0 has just written and compares
    it with rank 0's (which names rank 0's process and start time, so an old
    record elsewhere differs). Otherwise each rank would build its shards
    where the others cannot see them, and rank 0 would find the cache
    incomplete only at the end.
    """
    written = ranks.broadcast(_text(folder / HOLDER) if ranks.rank == 0 else None)  # read once it is written
    seen = written if ranks.rank == 0 else _seen(folder, written)
    blind = [r for r, same in enumerate(ranks.gather(written is None or seen == written)) if not same]
    if blind:
        who = f"rank {blind[0]} does" if len(blind) == 1 else f"ranks {', '.join(map(str, blind))} do"
        raise ValueError(
            f"the {ranks.world} ranks of this TeacherCache.build do not share its folder {folder}: {who} not see "
            f"the file rank 0 wrote there ({HOLDER}), so each rank would build its shards where the others cannot "
            "read them (a disk local to each node, or another path on each rank, say). Build into one folder on "
            "a file system that every rank shares. No shard was written."
        )


def _seen(folder: Path, written: str | None) -> str | None:
    """The holder record as this rank sees it, read again for up to :data:`SHARED_WAIT_S` while it differs from
    ``written``.

    A network file system may show another node's new file a moment late
    (NFS caches directory lookups); listing the folder makes it look again.
    """
    deadline = time.monotonic() + SHARED_WAIT_S
    seen = _text(folder / HOLDER)
    while written is not None and seen != written and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            os.listdir(folder)
        seen = _text(folder / HOLDER)
    return seen


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _me(ranks: Any) -> dict[str, Any]:
    return {
        "format": _store.FORMAT,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ranks": ranks.world,
        "since": time.time(),
    }


def holder(folder: Path) -> str:
    """Who holds the build lock of ``folder``, as its record says ("process 123 on host h (...) since ...")."""
    try:
        record = json.loads((folder / HOLDER).read_text())
        host, pid, since, world = record["host"], int(record["pid"]), float(record["since"]), int(record["ranks"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded who it is yet)"
    started = datetime.fromtimestamp(since).isoformat(sep=" ", timespec="seconds")
    ranks = f", rank 0 of {world}" if world > 1 else ""
    return f"process {pid} on host {host}{ranks} (since {started}, {time.time() - since:.0f} s ago)"


def building(folder: Path) -> str | None:
    """Who is building into ``folder`` right now (its lock is held), or ``None`` when no build runs.

    Asks the lock itself, not the holder record, which a killed build leaves behind.
    """
    if not (folder / LOCK).exists():
        return None
    lock = _filelock().FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=0)
    except _filelock().Timeout:
        return holder(folder)
    lock.release()
    return None
