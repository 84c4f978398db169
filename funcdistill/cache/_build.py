"""Building a teacher cache: the batched teacher loop, resuming, the progress bar, per-rank shards.

The dataset is read shard by shard (``shard_size`` consecutive samples), in
batches of ``batch_size``; the teacher of the distill function runs once per
batch (and per recorded augmentation draw) under :func:`torch.no_grad`, with
the same truncation as an online call, and the student never runs. Each
finished shard is written atomically and then listed in this rank's progress
file, so a build that stops (an exception, a kill, a power cut) is resumed by
calling it again with the same arguments: finished shards are kept and their
samples are not read again. Under :mod:`torch.distributed`, rank ``r`` of
``w`` builds the shards ``s`` with ``s % w == r``; rank 0 writes the index once
every rank is done. Before anything is written the ranks check that they were
given the same build (:mod:`~funcdistill.cache._ranks`), and the whole build
holds the folder's lock (:mod:`~funcdistill.cache._lock`), so builds into one
folder take turns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping as AbcMapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from funcdistill import _sharded
from funcdistill._pytree import tree_map
from funcdistill._state import state
from funcdistill.cache import _augment, _fingerprint, _keys, _layout, _lock, _ranks, _store
from funcdistill.cache._ranks import Ranks

__all__: list[str] = []

TARGET_SHARD_BYTES = 64 << 20


class Options:
    """The checked arguments of one build."""

    def __init__(self, fn: Any, teacher_state: Any, dataset: Any, path: Any, **kw: Any):
        from funcdistill._distill import DistillFn

        if not isinstance(fn, DistillFn):
            raise TypeError(
                f"TeacherCache.build takes a distill function (funcdistill.distill), got {type(fn).__name__}."
            )
        if not isinstance(teacher_state, AbcMapping):
            raise TypeError(
                f"teacher_state must be a dict of tensors (funcdistill.state(teacher)), got {type(teacher_state).__name__}."
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"dataset must be a map-style dataset (with __len__ and __getitem__), got {type(dataset).__name__}."
            )
        self.fn, self.teacher_state, self.dataset, self.folder = fn, teacher_state, dataset, Path(path)
        self.samples = len(dataset)
        if self.samples == 0:
            raise ValueError("dataset is empty: there is nothing to cache.")
        self.batch_size = _positive_int("batch_size", kw["batch_size"])
        self.inputs = _positive_int("inputs", kw["inputs"])
        self.shard_size = None if kw["shard_size"] is None else _positive_int("shard_size", kw["shard_size"])
        self.augment = kw["augment"]
        if self.augment is not None and not callable(self.augment):
            raise TypeError(f"augment must be a function augment(x, generator), got {type(self.augment).__name__}.")
        self.draws = _positive_int("draws", kw["draws"]) if self.augment is not None else 0
        if kw["draws"] != 1 and self.augment is None:
            raise ValueError(f"draws={kw['draws']} needs augment=...: draws are recorded augmentations.")
        self.seed = _augment.check_seed(kw["seed"])
        self.progress = bool(kw["progress"])
        self.device = _device(fn, teacher_state, kw["device"])
        self.keys = list(dict.fromkeys(t for t, _, _ in fn._plan))
        self.points = [_keys.point_key(k) for k in self.keys]  # stable keys, not reprs
        self.storage = _storage(fn, self.keys, kw["dtype"], kw["topk"], _temperature(kw["topk_temperature"]))
        if any(m.training for m in fn._teacher.model.modules()):
            raise ValueError(
                "the teacher has modules in training mode, whose outputs depend on the batch and on random "
                "draws (dropout, BatchNorm batch statistics); a cache records one output per sample. Put the "
                "teacher in eval mode (teacher.eval()) before building the cache."
            )

    def settings(self) -> dict[str, Any]:
        """What the cache is built for, but the teacher's weights and the output layout."""
        structure = _fingerprint.structure(self.fn)
        meta = {
            "format": _store.FORMAT,
            "version": _store.VERSION,
            "samples": self.samples,
            "draws": self.draws,
            "seed": self.seed if self.draws else None,
            "augment": None if self.augment is None else _augment.name(self.augment),
            "points": self.points,
            "storage": self.storage,
            "teacher": {
                "class": _fingerprint.teacher_class(self.fn._teacher.model),
                "structure": [list(e) for e in structure],
            },
        }
        return json.loads(json.dumps(meta))  # as it reads back from the file (lists, not tuples)

    def weights(self) -> str:
        """SHA-256 of the whole teacher state (the model's own entries, then those given); collective for DTensors."""
        return _fingerprint.weights({**state(self.fn._teacher.model), **dict(self.teacher_state)})

    def meta(self) -> dict[str, Any]:
        """What the cache is built for, without the output layout (known after the first batch)."""
        meta = self.settings()
        meta["teacher"]["weights"] = self.weights()
        return meta

    def sharded(self) -> bool:
        """Whether the teacher runs on DTensor shards (FSDP2), whose forward is a collective of every rank."""
        tensors = [*self.teacher_state.values(), *state(self.fn._teacher.model).values()]
        return any(type(t) is not torch.Tensor and _sharded._is_dtensor(t) for t in tensors)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def _per_pair(name: str, value: Any, n_pairs: int, check: Any) -> dict[int, Any]:
    if value is None:
        return {}
    if not isinstance(value, AbcMapping):
        return {i: check(value) for i in range(n_pairs)}
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_pairs:
            raise ValueError(f"{name} keys are pair indices 0..{n_pairs - 1} of the mapping, got {i!r}.")
    return {i: check(v) for i, v in value.items() if v is not None}


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}.")
    return dtype


