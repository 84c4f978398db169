"""Memos: what a shadow remembers of the last state it checked, so that the same state passed again costs ~1 µs.

A training loop often passes the same state dict at every call: the models'
own tensors made once, or copies that an optimizer updates in place. The first
call checks such a state entry by entry (:class:`~funcdistill._spec.StateSpec`);
its memo then recognises it, exactly, at the next call:

* the same ``dict`` object, unchanged since: its ``id`` and CPython's dict
  version, which every insertion, deletion or replacement of a value changes
  (and which a new dict never shares with an old one);
* for a state of other tensors than the shadow's own, that every tensor still
  has the dtype, shape and device (and type, ``requires_grad`` and dispatch
  keys) it had when checked, and so do the live model's tensors it was checked
  against, by torch's C++ tensor guards (the checks ``torch.compile`` guards its
  graphs with; strides are not compared, as the full check does not compare
  them either).

A memo that does not match is a miss and the full check runs, so a memo never
changes what a call accepts or returns; it only skips re-reading what cannot
have changed. Where torch does not offer these guards (another torch or Python
version), there are no memos and every call checks in full.

Example:
    >>> import torch
    >>> a = {"w": torch.zeros(2)}
    >>> memo = remember(a, own=False, live=[torch.ones(2)])
    >>> memo is None or memo.holds(a, lambda: [torch.ones(2)])
    True
    >>> a["w"] = torch.zeros(3)  # a changed dict is a miss: the full check runs again
    >>> memo is None or memo.holds(a, lambda: [torch.ones(2)])
    False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []


def _probe() -> tuple[Callable[[dict], int], type] | None:
    """torch's dict version and tensor guards, if this torch and Python offer them."""
    try:
        from torch._C._dynamo.guards import TensorGuards, dict_version

        d: dict[str, int] = {}
        before = dict_version(d)
        d["x"] = 1
        t = torch.zeros(1)
        if dict_version(d) == before or not _guards(TensorGuards, [t]).check(t):
            return None
        return dict_version, TensorGuards
    except (ImportError, AttributeError, RuntimeError, TypeError):  # not there, or refused (dicts without a version)
        return None


def _guards(kind: type, tensors: list[torch.Tensor]) -> Any:
    """Guards on the dtype, shape, device, ``requires_grad`` and type of each tensor (not strides)."""
    return kind(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[[None] * t.dim() for t in tensors],
    )


_TORCH = _probe()


class Memo:
    """A state dict that passed the full check, as its shadow remembers it (see the module docstring).

    Attributes:
        own: whether the state was the shadow's own tensors (nothing swapped in).
    """

    __slots__ = ("_id", "_version", "own", "_given", "_live")

    def __init__(self, given: dict, version: int, own: bool, guards: tuple[Any, Any] | None):
        self._id = id(given)  # no reference: a memo must not keep a state's tensors alive
        self._version = version
        self.own = own
        self._given: Any = guards[0] if guards else None  # guards on the state's tensors
        self._live: Any = guards[1] if guards else None  # and on the live model's they were checked against

    def holds(self, given: Any, live: Callable[[], list[Any]]) -> bool:
        """Whether ``given`` is the remembered state, unchanged, and the live model's tensors (``live()``) still fit it."""
        if id(given) != self._id or type(given) is not dict or _TORCH is None:
            return False
        if _TORCH[0](given) != self._version:
            return False
        return self.own or (self._given.check(*given.values()) and self._live.check(*live()))


def remember(given: Any, *, own: bool, live: list[Any] | None = None) -> Memo | None:
    """A memo of ``given``, a plain dict that just passed the full check (``None`` where there are none).

    ``own``: ``given`` holds the shadow's own tensors, in its order; otherwise
    ``live`` are the live model's tensors that its entries were checked against,
    in the same order.
    """
    if _TORCH is None or type(given) is not dict:
        return None
    version, kind = _TORCH[0](given), _TORCH[1]
    if own:
        return Memo(given, version, True, None)
    if live is None:
        raise ValueError("remember(own=False) needs the live tensors the state was checked against.")
    return Memo(given, version, False, (_guards(kind, list(given.values())), _guards(kind, live)))
