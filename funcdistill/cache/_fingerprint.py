"""A teacher's fingerprint, as a cache records it: the teacher's structure and a digest of its weights.

A cache records the teacher points of the mapping it was built with (by
their stable keys, :mod:`funcdistill._keys`: names and
:class:`funcdistill.Point` values alike), the teacher's class and the name,
shape and dtype of every state entry (its *structure*,
:func:`funcdistill._outputs.teacher_record`), and a SHA-256 of the teacher
state it ran with (its *weights*, :func:`weights`). A distill function that
maps a teacher point the cache does not hold, or whose teacher has another
structure, is refused when it is given the cache's outputs (the core's
:class:`~funcdistill.cache.BuiltFor` checks that); other weights are refused by
:meth:`TeacherCache.open(path, teacher_state=...) <funcdistill.TeacherCache.open>`
and by a build that would resume another one. A cache built from a served
teacher has no weights here: it records the served model's name in their place
(:mod:`~funcdistill.cache._served`).

The weights of a teacher sharded with FSDP2 (``DTensor`` entries) are those of
its full tensors, gathered one entry at a time (``full_tensor()``, a collective:
every rank hashes the same names in the same order), so the fingerprint does
not depend on the number of ranks and equals that of the unsharded teacher.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping as AbcMapping

import torch

from funcdistill._outputs import dtype_name

__all__: list[str] = []


def to_dtype(name: str) -> torch.dtype:
    """The inverse of :func:`funcdistill._outputs.dtype_name`."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a teacher cache index.")
    return dtype


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
