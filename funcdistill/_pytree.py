"""Every pytree call of the package, and the registration of :class:`Mapping`, in one place.

Tree utilities come from the public ``torch.utils.pytree`` where the installed
torch has it, else from ``torch.utils._pytree``. :class:`Mapping` is registered
once, with optree (namespace ``"funcdistill"``) and with torch's registry:
its leaves are the payloads; the names and the models are static metadata.
"""

from __future__ import annotations

from typing import Any

import optree

try:  # public from newer torch releases on
    import torch.utils.pytree as torch_pytree  # type: ignore[import-not-found]
except ImportError:
    import torch.utils._pytree as torch_pytree

from funcdistill._mapping import Mapping

__all__ = ["NAMESPACE", "register_node", "tree_flatten", "tree_leaves", "tree_map", "tree_unflatten"]

NAMESPACE = "funcdistill"

tree_map = torch_pytree.tree_map
tree_leaves = torch_pytree.tree_leaves
tree_flatten = torch_pytree.tree_flatten
tree_unflatten = torch_pytree.tree_unflatten


def _flatten(m: Mapping) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return m._payloads, (m._teacher, m._student, m._names)


def _unflatten(meta: tuple[Any, ...], payloads: Any) -> Mapping:
    teacher, student, names = meta
    return Mapping._build(teacher, student, names, tuple(payloads))


def _entries(m: Mapping) -> tuple[int, ...]:
    return tuple(range(len(m)))


optree.register_pytree_node(
    Mapping,  # type: ignore[arg-type]  # a Mapping is a container of its payloads
    lambda m: (*_flatten(m), _entries(m)),  # type: ignore[arg-type]
    _unflatten,  # type: ignore[arg-type]
    namespace=NAMESPACE,
)


# torch's pytree treats None as a leaf and optree does not; torch's flattening
# drops None payloads (their positions go into the context) so that both see
# the same leaves.
def _torch_flatten(m: Mapping) -> tuple[list[Any], tuple[Any, ...]]:
    kept = [p for p in m._payloads if p is not None]
    nones = tuple(i for i, p in enumerate(m._payloads) if p is None)
    return kept, (m._teacher, m._student, m._names, nones)


def _torch_unflatten(kept: Any, context: tuple[Any, ...]) -> Mapping:
    teacher, student, names, nones = context
    it = iter(kept)
    payloads = [None if i in nones else next(it) for i in range(len(names))]
    return Mapping._build(teacher, student, names, payloads)


def _torch_flatten_with_keys(m: Mapping) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    kept, context = _torch_flatten(m)
    keys: list[Any] = [torch_pytree.SequenceKey(i) for i, p in enumerate(m._payloads) if p is not None]
    return list(zip(keys, kept)), context


torch_pytree.register_pytree_node(
    Mapping,
    _torch_flatten,
    _torch_unflatten,
    serialized_type_name="funcdistill.Mapping",
    flatten_with_keys_fn=_torch_flatten_with_keys,
)


def register_node(cls: type, flatten: Any, unflatten: Any, *, name: str) -> None:
    """Register an immutable value class as a pytree node with optree and with torch.

    ``flatten(value) -> (children, context)`` and ``unflatten(context, children) -> value``;
    the children are subtrees (both registries recurse into them), the context
    is static metadata. ``name`` is torch's ``serialized_type_name``.
    """
    optree.register_pytree_node(
        cls,
        flatten,
        lambda context, children: unflatten(context, tuple(children)),
        namespace=NAMESPACE,
    )

    def torch_flatten(value: Any) -> tuple[list[Any], Any]:
        children, context = flatten(value)
        return list(children), context

    torch_pytree.register_pytree_node(
        cls,
        torch_flatten,
        lambda children, context: unflatten(context, tuple(children)),
        serialized_type_name=name,
    )
