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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from funcdistill._pytree import torch_pytree, tree_map
from funcdistill.cache import _augment, _layout, _ragged, _store, _tokens
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

    def layout(self) -> dict[str, Any]:
        """``build.json``: the settings, the shard size and the output layout."""
        assert self.entries is not None and self.shard_size is not None  # set by run()
        ragged = {"version": _store.RAGGED_VERSION, "ragged": True} if self.ragged else {}
        return {**self.meta, **ragged, "shard_size": self.shard_size, "entries": self.entries}

    def run(self) -> None:
        o, ranks = self.o, self.ranks
        folder = o.folder
        done, by_rank = finished(folder)
        pending_first: dict[int, dict[str, torch.Tensor]] = {}
        if self.entries is None:  # a fresh build: the first batch fixes the layout (and the shard size)
            pending_first[0] = self._first_batch()
            if ranks.rank == 0:
                _store.write_json(folder / _store.BUILD, self.layout())
        size = self.shard_size
        assert size is not None
        shards = [s for s in range(-(-o.samples // size)) if s % ranks.world == ranks.rank]
        todo = [s for s in shards if _store.shard_name(s) not in done]
        mine = dict(by_rank.get(ranks.rank, {}))
        bar = _bar(sum(min(size, o.samples - s * size) for s in todo), o.progress and ranks.rank == 0)
        try:
            for s in todo:
                first, count = s * size, min(size, o.samples - s * size)
                record = self._shard(s, first, count, pending_first.pop(first, None), bar)
                mine[record["file"]] = record
                _store.write_json(folder / _store.progress_name(ranks.rank), {"format": _store.FORMAT, "shards": mine})
            self._drain()
        finally:
            if bar is not None:
                bar.close()

    def _first_batch(self) -> dict[str, torch.Tensor]:
        o = self.o
        tensors = self._batch(0, min(o.batch_size, o.samples))
        if self.shard_size is None:
            tokens = self.tokens_per_sample
            per_sample = sum(_layout.bytes_per_sample(e, self.draws, tokens=tokens) for e in self.entries or [])
            self.shard_size = _default_shard_size(per_sample, o.batch_size)
        return tensors

    @property
    def draws(self) -> int:
        return self.o.draws

    def _shard(self, s: int, first: int, count: int, head: dict | None, bar: Any) -> dict[str, Any]:
        parts: list[dict[str, torch.Tensor]] = []
        start = first
        while start < first + count:
            n = min(self.o.batch_size, first + count - start)
            parts.append(head if head is not None and start == first and _rows(head) == n else self._batch(start, n))
            start += n
            if bar is not None:
                bar.update(n)
        tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        path = self.o.folder / _store.shard_name(s)
        lengths = tensors.pop(_LENGTHS, None)
        if lengths is None:
            return _store.write_shard(path, tensors, first)
        tensors[_ragged.OFFSETS] = _ragged.offsets(lengths)
        return _store.write_shard(path, tensors, first, count=count, tokens=int(lengths.sum()))

    def _batch(self, first: int, n: int) -> dict[str, torch.Tensor]:
        """Stored tensors of samples ``first .. first + n - 1`` (every draw)."""
        o = self.o
        items = [o.dataset[i] for i in range(first, first + n)]
        if self.ragged is None:  # the first item decides: token samples of any length, or samples of one shape
            self.ragged = _tokens.is_token_sample(items[0])
        if self.ragged:
            args, kwargs, mask = self._padded(items, first)
            self.tokens_per_sample = float(mask.sum()) / n if first == 0 else self.tokens_per_sample
            return {**self._run(args, n, first, kwargs=kwargs, mask=mask), _LENGTHS: mask.sum(1)}
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
        """Token samples as the teacher's padded batch: ``(args, kwargs)`` on its device, and the mask of real tokens."""
        o = self.o
        if o.augment is not None or o.inputs != 1:
            option = "augment=..." if o.augment is not None else f"inputs={o.inputs}"
            raise ValueError(
                f"{option} does not apply to token samples (this dataset's items are token ids): augmentation "
                "needs inputs of one shape, and inputs= counts the model inputs of tuple items. Leave it out."
            )
        samples = []
        for j, item in enumerate(items):
            try:
                samples.append(_tokens.tokens(item, f"dataset item {first + j}"))
            except TypeError as error:
                raise TypeError(
                    f"this build caches token samples (its first item is one), so every item must be one: {error}"
                ) from None
        ids, attention = _tokens.pad(samples)
        args, kwargs = _tokens.teacher_call(o.fn.teacher_model, ids, attention)
        return _to(args, o.teacher_device), dict(_to((kwargs,), o.teacher_device)[0]), attention.bool()

    def _forward(self, args: tuple, kwargs: dict[str, Any] | None = None) -> dict[Any, Any]:
        """The teacher's outputs at the mapped points; a sharded teacher's first tells the other ranks (_drain)."""
        o = self.o
        kwargs = kwargs or {}
        if self.lockstep:
            self.ranks.anyone(True, o.teacher_device)
            self.spare = args, kwargs
        with torch.no_grad():
            return o.fn.run_teacher(o.teacher_state, args, kwargs)

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
                item = o.dataset[0]
                if self.ragged:
                    self.spare = self._padded([item], 0)[:2]
                else:
                    self.spare = _to(_collate([item], o.inputs), o.teacher_device), {}
            with torch.no_grad():
                o.fn.run_teacher(o.teacher_state, *self.spare)

    def _run(
        self, args: tuple, n: int, first: int, *, kwargs: dict[str, Any] | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        o = self.o
        captured = self._forward(args, kwargs)
        if self.entries is None:
            per_token = None if mask is None else self._per_token(captured, args, kwargs or {}, mask)
            self.entries = [
                _layout.entry(i, key, captured[p], n, storage=st, per_token=None if per_token is None else per_token[p])
                for i, (p, key, st) in enumerate(zip(o.teacher_points, o.keys, o.storage))
            ]
        out: dict[str, torch.Tensor] = {}
        for p, pairs, entry in zip(o.teacher_points, o.pairs, self.entries):
            out.update(_layout.to_tensors(entry, captured[p], n, first, pairs=list(pairs), mask=mask))
        return out

    def _per_token(self, captured: dict[Any, Any], args: tuple, kwargs: dict[str, Any], mask: torch.Tensor) -> dict:
        """Which output leaves are per token: those whose second dimension follows the padded length.

        The first sample alone, padded to one token more than the batch, runs
        once more (a probe): a leaf ``(batch, T, ...)`` on the batch and
        ``(1, T + 1, ...)`` on the probe is per token; any other leaf is per
        sample (a pooled output, say), even where its size happens to be T.
        """
        longest = mask.shape[1]

        def widen(a: Any) -> Any:  # the first row, one padding position more (the mask's is 0)
            return torch.nn.functional.pad(a[:1], (0, 1)) if isinstance(a, torch.Tensor) and a.dim() == 2 else a

        probe = self._forward(tuple(map(widen, args)), {k: widen(v) for k, v in kwargs.items()})

        def follows(a: Any, b: Any) -> bool:
            tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
            return tensors and a.shape[1] == longest and b.shape[1] == longest + 1

        return {
            p: [follows(a, b) for a, b in zip(_leaves(captured[p]), _leaves(probe[p]))] for p in self.o.teacher_points
        }


_LENGTHS = "lengths"  # a ragged batch's real tokens per sample (stored as the shard's offsets)


def _rows(tensors: dict[str, torch.Tensor]) -> int:
    lengths = tensors.get(_LENGTHS)
    return (lengths if lengths is not None else next(iter(tensors.values()))).shape[0]


def _leaves(output: Any) -> list[Any]:
    return torch_pytree.tree_leaves(output)


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


def _bar(total: int, show: bool) -> Any:
    if not show or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="teacher cache", unit="sample", dynamic_ncols=True)
