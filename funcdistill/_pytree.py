"""Pytree registration of :class:`Mapping`, in one place, for optree and torch.

Leaves are the payloads; the names and the models are static metadata. The
namespace for optree is ``"funcdistill"``.
"""

from __future__ import annotations

from typing import Any

import optree
import torch.utils._pytree as torch_pytree

from funcdistill._mapping import Mapping

__all__ = ["NAMESPACE"]

NAMESPACE = "funcdistill"


def _flatten(m: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return m._payloads, (m._teacher, m._student, m._names)


def _unflatten(meta: tuple[Any, ...], payloads: Any) -> Mapping:
    teacher, student, names = meta
    return Mapping._build(teacher, student, names, tuple(payloads))


def _entries(m: Mapping) -> tuple[int, ...]:
    return tuple(range(len(m)))


optree.register_pytree_node(
    Mapping,
    lambda m: (*_flatten(m), _entries(m)),
    _unflatten,
    namespace=NAMESPACE,
)

torch_pytree.register_pytree_node(
    Mapping,
    _flatten,
    lambda payloads, meta: _unflatten(meta, payloads),
    serialized_type_name="funcdistill.Mapping",
    flatten_with_keys_fn=lambda m: (
        [(torch_pytree.SequenceKey(i), p) for i, p in enumerate(m._payloads)],
        (m._teacher, m._student, m._names),
    ),
)
