"""Deterministic costs of a step: FLOPs, bytes saved for backward, graph breaks.

These are the figures ``tests/test_costs.py`` checks; the benchmark reports them
beside the timings.

>>> import torch
>>> lin = torch.nn.Linear(4, 4)
>>> flops(lambda: lin(torch.randn(2, 4)))
64
>>> x = torch.randn(2, 4, requires_grad=True)  # so the weight is saved too
>>> saved_bytes(lambda: lin(x).relu().sum(), exclude=[lin.weight, lin.bias])
{'total': 128, 'activations': 64}
>>> with torch.no_grad():
...     allocated_bytes(lambda: lin(x).relu())
64
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["allocated_bytes", "flops", "graph_breaks", "saved_bytes", "storage_ptrs"]


def flops(fn: Callable[[], Any]) -> int:
    """FLOPs counted by :class:`~torch.utils.flop_counter.FlopCounterMode` while ``fn()`` runs."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops())


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Addresses of the storages behind ``tensors`` (to exclude weights from a count)."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(step: Callable[[], torch.Tensor], *, exclude: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes that autograd saves for backward while ``step()`` builds its graph.

    ``step`` returns the loss (its graph is dropped afterwards, backward is not
    run). Each storage is counted once, whatever number of tensors saved it.
    ``activations`` leaves out the storages of ``exclude`` (the models'
    parameters and buffers, which exist anyway); ``total`` counts everything.
    """
    skip = storage_ptrs(exclude)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return {
        "total": sum(seen.values()),
        "activations": sum(n for p, n in seen.items() if p not in skip),
    }


def graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Graphs and graph breaks :func:`torch._dynamo.explain` finds when tracing ``fn(*args)``."""
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()
    return {
        "graphs": out.graph_count,
        "graph_breaks": out.graph_break_count,
        "reasons": [str(r.reason) for r in out.break_reasons],
    }


class _AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every new storage an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr not in inputs:
                    self.bytes += t.untyped_storage().nbytes()
        return out


def allocated_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the new tensors the operators in ``fn()`` produce (views and in-place results excluded).

    A measure of the memory traffic of a forward pass, independent of the
    allocator: it halves when the same computation runs in a 16-bit dtype.
    """
    counter = _AllocationCounter()
    with counter:
        fn()
    return counter.bytes
