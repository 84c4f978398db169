"""The shard loop of a cache build on one rank: batches, augmentation draws, the teacher, the shards.

The dataset is read shard by shard (``shard_size`` consecutive samples), in
batches of ``batch_size``; the teacher of the distill function runs once per
batch (and per recorded augmentation draw) under :func:`torch.no_grad`
(:meth:`~funcdistill.DistillFn.run_teacher`, with the same truncation as an
online call), and the student never runs. Each finished shard is written
atomically and then listed in this rank's progress file (:func:`finished`
reads them back), so a build that stops is resumed where it stopped.

When the first item is a token sample (a 1-D integer tensor of token ids, or
a dict with ``input_ids``: :mod:`~funcdistill.cache._tokens`), the build is
*ragged*: each batch is padded on the right to its longest sample
(:func:`~funcdistill.cache.pad_tokens`), the teacher is called with the
attention mask, and only the real tokens of per-token outputs are stored,
packed, with per-sample offsets (:mod:`~funcdistill.cache._ragged`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from funcdistill._pytree import tree_map
from funcdistill.cache import _augment, _layout, _ragged, _ranks, _served, _source, _store, _tokens
from funcdistill.cache._options import Options
from funcdistill.cache._ranks import Ranks

__all__: list[str] = []

TARGET_SHARD_BYTES = 64 << 20


class Runner:
    """The shard loop of one rank: the teacher over this rank's unfinished shards, each written as it is done."""

    def __init__(
        self,
        options: Options,
        meta: dict[str, Any],
        layout: dict[str, Any] | None,
        shard_size: int | None,
        ranks: Ranks,
    ):
        self.o = options
        self.meta = meta
        self.entries: list[dict[str, Any]] | None = None if layout is None else layout["entries"]
        self.shard_size = shard_size
        self.ranks = ranks
        # an FSDP2 teacher's forward gathers its shards: every rank must run as many forwards (see _drain)
        self.lockstep = ranks.distributed and options.sharded()
        self.spare: tuple[tuple, dict] | None = None  # inputs of this rank's last forward, for _drain
        # token samples of any length (decided by the first item; recorded in the layout)
        self.ragged: bool | None = None if layout is None else bool(layout.get("ragged"))
        self.tokens_per_sample = 1.0  # a ragged build's first batch: its mean length, for the default shard size
        self.failure: Exception | None = None  # this rank's error in its shard loop, raised once the others know

    def layout(self) -> dict[str, Any]:
        """``build.json``: the settings, the shard size and the output layout."""
        assert self.entries is not None and self.shard_size is not None  # set by run()
        ragged = {"version": _store.RAGGED_VERSION, "ragged": True} if self.ragged else {}
        return {**self.meta, **ragged, "shard_size": self.shard_size, "entries": self.entries}

    def run(self) -> dict[str, Any]:
        """Build this rank's unfinished shards; return what it saw of a stream's end, and a stream problem.

        A :class:`~funcdistill.cache._source.StreamError` (a stream shorter or
        longer than declared, or one that changed since a shard was built) stops
        this rank's loop and is returned, so that the build reports it on every
        rank (:func:`~funcdistill.cache._source.settle`) rather than leaving the
        others waiting in a collective. Under ``torch.distributed`` any other
        error of the loop (a server fault, a full disk) stops it the same way:
        it is kept in :attr:`failure`, its text returned under ``"failed"``, and
        :meth:`fail` raises it on this rank and names it on the others.
        """
        o, ranks = self.o, self.ranks
        folder = o.folder
        done, by_rank = finished(folder)
        self.records = {int(r["first"]): r for r in done.values()}
        known = {f: (int(r["count"]), r["inputs"]) for f, r in self.records.items() if "inputs" in r}
        self.reader = o.source.reader(known)
        head = None
        if self.entries is None:  # a fresh build: the first batch fixes the layout (and the shard size)
            head = self._first_batch()
            if ranks.rank == 0:
                _store.write_json(folder / _store.BUILD, self.layout())
        size = self.shard_size
        assert size is not None
        self.end = o.samples if o.samples is not None else _source.recorded_end(self.records.values())
        mine = dict(by_rank.get(ranks.rank, {}))
        bar = _bar(self._todo_samples(done), o.progress and ranks.rank == 0)
        problem = None
        try:
            try:
                for s in self._todo(done):
                    record = self._shard(s, head if s == 0 else None, bar)
                    if record is None:
                        break
                    mine[record["file"]] = record
                    _store.write_json(
                        folder / _store.progress_name(ranks.rank), {"format": _store.FORMAT, "shards": mine}
                    )
            except _source.StreamError as error:
                problem = str(error)
            except Exception as error:
                if not ranks.distributed:
                    raise
                self.failure = error
            self._drain()
        finally:
            if bar is not None:
                bar.close()
        failed = None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"
        return {**_source.seen(self.reader, self.records.values(), problem), "failed": failed}

    def fail(self, every: list[dict[str, Any]]) -> None:
        """Raise this rank's own error of its shard loop, or another rank's (``every``: each rank's :meth:`run`).

        A rank's finished shards are kept (each is listed in its progress file
        as it is written), so calling the build again resumes it.
        """
        if self.failure is not None:
            raise self.failure
        for rank, one in enumerate(every):
            if one.get("failed"):
                raise RuntimeError(
                    f"rank {rank} failed while building its shards, so this rank stops too: {one['failed']}. "
                    "The finished shards of every rank are kept: calling TeacherCache.build again with the same "
                    "arguments resumes the build."
                )

    def _todo(self, done: dict[str, Any]) -> Iterator[int]:
        """This rank's unfinished shards, in order, up to the end (of a stream: as far as it is known)."""
        size, s = self.shard_size, self.ranks.rank
        assert size is not None
        while self.end is None or s * size < self.end:
            if _store.shard_name(s) not in done:
                yield s
            s += self.ranks.world

    def _todo_samples(self, done: dict[str, Any]) -> int | None:
        if self.end is None:
            return None
        size = self.shard_size
        assert size is not None
        return sum(min(size, self.end - s * size) for s in self._todo(done))

    def _first_batch(self) -> _Part:
        o = self.o
        n = min(o.batch_size, o.shard_size or o.batch_size, o.samples or o.batch_size)
        part = self._first_served(n) if o.served is not None and self.ranks.world > 1 else self._part(0, n)
        if o.source.stream:  # every rank read these samples: the same stream on every rank (an empty one too)
            _ranks.agree(self.ranks, {"first": _source.combined(part.digests)[:12]}, _FIRST)
        if not part.rows:
            raise ValueError("the stream is empty (it yielded no sample): there is nothing to cache.")
        if self.shard_size is None:
            tokens = self.tokens_per_sample
            per_sample = sum(_layout.bytes_per_sample(e, self.draws, tokens=tokens) for e in self.entries or [])
            self.shard_size = _default_shard_size(per_sample, o.batch_size)
        return part

    def _first_served(self, n: int) -> _Part:
        """The first batch of a served build on several ranks: rank 0 asks, and tells the others the layout.

        Every rank needs the first batch's layout (and, for the default shard
        size, its tokens per sample), but the server is shared: asked by each
        rank, it would score the same batch once per rank. So rank 0 asks and
        tells the others what the answer fixed, or its error, which every other
        rank then raises, of the same type where it can
        (:meth:`~funcdistill.cache._ranks.Ranks.from_rank_0`). The other ranks
        read the samples (a stream's digests are compared) and run nothing; the
        batch's outputs belong to shard 0, which is rank 0's.
        """
        items = self.reader.read(0, n)
        digests = [_source.digest(it) for it in items] if self.o.source.stream else []
        tensors: dict[str, torch.Tensor] = {}

        def ask() -> tuple[Any, ...]:  # rank 0: the batch's outputs stay here, what they fixed goes to all
            tensors.update(self._batch(items, 0) if items else {})
            return self.entries, self.ragged, self.tokens_per_sample

        what = "rank 0 stopped the build on the first batch, which every rank waits for (it fixes the layout)"
        self.entries, self.ragged, self.tokens_per_sample = self.ranks.from_rank_0(ask, what, same_type=True)
        return _Part(tensors, digests, len(items))

    @property
    def draws(self) -> int:
        return self.o.draws

    def _shard(self, s: int, head: _Part | None, bar: Any) -> dict[str, Any] | None:
        """Read, run and write shard ``s``; its record, or ``None`` where a stream ended before it."""
        o, size = self.o, self.shard_size
        assert size is not None
        first = s * size
        want = size if self.end is None else min(size, self.end - first)
        parts: list[_Part] = []
        got = 0
        while got < want:
            n = min(o.batch_size, want - got)
            part, head = (head, None) if head is not None else (self._part(first + got, n), None)
            if part.digests and not got:
                _source.check_follows(self.records.get(first - size), part.digests[0], s)
            parts.append(part)
            got += part.rows
            if bar is not None:
                bar.update(part.rows)
            if part.rows < n:
                break
        if o.samples is not None and got < want:
            raise _source.StreamError(_source.short(o.samples, self.reader, first + got))
        if not got:
            return None
        extra: dict[str, Any] = {}
        if o.source.stream:
            extra = self._next(first, got, want, parts)
        tensors = {name: torch.cat([p.tensors[name] for p in parts if p.rows]) for name in parts[0].tensors}
        path, lengths = o.folder / _store.shard_name(s), tensors.pop(_LENGTHS, None)
        if lengths is None:
            return {**_store.write_shard(path, tensors, first), **extra}
        tensors[_ragged.OFFSETS] = _ragged.offsets(lengths)
        return {**_store.write_shard(path, tensors, first, count=got, tokens=int(lengths.sum())), **extra}

    def _next(self, first: int, got: int, want: int, parts: list[_Part]) -> dict[str, Any]:
        """A stream shard's ``inputs`` and ``next`` checksums (a peek at the sample after it); its end, if there."""
        after = self.reader.peek(first + got) if got == want else None
        if after is not None and first + got == self.o.samples:
            raise _source.StreamError(_source.longer(self.o.samples))
        if after is None:
            self.end = first + got
        return {
            "inputs": _source.combined([d for p in parts for d in p.digests]),
            "next": None if after is None else _source.digest(after),
        }

    def _part(self, first: int, n: int) -> _Part:
        """Samples ``first .. first + n - 1`` (fewer where a stream ends), read and run through the teacher."""
        items = self.reader.read(first, n)
        if not items:
            return _Part({}, [], 0)
        digests = [_source.digest(it) for it in items] if self.o.source.stream else []
        return _Part(self._batch(items, first), digests, len(items))

    def _batch(self, items: list[Any], first: int) -> dict[str, torch.Tensor]:
        """Stored tensors of the samples ``items``, from ``first`` on (every draw)."""
        o, n = self.o, len(items)
        if self.ragged is None:  # the first item decides: token samples of any length, or samples of one shape
            self.ragged = _tokens.is_token_sample(items[0])
        if self.ragged:
            args, kwargs, mask = self._padded(items, first)
            if first == 0:
                self.tokens_per_sample = float(mask.sum()) / n
            return {**self._run(args, n, first, kwargs=kwargs, mask=mask), _LENGTHS: mask.sum(1)}
        if o.served is not None:
            raise TypeError(
                f"a served teacher scores token samples, but dataset item {first} is {_kind(items[0])}: "
                "give each item as a 1-D integer tensor of token ids, or a dict with 'input_ids'."
            )
        args = _to(_collate(items, o.inputs), o.teacher_device)
        if not self.draws:
            return self._run(args, n, first)
        xs = [it if isinstance(it, torch.Tensor) else it[0] for it in items]
        return self._drawn(xs, args[1:], first, n)

    def _drawn(self, xs: list[torch.Tensor], rest: tuple, first: int, n: int) -> dict[str, torch.Tensor]:
        """Every recorded draw: each sample's first input augmented on the CPU (as replay() does), then the teacher."""
        o, augment = self.o, self.o.augment
        assert augment is not None  # Options records draws only with augment
        draw_seeds = _augment.seeds(o.seed, first, n, self.draws)
        per_draw = []
        for j in range(self.draws):
            x = _augment.replay(augment, torch.stack(xs), draw_seeds[:, j])
            per_draw.append(self._run((x.to(o.teacher_device), *rest), n, first))
        out = {name: torch.stack([d[name] for d in per_draw], dim=1) for name in per_draw[0]}
        out["seeds"] = draw_seeds
        return out

    def _padded(self, items: list[Any], first: int) -> tuple[tuple, dict[str, Any], torch.Tensor]:
        """Token samples as the teacher's padded batch, ``(args, kwargs)`` on its device, and the mask of real tokens."""
        o = self.o
        option = "augment=..." if o.augment is not None else f"inputs={o.inputs}" if o.inputs != 1 else None
        args, kwargs, mask = _tokens.teacher_batch(items, first, model=o.fn.teacher_model, options=option)
        return _to(args, o.teacher_device), dict(_to((kwargs,), o.teacher_device)[0]), mask

    def _forward(
        self, args: tuple, kwargs: dict[str, Any] | None = None, mask: torch.Tensor | None = None
    ) -> dict[Any, Any]:
        """The teacher's outputs at the mapped points; a sharded teacher's first tells the other ranks (_drain).

        A served teacher's are its server's answer for the batch (token samples: ``mask`` is given).
        """
        o = self.o
        kwargs = kwargs or {}
        if o.served is not None and mask is not None:
            return _served.ask(o.served, o.fn, args, kwargs, mask)
        if self.lockstep:
            self.ranks.anyone(True, o.teacher_device)
            self.spare = args, kwargs
        with torch.no_grad():
            return o.fn.run_teacher(o.state, args, kwargs)

    def _drain(self) -> None:
        """A sharded teacher: forwards on spare inputs (discarded) while another rank still runs its own.

        Each forward of an FSDP2 teacher all-gathers its shards, a collective of
        every rank, but ranks have different numbers of shards (and a resumed
        build different ones left), so before each forward a rank says it has
        one (an all-reduce), and a rank that is done joins the others' forwards
        until none is left, as ``torch.distributed.algorithms.Join`` does.
        """
        if not self.lockstep:
            return
        o = self.o
        while self.ranks.anyone(False, o.teacher_device):
            if self.spare is None:
                items = self.reader.read(0, 1)
                if self.ragged:
                    self.spare = self._padded(items, 0)[:2]
                else:
                    self.spare = _to(_collate(items, o.inputs), o.teacher_device), {}
            with torch.no_grad():
                o.fn.run_teacher(o.state, *self.spare)

    def _run(
        self, args: tuple, n: int, first: int, *, kwargs: dict[str, Any] | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        o = self.o
        captured = self._forward(args, kwargs, mask)
        if self.entries is None:
            self.entries = self._entries(captured, (args, kwargs or {}), mask, n)
        out: dict[str, torch.Tensor] = {}
        for p, pairs, entry in zip(o.teacher_points, o.pairs, self.entries):
            out.update(_layout.to_tensors(entry, captured[p], n, first, pairs=list(pairs), mask=mask))
        return out

    def _entries(
        self, captured: dict[Any, Any], call: tuple[tuple, dict[str, Any]], mask: torch.Tensor | None, n: int
    ) -> list[dict[str, Any]]:
        """The layout, from the first batch's outputs (a served teacher's: those of a live top-k build)."""
        o = self.o
        if o.served is not None:  # the logits the server ranked, per token: no probe forward
            assert o.classes is not None  # set with served
            captured = {p: _served.logits_like(captured[p], o.classes) for p in captured}
            tokens: dict[Any, list[bool]] | None = {p: [True] for p in captured}
        else:
            tokens = None if mask is None else _ragged.per_token(self._forward, captured, call, mask)
        return [
            _layout.entry(i, key, captured[p], n, storage=st, per_token=None if tokens is None else tokens[p])
            for i, (p, key, st) in enumerate(zip(o.teacher_points, o.keys, o.storage))
        ]


class _Part(NamedTuple):
    """A batch of a shard: its stored tensors, its samples' digests (a stream's) and its number of samples."""

    tensors: dict[str, torch.Tensor]
    digests: list[str]
    rows: int


_FIRST = {"first": "the stream's first samples (SHA-256 of the first batch)"}
_LENGTHS = "lengths"  # a ragged batch's real tokens per sample (stored as the shard's offsets)


def _kind(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a {str(item.dtype).removeprefix('torch.')} tensor of shape {list(item.shape)}"
    return f"a {type(item).__name__}"


def _default_shard_size(per_sample: int, batch_size: int) -> int:
    """About 64 MiB per shard, a whole number of batches."""
    batches = max(1, TARGET_SHARD_BYTES // max(1, per_sample * batch_size))
    return batches * batch_size


def _to(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(tree_map(lambda a: a.to(device) if isinstance(a, torch.Tensor) else a, args))


def _collate(items: Sequence[Any], inputs: int) -> tuple[Any, ...]:
    from torch.utils.data import default_collate

    rows = []
    for it in items:
        if isinstance(it, torch.Tensor):
            rows.append((it,))
        elif isinstance(it, (tuple, list)) and len(it) >= inputs:
            rows.append(tuple(it[:inputs]))
        else:
            raise TypeError(
                f"each dataset item must be the model input (a tensor) or a tuple whose first {inputs} "
                f"entries are the model inputs (e.g. (x, label) with inputs=1), got {type(it).__name__}"
                + (f" of length {len(it)}" if isinstance(it, (tuple, list)) else "")
                + (f" ({_tokens.dict_hint(it)})" if isinstance(it, Mapping) else "")
                + "."
            )
    return tuple(default_collate(rows))


def finished(folder: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Shards listed in the progress files whose data file is there with the recorded size (also by rank)."""
    done: dict[str, Any] = {}
    by_rank: dict[int, dict[str, Any]] = {}
    for progress in sorted(folder.glob("progress-rank*.json")):
        rank = int(progress.stem.removeprefix("progress-rank"))
        records = _store.read_json(progress, "progress file").get("shards", {})
        kept = {}
        for name, record in records.items():
            path = folder / name
            if path.exists() and path.stat().st_size == record["bytes"]:
                done[name] = record
                kept[name] = record
        by_rank[rank] = kept
    return done, by_rank


def _bar(total: int | None, show: bool) -> Any:
    if not show or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="teacher cache", unit="sample", dynamic_ncols=True)
