"""Verdicts: whether a truncated teacher may stop after its deepest mapped point, per input signature.

Stopping is only safe when every mapped point runs exactly once, which the
call cannot tell since it stops. The shape-only dry run
(:mod:`funcdistill._dryrun`) runs the whole forward on a dedicated shadow and
counts each point's calls; its verdict for an input signature is
:data:`TRUNCATE`, :data:`FULL` (the dry run could not run: the teacher runs
in full) or the message that says what the counts show is wrong. A verdict
depends on nothing but the signature, so it is computed once per signature
and cached. Under ``torch.compile`` it is computed at trace time, as a
constant of the trace (:func:`constant_under_compile`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from funcdistill import _dryrun, _taps

if TYPE_CHECKING:
    from funcdistill._shadow import Shadow
    from funcdistill._side import Side

__all__: list[str] = []

TRUNCATE = "truncate"
"""Verdict: every mapped point runs once; stopping after the deepest is safe."""
FULL = "full"
"""Verdict: the dry run could not run (data-dependent control flow, an op without a
shape rule, an input it cannot rebuild); run the model in full, so the taps see every call."""

_MAX_VERDICTS = 1024
_DRY_NOTE = " (Seen by the shape-only dry run that checks a truncated teacher for these input shapes.)"


def constant_under_compile(fn: Any) -> Any:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing Dynamo.

    Dynamo then calls ``fn`` at trace time and puts its result in the graph as a
    constant. Importing Dynamo takes about two seconds, which eager-only users
    (and every DataLoader worker) would pay on their first ``distill``; the
    marker is the attribute the public function sets (a test checks they agree).
    """
    fn._dynamo_marked_constant = True
    return fn


class Verdicts:
    """The verdicts of one side (a truncated teacher), one per input signature.

    Args:
        side: the side they are for; its dry runs use a shadow of their own,
            made on first use.
    """

    __slots__ = ("_side", "_cache", "_lock", "_dry", "_traced")

    def __init__(self, side: Side):
        self._side = side
        self._cache: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self._dry: Shadow | None = None
        self._traced = constant_under_compile(lambda sig: self._for(sig))

    def of(self, args: tuple, kwargs: dict, compiling: bool) -> str:
        """The verdict for a call's inputs (already cast to the side's dtype)."""
        sig = _dryrun.signature(args, kwargs)
        if sig is None:
            return FULL
        if compiling:  # a constant of the trace: needs static shapes (dynamic=False) or truncate=False
            return self._traced(sig)
        verdict = self._cache.get(sig)
        return self._for(sig) if verdict is None else verdict

    def _for(self, sig: tuple) -> str:
        """The dry run's verdict for an input signature (cached: it depends on nothing else)."""
        with self._lock:
            verdict = self._cache.get(sig)
            if verdict is not None:
                return verdict
            counts = _dryrun.count_calls(self._dry_run, self._fake_specs(sig), sig)
            if counts is None:
                verdict = FULL
            else:
                side = self._side
                problems = _taps.count_problems(side.points, counts, side.role, side.model)
                verdict = "\n".join(problems) + _DRY_NOTE if problems else TRUNCATE
            if len(self._cache) >= _MAX_VERDICTS:
                self._cache.clear()
            self._cache[sig] = verdict
            return verdict

    def _dry_run(self, fake_state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> dict[Any, int]:
        if self._dry is None:
            self._dry = self._side.new_shadow(dry=True)
        shadow = self._dry
        shadow.sync_modes()
        record = _taps.CallRecord(values=False, versions=False)  # the dry run only counts
        shadow.run(record, fake_state, args, kwargs, functional=True)
        return record.counts

    def _fake_specs(self, sig: tuple) -> dict[str, tuple[torch.Size, torch.dtype, torch.device]]:
        """Shape, dtype and device of each state entry, as the checked call will run it."""
        spec = self._side.spec
        dtype = spec.dtype
        fallback = next((device for _, device in _dryrun.tensor_specs(sig)), torch.device("cpu"))
        out = {}
        for name in spec.names:
            t = spec.live_tensor(name)
            if t is None:
                continue
            t_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            out[name] = (t.shape, t_dtype, fallback if t.is_meta else t.device)
        return out
