"""Where a cache build reads its samples: a map-style dataset, or a stream positioned by sample count.

A **map-style** dataset (``len(dataset)``, ``dataset[i]``) is read by index, as
it always was. Anything else that yields samples is a **stream**, read in
order; its length is declared (``samples=``) or unknown (counted: the index
records it at the end). Shards are fixed by sample count (shard ``s`` holds
samples ``s * shard_size ..``), so a stream is *positioned* at a shard's first
sample, on a resume or for a rank's next shard (rank ``r`` of ``w`` builds the
shards ``s`` with ``s % w == r``). How depends on what it is:

==========================  ==========================================================
the dataset                 positioned at sample ``n`` by
==========================  ==========================================================
has ``.skip(n)``            ``iter(dataset.skip(n))`` (``datasets.IterableDataset``)
a function                  ``iter(dataset(n))``: ``start -> the samples from start``
re-iterable                 ``iter(dataset)``, reading and dropping ``n`` samples
(``IterableDataset``)
a one-shot iterator         reading and dropping ``n`` samples (it never goes back)
(a generator)
==========================  ==========================================================

The first two read nothing before sample ``n``; the last two read the samples
they drop (not the teacher: it runs on no dropped sample), and say so once in
the log. Every sample of a stream gets a SHA-256 of its values
(:func:`digest`); a shard's record keeps that of its samples (``inputs``) and of
the sample after it (``next``, ``None`` where the stream ended), so a resumed
stream that yields other samples (the data changed, or ``skip`` is off by one)
is refused when its first sample is not the recorded ``next`` of the shard
before, and dropped samples are checked against their shards' ``inputs``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from funcdistill._pytree import tree_leaves

__all__: list[str] = []

log = logging.getLogger("funcdistill.cache")

MAP, SKIP, START, ITERABLE, ONE_SHOT = "map-style", "skip", "start", "re-iterable", "one-shot"
_FIX = (
    "give the stream a .skip(n) method (as datasets.IterableDataset has), or pass a function start -> iterable "
    "of the samples from sample start, to position it without reading"
)


class StreamError(ValueError):
    """A stream that does not match its declared length or its recorded samples (never a silent wrong cache)."""


@dataclass(frozen=True)
class Source:
    """The dataset of a build, classified: how it is read and positioned, and its number of samples."""

    dataset: Any = field(repr=False)
    kind: str
    samples: int | None
    """``len(dataset)``, a stream's declared length, or ``None`` (unknown: counted)."""

    @property
    def stream(self) -> bool:
        return self.kind != MAP

    def reader(self, known: dict[int, tuple[int, str]] | None = None) -> Reader:
        """A reader of the samples; ``known``: first sample -> (count, ``inputs``) of finished shards."""
        return Reader(self, dict(known or {}))