def _check_k(k: Any) -> int:
    return _positive_int("topk", k)


def _temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"topk_temperature must be a positive number, got {value!r}.")
    return float(value)


def _storage(fn: Any, keys: list[Any], dtype: Any, topk: Any, temperature: float) -> list[dict[str, Any]]:
    """Storage dtype and top-k of each teacher point, from the per-pair options."""
    n = len(fn._plan)
    dtypes, ks = _per_pair("dtype", dtype, n, _check_dtype), _per_pair("topk", topk, n, _check_k)
    chosen: dict[Any, tuple[Any, Any, int]] = {}
    for i, (t, _, _) in enumerate(fn._plan):
        option = (dtypes.get(i), ks.get(i))
        if t in chosen and chosen[t][:2] != option:
            raise ValueError(
                f"pairs {chosen[t][2]} and {i} read the same teacher point {t!r} but ask for different storage "
                f"({chosen[t][:2]} vs {option}); a cache stores each teacher point once: give them the same "
                "dtype and topk."
            )
        chosen.setdefault(t, (*option, i))
    return [
        {
            "dtype": None if chosen[t][0] is None else _fingerprint.dtype_name(chosen[t][0]),
            "topk": chosen[t][1],
            "temperature": temperature if chosen[t][1] is not None else None,
        }
        for t in keys
    ]


def build(options: Options, *, timeout: float | None = None) -> None:
    """Run the build (or resume it, or find it done) holding the folder's build lock; on return the index is written.

    The ranks compare what they were given first (before anything is written,
    and before the fingerprint's collectives for a sharded teacher).
    """
    timeout = _timeout(timeout)
    ranks = Ranks.current()
    meta = options.settings()
    _ranks.agree(ranks, {k: _ranks.short(v) for k, v in _given(options, meta).items()}, _GIVEN)
    meta["teacher"]["weights"] = options.weights()
    _ranks.agree(ranks, {"weights": f"sha256:{meta['teacher']['weights'][:12]}"}, _WEIGHTS)
    folder = options.folder
    folder.mkdir(parents=True, exist_ok=True)
    with _lock.held(folder, ranks, timeout=timeout):
        _build_locked(options, meta, ranks)


