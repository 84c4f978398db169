"""The swap plan: where a shadow holds each state entry, the interface between a shadow and its state spec."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from funcdistill._state import uncached_state

if TYPE_CHECKING:
    from funcdistill._memo import Memo
    from funcdistill._spec import StateSpec

__all__: list[str] = []


class SwapPlan:
    """For each state name, the ``_parameters``/``_buffers`` slots of a shadow that hold it (tied names included).

    Made once per shadow, from the names of its side's
    :class:`~funcdistill._spec.StateSpec`. The spec reads from it what the
    shadow holds, so that a call swaps only the entries that differ
    (:meth:`StateSpec.swaps <funcdistill._spec.StateSpec.swaps>`); the shadow
    puts those swaps into the slots it names for the forward, and its own
    tensors back after it.

    Attributes:
        tables: the dict (``_parameters`` or ``_buffers``) of each entry's
            first slot, by canonical name.
        attrs: the key in that dict, by canonical name.
        aliases: the other slots of tied entries, by canonical name.
        own: the shadow's own tensor under every name.
        own_list: the shadow's tensors of the spec's names, in the spec's order.
        meta: the spec's names that the shadow holds on the meta device.
        held_keys: the names :func:`funcdistill.state` gives for the shadow's tensors.
        held_values: those tensors, in order (passing them swaps nothing).
        names: the spec's canonical names, in order (``own_list``'s order).
        slots: the first slot of each of ``names``, as two lists: dicts and keys.
        ordered: whether ``held_keys`` is ``names`` and no entry is tied, so that a
            state with every entry swapped, in that order, goes in by position.
        memo: the state dict the last call on this shadow passed the full check
            with (:mod:`funcdistill._memo`), or ``None``.
    """

    __slots__ = (
        "tables",
        "attrs",
        "aliases",
        "own",
        "own_list",
        "meta",
        "held_keys",
        "held_values",
        "names",
        "slots",
        "ordered",
        "memo",
    )

    def __init__(self, module: nn.Module, spec: StateSpec):
        own: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        own.update(module.named_buffers(remove_duplicate=False))
        slots: dict[str, list[tuple[dict, str]]] = {}
        for name, canonical in spec.canonical.items():
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix)
            table = owner._parameters if attr in owner._parameters else owner._buffers
            slots.setdefault(canonical, []).append((table, attr))
        # first slot of each entry as two dicts, for C-level swaps; the other slots of tied entries
        self.tables = {k: v[0][0] for k, v in slots.items()}
        self.attrs = {k: v[0][1] for k, v in slots.items()}
        self.aliases = {k: tuple(v[1:]) for k, v in slots.items() if len(v) > 1}
        self.own = own
        self.own_list = [own[n] for n in spec.names]
        self.meta = [n for n in spec.names if own[n].is_meta]
        # what funcdistill.state(model) gives for the tensors the shadow holds: passing it swaps nothing.
        # Read without state()'s per-module cache: its entry would keep this shadow (and its thread's
        # clones) alive for good, since the shadow's taps refer back to it.
        held = uncached_state(module)
        self.held_keys = list(held)
        self.held_values = list(held.values())
        self.names = list(spec.names)
        self.slots = ([self.tables[n] for n in self.names], [self.attrs[n] for n in self.names])
        self.ordered = self.held_keys == self.names and not self.aliases
        self.memo: Memo | None = None  # the state a call checked last (set by the spec)
