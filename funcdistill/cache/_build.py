"""Building a teacher cache: the folder's lock, the ranks' agreement, fresh or resumed, the index.

:func:`build` takes the checked arguments (:class:`~funcdistill.cache._options.Options`)
and runs this rank's shard loop (:class:`~funcdistill.cache._runner.Runner`):
the teacher of the distill function runs once per batch, and the student never
runs. Each finished shard is written atomically and then listed in this rank's
progress file, so a build that stops (an exception, a kill, a power cut) is
resumed by calling it again with the same arguments: finished shards are kept
and their samples are not run again (a stream is positioned at the first
unfinished shard, :mod:`~funcdistill.cache._source`; a stream's length is
settled by the ranks at the end). Under :mod:`torch.distributed`, rank
``r`` of ``w`` builds the shards ``s`` with ``s % w == r``; rank 0 writes the
index once every rank is done. Before anything is written the ranks check that
they were given the same build (:mod:`~funcdistill.cache._ranks`), and the
whole build holds the folder's lock (:mod:`~funcdistill.cache._lock`), so
builds into one folder take turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from funcdistill.cache import _lock, _ranks, _served, _source, _store
from funcdistill.cache._options import Options
from funcdistill.cache._ranks import Ranks
from funcdistill.cache._runner import Runner, finished

__all__ = ["Options", "build"]


def build(options: Options, *, timeout: float | None = None) -> None:
    """Run the build (or resume it, or find it done) holding the folder's build lock; on return the index is written.

    The ranks compare what they were given first (before anything is written,
    and before the fingerprint's collectives for a sharded teacher).
    """
    timeout = _timeout(timeout)
    ranks = Ranks.current()
    meta = options.settings()
    _ranks.agree(ranks, _given(options, meta), _GIVEN)
    weights = meta["teacher"]["weights"] = options.weights()
    if weights is not None:
        _ranks.agree(ranks, {"weights": f"sha256:{weights[:12]}"}, _WEIGHTS)
    if options.served is not None:  # where it was asked: recorded, not compared (another replica may answer)
        meta["teacher"]["served"]["url"] = options.served.url
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
    "served": "teacher",
    "batch_size": "batch_size",
    "inputs": "inputs",
    "shard_size": "shard_size",
}
_WEIGHTS = {"weights": "teacher weights (SHA-256 of the teacher state)"}


def _given(options: Options, meta: dict[str, Any]) -> dict[str, Any]:
    """What a rank was given, field by field, as the message shows it (short values, or their digests).

    A served teacher is compared by its model name, shown whole (``served by
    model '...'``, or ``a teacher state``), apart from the architecture.
    """
    teacher = {k: v for k, v in meta["teacher"].items() if k != "served"}
    given = {
        **{k: meta[k] for k in ("samples", "draws", "seed", "augment", "points", "storage")},
        "teacher": teacher,
        "batch_size": options.batch_size,
        "inputs": options.inputs,
        "shard_size": options.shard_size,
    }
    return {**{k: _ranks.short(v) for k, v in given.items()}, "served": _served.describe(meta["teacher"])}


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
    runner = Runner(options, meta, layout, shard_size, ranks)
    every = ranks.gather(runner.run())  # every rank gets here, also one whose shard loop failed
    runner.fail(every)
    samples = _source.settle(options.samples, every)  # a stream's count, agreed by the ranks
    _index(folder, {**runner.layout(), "samples": samples}, ranks)


def _index(folder: Path, layout: dict[str, Any], ranks: Ranks) -> None:
    """Rank 0 writes the index while the others wait; if it cannot, every rank raises (none is left waiting)."""
    ranks.from_rank_0(
        lambda: _write_index(folder, layout, ranks.world),
        f"rank 0 could not write the index of the teacher cache {folder}",
    )


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
    diffs = [
        f"{labels[k]}: {recorded.get(k)!r} then, {meta[k]!r} now"
        for k in labels
        if recorded.get(k) != meta[k] and not (k == "samples" and None in (recorded.get(k), meta[k]))
    ]  # a stream of unknown length (samples None) may finish or reopen a build of a declared one, and back
    if options.shard_size is not None and recorded.get("shard_size") != options.shard_size:
        diffs.append(f"shard_size: {recorded.get('shard_size')!r} then, {options.shard_size!r} now")
    teacher, now = recorded.get("teacher", {}), meta["teacher"]
    then_served, now_served = (_served.describe(t) for t in (teacher, now))
    if teacher.get("class") != now["class"] or teacher.get("structure") != now["structure"]:
        diffs.append(f"teacher: a {teacher.get('class')} then, a {now['class']} with another state layout now")
    elif then_served != now_served:  # a served teacher is its model's name (not its URL)
        diffs.append(f"teacher: {then_served} then, {now_served} now")
    elif teacher.get("weights") != now["weights"]:
        diffs.append("teacher weights: the teacher state differs from the one the cache was built with")
    if diffs:
        raise ValueError(
            f"{folder} already holds a teacher cache (or an unfinished build) made with other settings: "
            + "; ".join(diffs)
            + ". Build into another folder, or delete this one to start again."
        )


def _write_index(folder: Path, layout: dict[str, Any], world: int) -> None:
    done, _ = finished(folder)
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