_GIVEN = {
    "samples": "number of samples (len(dataset))",
    "draws": "augmentation draws",
    "seed": "augmentation seed",
    "augment": "augmentation function",
    "points": "teacher points of the mapping",
    "storage": "storage (dtype, topk) per teacher point",
    "teacher": "teacher (class, state names, shapes and dtypes)",
    "batch_size": "batch_size",
    "inputs": "inputs",
    "shard_size": "shard_size",
}
_WEIGHTS = {"weights": "teacher weights (SHA-256 of the teacher state)"}


def _given(options: Options, meta: dict[str, Any]) -> dict[str, Any]:
    """What a rank was given, field by field, for comparing the ranks."""
    return {
        **{k: meta[k] for k in ("samples", "draws", "seed", "augment", "points", "storage", "teacher")},
        "batch_size": options.batch_size,
        "inputs": options.inputs,
        "shard_size": options.shard_size,
    }


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(
            f"timeout must be a number of seconds (0 or more), or None to wait as long as it takes, got {value!r}."
        )
    return float(value)


def _build_locked(options: Options, meta: dict[str, Any], ranks: Ranks) -> None:
    folder = options.folder
    index = folder / _store.INDEX
    if index.exists():
        _same_settings(folder, _store.read_json(index, "index"), meta, options)
        return
    recorded = folder / _store.BUILD
    layout: dict[str, Any] | None = None
    if recorded.exists():
        layout = _store.read_json(recorded, "build record")
        _same_settings(folder, layout, meta, options)
    ranks.barrier()  # every rank decides "fresh or resumed" on the same files, before rank 0 writes the record
    shard_size = options.shard_size or (layout["shard_size"] if layout else None)
    runner = _Runner(options, meta, layout, shard_size, ranks)
    runner.run()
    ranks.barrier()
    if ranks.rank == 0:
        _write_index(folder, runner.layout(), ranks.world)
    ranks.barrier()


def _same_settings(folder: Path, recorded: dict[str, Any], meta: dict[str, Any], options: Options) -> None:
    """Refuse to resume (or reuse) a cache built with other settings."""
    labels = {
        "samples": "number of samples",
        "draws": "augmentation draws",
        "seed": "augmentation seed",
        "augment": "augmentation function",
        "points": "teacher points of the mapping",
        "storage": "storage (dtype, topk) per teacher point",
    }
    diffs = [f"{labels[k]}: {recorded.get(k)!r} then, {meta[k]!r} now" for k in labels if recorded.get(k) != meta[k]]
    if options.shard_size is not None and recorded.get("shard_size") != options.shard_size:
        diffs.append(f"shard_size: {recorded.get('shard_size')!r} then, {options.shard_size!r} now")
    teacher, now = recorded.get("teacher", {}), meta["teacher"]
    if teacher.get("class") != now["class"] or teacher.get("structure") != now["structure"]:
        diffs.append(f"teacher: a {teacher.get('class')} then, a {now['class']} with another state layout now")
    elif teacher.get("weights") != now["weights"]:
        diffs.append("teacher weights: the teacher state differs from the one the cache was built with")
    if diffs:
        raise ValueError(
            f"{folder} already holds a teacher cache (or an unfinished build) made with other settings: "
            + "; ".join(diffs)
            + ". Build into another folder, or delete this one to start again."
        )