def source(dataset: Any, samples: Any) -> Source:
    """Classify ``dataset`` (map-style or which kind of stream) and check ``samples``.

    Example:
        >>> source(torch.zeros(5, 2), None).kind, source(iter(range(3)), 3).kind, source(lambda n: [], None).kind
        ('map-style', 'one-shot', 'start')
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive int (the number of samples a stream yields), got {samples!r}.")
    if isinstance(dataset, torch.utils.data.DataLoader):
        raise TypeError(
            "dataset is a DataLoader, which yields batches, not samples; pass its dataset (loader.dataset): the "
            "build batches the samples itself (batch_size=...)."
        )
    if _map_style(dataset):
        n = len(dataset)
        if samples is not None and samples != n:
            raise ValueError(
                f"samples={samples}, but the map-style dataset has len(dataset) = {n}; leave samples out "
                "for a map-style dataset (or pass a Subset of it)."
            )
        if n == 0:
            raise ValueError("dataset is empty: there is nothing to cache.")
        return Source(dataset, MAP, n)
    if callable(getattr(dataset, "skip", None)) and hasattr(dataset, "__iter__"):
        kind = SKIP
    elif hasattr(dataset, "__iter__"):
        kind = ONE_SHOT if isinstance(dataset, Iterator) else ITERABLE
    elif callable(dataset):
        kind = START
    else:
        raise TypeError(
            f"dataset must be a map-style dataset (with __len__ and __getitem__), an iterable of samples (an "
            f"IterableDataset, a generator, a datasets streaming dataset) or a function start -> iterable of the "
            f"samples from sample start; got {type(dataset).__name__}."
        )
    return Source(dataset, kind, samples)


def _map_style(dataset: Any) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def digest(item: Any) -> str:
    """SHA-256 of one sample's values: each leaf's dtype, shape and bytes (a tensor or array), else its ``repr``.

    Example:
        >>> digest(torch.ones(2)) == digest(torch.ones(2)), digest(torch.ones(2)) == digest(torch.ones(3))
        (True, False)
    """
    h = hashlib.sha256()
    for leaf in tree_leaves(item):
        if not isinstance(leaf, torch.Tensor) and hasattr(leaf, "__array_interface__"):
            leaf = torch.as_tensor(leaf)  # a NumPy array: its bytes (its repr elides the middle of large ones)
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{type(leaf).__name__}|{leaf!r}|".encode())
    return h.hexdigest()


def combined(digests: list[str]) -> str:
    """The ``inputs`` checksum of a shard: SHA-256 of its samples' digests, in order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class Reader:
    """Reads samples by position: ``dataset[i]`` for a map-style dataset, a positioned iterator for a stream.

    For a stream it tracks what it learnt of the stream's end: ``exact`` (it
    saw the end at a known position), ``lower`` (samples it read exist) and
    ``upper`` (positioned past the end: the end is at or before there).
    """

    def __init__(self, src: Source, known: dict[int, tuple[int, str]]):
        self.src, self.known = src, known
        self.it: Iterator[Any] | None = None
        self.position = 0  # the sample the iterator yields next
        self.buffer: list[Any] = []  # a peeked sample at self.position
        self.started = False  # a one-shot iterator was read from
        self.exact: int | None = None
        self.lower = 0
        self.upper: int | None = None
        self.warned = False

    def read(self, first: int, n: int) -> list[Any]:
        """Samples ``first .. first + n - 1``; fewer where a stream ends."""
        if not self.src.stream:
            return [self.src.dataset[i] for i in range(first, first + n)]
        if not self._at(first):
            return []
        items = self.buffer[:n]
        del self.buffer[:n]
        while len(items) < n and self._next(items):
            pass
        self.position = first + len(items)
        self.lower = max(self.lower, self.position)
        return items

    def peek(self, at: int) -> Any | None:
        """The sample at ``at`` (kept for the next read), or ``None`` where the stream ended."""
        items = self.read(at, 1)
        if not items:
            return None
        self.buffer, self.position = items, at
        return items[0]

    def _next(self, into: list[Any]) -> bool:
        assert self.it is not None
        try:
            into.append(next(self.it))
            return True
        except StopIteration:
            self._ended(self.position + len(into))
            return False

    def _ended(self, at: int) -> None:
        self.it = _EMPTY
        self.exact = at

    def _at(self, first: int) -> bool:
        """Put the iterator at sample ``first``; whether there may be a sample there."""
        if self.it is not None and self.position == first:
            return self.exact is None or first < self.exact
        self.buffer = []
        if self.exact is not None and first >= self.exact:
            return False
        kind, dataset = self.src.kind, self.src.dataset
        if kind in (SKIP, START):
            self.it, self.position = _positioned(dataset, kind, first), first
            if not self._peek_one():
                self.upper = first if self.upper is None else min(self.upper, first)
                return False
            return True
        if self.it is None or first < self.position:
            if kind == ONE_SHOT and self.started:
                raise ValueError(
                    f"the dataset is a one-shot iterator (a generator), read up to sample {self.position}; it "
                    f"cannot go back to sample {first}: {_FIX}."
                )
            self.it, self.position = iter(dataset), 0
            self.started = True
        return self._drop(first)

    def _peek_one(self) -> bool:
        assert self.it is not None
        try:
            self.buffer = [next(self.it)]
            return True
        except StopIteration:
            self.it = None  # nothing at the position asked for: the end is there or before (an upper bound)
            return False

    def _drop(self, first: int) -> bool:
        """Read and drop samples up to ``first``, checking whole finished shards against their ``inputs``."""
        count = first - self.position
        if count > 0 and not self.warned:
            self.warned = True
            log.warning(
                "reading and dropping %d samples of the stream (a %s dataset) to reach sample %d: it cannot be "
                "positioned without reading; %s.",
                count,
                "one-shot iterator" if self.src.kind == ONE_SHOT else "re-iterable",
                first,
                _FIX,
            )
        check: list[str] | None = None
        end = first
        while self.position < first:
            if self.position in self.known and self.position + self.known[self.position][0] <= first:
                check, end = [], self.position + self.known[self.position][0]
            item: list[Any] = []
            if not self._next(item):
                return False
            if check is not None:
                check.append(digest(item[0]))
            self.position += 1
            self.lower = max(self.lower, self.position)
            if check is not None and self.position == end:
                self._compare(end - len(check), check)
                check = None
        return True

    def _compare(self, first: int, digests: list[str]) -> None:
        if combined(digests) != self.known[first][1]:
            raise StreamError(
                f"the stream changed: samples {first} .. {first + len(digests) - 1}, read again to reach a "
                "later shard, are not the samples the finished shard of them was built from (their SHA-256 "
                "differs). A resumed build must read the same stream, in the same order; delete the folder "
                "to build from this one."
            )


