"""The checked arguments of a cache build, :class:`Options`, and what the cache is built for.

``TeacherCache.build`` hands its arguments (all but ``timeout``) to
:class:`Options`, which checks them, one error naming the argument and the
fix, and works out what follows from them: where the teacher runs, the
distill function's teacher points and their stable keys, and each point's
storage (dtype, top-k). :meth:`Options.settings` is what the build records and
compares (with an earlier build, and between the ranks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping as AbcMapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch

from funcdistill import _sharded
from funcdistill._distill import DistillFn
from funcdistill._keys import point_key
from funcdistill._outputs import dtype_name, teacher_record
from funcdistill._point import Point
from funcdistill._state import state
from funcdistill.cache import _augment, _fingerprint, _served, _source, _store
from funcdistill.cache._served import ServedTeacher

__all__: list[str] = []


@dataclass(frozen=True, eq=False)
class Options:
    """The checked arguments of one build, as ``TeacherCache.build`` takes them, and what follows from them.

    The given fields are checked (in this order) when it is made; ``seed``,
    ``progress`` and ``draws`` are normalised (``draws`` is 0 without
    ``augment``: nothing is drawn).
    """

    fn: DistillFn
    teacher_state: AbcMapping[str, torch.Tensor] | ServedTeacher = field(repr=False)
    dataset: Any = field(repr=False)
    path: str | os.PathLike[str]
    _: KW_ONLY
    batch_size: int
    inputs: int
    dtype: torch.dtype | AbcMapping[int, torch.dtype] | None
    topk: int | AbcMapping[int, int] | None
    topk_temperature: float
    augment: _augment.Augment | None
    draws: int
    seed: int
    shard_size: int | None
    device: torch.device | str | None
    progress: bool
    samples: int | None = None
    """``len(dataset)``, a stream's declared number of samples, or ``None`` (a stream of unknown length)."""
    folder: Path = field(init=False)
    """The cache's folder."""
    source: _source.Source = field(init=False)
    """How the dataset is read: map-style, or a stream and how it is positioned."""
    teacher_device: torch.device = field(init=False)
    """Where the teacher runs: ``device``, else that of the teacher state (or the teacher's own tensors)."""
    teacher_points: tuple[str | Point, ...] = field(init=False)
    """The distill function's teacher points, in mapping order."""
    keys: tuple[str, ...] = field(init=False)
    """Their stable keys (what the index records)."""
    pairs: tuple[tuple[int, ...], ...] = field(init=False)
    """For each teacher point, the indices of the pairs that read it."""
    storage: tuple[dict[str, Any], ...] = field(init=False)
    """Each teacher point's storage: ``dtype`` name (or ``None``), ``topk`` and ``temperature``."""
    served: ServedTeacher | None = field(init=False)
    """The served teacher given in place of the teacher state, or ``None`` (:mod:`~funcdistill.cache._served`)."""
    classes: int | None = field(init=False)
    """A served teacher's number of classes (the teacher's vocabulary: the top-k index dtype), else ``None``."""

    def __post_init__(self) -> None:
        fn, teacher_state, dataset = self.fn, self.teacher_state, self.dataset
        if not isinstance(fn, DistillFn):
            raise TypeError(
                f"TeacherCache.build takes a distill function (funcdistill.distill), got {type(fn).__name__}."
            )
        served = teacher_state if isinstance(teacher_state, ServedTeacher) else None
        if served is None and not isinstance(teacher_state, AbcMapping):
            raise TypeError(
                "teacher_state must be a dict of tensors (funcdistill.state(teacher)) or a ServedTeacher, got "
                f"{type(teacher_state).__name__}."
            )
        source = _source.source(dataset, self.samples)
        _positive_int("batch_size", self.batch_size)
        _positive_int("inputs", self.inputs)
        if self.shard_size is not None:
            _positive_int("shard_size", self.shard_size)
        if self.augment is not None and not callable(self.augment):
            raise TypeError(f"augment must be a function augment(x, generator), got {type(self.augment).__name__}.")
        draws = _positive_int("draws", self.draws) if self.augment is not None else 0
        if self.draws != 1 and self.augment is None:
            raise ValueError(f"draws={self.draws} needs augment=...: draws are recorded augmentations.")
        points = fn.teacher_points
        pairs = tuple(tuple(i for i, (t, _) in enumerate(fn.mapping.names) if t == p) for p in points)
        storage = _storage(fn, points, self.dtype, self.topk, _temperature(self.topk_temperature))
        if isinstance(teacher_state, ServedTeacher):  # it runs in its server: its answers are stored from the CPU
            teacher_device = torch.device("cpu")
        else:
            teacher_device = _teacher_device(fn, teacher_state, self.device)
        _set(
            self,
            folder=Path(self.path),
            source=source,
            samples=source.samples,
            draws=draws,
            seed=_augment.check_seed(self.seed),
            progress=bool(self.progress),
            teacher_device=teacher_device,
            teacher_points=points,
            keys=tuple(map(point_key, points)),
            pairs=pairs,
            storage=storage,
            served=served,
            classes=None if served is None else _served.check(served, fn, storage, self.device),
        )
        if served is None and any(m.training for m in fn.teacher_model.modules()):
            raise ValueError(
                "the teacher has modules in training mode, whose outputs depend on the batch and on random "
                "draws (dropout, BatchNorm batch statistics); a cache records one output per sample. Put the "
                "teacher in eval mode (teacher.eval()) before building the cache."
            )

    def settings(self) -> dict[str, Any]:
        """What the cache is built for, but the teacher's weights and the output layout."""
        cls, structure = teacher_record(self.fn.teacher_model)
        teacher: dict[str, Any] = {"class": cls, "structure": [list(e) for e in structure]}
        if self.served is not None:  # the model name stands for the weights, which are in the server
            teacher["served"] = _served.record(self.served)
        meta = {
            "format": _store.FORMAT,
            "version": _store.VERSION,
            "samples": self.samples,
            "draws": self.draws,
            "seed": self.seed if self.draws else None,
            "augment": None if self.augment is None else _augment.name(self.augment),
            "points": self.keys,
            "storage": self.storage,
            "teacher": teacher,
        }
        return json.loads(json.dumps(meta))  # as it reads back from the file (lists, not tuples)

    @property
    def state(self) -> AbcMapping[str, torch.Tensor]:
        """The teacher state the teacher runs with (a build from a served teacher never runs it)."""
        assert not isinstance(self.teacher_state, ServedTeacher)  # the runner asks the server instead
        return self.teacher_state

    def weights(self) -> str | None:
        """SHA-256 of the whole teacher state (the model's own entries, then those given); collective for DTensors.

        ``None`` for a served teacher: its weights are in the server (its model name is recorded instead).
        """
        if isinstance(self.teacher_state, ServedTeacher):
            return None
        return _fingerprint.weights({**state(self.fn.teacher_model), **dict(self.teacher_state)})

    def sharded(self) -> bool:
        """Whether the teacher runs on DTensor shards (FSDP2), whose forward is a collective of every rank."""
        if isinstance(self.teacher_state, ServedTeacher):
            return False
        tensors = [*self.teacher_state.values(), *state(self.fn.teacher_model).values()]
        return any(type(t) is not torch.Tensor and _sharded._is_dtensor(t) for t in tensors)


