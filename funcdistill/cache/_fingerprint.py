"""What a teacher cache was built for: the teacher's points, its state's layout, its weights.

A cache records the teacher points of the mapping it was built with (by
their stable keys, :mod:`funcdistill.cache._keys`: names and
:class:`funcdistill.Point` values alike), the
teacher's class and the name, shape and dtype of every state entry (its
*structure*), and a SHA-256 of the teacher state it ran with (its *weights*).
A distill function that maps a teacher point the cache does not hold, or whose
teacher has another structure, is refused when it is given the cache's outputs;
other weights are refused by :meth:`TeacherCache.open(path, teacher_state=...)
<funcdistill.TeacherCache.open>` and by a build that would resume another one.

The weights of a teacher sharded with FSDP2 (``DTensor`` entries) are those of
its full tensors, gathered one entry at a time (``full_tensor()``, a collective:
every rank hashes the same names in the same order), so the fingerprint does
not depend on the number of ranks and equals that of the unsharded teacher.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping as AbcMapping
from typing import Any

import torch

from funcdistill._state import state
from funcdistill.cache._keys import point_key

__all__: list[str] = []

Structure = tuple[tuple[str, tuple[int, ...], str], ...]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` as ``'float16'``."""
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name`."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a teacher cache index.")
    return dtype


def teacher_points(fn: Any) -> tuple[str, ...]:
    """The distinct teacher points of a distill function, as stable keys, in mapping order."""
    return tuple(dict.fromkeys(point_key(t) for t, _, _ in fn._pairs))


def teacher_class(model: Any) -> str:
    """The teacher's class name; for an FSDP2 model, that of the model it shards (``Net``, not ``FSDPNet``)."""
    from funcdistill import _sharded

    return _sharded._plain_name(model) if _sharded._fsdp() is not None else type(model).__name__


def structure(fn: Any) -> Structure:
    """Name, shape and dtype of every state entry of the distill function's teacher."""
    return tuple((name, tuple(t.shape), dtype_name(t.dtype)) for name, t in state(fn._teacher.model).items())


def weights(tensors: AbcMapping[str, torch.Tensor]) -> str:
    """SHA-256 of a whole teacher state: every entry's name, shape, dtype and bytes.

    ``DTensor`` entries (FSDP2) are hashed as their full tensors: under
    :mod:`torch.distributed` every rank of their mesh must call this with the
    same names (each entry's ``full_tensor()`` is a collective).

    Example:
        >>> import torch
        >>> a = weights({"w": torch.ones(2)})
        >>> a == weights({"w": torch.ones(2)}), a == weights({"w": torch.zeros(2)})
        (True, False)
    """
    merged = dict(tensors)
    digest = hashlib.sha256()
    for name in sorted(merged):
        t = _plain(name, merged[name].detach()).to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{dtype_name(t.dtype)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(name: str, t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the values of ``t``: a ``DTensor``'s full tensor (a collective)."""
    if type(t) is torch.Tensor:
        return t
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    raise TypeError(
        f"teacher state entry {name!r} is a {type(t).__name__}, a tensor subclass whose values the cache's "
        "fingerprint cannot read; pass plain tensors (or FSDP2 DTensor shards) as the teacher state."
    )


def missing_points(recorded: tuple[str, ...], fn: Any) -> list[str]:
    """The teacher points of ``fn`` that a cache built for ``recorded`` does not hold."""
    return [p for p in teacher_points(fn) if p not in recorded]


def structure_difference(recorded: tuple[str, Structure], fn: Any) -> str | None:
    """The first way ``fn``'s teacher differs from the recorded one, or ``None``."""
    cls, entries = recorded
    given_cls, given = teacher_class(fn._teacher.model), structure(fn)
    if cls != given_cls:
        return f"it was built for a {cls} teacher, this distill function's teacher is a {given_cls}"
    built = {name: (shape, dtype) for name, shape, dtype in entries}
    now = {name: (shape, dtype) for name, shape, dtype in given}
    for name in built:
        if name not in now:
            return f"the teacher it was built for has a state entry {name!r} that this teacher lacks"
        if built[name] != now[name]:
            (s0, d0), (s1, d1) = built[name], now[name]
            return (
                f"teacher state entry {name!r} was {list(s0)} {d0} when the cache was built, "
                f"this teacher's is {list(s1)} {d1}"
            )
    extra = next((name for name in now if name not in built), None)
    if extra is not None:
        return f"this teacher has a state entry {extra!r} that the teacher it was built for lacks"
    return None
