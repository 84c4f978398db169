"""The ranks of a build under ``torch.distributed``: who this process is, and that all ranks agree.

Every rank calls ``TeacherCache.build`` with the same arguments and writes its
own shards, so a rank given another teacher state (a wrong seed, a stale
checkpoint), another dataset or other options would write outputs that do not
belong with the others. :func:`agree` compares what each rank was given
(``all_gather_object``) before anything is written, and raises on every rank,
naming the ranks that differ. What rank 0 alone does for all of them
(:meth:`Ranks.from_rank_0`) ends on every rank: with its value, or its error.
Outside ``torch.distributed`` this process is rank 0 of 1 and every collective
here is the identity.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []


class Ranks:
    """This process's rank and the number of ranks (``torch.distributed`` when initialised, else 0 of 1)."""

    def __init__(self, rank: int, world: int, distributed: bool):
        self.rank, self.world, self.distributed = rank, world, distributed

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls(0, 1, False)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank (a picklable value)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_rank_0(self, fn: Callable[[], Any], what: str, *, same_type: bool = False) -> Any:
        """``fn()`` run by rank 0 alone; its value on every rank, or its error raised on every rank.

        The other ranks wait for rank 0 (a broadcast of the value, which must
        pickle), so none is left waiting in a collective when it fails: rank 0
        raises its own error, the others ``"{what}, so this rank stops too:
        {type}: {message}"``, as a ``RuntimeError``, or (``same_type``) of
        rank 0's type where that type can be sent and takes one message.

        Example:
            >>> Ranks(0, 1, False).from_rank_0(lambda: 42, "rank 0 could not answer")
            42
        """
        if not self.distributed:  # one process: rank 0 of 1 (or, in tests, one rank played alone)
            return fn() if self.rank == 0 else None
        error = None
        told: tuple[Any, ...] | None = None
        if self.rank == 0:
            try:
                told = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - raised below, once the other ranks know
                error = e
                told = ("error", _sendable(type(e)) if same_type else RuntimeError, f"{type(e).__name__}: {e}")
        told = self.broadcast(told)
        if error is not None:
            raise error
        assert told is not None  # rank 0 always sends one
        if told[0] == "error":
            raise _error(told[1], f"{what}, so this rank stops too: {told[2]}")
        return told[1]

    def anyone(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on some rank (an all-reduce of one number on ``device``)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def short(value: Any) -> str:
    """A value as the message shows it: its ``repr`` when short, else the start of a digest of it.

    Example:
        >>> short(64), short(list(range(100)))[:7]
        ('64', 'sha256:')
    """
    text = repr(value)
    if len(text) <= 40:
        return text
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def agree(ranks: Ranks, given: dict[str, str], labels: dict[str, str]) -> None:
    """Raise on every rank when the ranks were given different ``given`` values (digests, by field).

    Args:
        ranks: the ranks.
        given: this rank's value of each field, as a short string (a digest).
        labels: what each field is, for the message.

    Example:
        >>> agree(Ranks(0, 1, False), {"weights": "3fa2"}, {"weights": "teacher weights"})
    """
    every = ranks.gather(given)
    problems = []
    for field, label in labels.items():
        groups: dict[str, list[int]] = {}
        for rank, values in enumerate(every):
            groups.setdefault(values[field], []).append(rank)
        if len(groups) > 1:
            problems.append(f"{label}: " + "; ".join(_group(rs, value) for value, rs in groups.items()))
    if problems:
        raise ValueError(
            f"the {ranks.world} ranks of this TeacherCache.build were given different builds, so their shards "
            "would not belong together:\n  "
            + "\n  ".join(problems)
            + "\nEvery rank must call TeacherCache.build with the same teacher state (the same checkpoint and "
            "seed) or served model, dataset and arguments. Nothing was written."
        )


def _sendable(kind: type[BaseException]) -> type[BaseException]:
    """``kind`` where it can be sent to the other ranks (a class defined at module level), else ``RuntimeError``."""
    try:
        pickle.loads(pickle.dumps(kind))
    except Exception:  # noqa: BLE001 - a local class, say: the other ranks raise a RuntimeError with its message
        return RuntimeError
    return kind


def _error(kind: type[BaseException], text: str) -> BaseException:
    """An error of ``kind`` with ``text``; a ``RuntimeError`` where ``kind`` does not take one message."""
    try:
        error = kind(text)
    except Exception:  # noqa: BLE001 - a type that does not take one message: the text alone
        return RuntimeError(text)
    return error if isinstance(error, Exception) else RuntimeError(text)


def _group(ranks: list[int], value: str) -> str:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    return f"{who} {value}"
