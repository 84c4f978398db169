"""A shape-only dry run of a model: how often each mapped point runs, without computing anything.

A truncated teacher stops as soon as its mapped points have run, so a mapped
module that would run *again* later in the forward is never seen by the real
call. The dry run sees it: it runs the whole forward under
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`, on fake tensors with
the shapes, dtypes and devices of the call's inputs and state (no FLOPs, no
memory for activations, no random draws), and counts the calls of each point.

Its result depends only on the input *signature* (the structure of the
inputs, each tensor's shape, dtype and device, and the other input values),
so the verdict drawn from it is cached per signature (:mod:`funcdistill._verdict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__: list[str] = []

_TENSOR = "<tensor>"


def signature(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable description of the inputs, or ``None`` when one cannot be rebuilt from it.

    Tensors become ``(shape, dtype, device)``; tuples, lists and dicts are kept
    as structure; ``None``, numbers, strings, dtypes and devices as values.
    Under ``torch.compile`` the signature must be a constant of the trace, so
    a truncated teacher is compiled with static input shapes (``dynamic=False``,
    or ``truncate=False`` for dynamic shapes).
    """
    if not kwargs and all(type(x) is torch.Tensor for x in args):  # the common call, encoded as _encode does
        return (("tuple", tuple([(_TENSOR, tuple(x.shape), x.dtype, x.device) for x in args])), _NO_KWARGS)
    try:
        return (_encode(args), _encode(kwargs))
    except _Unencodable:
        return None


_NO_KWARGS = ("dict", ())


class _Unencodable(Exception):
    pass


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _encode(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (_TENSOR, tuple(x.shape), x.dtype, x.device)
    if isinstance(x, tuple) and type(x) in (tuple,):
        return ("tuple", tuple(_encode(v) for v in x))
    if type(x) is list:
        return ("list", tuple(_encode(v) for v in x))
    if type(x) is dict:
        return ("dict", tuple((k, _encode(v)) for k, v in x.items()))
    if isinstance(x, _PLAIN):
        return ("value", x)
    raise _Unencodable


def tensor_specs(sig: Any) -> Iterator[tuple[tuple[int, ...], torch.device]]:
    """``(shape, device)`` of each tensor in a signature, in order."""
    if isinstance(sig, tuple) and sig:
        if sig[0] == _TENSOR:
            yield sig[1], sig[3]
        else:
            for item in sig:
                yield from tensor_specs(item)


def _decode(x: Any) -> Any:
    tag, body = x[0], x[1:]
    if tag == _TENSOR:
        shape, dtype, device = body
        return torch.empty(shape, dtype=dtype, device=device)
    if tag == "tuple":
        return tuple(_decode(v) for v in body[0])
    if tag == "list":
        return [_decode(v) for v in body[0]]
    if tag == "dict":
        return {k: _decode(v) for k, v in body[0]}
    return body[0]


def count_calls(
    run: Callable[[dict[str, torch.Tensor], tuple, dict], dict[str, int]],
    state_specs: dict[str, tuple[torch.Size, torch.dtype, torch.device]],
    sig: tuple,
) -> dict[str, int] | None:
    """Run ``run(fake_state, fake_args, fake_kwargs)`` on fake tensors; ``None`` if it cannot run.

    ``run`` returns how many times each point ran. Nothing real is computed,
    the random generators are not advanced, and the run is outside any
    ``torch.func`` transform and any dispatch mode (a FLOP counter) the call
    is in.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    try:  # outside any transform and dispatch mode of the call (a FLOP counter sees nothing)
        with _disable_current_modes(), torch._C._DisableFuncTorch(), torch.no_grad(), FakeTensorMode():
            fake_state = {
                name: torch.empty(shape, dtype=dtype, device=device)
                for name, (shape, dtype, device) in state_specs.items()
            }
            args, kwargs = _decode(sig[0]), _decode(sig[1])
            return run(fake_state, args, kwargs)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell": run in full
        return None