_EMPTY: Iterator[Any] = iter(())


def _positioned(dataset: Any, kind: str, first: int) -> Iterator[Any]:
    if kind == SKIP:
        return iter(dataset.skip(first) if first else dataset)
    start: Callable[[int], Any] = dataset
    out = start(first)
    if not hasattr(out, "__iter__"):
        raise TypeError(
            f"the dataset function start -> samples returned a {type(out).__name__} for start={first}, not an "
            "iterable of the samples from sample start."
        )
    return iter(out)


def recorded_end(records: Any) -> int | None:
    """Where a stream ended, as the finished shards' records say (the one whose ``next`` is ``None``)."""
    ends = [int(r["first"]) + int(r["count"]) for r in records if "next" in r and r["next"] is None]
    return min(ends) if ends else None


def check_follows(before: dict[str, Any] | None, first_digest: str, shard: int) -> None:
    """Refuse a stream whose shard ``shard`` does not start with the sample that followed the finished shard before."""
    if before is None or "next" not in before or before["next"] == first_digest:
        return
    first = int(before["first"]) + int(before["count"])
    was = (
        f"the stream ended at sample {first} when shard {shard - 1} was built, and now goes on"
        if before["next"] is None
        else f"sample {first}, the first of shard {shard}, is not the sample that followed shard {shard - 1} "
        "when that shard was built (their SHA-256 differ)"
    )
    raise StreamError(
        f"the stream changed: {was}. A resumed build must read the same samples in the same order: check that "
        "the dataset positions itself at sample n (its .skip(n), or the function start -> samples) and that "
        "the data did not change; or delete the folder to build again."
    )


def short(samples: int, reader: Reader, at: int) -> str:
    """The message for a stream that ends before its declared length (``at``: the sample it has not)."""
    ended = f"ended after {at} samples" if reader.exact == at else f"has no sample {at} (it ends there or before)"
    return (
        f"the stream {ended}, but samples={samples} was declared; pass the number of samples it yields, or "
        "samples=None to count them."
    )


def longer(samples: int) -> str:
    return (
        f"the stream yields more than the samples={samples} declared; pass the number it yields, samples=None "
        f"to count them, or cut it (itertools.islice(stream, {samples}), or .take({samples}) of a datasets stream)."
    )


def seen(reader: Reader, records: Any, problem: str | None) -> dict[str, Any]:
    """What one rank learnt of a stream's end (its reads and the finished shards' records), and its problem."""
    records = list(records)
    recorded = recorded_end(records)
    lower = max([reader.lower, *(int(r["first"]) + int(r["count"]) for r in records)])
    return {
        "problem": problem,
        "exact": reader.exact if recorded is None else recorded,
        "lower": lower,
        "upper": reader.upper,
    }


def settle(samples: int | None, every: list[dict[str, Any]]) -> int:
    """The number of samples of the build, from every rank's :func:`seen`; raise a rank's stream problem.

    Example:
        >>> settle(None, [{"problem": None, "exact": 20, "lower": 20, "upper": None},
        ...               {"problem": None, "exact": None, "lower": 16, "upper": 24}])
        20
    """
    where = (lambda r: f" (rank {r})") if len(every) > 1 else (lambda r: "")
    for rank, one in enumerate(every):
        if one["problem"] is not None:
            raise StreamError(one["problem"] + where(rank))
    if samples is not None:
        return samples
    exact = {one["exact"] for one in every if one["exact"] is not None}
    lower = max(one["lower"] for one in every)
    upper = min([one["upper"] for one in every if one["upper"] is not None], default=None)
    total = exact.pop() if len(exact) == 1 else lower if not exact and lower == upper else None
    if total is None or total < lower or (upper is not None and total > upper):
        ranks = "; ".join(
            f"rank {r} read {one['lower']} samples"
            + ("" if one["exact"] is None else f", saw it end at {one['exact']}")
            for r, one in enumerate(every)
        )
        raise StreamError(
            f"the ranks read streams of different lengths ({ranks}); every rank must be given the same stream."
        )
    return total
