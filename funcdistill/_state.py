"""Explicit model state: ``{qualified_name: tensor}`` dicts, and how a call uses them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping as AbcMapping
from typing import Any

import torch
from torch import nn

__all__ = ["state"]

PAYLOAD_PREFIX = "payloads"


def state(module: nn.Module, mapping: Any = None, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Return the parameters and buffers of ``module`` as a flat dict.

    The values are the module's own tensors (no copy), keyed by qualified name,
    ready for :func:`torch.func.functional_call`, :func:`torch.func.grad` and the
    functions made by :func:`funcdistill.distill`.

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
    out: dict[str, torch.Tensor] = dict(module.named_parameters())
    if buffers:
        out.update(module.named_buffers())
    if mapping is not None:
        for i, payload in enumerate(mapping.payload()):
            if isinstance(payload, nn.Module):
                for name, t in state(payload, buffers=buffers).items():
                    out[f"{PAYLOAD_PREFIX}.{i}.{name}"] = t
    return out


def _table(owner: nn.Module, attr: str, is_buffer: bool) -> tuple[dict[str, Any], str]:
    """The live dict a tensor is kept in (``_parameters`` or ``_buffers``), and its key."""
    return (owner._buffers if is_buffer else owner._parameters), attr


def _all_names(model: nn.Module) -> frozenset[str]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return frozenset(names)


class StateSpec:
    """What a model's forward needs, and how to complete a caller's partial state.

    Built once per model at ``distill`` time. :meth:`complete` turns the state a
    caller passes into the dict ``functional_call`` receives: names are checked,
    missing tensors are taken from the live model (so ``model.to(...)`` after
    ``distill`` is seen), and buffers of modules in training mode are cloned so
    that in-place updates (BatchNorm running statistics) never reach the
    caller's tensors (unless ``clone_buffers=False``).
    """

    __slots__ = ("role", "model", "owners", "fill", "buffer_owners", "buffer_names", "ignored", "clone_buffers")

    def __init__(self, role: str, model: nn.Module, run_module: nn.Module, *, clone_buffers: bool = True):
        self.role = role
        self.model = model
        self.clone_buffers = clone_buffers
        # name -> (owning module in the live model, attribute, is_buffer)
        self.owners: dict[str, tuple[nn.Module, str, bool]] = {}
        groups: dict[int, list[str]] = {}
        for name, p in run_module.named_parameters(remove_duplicate=False):
            self._add(name, False, p, groups)
        for name, b in run_module.named_buffers(remove_duplicate=False):
            self._add(name, True, b, groups)
        # one entry per distinct tensor (tied weights share one): its first name,
        # its other names, and where the live tensor is
        self.fill = [
            (names[0], tuple(names[1:]), *_table(*self.owners[names[0]])) for names in groups.values()
        ]
        self.buffer_owners = [(n, owner) for n, (owner, _, b) in self.owners.items() if b]
        self.buffer_names = [n for n, _ in self.buffer_owners]
        # names of the live model that the forward does not use (FX drops them)
        self.ignored = _all_names(model) - frozenset(self.owners)

    def _add(self, name: str, is_buffer: bool, t: torch.Tensor, groups: dict) -> None:
        prefix, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(prefix)
        self.owners[name] = (owner, attr, is_buffer)
        groups.setdefault(id(t), []).append(name)

    def complete(self, given: AbcMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the full state for one call; ``given`` is not modified."""
        if not isinstance(given, AbcMapping):
            raise TypeError(
                f"{self.role}_state must be a dict of name -> tensor "
                f"(funcdistill.state({self.role})), got {type(given).__name__}."
            )
        owners = self.owners
        if not given:  # everything from the live model
            full = {name: table[attr] for name, _, table, attr in self.fill}
        elif given.keys() <= owners.keys():
            full = dict(given)
        else:
            unexpected = given.keys() - owners.keys() - self.ignored
            if unexpected:
                raise ValueError(self._unexpected_message(sorted(unexpected)))
            full = {k: v for k, v in given.items() if k in owners}
        if len(full) < len(owners):
            for name, aliases, table, attr in self.fill:
                if name not in full and not (aliases and any(a in full for a in aliases)):
                    full[name] = table[attr]
        for name, owner in self.buffer_owners if self.clone_buffers else ():
            if owner.training:
                t = full.get(name)
                if t is not None:
                    full[name] = t.clone()
        return full

    def buffers(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The buffers of ``full`` after a call (updated in place by the forward)."""
        return {n: full[n] for n in self.buffer_names if n in full}

    def _unexpected_message(self, unexpected: list[str]) -> str:
        msg = (
            f"{self.role}_state has {len(unexpected)} key(s) that are not parameters "
            f"or buffers of the {self.role} {type(self.model).__name__}: "
            + ", ".join(repr(k) for k in unexpected[:5])
            + (" ..." if len(unexpected) > 5 else "")
            + "."
        )
        close = difflib.get_close_matches(unexpected[0], list(self.owners), n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        msg += (
            f" Pass funcdistill.state({self.role}); if these are the other model's "
            "names, teacher_state and student_state look swapped."
        )
        return msg