class _Runner:
    """The shard loop of one rank."""

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
        self.spare: tuple[Any, ...] | None = None  # inputs of this rank's last forward, for _drain

    def layout(self) -> dict[str, Any]:
        """``build.json``: the settings, the shard size and the output layout."""
        assert self.entries is not None and self.shard_size is not None  # set by run()
        return {**self.meta, "shard_size": self.shard_size, "entries": self.entries}

    def run(self) -> None:
        o, ranks = self.o, self.ranks
        folder = o.folder
        done, by_rank = _finished(folder)
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
            per_sample = sum(_layout.bytes_per_sample(e, self.draws) for e in self.entries or [])
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
        return _store.write_shard(self.o.folder / _store.shard_name(s), tensors, first)

    def _batch(self, first: int, n: int) -> dict[str, torch.Tensor]:
        """Stored tensors of samples ``first .. first + n - 1`` (every draw)."""
        o = self.o
        items = [o.dataset[i] for i in range(first, first + n)]
        args = _to(_collate(items, o.inputs), o.device)
        if not self.draws:
            return self._run(args, n, first)
        xs = [it if isinstance(it, torch.Tensor) else it[0] for it in items]
        return self._drawn(xs, args[1:], first, n)

    def _drawn(self, xs: list[torch.Tensor], rest: tuple, first: int, n: int) -> dict[str, torch.Tensor]:
        """Every recorded draw: each sample's first input augmented on the CPU (as replay() does), then the teacher."""
        o = self.o
        draw_seeds = _augment.seeds(o.seed, first, n, self.draws)
        per_draw = []
        for j in range(self.draws):
            x = _augment.replay(o.augment, torch.stack(xs), draw_seeds[:, j])
            per_draw.append(self._run((x.to(o.device), *rest), n, first))
        out = {name: torch.stack([d[name] for d in per_draw], dim=1) for name in per_draw[0]}
        out["seeds"] = draw_seeds
        return out

    def _forward(self, args: tuple) -> dict[Any, Any]:
        """The teacher's outputs at the mapped points; a sharded teacher's first tells the other ranks (_drain)."""
        o = self.o
        if self.lockstep:
            self.ranks.anyone(True, o.device)
            self.spare = args
        with torch.no_grad():
            captured = o.fn._teacher.run(o.teacher_state, args, {}).values
        return captured

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
        while self.ranks.anyone(False, o.device):
            if self.spare is None:
                self.spare = _to(_collate([o.dataset[0]], o.inputs), o.device)
            with torch.no_grad():
                o.fn._teacher.run(o.teacher_state, self.spare, {})

    def _run(self, args: tuple, n: int, first: int) -> dict[str, torch.Tensor]:
        o = self.o
        captured = self._forward(args)
        if self.entries is None:
            self.entries = [
                _layout.describe(i, p, captured[k], n, storage=st)
                for i, (k, p, st) in enumerate(zip(o.keys, o.points, o.storage))
            ]
        out: dict[str, torch.Tensor] = {}
        for k, entry in zip(o.keys, self.entries):
            pairs = [i for i, (t, _, _) in enumerate(o.fn._plan) if t == k]
            out.update(_layout.to_tensors(entry, captured[k], n, first, pairs=pairs))
        return out


def _rows(tensors: dict[str, torch.Tensor]) -> int:
    return next(iter(tensors.values())).shape[0]


def _default_shard_size(per_sample: int, batch_size: int) -> int:
    """About 64 MiB per shard, a whole number of batches."""
    batches = max(1, TARGET_SHARD_BYTES // max(1, per_sample * batch_size))
    return batches * batch_size


def _device(fn: Any, teacher_state: AbcMapping[str, Any], device: Any) -> torch.device:
    """Where the teacher runs: ``device``, else that of the teacher state (or the teacher's own tensors)."""
    if device is not None:
        return torch.device(device)
    tensors = [*teacher_state.values(), *state(fn._teacher.model).values()]
    return next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))


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
                + "."
            )
    return tuple(default_collate(rows))


def _finished(folder: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
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


def _write_index(folder: Path, layout: dict[str, Any], world: int) -> None:
    done, _ = _finished(folder)
    size, samples = layout["shard_size"], layout["samples"]
    names = [_store.shard_name(s) for s in range(-(-samples // size))]
    missing = [n for n in names if n not in done]
    if missing:
        raise RuntimeError(
            f"the build of {folder} is incomplete: {len(missing)} of {len(names)} shards are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run the build again (on "
            f"{world} rank(s)) to finish it."
        )
    _store.write_json(folder / _store.INDEX, {**layout, "shards": [done[n] for n in names]})
    for leftover in [folder / _store.BUILD, *folder.glob("progress-rank*.json")]:  # the index has it all now
        leftover.unlink(missing_ok=True)


def _bar(total: int, show: bool) -> Any:
    if not show or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="teacher cache", unit="sample", dynamic_ncols=True)
