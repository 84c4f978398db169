"""Reading a model's state: :func:`state` gives ``{qualified_name: tensor}``, fast, through a reader.

How a call checks the state it is given is :mod:`funcdistill._spec`.
"""

from __future__ import annotations

import sys
import weakref
from operator import getitem, is_
from typing import Any

import torch
from torch import nn

from funcdistill import _payloads

__all__ = ["state"]


def state(module: nn.Module, mapping: Any = None, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Return the parameters and buffers of ``module`` as a flat dict.

    The values are the module's own tensors (no copy), keyed by qualified name
    in the order of ``named_parameters()`` then ``named_buffers()``, ready for
    :func:`torch.func.functional_call`, :func:`torch.func.grad` and the
    functions made by :func:`funcdistill.distill`. It is cheap enough to call
    every step (a fraction of a microsecond per tensor).

    Args:
        module: the model.
        mapping: optional :class:`funcdistill.Mapping`. Its payloads that are
            modules with parameters or buffers (adapters) are added under
            ``'payloads.<index>.<name>'``, which is where a distill function looks
            for them in the student state.
        buffers: include buffers. ``buffers=False`` gives the parameters only,
            which is what to differentiate with :func:`torch.func.grad` (it
            cannot differentiate integer buffers such as BatchNorm's
            ``num_batches_tracked``); a distill function takes missing buffers
            from the model.

    Example:
        >>> from torch import nn
        >>> sorted(state(nn.Linear(2, 3)))
        ['bias', 'weight']
        >>> sorted(state(nn.BatchNorm1d(2), buffers=False))
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"state() takes an nn.Module, got {type(module).__name__}.")
    out: dict[str, torch.Tensor]
    if torch.compiler.is_compiling():  # traced once: no reader (Dynamo would guard on the cache)
        out = dict(module.named_parameters())
        if buffers:
            out.update(module.named_buffers())
    else:
        reader = _READERS.get(module)
        try:
            if reader is None or not reader.valid():
                raise KeyError
            out = reader.read(buffers)
        except KeyError:  # a new model, or its tree or names changed: a new reader
            reader = _READERS[module] = _Reader(module)
            out = reader.read(buffers)
    if mapping is not None:
        for i, payload in _payloads.stateful_modules(mapping.payload()):
            for name, t in state(payload, buffers=buffers).items():
                out[_payloads.key(i, name)] = t
    return out


def uncached_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`state` returns, without keeping a reader for ``module``.

    For modules that must not be kept alive by the readers' cache: a reader
    holds the submodules, so a module whose submodules refer back to it (a
    shadow, through its taps) would never be freed from the cache's weak keys.
    """
    return _Reader(module).read(True)


_NONE_ID = id(None)


class _Reader:
    """Where a module tree keeps its tensors, and a check that the tree is still so.

    :func:`state` reads the tensors through the reader (C-level ``map`` over the
    live ``_parameters``/``_buffers`` dicts) instead of walking the module tree.
    The reader is used only while the tree has the same submodules and the same
    parameter, buffer and submodule names as when it was made: :meth:`valid`
    checks the submodules and the size of every name table, and :meth:`read`
    finds every name it expects (a ``KeyError`` otherwise), so the names are
    the same sets. :func:`state` thus returns what ``named_parameters()`` and
    ``named_buffers()`` would, whatever happened to the model in between.
    """

    __slots__ = ("_child_tables", "_child_keys", "_children", "_tables", "_sizes", "_params", "_all")

    def __init__(self, root: nn.Module):
        modules = _modules(root)
        self._child_tables: list[dict] = []
        self._child_keys: list[str] = []
        self._children: list[nn.Module | None] = []
        self._tables: list[dict] = []
        for _, m in modules:
            for k, child in m._modules.items():
                self._child_tables.append(m._modules)
                self._child_keys.append(k)
                self._children.append(child)
            self._tables += (m._modules, m._parameters, m._buffers)
        self._sizes = list(map(len, self._tables))
        self._params = _entries(modules, "_parameters")
        names, tables, keys = self._params
        b_names, b_tables, b_keys = _entries(modules, "_buffers")
        # parameters then buffers in one read (no tensor is both, so dropping repeats is the same)
        self._all = (names + b_names, tables + b_tables, keys + b_keys)

    def valid(self) -> bool:
        """Same submodules under the same names, and name tables of the same sizes."""
        try:
            same_children = all(map(is_, map(getitem, self._child_tables, self._child_keys), self._children))
        except KeyError:
            return False
        return same_children and list(map(len, self._tables)) == self._sizes

    def read(self, buffers: bool) -> dict[str, torch.Tensor]:
        """The live tensors by name (raises ``KeyError`` when a name it expects is gone)."""
        return _read(*self._all) if buffers else _read(*self._params)


_READERS: weakref.WeakKeyDictionary[nn.Module, _Reader] = weakref.WeakKeyDictionary()


def _modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, module)`` in the order of ``named_modules()``, each module once."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((prefix, m))
        stack.extend(reversed([(f"{prefix}{k}.", c) for k, c in m._modules.items() if c is not None]))
    return out


def _entries(modules: list[tuple[str, nn.Module]], attr: str) -> tuple[list[str], list[dict], list[str]]:
    names, tables, keys = [], [], []
    for prefix, m in modules:
        table = getattr(m, attr)
        for k in table:
            names.append(sys.intern(prefix + k))  # one object per name: a call compares state keys by identity
            tables.append(table)
            keys.append(k)
    return names, tables, keys


def _read(names: list[str], tables: list[dict], keys: list[str]) -> dict[str, torch.Tensor]:
    """The live tensors, dropping ``None`` entries and repeats of a tensor (as ``named_*()`` do)."""
    values = list(map(getitem, tables, keys))
    ids = set(map(id, values))
    if len(ids) == len(values) and _NONE_ID not in ids:
        return dict(zip(names, values))
    out, seen = {}, set()
    for name, v in zip(names, values):
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            out[name] = v
    return out
