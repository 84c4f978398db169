"""Sides: one model's part of a distill function (teacher, student, or a payload module), and running it.

A :class:`Side` owns the model, its shadows (:mod:`funcdistill._shadow`: one
per thread, a dedicated one for traced code, and the dry run's), its
:class:`~funcdistill._spec.StateSpec` and its points. :meth:`Side.run` checks
the state a call gives, runs a shadow on it with a fresh
:class:`~funcdistill._taps.CallRecord`, and returns what the taps kept as a
:class:`SideRun`.

Truncation: a side built with ``truncate=True`` whose modules are all in eval
mode stops right after its last mapped point has run, from its first call on,
by raising :class:`~funcdistill._taps.Stop`, a ``BaseException`` that
``except Exception`` in model code does not swallow. Whether stopping is safe
(every mapped point runs exactly once) is the dry run's verdict for the input
signature (:mod:`funcdistill._verdict`); a model with a module in training
mode runs in full, so its random draws and buffer updates are those of a plain
forward.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
from torch import nn

from funcdistill import _failures, _roles, _sharded, _taps, _tensor_parallel, _verdict
from funcdistill._point import Point
from funcdistill._pytree import tree_leaves
from funcdistill._shadow import WHOLE, Shadow
from funcdistill._spec import StateSpec
from funcdistill._tensors import cast_floating

__all__: list[str] = []


class SideRun(NamedTuple):
    """What one call of a side gives its caller."""

    values: dict[Any, Any]
    """The value of each point (the output under ``''``; ``None`` there when truncated)."""
    buffers: dict[str, torch.Tensor] | None
    """The buffers the call ran with, by every name (when asked for), else ``None``."""
    updated: bool
    """Whether the forward updated buffers that were cloned for the call (only when asked for)."""


class _PerThread(threading.local):
    """What a side keeps for each thread: its shadow (made on the thread's first call).

    Read by eager calls only: traced code runs the side's traced shadow (Dynamo
    does not trace a ``threading.local`` subclass's class defaults reliably).
    """

    shadow: Shadow | None = None


class Side:
    """Runs a model statelessly on a given state and returns the values at its mapped points.

    Args:
        model: the live model (never modified).
        points: the points to read: names (``''`` is the final output) and
            :class:`~funcdistill.Point` values, resolved.
        role: ``"teacher"``, ``"student"`` or ``"payload <i>"``, for messages.
        truncate: stop the forward once every point has been read, when
            every module is in eval mode and the dry run allows it.
        clone_buffers: clone the buffers of training-mode modules before a
            call, so that their in-place updates never reach the given tensors.
        dtype: run in this floating dtype (state and floating inputs are cast).
        other: the counterpart side (the teacher's, for the student), whose
            state spec this side's is built with.
    """

    spec: StateSpec

    def __init__(
        self,
        model: nn.Module,
        points: tuple[str | Point, ...],
        role: str,
        *,
        truncate: bool = False,
        clone_buffers: bool = True,
        dtype: torch.dtype | None = None,
        other: Side | None = None,
    ):
        self.model = model
        self.role = role
        self.dtype = dtype
        self.points = tuple(dict.fromkeys(points))
        self._n_points = len(self.points)
        self.whole = WHOLE in self.points
        self.gathers = _taps.needs_whole_forward(self.points)  # some point keeps every call's value
        whole = self.whole or self.gathers
        self.stop_at = frozenset(self.points) if truncate and not whole else None
        _sharded.check(model, role)
        main = Shadow(model, self.points, role)
        self.spec = StateSpec(
            role,
            model,
            main.module,
            clone_buffers=clone_buffers,
            dtype=dtype,
            other=None if other is None else other.spec,
        )
        self._main = main.bind(self.spec)
        self._traced = self.new_shadow()
        self._local = _PerThread()
        self._local.shadow = self._main
        self._verdicts = _verdict.Verdicts(self)
        self._shapes = _tensor_parallel.Shapes(self)

    @property
    def run_module(self) -> nn.Module:
        """The module the forward runs on (its state names are what a call needs)."""
        return self._main.module

    def new_shadow(self, *, dry: bool = False) -> Shadow:
        """Another shadow of the model, with its swap plan (``dry``: for the shape-only dry run)."""
        return Shadow(self.model, self.points, self.role, dry=dry).bind(self.spec)

    def run(self, given: Any, args: tuple, kwargs: dict, *, buffers: bool = False, report: bool = False) -> SideRun:
        """Run the model on the ``given`` state.

        Returns the value of each point, the buffers it ran with (when
        ``buffers``), and (when ``report``) whether the forward updated buffers
        that were cloned for the call.
        """
        compiling = torch.compiler.is_compiling()
        if compiling:
            shadow = self._traced
        else:
            shadow = self._local.shadow or self._new_thread_shadow()
        if shadow.taps.record is not None:
            raise RuntimeError(
                f"the {self.role} is already running in a distill call on this thread: "
                "a distill function cannot be called from inside itself (for example "
                "from a payload or a hook)."
            )
        training = shadow.sync_modes(compiling=compiling)
        plain = shadow.units is None and shadow.parallel is None
        swaps, cloned = self.spec.swaps(
            given, shadow.plan, training=training, compiling=compiling, drop_stats=plain and not (buffers or report)
        )
        if self.dtype is not None:
            args, kwargs = cast_floating((args, kwargs), self.dtype)
        stop = None
        if self.stop_at is not None and not training:
            verdict = self._verdicts.of(args, kwargs, compiling)
            if verdict == _verdict.TRUNCATE:
                stop = self.stop_at
            elif verdict != _verdict.FULL:
                raise RuntimeError(verdict)
        record = _taps.CallRecord(stop=stop, versions=not compiling)
        try:
            output = shadow.run(record, swaps, args, kwargs)
        except _taps.Stop:
            output = None
        except Exception as error:
            self._reraise(error, swaps, shadow, args, kwargs, compiling)
            raise
        values: dict[Any, Any] = record.values  # type: ignore[assignment]  # a call's record keeps values
        if record.versions:
            _taps.check_versions(record.versions, self.role)
        if self.gathers:
            _taps.finish(values, self.points)
        if self.whole:
            values[WHOLE] = output
        self._check(values, record.counts)
        if shadow.parallel is not None and not compiling:  # a local shard of a tensor-parallel model: refused
            self._shapes.check(values, args, kwargs)
        used = self.spec.buffers(swaps, shadow.plan.own) if buffers else None
        updated = report and bool(cloned) and not compiling and self.spec.updated(swaps, cloned)
        return SideRun(values, used, updated)

    def _new_thread_shadow(self) -> Shadow:
        """This thread's first call: give it its own shadow."""
        shadow = self._local.shadow = self.new_shadow()
        return shadow

    # --- errors -----------------------------------------------------------------------

    def _reraise(
        self, error: Exception, swaps: dict, shadow: Shadow, args: tuple, kwargs: dict, compiling: bool
    ) -> None:
        """Raise a clearer error than the forward's ``error``: which model failed, on what, and what to do.

        Returns (for the caller to raise ``error`` itself) for funcdistill's own
        errors and while compiling.
        """
        if compiling or _failures.raised_by_funcdistill(error):
            return
        if shadow.units is not None:
            _sharded.reraise(error, self.role)
        model = _roles.model_name(self.model)
        tensors = (t for t in (*swaps.values(), *shadow.plan.own_list) if t is not None)
        state_dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
        typed = _failures.dtype_error(error, self.role, model, {"state": state_dtype, **self._dtypes()}, args, kwargs)
        if typed is not None:
            raise _failures.mark(typed) from error
        wrapped = _failures.failed(error, self.role, model, args, kwargs)
        if wrapped is not error:
            raise wrapped from error

    def _dtypes(self) -> dict[str, torch.dtype | None]:
        """The student's floating dtype, and the teacher's as it runs (``None`` when ``teacher_dtype`` casts)."""
        other = self.spec.other
        if other is None:
            return {}
        if self.role == "teacher":
            return {"student": other.floating_dtype(), "teacher": None if self.dtype else self.spec.floating_dtype()}
        return {"teacher": None if other.dtype is not None else other.floating_dtype()}

    def _check(self, values: dict[Any, Any], counts: dict[Any, int]) -> None:
        if len(values) != self._n_points or sum(counts.values()) != len(counts):  # some count is not 1
            problems = _taps.count_problems(self.points, counts, self.role, self.model)
            missing = [p for p in self.points if p not in values and not counts.get(p)]
            if missing:
                problems.append(
                    f"{self.role} module(s) {', '.join(map(repr, missing))} never ran during "
                    f"the forward pass of the {self.role} {_roles.model_name(self.model)}, so "
                    "there is nothing to distill. Map modules that the forward calls for this "
                    "input."
                )
            if problems:
                raise RuntimeError("\n".join(problems))
        for point, value in values.items():
            if isinstance(value, torch.Tensor):
                continue
            for leaf in tree_leaves(value):
                if leaf is not None and not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"the {_taps.what(point)} of {self.role} module {_taps.name_of(point)!r} contains "
                        f"a {type(leaf).__name__}, not only tensors; "
                        + (_CACHE_FIX if _is_transformers_cache(leaf) else "")
                        + "map a point whose value is a tensor or a tuple/list/dict of tensors (None entries "
                        f"are allowed){_taps.arg_hint(point)}."
                    )


_CACHE_FIX = (
    "it is the key/value cache of a transformers model, returned because use_cache is on (the "
    "config's default). Pass use_cache=False with the inputs, fn(teacher_state, student_state, ..., "
    "use_cache=False) (both models get it), or set model.config.use_cache = False; or "
)


def _is_transformers_cache(value: Any) -> bool:
    """Whether ``value`` is a ``transformers`` cache (``DynamicCache`` and the like), without importing it."""
    return type(value).__module__.startswith("transformers") and any(c.__name__ == "Cache" for c in type(value).__mro__)
