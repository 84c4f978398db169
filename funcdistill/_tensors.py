"""Two tensor helpers the core shares: casting a pytree's floating tensors, and seeing under ``torch.func``'s wrappers.

Inside :func:`torch.func.grad` or :func:`torch.func.vmap` a tensor is a
wrapper (one per transform level) around the tensor the transform tracks;
:func:`levels` is the one place funcdistill reads through them.
"""

from __future__ import annotations

from typing import Any

import torch

from funcdistill._pytree import tree_map

__all__: list[str] = []


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Cast the floating tensors of a pytree to ``dtype`` (a no-op for those already in it).

    Example:
        >>> out = cast_floating((torch.ones(1), torch.ones(1, dtype=torch.long), "x"), torch.float64)
        >>> [getattr(v, "dtype", v) for v in out]
        [torch.float64, torch.int64, 'x']
    """
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def levels(t: Any) -> list[Any]:
    """``t`` and the tensor under each of its ``torch.func`` wrappers, outermost first.

    The last one is the tensor no transform wraps; outside any transform the
    list is ``[t]``.

    Example:
        >>> len(levels(torch.ones(1)))
        1
        >>> seen = []
        >>> _ = torch.func.grad(lambda y: seen.append(len(levels(y))) or y.sum())(torch.ones(1))
        >>> seen  # grad's wrapper, and the tensor it tracks
        [2]
    """
    functorch = torch._C._functorch
    out = [t]
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
        out.append(t)
    return out


def grad_tracked(t: Any) -> bool:
    """Whether a ``torch.func.grad`` (at any level) differentiates with respect to ``t``.

    Example:
        >>> grad_tracked(torch.ones(1))
        False
        >>> seen = []
        >>> _ = torch.func.grad(lambda y: seen.append(grad_tracked(y)) or y.sum())(torch.ones(1))
        >>> seen
        [True]
    """
    return any(map(torch._C._functorch.is_gradtrackingtensor, levels(t)[:-1]))