def _set(options: Options, **fields: Any) -> None:
    """Set fields of an :class:`Options` being made (it is frozen)."""
    for name, value in fields.items():
        object.__setattr__(options, name, value)


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


def _storage(
    fn: DistillFn, points: tuple[str | Point, ...], dtype: Any, topk: Any, temperature: float
) -> tuple[dict[str, Any], ...]:
    """Storage dtype and top-k of each teacher point, from the per-pair options."""
    n = len(fn.mapping)
    dtypes, ks = _per_pair("dtype", dtype, n, _check_dtype), _per_pair("topk", topk, n, _check_k)
    chosen: dict[Any, tuple[Any, Any, int]] = {}
    for i, (t, _) in enumerate(fn.mapping.names):
        option = (dtypes.get(i), ks.get(i))
        if t in chosen and chosen[t][:2] != option:
            raise ValueError(
                f"pairs {chosen[t][2]} and {i} read the same teacher point {t!r} but ask for different storage "
                f"({chosen[t][:2]} vs {option}); a cache stores each teacher point once: give them the same "
                "dtype and topk."
            )
        chosen.setdefault(t, (*option, i))
    return tuple(
        {
            "dtype": None if chosen[t][0] is None else dtype_name(chosen[t][0]),
            "topk": chosen[t][1],
            "temperature": temperature if chosen[t][1] is not None else None,
        }
        for t in points
    )


def _teacher_device(fn: DistillFn, teacher_state: AbcMapping[str, Any], device: Any) -> torch.device:
    """Where the teacher runs: ``device``, else that of the teacher state (or the teacher's own tensors)."""
    if device is not None:
        return torch.device(device)
    tensors = [*teacher_state.values(), *state(fn.teacher_model).values()]
    return next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
