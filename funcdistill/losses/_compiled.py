r"""The compiled chunk: a fused loss's per-chunk work run through ``torch.compile``, and when it is not.

A chunk's work (its logits, both softmaxes, the divergence and its gradient
for the logits) is a handful of passes over ``chunk x V`` values when each
operation runs as its own eager kernel; compiled, the elementwise work and the
reductions fuse into a few loops over each row, and only the matrix products
remain separate calls. The fused losses call a chunk function through
:func:`chunk_kernel`, which gives the compiled form when :func:`use_compiled`
says so and the eager one otherwise. Both compute the same arithmetic; they
differ only in rounding (see the tests' tolerance).

When the compiled form is used (decided by :func:`use_compiled` from the
arguments, the chunk's size and the environment, never from what was cached):

* ``compiled=False``, or the environment variable ``FUNCDISTILL_FUSED_EAGER=1``:
  never (the eager chunk, as before).
* Inside a ``torch.compile`` region (the user's step): never here; the eager
  chunk code is traced into the user's graph and compiled with it.
* ``compiled=None`` (the default): when the call's logits (tokens x V, all
  chunks together) number at least ``2**20`` (compiling costs seconds; below
  that size it does not pay back), and Dynamo supports this Python and
  platform. It is the call's size, not the chunk's, that counts: small
  chunks of a long sequence are worth compiling.
* ``compiled=True``: whenever Dynamo is supported, whatever the size.

Each chunk function is compiled once per shape family with ``dynamic=True``:
the token dimension is symbolic, so other sequence lengths and the shorter last
chunk reuse the compiled code (a chunk of exactly 1 token is specialised once,
as Dynamo does for sizes 0 and 1). Python hyper-parameters (``beta``, the
temperature) are graph inputs, not constants, so a new value does not
recompile. Each chunk function gets its own code object, so the losses do not
share Dynamo's per-function recompile limit.

When compiling fails (no C compiler, an unsupported platform, an inductor
error), the chunk runs eagerly, the failure is reported once as a
:class:`RuntimeWarning`, and that chunk function stays eager in this process.
A failure changes only the speed: the values are the eager chunk's.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []

EAGER_ENV = "FUNCDISTILL_FUSED_EAGER"
MIN_COMPILED_LOGITS = 1 << 20  # logits per call (all chunks) from which compiled=None compiles (4 MiB in fp32)

_KERNELS: dict[Callable[..., Any], Callable[..., Any]] = {}  # chunk function -> its compiled form
_BROKEN: set[Callable[..., Any]] = set()  # chunk functions whose compile failed in this process


def check_compiled(loss: str, compiled: Any) -> None:
    """``compiled`` is True, False or None."""
    if compiled is not None and not isinstance(compiled, bool):
        raise TypeError(
            f"{loss}: compiled must be True, False or None (None: compile calls of 2**20 logits or more), "
            f"got {type(compiled).__name__}."
        )


def use_compiled(compiled: bool | None, logits: int) -> bool:
    """Whether the chunks of a call with ``logits`` logits in all (tokens x V) run compiled (see the module doc)."""
    if torch.compiler.is_compiling() or compiled is False:
        return False
    if os.environ.get(EAGER_ENV, "") not in ("", "0"):
        return False
    if compiled is None and logits < MIN_COMPILED_LOGITS:
        return False
    return torch._dynamo.is_dynamo_supported()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object (Dynamo keeps its cache, and its recompile limit, per code)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_compiled")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def chunk_kernel(fn: Callable[..., Any], compiled: bool) -> Callable[..., Any]:
    """``fn`` itself, or (``compiled``) its compiled form, which falls back to ``fn`` if compiling fails."""
    if not compiled or fn in _BROKEN:
        return fn
    if fn not in _KERNELS:
        _KERNELS[fn] = torch.compile(_own_code(fn), dynamic=True)
    return functools.partial(_run_compiled, fn, _KERNELS[fn])


def _detached(x: Any) -> Any:
    """Tensors (in tuples too) detached: not views, not requiring grad, so Dynamo's guards see one kind of input.

    A chunk is a slice (a view), and its base's rank and ``requires_grad`` would
    otherwise be guarded on and recompile the chunk function for each.
    """
    if isinstance(x, torch.Tensor):
        return x.detach()
    return tuple(_detached(v) for v in x) if isinstance(x, tuple) else x


def _run_compiled(fn: Callable[..., Any], kernel: Callable[..., Any], *args: Any) -> Any:
    try:
        return kernel(*(_detached(a) for a in args))
    except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - any compile failure: the eager chunk computes the same values
        _BROKEN.add(fn)
        warnings.warn(
            f"funcdistill fused losses: compiling the per-chunk work failed ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}); running it eagerly "
            f"from now on (slower, same values). Pass compiled=False or set {EAGER_ENV}=1 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return fn(*args)
