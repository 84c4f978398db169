"""``TeacherCache``: teacher outputs computed once, read back by sample index in place of the teacher."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping as AbcMapping
from pathlib import Path
from typing import Any

import torch

from funcdistill._distill import DistillFn
from funcdistill._frozen import Frozen, init
from funcdistill._outputs import BuiltFor, TeacherOutputs
from funcdistill.cache import _augment, _build, _fingerprint, _index, _layout, _lock, _ragged, _read, _served, _store
from funcdistill.cache._options import Options
from funcdistill.cache._served import ServedTeacher

__all__ = ["TeacherCache"]


class TeacherCache(Frozen):
    """Teacher outputs stored per sample, read back to stand in for the teacher (offline distillation).

    :meth:`build` runs the teacher of a distill function once over a dataset
    and stores its outputs at the mapped teacher points; :meth:`open` opens
    such a cache; ``cache[indices]`` gives the outputs of those samples as a
    :class:`~funcdistill.cache.TeacherOutputs`, which the distill function
    takes **in place of the teacher state**: ``fn(cache[idx], student_state,
    *inputs)`` returns the pairs ``fn(teacher_state, student_state, *inputs)``
    would, without running the teacher (see the "Offline distillation" page).

    The cache is a folder of memory-mapped `safetensors` shards and a JSON
    index with each shard's SHA-256; it records what it was built for (the
    teacher points, the teacher's state layout and weights, or the served
    model's name for a cache built from a served teacher), and a distill
    function with another mapping or another teacher is refused.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import funcdistill as fd
        >>> t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> s = nn.Sequential(nn.Linear(4, 3))
        >>> fn = fd.distill(t, s)
        >>> data = torch.randn(10, 4)
        >>> folder = tempfile.TemporaryDirectory()
        >>> cache = fd.TeacherCache.build(fn, fd.state(t), data, folder.name, batch_size=4, progress=False)
        >>> len(cache), cache.points
        (10, ("''",))
        >>> idx = torch.tensor([7, 2])
        >>> ((teacher, student, _),) = fn(cache[idx], fd.state(s), data[idx])
        >>> # the cache holds the forward on the build's batches of 4: this 2-sample one may round differently
        >>> torch.allclose(teacher, t(data[idx]), atol=1e-5)
        True
        >>> folder.cleanup()
    """

    __slots__ = (
        "path",
        "built_for",
        "augment",
        "_index",
        "_entries",
        "_readers",
        "_names",
        "_token_names",
        "_shards",
        "_shard_size",
        "_direct",
        "_verify",
        "_loaded",
        "_lock",
    )
    _immutable_name = "a TeacherCache"
    _immutable_hint = " Open it again (TeacherCache.open) for other options."
    path: Path
    """The cache's folder."""
    built_for: BuiltFor
    """What the cache was built for (path, teacher points, teacher state layout)."""
    augment: Any
    """The augmentation replayed by :meth:`replay`, or ``None``."""
    _index: dict[str, Any]
    _entries: list[dict[str, Any]]
    _readers: tuple[_layout.Reader, ...]
    _names: list[str]
    _token_names: list[str] | None
    _shards: list[dict[str, Any]]
    _shard_size: int
    _direct: bool
    _verify: bool
    _loaded: dict[int, dict[str, torch.Tensor]]
    _lock: threading.Lock

    @classmethod
    def build(
        cls,
        fn: DistillFn,
        teacher_state: AbcMapping[str, torch.Tensor] | ServedTeacher,
        dataset: Any,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 64,
        samples: int | None = None,
        inputs: int = 1,
        dtype: torch.dtype | AbcMapping[int, torch.dtype] | None = None,
        topk: int | AbcMapping[int, int] | None = None,
        topk_temperature: float = 1.0,
        augment: _augment.Augment | None = None,
        draws: int = 1,
        seed: int = 0,
        shard_size: int | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        timeout: float | None = None,
    ) -> TeacherCache:
        """Run the teacher of ``fn`` once over ``dataset`` and store its outputs at ``path``; return the cache.

        Calling it again with the same arguments resumes a build that stopped
        (finished shards are kept and their samples not read again), and
        opens a finished cache without running anything. Builds into one
        folder take turns (a file lock): a build that finds another one
        running waits for it (logging who holds it), then opens its cache or
        refuses it when it was built with other settings.

        Args:
            fn: the distill function (:func:`funcdistill.distill`); its teacher
                must be in eval mode. The student never runs.
            teacher_state: the teacher state to run with, as for ``fn``; or a
                :class:`~funcdistill.served.ServedTeacher` made for ``fn``,
                whose server's answers are stored as a top-k cache of the
                teacher's (``topk`` its ``k``; token samples only; the teacher
                never runs, and may be on the ``meta`` device; see "Served
                teacher" on the LLM page).
            dataset: a map-style dataset (``len(dataset)``, ``dataset[i]``) or a stream (see ``samples``).
                Each item is the model input (a tensor), or a tuple whose
                first ``inputs`` entries are the model's positional inputs
                (``(x, label)``: the label is ignored). Items are batched with
                :func:`torch.utils.data.default_collate`; every sample must
                give outputs of the same shape. Or each item is a *token
                sample* of any length: a 1-D integer tensor of token ids, or a
                dict with ``input_ids`` (and optionally ``attention_mask``).
                Then each batch is padded on the right to its longest sample
                (:func:`~funcdistill.cache.pad_tokens`), the teacher is called
                with ``input_ids=`` (positionally when its ``forward`` has no
                such parameter) and ``attention_mask=`` (when it has one), and
                only the real tokens of per-token outputs are stored; reading
                gives them padded, with a ``mask`` (see the "Offline
                distillation" page).
            path: the cache's folder (created if needed).
            batch_size: samples per teacher call.
            samples: a stream's number of samples (checked: a stream that
                ends sooner or goes on is refused), or ``None``: counted, and
                recorded when it ends. A stream is an iterable of samples (an
                ``IterableDataset``, a generator, a ``datasets`` streaming
                dataset) or a function ``start -> iterable`` of the samples
                from sample ``start``, read in order; it is positioned at a
                shard's first sample (to resume, or for a rank's next shard)
                by its ``.skip(n)``, by the function, or by reading and
                dropping samples ("Streaming builds" on the "Offline
                distillation" page).
            inputs: how many leading entries of a tuple item are model inputs.
            dtype: storage dtype of the floating outputs (e.g. ``torch.float16``),
                for every pair, or ``{pair_index: dtype}``; ``None`` keeps the
                teacher's. Outputs are read back in the teacher's dtype.
            topk: for logits pairs, store only the ``k`` largest
                ``log_softmax`` values and their indices: an int for every
                pair, or ``{pair_index: k}``. Such a pair's teacher output is
                then a :class:`~funcdistill.cache.TopK`, for
                :func:`funcdistill.losses.topk_kl_loss`.
            topk_temperature: the top-k log-probabilities are
                ``log_softmax(logits / topk_temperature)``: store them at the
                temperature you distil at.
            augment: a pure ``augment(x, generator)`` applied to the first
                input of each sample before the teacher sees it, ``draws``
                times per sample with recorded generator seeds; index such a
                cache with ``cache[indices, draws]`` and get the matching
                inputs with :meth:`replay`.
            draws: augmentation draws per sample (needs ``augment``).
            seed: seed of the augmentation draws.
            shard_size: samples per shard file; by default about 64 MiB per
                shard, a whole number of batches.
            device: where the teacher runs: each batch of inputs is moved
                there (after augmentation, which runs on the CPU); by default
                the device of the teacher state. Outputs are stored from the CPU.
            progress: show a progress bar (needs tqdm; rank 0 only).
            timeout: seconds to wait for another build of ``path`` to finish;
                ``None`` waits as long as it takes, ``0`` refuses at once.

        Raises:
            TypeError, ValueError: a bad argument (the message says which and
                the fix); ``path`` holds a cache or an unfinished build made
                with other settings (another teacher, mapping, storage or
                dataset size); under ``torch.distributed``, the ranks were
                given different builds (the message names the ranks).
            TimeoutError: another build of ``path`` still runs after
                ``timeout`` seconds (the message says which process).
        """
        options = Options(
            fn,
            teacher_state,
            dataset,
            path,
            batch_size=batch_size,
            samples=samples,
            inputs=inputs,
            dtype=dtype,
            topk=topk,
            topk_temperature=topk_temperature,
            augment=augment,
            draws=draws,
            seed=seed,
            shard_size=shard_size,
            device=device,
            progress=progress,
        )
        _build.build(options, timeout=timeout)
        return cls.open(path, augment=augment)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        augment: _augment.Augment | None = None,
        teacher_state: AbcMapping[str, torch.Tensor] | ServedTeacher | None = None,
        verify: bool = True,
    ) -> TeacherCache:
        """Open a finished cache.

        The index is checked now, against itself and against each shard's
        size and safetensors header (its first sample, tensor names, shapes
        and dtypes; no data is read); each shard's SHA-256 is checked the
        first time it is read (``verify=False`` skips that). So a damaged
        file is an error naming it, never wrong outputs.

        Args:
            path: the cache's folder.
            augment: the augmentation the cache was built with, for :meth:`replay`.
            teacher_state: when given, checked against the teacher weights the
                cache was built with (the whole state: ``funcdistill.state(teacher)``);
                for a cache built from a served teacher, the
                :class:`~funcdistill.served.ServedTeacher` (its model name is
                compared; a teacher state is refused: such a cache records no weights).
            verify: check each shard's checksum on its first read.

        Raises:
            FileNotFoundError: there is no cache at ``path``.
            ValueError: the build is unfinished; the index is damaged (naming
                its wrong fields), of another format version, or names a shard
                outside the folder; a shard is truncated, missing or does not
                match the index; ``augment`` is not the recorded one; or
                ``teacher_state`` differs from the teacher it was built with (or is
                a teacher state for a cache of a served teacher, or the reverse).
        """
        folder = Path(path)
        index_path = folder / _store.INDEX
        if not index_path.exists():
            if (folder / _store.BUILD).exists():
                running = _lock.building(folder)
                if running is not None:
                    raise ValueError(
                        f"the teacher cache in {folder} is still being built, by {running}; wait for that build "
                        "to finish, or call TeacherCache.build with the same arguments, which waits for it and "
                        "opens the result."
                    )
                raise ValueError(
                    f"the teacher cache build in {folder} is unfinished; run TeacherCache.build again with "
                    "the same arguments to finish it."
                )
            raise FileNotFoundError(
                f"no teacher cache at {folder} (no {_store.INDEX}); build one with TeacherCache.build."
            )
        index = _store.read_json(index_path, "index")  # and its format version
        _index.check(index, index_path)
        _index.check_shards(folder, index, index_path)
        _check_augment(index, augment, folder)
        if teacher_state is not None and not _served.check_open(index, teacher_state, folder):
            assert not isinstance(teacher_state, ServedTeacher)  # check_open answered True for one
            _check_weights(index, teacher_state, folder)
        entries = index["entries"]
        teacher = index["teacher"]
        names = [n for e in entries for n in _layout.tensor_names(e)]
        built_for = BuiltFor(
            str(folder),
            tuple(index["points"]),
            (teacher["class"], tuple((n, tuple(s), d) for n, s, d in teacher["structure"])),
            model=(teacher.get("served") or {}).get("model"),
        )
        new = object.__new__(cls)
        init(
            new,
            path=folder,
            built_for=built_for,
            augment=augment,
            _index=index,
            _entries=entries,
            _readers=tuple(_layout.reader(e) for e in entries),
            _names=names,
            _token_names=[n for e in entries for n in _layout.token_names(e)] if index.get("ragged") else None,
            _shards=index["shards"],
            _shard_size=index["shard_size"],
            # cache[indices] of one shard's samples: an index tensor goes straight to index_select (see _direct_read)
            _direct=len(index["shards"]) == 1 and not index["draws"] and not index.get("ragged") and bool(names),
            _verify=bool(verify),
            _loaded={},
            _lock=threading.Lock(),
        )
        return new

    # --- what it holds -----------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index["samples"])

    @property
    def points(self) -> tuple[str, ...]:
        """The teacher points whose outputs it holds, shown as their ``repr`` (the index records stable keys)."""
        return self.built_for.points

    @property
    def draws(self) -> int:
        """Recorded augmentation draws per sample; 0 for a cache built without ``augment``."""
        return int(self._index["draws"])

    @property
    def nbytes(self) -> int:
        """Bytes of its shard files on disk."""
        return sum(int(r["bytes"]) for r in self._shards)

    @property
    def tokens(self) -> int | None:
        """The real tokens it holds, for a cache of token samples (ragged); ``None`` for samples of one shape."""
        return None if self._token_names is None else sum(int(r["tokens"]) for r in self._shards)

    @property
    def bytes_per_sample(self) -> float:
        """:attr:`nbytes` per sample (all draws of a sample included)."""
        return self.nbytes / len(self)

    def __repr__(self) -> str:
        draws = f", draws={self.draws}" if self.draws else ""
        tokens = self.tokens
        if tokens is not None:
            return (
                f"TeacherCache({str(self.path)!r}, samples={len(self)}, tokens={tokens}, "
                f"points={list(self.points)}, {self.nbytes / tokens:.1f} bytes/token)"
            )
        return (
            f"TeacherCache({str(self.path)!r}, samples={len(self)}, points={list(self.points)}{draws}, "
            f"{self.bytes_per_sample:.0f} bytes/sample)"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers and copies open the folder again
        return (_reopen, (str(self.path), self.augment, self._verify))

    # --- reading ----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> TeacherOutputs:
        """The stored teacher outputs of ``cache[indices]`` or, with augmentation draws, ``cache[indices, draws]``.

        ``indices`` is a 1-D integer tensor, a list or tuple of ints, a range
        or a slice of sample indices; ``draws`` gives each sample's draw
        (``0 .. K-1``), in the same forms. For a cache of token samples, the
        per-token outputs come padded on the right to the longest of these
        samples (zeros at the padding), and ``mask`` (``(batch, tokens)``,
        ``True`` at the real tokens) equals the ``attention_mask.bool()`` of
        :func:`~funcdistill.cache.pad_tokens` on the same samples. The
        tensors are copies of the stored rows, never views of the files:
        writing into them changes no later read.

        Raises:
            TypeError: ``indices`` or ``draws`` is of another kind (a single
                int: write ``cache[[i]]``).
            IndexError: an index is out of range, or draws are missing or
                given to a cache without augmentation.
            ValueError: a shard read for the first time is damaged.
        """
        read = self._direct_read(key) if self._direct else None
        mask = None
        if read is None:
            indices, draws, lo, hi, run = self._key(key)
            if self._token_names is None:
                read = self._gather(indices, draws, self._names, (lo, hi), run=run)
            else:  # token samples: padded on the right to the longest of this batch, with the mask of real tokens
                rest = [n for n in self._names if n not in self._token_names]
                read, mask = _ragged.gather(indices, self._shard_size, self._shard, self._token_names, rest)
        return TeacherOutputs(tuple(r(read) for r in self._readers), self.built_for, mask)

    def _direct_read(self, key: Any) -> dict[str, torch.Tensor] | None:
        """``cache[key]`` of a one-shard cache for a 1-D ``int64`` CPU tensor, or ``None`` for any other key.

        The shard's tensors hold every sample, so ``index_select`` gives what
        :meth:`_gather` would, and its bounds check stands in for
        :func:`_as_indices`'s: an index out of range gives ``None``, and the
        full path raises the error naming it.
        """
        if type(key) is not torch.Tensor or key.dtype is not torch.int64 or key.ndim != 1 or not key.is_cpu:
            return None
        tensors = self._shard(0)
        try:
            return {n: tensors[n].index_select(0, key) for n in self._names}
        except IndexError:
            return None

    def replay(self, x: torch.Tensor, indices: Any, draws: Any) -> torch.Tensor:
        """The augmented inputs whose teacher outputs ``cache[indices, draws]`` holds, bit for bit.

        Args:
            x: the un-augmented first inputs of those samples, batched in the
                order of ``indices`` (what the dataset gives).
            indices: their sample indices.
            draws: the draw of each sample.
        """
        if self.augment is None:
            raise ValueError(
                "replay needs the augmentation the cache was built with: open it with "
                "TeacherCache.open(path, augment=...)."
                if self.draws
                else "this cache was built without augment=..., so there is nothing to replay."
            )
        idx, d, lo, hi, _ = self._key((indices, draws))
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(idx):
            raise ValueError(
                f"replay(x, ...) needs one input per index ({len(idx)}) along the first dimension of a tensor, "
                f"got {list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}."
            )
        seeds = self._gather(idx, d, ["seeds"], (lo, hi))["seeds"]
        return _augment.replay(self.augment, x, seeds)

    def verify(self) -> None:
        """Check every shard's size and SHA-256 now.

        Raises:
            ValueError: naming the first damaged, truncated or missing file.
        """
        for record in self._shards:
            tensors = _store.load_shard(self.path, record, verify=True)
            if self._token_names is not None:
                _ragged.check_offsets(tensors[_ragged.OFFSETS], record, self.path)

    def _key(self, key: Any) -> tuple[torch.Tensor, torch.Tensor | None, int, int, bool]:
        """The sample indices, the draws (or ``None``), the smallest and largest index, and whether it is a run.

        A run: consecutive ascending indices, read as slices (no draws).
        """
        draws: Any = _NO_DRAWS
        if isinstance(key, tuple) and len(key) == 2 and not isinstance(key[0], int):
            key, draws = key
        indices, lo, hi, run = _as_indices(key, len(self), "sample indices")
        if self.draws and draws is _NO_DRAWS:
            raise IndexError(
                f"this cache holds {self.draws} augmentation draws per sample: index it with "
                "cache[indices, draws] (and get the inputs with cache.replay(x, indices, draws))."
            )
        if draws is _NO_DRAWS:
            return indices, None, lo, hi, run
        if not self.draws:
            raise IndexError("this cache was built without augmentation: index it with cache[indices] only.")
        d = _as_indices(draws, self.draws, "draws")[0]
        if d.shape != indices.shape:
            raise IndexError(f"give one draw per index: {len(indices)} indices, {len(d)} draws.")
        return indices, d, lo, hi, False

    def _gather(
        self,
        indices: torch.Tensor,
        draws: torch.Tensor | None,
        names: list[str],
        bounds: tuple[int, int],
        *,
        run: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The rows of ``names`` for ``indices`` (in range, from ``bounds[0]`` to ``bounds[1]``), and ``draws``."""
        size = self._shard_size
        lo, hi = bounds
        if run:  # consecutive samples: a slice of each shard they span
            return _read.run(self._shard, size, lo, hi + 1, names)
        first, last = lo // size, hi // size
        rows = indices if first == last == 0 else indices - first * size if first == last else indices % size
        if draws is not None:  # row r, draw d is row r * K + d of the (rows * K, ...) view
            rows = rows * self.draws + draws
        if first == last:  # one shard: one gather per stored tensor
            return _read.one_shard(self._shard(first), rows, names, draws is not None)
        return _read.across(self._shard, indices // size, rows, names, draws is not None)

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        tensors = self._loaded.get(s)
        if tensors is None:
            with self._lock:
                tensors = self._loaded.get(s)
                if tensors is None:
                    record = self._shards[s]
                    tensors = _store.load_shard(self.path, record, verify=self._verify)
                    if self._token_names is not None:
                        _ragged.check_offsets(tensors[_ragged.OFFSETS], record, self.path)
                    self._loaded[s] = tensors
        return tensors


def _reopen(path: str, augment: Any, verify: bool) -> TeacherCache:
    return TeacherCache.open(path, augment=augment, verify=verify)


_NO_DRAWS = object()  # cache[indices]: no draws given (None is a wrong draws value, not a missing one)

ACCEPTED = "a 1-D integer tensor, a list or tuple of ints, a range or a slice"
"""What ``cache[...]`` takes as sample indices (and as draws)."""


def _as_indices(key: Any, n: int, what: str) -> tuple[torch.Tensor, int, int, bool]:
    """``key`` as a 1-D ``int64`` CPU tensor of indices in ``0 .. n - 1``, its smallest and largest, and whether
    it is a run (consecutive ascending indices, at least two).

    Raises:
        TypeError: ``key`` is not one of :data:`ACCEPTED`.
        IndexError: an index is out of range.
    """
    if isinstance(key, slice):
        key = _slice(key, n)
    if isinstance(key, range):
        return _range(key, n, what)
    t = _index_tensor(key, what)
    if t.dtype != torch.int64 or not t.is_cpu:
        t = t.to("cpu", torch.int64)
    lo, hi = _bounds(t)
    _check_range(lo, hi, n, what)
    # a run's length is hi - lo + 1: only then is it worth comparing with one (shuffled batches never are)
    run = hi - lo + 1 == t.shape[0] > 1 and torch.equal(t, torch.arange(lo, hi + 1))
    return t, lo, hi, run


def _slice(key: slice, n: int) -> range | torch.Tensor:
    """The samples of ``cache[start:stop:step]``: a range, or (a step of 0 or below, bounds not ints) what
    tensor slicing gives, and its errors."""
    if all(v is None or type(v) is int for v in (key.start, key.stop, key.step)) and (key.step is None or key.step > 0):
        return range(n)[key]
    return torch.arange(n)[key]


def _range(r: range, n: int, what: str) -> tuple[torch.Tensor, int, int, bool]:
    """:func:`_as_indices` of a range: its bounds known without reading a tensor."""
    if not r:  # torch.arange refuses a start past the stop
        return torch.zeros(0, dtype=torch.int64), 0, 0, False
    t = torch.arange(r.start, r.stop, r.step)
    lo, hi = (r[0], r[-1]) if r.step > 0 else (r[-1], r[0])
    _check_range(lo, hi, n, what)
    return t, lo, hi, r.step == 1 and len(r) > 1


def _check_range(lo: int, hi: int, n: int, what: str) -> None:
    if lo < 0 or hi >= n:
        raise IndexError(f"{what} must be in 0..{n - 1}, got {lo if lo < 0 else hi}.")


def _index_tensor(key: Any, what: str) -> torch.Tensor:
    """``key`` as a 1-D integer tensor, or a TypeError naming the accepted kinds."""
    kind = type(key).__name__
    if isinstance(key, (int, bool)):
        raise TypeError(f"{what} must be {ACCEPTED} (cache[[i]] for one sample), got the {kind} {key!r}.")
    if isinstance(key, torch.Tensor):
        t = key
    elif isinstance(key, (list, tuple)) or hasattr(key, "__array__"):  # numpy arrays too (ranges are read before)
        try:
            t = torch.as_tensor(key)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be {ACCEPTED}; got a {kind} that is not all ints.") from None
    else:
        raise TypeError(f"{what} must be {ACCEPTED}, got {kind}.")
    if t.dim() != 1 or (t.numel() and not _integer(t)):
        raise TypeError(f"{what} must be {ACCEPTED}, got a {kind} of {t.dtype}, shape {list(t.shape)}.")
    return t


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _bounds(t: torch.Tensor) -> tuple[int, int]:
    """Smallest and largest entry of a 1-D integer tensor (``(0, 0)`` when empty)."""
    if not t.numel():
        return 0, 0
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def _check_augment(index: dict[str, Any], augment: Any, folder: Path) -> None:
    recorded = index.get("augment")
    if augment is None:
        return
    if recorded is None:
        raise ValueError(f"the teacher cache at {folder} was built without augment=...; open it without one.")
    if _augment.name(augment) != recorded:
        raise ValueError(
            f"the teacher cache at {folder} was built with the augmentation {recorded}, not "
            f"{_augment.name(augment)}; pass the same function, or build a cache with this one."
        )


def _check_weights(index: dict[str, Any], teacher_state: AbcMapping[str, torch.Tensor], folder: Path) -> None:
    if _fingerprint.weights(teacher_state) != index["teacher"]["weights"]:
        raise ValueError(
            f"the teacher cache at {folder} was built with another teacher state: the SHA-256 of the one "
            "given differs from the recorded one (pass the whole state, funcdistill.state(teacher), as "
            "the build saw it). Build a cache for this teacher."
        )
