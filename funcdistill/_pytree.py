"""Every pytree call of the package, and :func:`register_node`, the one way a value class becomes a pytree.

Tree utilities come from the public ``torch.utils.pytree`` where the installed
torch has it, else from ``torch.utils._pytree``. A value class registers itself
next to its definition, once, with :func:`register_node`, which registers it
with optree (namespace ``"funcdistill"``) and with torch's registry alike:
:class:`~funcdistill.Mapping` (its leaves are the payloads) and
:class:`~funcdistill._outputs.TeacherOutputs` (its leaves are the teacher's values).
"""

from __future__ import annotations

from typing import Any

import optree

try:  # public from newer torch releases on
    import torch.utils.pytree as torch_pytree  # type: ignore[import-not-found]
except ImportError:
    import torch.utils._pytree as torch_pytree

__all__ = ["NAMESPACE", "register_node", "tree_flatten", "tree_leaves", "tree_map", "tree_unflatten"]

NAMESPACE = "funcdistill"

tree_map = torch_pytree.tree_map
tree_leaves = torch_pytree.tree_leaves
tree_flatten = torch_pytree.tree_flatten
tree_unflatten = torch_pytree.tree_unflatten


def register_node(cls: type, flatten: Any, unflatten: Any, *, name: str, drop_none: bool = False) -> None:
    """Register an immutable value class as a pytree node with optree and with torch.

    ``flatten(value) -> (children, context)`` and ``unflatten(context, children) -> value``;
    the children are subtrees (both registries recurse into them), the context
    is static metadata. ``name`` is torch's ``serialized_type_name``. torch's
    key paths name each child by its position (``SequenceKey``).

    torch's pytree treats ``None`` as a leaf and optree as an empty subtree;
    with ``drop_none``, torch's flattening drops ``None`` children (their
    positions go into the context) so that both registries see the same leaves.
    """
    optree.register_pytree_node(
        cls,
        flatten,
        lambda context, children: unflatten(context, tuple(children)),
        namespace=NAMESPACE,
    )

    def torch_flatten(value: Any) -> tuple[list[Any], Any]:
        children, context = flatten(value)
        if not drop_none:
            return list(children), context
        nones = tuple(i for i, c in enumerate(children) if c is None)
        return [c for c in children if c is not None], (context, nones)

    def torch_flatten_with_keys(value: Any) -> tuple[list[tuple[Any, Any]], Any]:
        children, context = torch_flatten(value)
        nones = context[1] if drop_none else ()
        positions = [i for i in range(len(children) + len(nones)) if i not in nones]
        return [(torch_pytree.SequenceKey(i), c) for i, c in zip(positions, children)], context

    def torch_unflatten(children: Any, context: Any) -> Any:
        if not drop_none:
            return unflatten(context, tuple(children))
        context, nones = context
        kept = iter(children)
        return unflatten(context, tuple(None if i in nones else next(kept) for i in range(len(nones) + len(children))))

    torch_pytree.register_pytree_node(
        cls,
        torch_flatten,
        torch_unflatten,
        serialized_type_name=name,
        flatten_with_keys_fn=torch_flatten_with_keys,
    )
