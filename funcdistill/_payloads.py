"""Payload modules with state (adapters): the ``payloads.<index>.<name>`` convention, in one place.

A payload that is an ``nn.Module`` with parameters or buffers keeps its state
in the *student* state under ``payloads.<index>.<name>``, ``index`` being the
pair's position in the mapping: :func:`funcdistill.state` adds those entries,
a distill function takes them back out, and hands out the payload as a
:class:`BoundPayload` that runs on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping as AbcMapping
from typing import Any

import torch
from torch import nn

from funcdistill._frozen import Frozen, init
from funcdistill._tensors import grad_tracked

__all__ = ["BoundPayload"]

PREFIX = "payloads"


def key(index: int, name: str) -> str:
    """The student-state key of entry ``name`` of the payload of pair ``index``."""
    return f"{PREFIX}.{index}.{name}"


def stateful_modules(payloads: list[Any]) -> Iterator[tuple[int, nn.Module]]:
    """``(index, module)`` for each payload that is a module (with or without state)."""
    for i, payload in enumerate(payloads):
        if isinstance(payload, nn.Module):
            yield i, payload


def split(student_state: AbcMapping[str, Any], keys: frozenset[str]) -> tuple[dict[str, Any], AbcMapping[str, Any]]:
    """Separate the payload entries (``keys``) of a student state from the student's own."""
    payload_state = {k: v for k, v in student_state.items() if k in keys}
    if not payload_state:
        return {}, student_state
    return payload_state, {k: v for k, v in student_state.items() if k not in keys}


def own_entries(index: int, payload_state: dict[str, Any]) -> dict[str, Any]:
    """The entries of payload ``index``, by the payload module's own names."""
    prefix = f"{PREFIX}.{index}."
    return {k[len(prefix) :]: v for k, v in payload_state.items() if k.startswith(prefix)}


def missing_under_grad(
    student_state: AbcMapping[str, Any], payload_state: dict[str, Any], indices: list[int]
) -> list[int]:
    """Payloads whose parameters a ``torch.func.grad`` call over the student state would freeze.

    When the student state holds tensors that ``torch.func.grad`` differentiates
    (grad-tracking wrappers) but a stateful payload has none of its entries in
    it, the payload would run on its own tensors: constants to the transform,
    so the adapter silently never trains.
    """
    if not indices or not _differentiated(student_state):
        return []
    present = {int(k.split(".", 2)[1]) for k in payload_state}
    return [i for i in indices if i not in present]


def _differentiated(state: AbcMapping[str, Any]) -> bool:
    for value in state.values():
        if isinstance(value, torch.Tensor):
            return grad_tracked(value)
    return False


class BoundPayload(Frozen):
    """A payload module bound to the state passed to a distill call.

    Distill functions return these in place of payload modules that have
    parameters or buffers (adapters); they are not built by hand. Calling one
    runs the module with the ``payloads.<index>.*`` entries of that call's
    student state (missing entries come from the module itself), so it is
    differentiable with respect to that state.
    """

    __slots__ = ("_side", "_state")
    _side: Any
    _state: dict[str, torch.Tensor]
    _immutable_hint = " It is made by a distill call for that call's state."

    def __init__(self, side: Any, state: dict[str, torch.Tensor]):  # made by DistillFn only
        init(self, _side=side, _state=state)

    @property
    def module(self) -> nn.Module:
        """The payload module as it was put in the mapping."""
        return self._side.model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._side.run(self._state, args, kwargs).values[""]

    def __repr__(self) -> str:
        return f"BoundPayload({self._side.model!r})"
