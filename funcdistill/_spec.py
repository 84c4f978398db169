"""The state spec: what a side's state must be, how a call's state is checked, and the swaps it gives."""

from __future__ import annotations

import difflib
from collections.abc import Mapping as AbcMapping
from itertools import repeat
from operator import attrgetter, getitem, is_
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from funcdistill import _memo, _payloads
from funcdistill._swap import SwapPlan
from funcdistill._tensors import levels

__all__: list[str] = []

_DTYPE, _SHAPE, _DEVICE = attrgetter("dtype"), attrgetter("shape"), attrgetter("device")
_TRAINING = attrgetter("training")
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StateSpec:
    """What a side's state must be, checked against the state a caller passes.

    Built once per side at ``distill`` time from the module the forward runs on
    (a shadow: its names) and the live model (where each tensor lives now),
    with its counterpart: the student's spec is built with the teacher's as
    ``other``, and each then names the other in the "look swapped" hint. For a
    call, :meth:`swaps` checks the caller's state entry by entry (name, shape,
    dtype, device; all problems in one message) and returns only the entries
    that differ from the tensors the shadow already holds (its
    :class:`~funcdistill._swap.SwapPlan` says which), completed from the live
    model and with the buffers of training-mode modules cloned (unless
    ``clone_buffers=False``), so in-place updates never reach the caller's
    tensors.
    """

    __slots__ = (
        "role",
        "model",
        "dtype",
        "clone_buffers",
        "live",
        "canonical",
        "tied",
        "buffer_owners",
        "buffer_names",
        "stat_buffers",
        "stat_free",
        "ignored",
        "other",
        "grad_check",
        "names",
        "_tables",
        "_attrs",
        "_buffer_modules",
    )

    def __init__(
        self,
        role: str,
        model: nn.Module,
        run_module: nn.Module,
        *,
        clone_buffers: bool = True,
        dtype: torch.dtype | None = None,
        other: StateSpec | None = None,
    ):
        self.role = role
        self.model = model
        self.dtype = dtype
        self.clone_buffers = clone_buffers
        self.other = other  # the counterpart's spec (the teacher's for the student's), for "look swapped"
        if other is not None:
            other.other = self
        self.grad_check = role == "student"  # refuse detached copies of its parameters (state_dict())
        # name -> (live owner module, its _parameters or _buffers dict, attribute)
        self.live: dict[str, tuple[nn.Module, dict, str]] = {}
        groups: dict[int, list[str]] = {}
        is_buffer: dict[str, bool] = {}
        for kind, items in (
            ("_parameters", run_module.named_parameters(remove_duplicate=False)),
            ("_buffers", run_module.named_buffers(remove_duplicate=False)),
        ):
            for name, t in items:
                prefix, _, attr = name.rpartition(".")
                owner = model.get_submodule(prefix)
                self.live[name] = (owner, getattr(owner, kind), attr)
                is_buffer[name] = kind == "_buffers"
                groups.setdefault(id(t), []).append(name)
        # tied tensors (one tensor under several names) are one entry: its first name
        self.canonical = {name: names[0] for names in groups.values() for name in names}
        self.tied = {name: tuple(names) for names in groups.values() if len(names) > 1 for name in names}
        self.buffer_owners = [(n, self.live[n][0]) for n in self.live if is_buffer[n] and self.canonical[n] == n]
        self.buffer_names = [n for n in self.live if is_buffer[n]]
        self._buffer_modules = list({id(owner): owner for _, owner in self.buffer_owners}.values())
        # buffers of the modules known to update them in training mode (BatchNorm and the like)
        self.stat_buffers = frozenset(n for n, owner in self.buffer_owners if isinstance(owner, _NormBase))
        # buffers of torch's own BatchNorm classes (not subclasses: their forward may read them otherwise),
        # untied, which a call that keeps no update runs without (``None``) in training mode
        self.stat_free = frozenset(
            n for n, owner in self.buffer_owners if type(owner) in _PLAIN_BATCH_NORMS and n not in self.tied
        )
        # the live tensor of each canonical name, as parallel lists for C-level checks
        self.names = [n for n in self.live if self.canonical[n] == n]
        self._tables = [self.live[n][1] for n in self.names]
        self._attrs = [self.live[n][2] for n in self.names]
        # names of the live model that the forward does not use (FX drops them)
        self.ignored = _all_names(model) - frozenset(self.live)

    def live_tensor(self, name: str) -> torch.Tensor:
        _, table, attr = self.live[name]
        return table[attr]

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the model's first floating tensor (``None`` when it has none)."""
        tensors = (self.live_tensor(name) for name in self.names)
        return next((t.dtype for t in tensors if t is not None and t.is_floating_point()), None)

    def swaps(
        self,
        given: Any,
        plan: SwapPlan,
        *,
        training: bool = True,
        compiling: bool | None = None,
        drop_stats: bool = False,
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The entries to swap into a shadow, by canonical name.

        ``plan`` is the shadow's swap plan: what it holds (``own``, ``own_list``,
        ``meta``, and what :func:`funcdistill.state` gives for it).
        ``training``: whether any module of the shadow is in training mode
        (``False`` skips looking for buffers to clone). ``compiling``: whether
        ``torch.compile`` traces the call (asked of torch when ``None``).
        ``drop_stats``: the call keeps no buffer update (``mutable=False``), so
        a training-mode BatchNorm runs with its running statistics swapped out
        (``None``, as :func:`torch.func.replace_all_batch_norm_modules_` does):
        it normalises with the batch statistics, as it would with them, and
        nothing is cloned for updates that would be dropped.

        Returns the swaps and the names of the training-mode modules' buffers
        that were cloned for the call.
        """
        if type(given) is not dict and not isinstance(given, AbcMapping):
            raise TypeError(
                f"{self.role}_state must be a dict of name -> tensor "
                f"(funcdistill.state({self.role})), got {type(given).__name__}."
            )
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        swaps = {} if not given else None if compiling else self._by_position(given, plan)
        if swaps is None:
            swaps, given = self._by_name(given, plan)
        if len(given) < len(plan.own):
            self._fill(given, plan, swaps)
        cloned = []
        if training and self.clone_buffers and self.buffer_owners and self._any_training():
            own = plan.own
            drop = self.stat_free if drop_stats and not compiling else frozenset()
            for name, owner in self.buffer_owners:
                if owner.training:
                    if name in drop:
                        swaps[name] = None  # type: ignore[assignment]  # BatchNorm reads None as "no statistics"
                        continue
                    t = swaps.get(name)
                    swaps[name] = (own[name] if t is None else t).clone()
                    cloned.append(name)
        if self.dtype is not None:
            self._cast(plan.own, swaps)
        return swaps, cloned

    def _by_position(self, given: AbcMapping, plan: SwapPlan) -> dict[str, torch.Tensor] | None:
        """The fast paths, for a state with the names :func:`funcdistill.state` gives, in its order.

        ``{}`` when every entry is the tensor the shadow holds (the model's own
        state: nothing to swap or check); every entry, when none is and each
        has the live model's shape, dtype and device (checked by position, at C
        level); ``None`` otherwise (the per-name path decides).
        """
        memo = plan.memo
        if memo is not None and memo.holds(given, self._live_list):  # the state checked last time, unchanged
            if memo.own:
                return {}
            swaps = dict(zip(plan.names, given.values()))
        else:
            plan.memo = None
            held = plan.held_values
            if len(given) != len(held) or list(given) != plan.held_keys:  # held_keys are interned: compared by id
                return None
            if all(map(is_, given.values(), held)):
                plan.memo = _memo.remember(given, own=True)
                return {}
            values = list(given.values())
            if not plan.ordered or any(map(is_, values, held)) or not self._fit(values):
                return None
            swaps = dict(zip(plan.names, values))
            plan.memo = _memo.remember(given, own=False, live=self._live_list())
        if self.grad_check and not next(iter(swaps.values())).requires_grad:
            self._check_detached(swaps)  # a rare path: the first entry given does not require grad
        return swaps

    def _live_list(self) -> list[Any]:
        """The live model's tensor of each canonical name, in ``names`` order (``None`` for an empty slot)."""
        return list(map(getitem, self._tables, self._attrs))

    def _fit(self, values: list[Any]) -> bool:
        """Every value is a tensor with the live model's shape, dtype and device, in ``names`` order."""
        try:
            return all(map(isinstance, values, repeat(torch.Tensor))) and _same_specs(values, self._live_list())
        except AttributeError:  # an entry of the live model is None: the per-name path says what to do
            return False

    def _by_name(self, given: AbcMapping, plan: SwapPlan) -> tuple[dict[str, torch.Tensor], AbcMapping]:
        """The entries of ``given`` that differ from the shadow's, checked by name; and ``given``
        without the names the forward ignores."""
        own = plan.own
        try:
            swaps = {k: v for k, v in given.items() if own[k] is not v}
        except (KeyError, TypeError):
            given = self._known(given)
            swaps = {k: v for k, v in given.items() if own[k] is not v}
        if swaps and not self._all_fit(swaps, plan):
            swaps = self._checked(swaps, given)
        elif self.tied:
            swaps = self._checked(swaps, given)
        if swaps and self.grad_check and not next(iter(swaps.values())).requires_grad:
            self._check_detached(swaps)  # a rare path: the first entry given does not require grad
        return swaps, given

    def _check_detached(self, swaps: dict[str, torch.Tensor]) -> None:
        """Refuse ``student.state_dict()`` (detached views of the parameters) where gradients are expected.

        Only in a grad-enabled call outside ``torch.func`` transforms and
        ``torch.compile``, when no entry given requires grad while some are
        detached views of live parameters that do: the student's outputs would
        not require grad, and ``loss.backward()`` would fail later with torch's
        "element 0 of tensors does not require grad". Copies (``clone()``) of
        the parameters, as a functional loop or an EMA evaluation passes them,
        are not refused.
        """
        if (
            not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or any(v.requires_grad for v in swaps.values())
        ):
            return
        views = [k for k, v in swaps.items() if _detached_view(v, self.live_tensor(k))]
        if views:
            raise ValueError(
                f"student_state holds detached views of the student's parameters ({views[0]!r}"
                + (f" and {len(views) - 1} more" if len(views) > 1 else "")
                + "), as student.state_dict() gives them, while the parameters require grad: the "
                "student's outputs would not require grad, and loss.backward() would fail with "
                "'element 0 of tensors does not require grad' (or train nothing but adapters). Pass "
                "funcdistill.state(student), the live parameters, in a loss.backward() loop; to run "
                "the student without gradients, call under torch.no_grad() or freeze it "
                "(student.requires_grad_(False))."
            )

    def _any_training(self) -> bool:
        if torch.compiler.is_compiling():
            return any(owner.training for owner in self._buffer_modules)
        return any(map(_TRAINING, self._buffer_modules))

    def updated(self, swaps: dict[str, torch.Tensor], cloned: list[str]) -> bool:
        """Whether the forward wrote into any of the ``cloned`` buffers (then dropped unless returned)."""
        for name in cloned:
            t = swaps[name]
            if t._version or (name in self.stat_buffers and len(levels(t)) > 1):
                return True  # a transform's wrapper keeps no version count: trust the module kind
        return False

    def _all_fit(self, swaps: dict[str, Any], plan: SwapPlan) -> bool:
        """The fast check: every swapped entry is a tensor like the shadow's, which is the live model's."""
        if torch.compiler.is_compiling():
            return False  # the per-entry check traces as well as any
        values = list(swaps.values())
        refs = list(map(plan.own.__getitem__, swaps))
        return (
            all(map(isinstance, values, repeat(torch.Tensor)))
            and _same_specs(values, refs)
            and all(map(is_, self._live_list(), plan.own_list))
        )

    def buffers(self, swaps: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The buffers a call ran with (updated in place by the forward), by every name."""
        return {n: swaps.get(self.canonical[n], own[n]) for n in self.buffer_names}

    def _fill(self, given: Any, plan: SwapPlan, swaps: dict[str, torch.Tensor]) -> None:
        """Entries left out come from the live model: swap those it no longer shares with the shadow."""
        own = plan.own
        if not given and all(map(is_, map(getitem, self._tables, self._attrs), plan.own_list)):
            missing_meta = plan.meta  # the shadow holds the live tensors already
        else:
            missing_meta = []
            for name, table, attr in zip(self.names, self._tables, self._attrs):
                if name in given or (name in self.tied and any(a in given for a in self.tied[name])):
                    continue
                t = table[attr]
                if t is None:
                    continue
                if t.is_meta:
                    missing_meta.append(name)
                elif t is not own[name]:
                    swaps[name] = t
        if missing_meta:
            raise ValueError(
                f"{self.role} entry {missing_meta[0]!r} is on the meta device (the {self.role} "
                f"{type(self.model).__name__} holds no data for it) and {self.role}_state does not "
                f"give it; pass real tensors for the model's meta entries in {self.role}_state "
                "(or load its weights first)."
            )

    def _cast(self, own: dict[str, torch.Tensor], swaps: dict[str, torch.Tensor]) -> None:
        dtype = self.dtype
        for name in self.names:
            t = swaps.get(name)
            if t is None and name in swaps:
                continue  # running statistics swapped out for the call
            t = own[name] if t is None else t
            if t.is_floating_point() and t.dtype != dtype:
                swaps[name] = t.to(dtype)

    def _known(self, given: AbcMapping) -> dict[str, Any]:
        """``given`` without names the forward ignores; an error for keys the model lacks."""
        odd = [k for k in given if not isinstance(k, str)]
        if odd:
            raise TypeError(
                f"{self.role}_state has {len(odd)} key(s) that are not strings: "
                + ", ".join(f"{k!r} ({type(k).__name__})" for k in odd[:5])
                + f". Keys are qualified names such as {next(iter(self.live), 'weight')!r}; "
                f"pass funcdistill.state({self.role})."
            )
        unexpected = sorted(given.keys() - self.live.keys() - self.ignored)
        if unexpected:
            raise ValueError(self._unexpected_message(unexpected, given))
        return {k: v for k, v in given.items() if k in self.live}

    def _checked(self, swaps: dict[str, Any], given: AbcMapping) -> dict[str, torch.Tensor]:
        """Check swapped entries against the live model; key them by canonical name."""
        problems = []
        out: dict[str, torch.Tensor] = {}
        canonical = self.canonical
        for k, v in swaps.items():
            problem = self._problem(k, v)
            if problem:
                problems.append(problem)
                continue
            c = canonical[k]
            if c in out and out[c] is not v:
                problems.append(f"{k!r} is tied to {c!r} in the model, but the state gives them different tensors")
            out[c] = v
        for k, v in given.items() if self.tied else ():
            if k in self.tied and canonical[k] in out and out[canonical[k]] is not v:
                problems.append(
                    f"{k!r} is tied to {canonical[k]!r} in the model, but the state gives them different tensors"
                )
        if problems:
            raise ValueError(self._mismatch_message(problems, given))
        return out

    def _problem(self, name: str, v: Any) -> str | None:
        if not isinstance(v, torch.Tensor):
            return f"{name!r} is a {type(v).__name__}, not a tensor"
        ref = self.live_tensor(name)
        if ref is None:
            return None
        if v.shape != ref.shape:
            return f"{name!r} has shape {tuple(v.shape)}, the model's has {tuple(ref.shape)}"
        if v.dtype != ref.dtype and not (self.dtype is not None and v.dtype == self.dtype and ref.is_floating_point()):
            return f"{name!r} has dtype {v.dtype}, the model's has {ref.dtype}"
        if v.device != ref.device and not ref.is_meta:
            return f"{name!r} is on {v.device}, the model's is on {ref.device}"
        return None

    def _mismatch_message(self, problems: list[str], given: AbcMapping) -> str:
        msg = (
            f"{self.role}_state does not fit the {self.role} {type(self.model).__name__}: "
            + "; ".join(problems[:6])
            + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
            + "."
        )
        return (
            msg
            + self._swapped_hint(given)
            + (
                f" Pass funcdistill.state({self.role}), or tensors with the model's shapes, dtypes and devices"
                + (" (or teacher_dtype)" if self.dtype is not None else "")
                + "; to change the model's dtype or device, convert the model (model.to(...))."
            )
        )

    def _unexpected_message(self, unexpected: list[str], given: AbcMapping) -> str:
        msg = (
            f"{self.role}_state has {len(unexpected)} key(s) that are not parameters "
            f"or buffers of the {self.role} {type(self.model).__name__}: "
            + ", ".join(repr(k) for k in unexpected[:5])
            + (" ..." if len(unexpected) > 5 else "")
            + "."
        )
        close = difflib.get_close_matches(unexpected[0], list(self.live), n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        hint = self._swapped_hint(given)
        return msg + (
            hint
            or (
                f" Pass funcdistill.state({self.role}); if these are the other model's "
                "names, teacher_state and student_state look swapped."
            )
        )

    def _swapped_hint(self, given: AbcMapping) -> str:
        """The "look swapped" hint: only for a state that fits the other model and not this one."""
        other = self.other
        if other is None or not other._fits(given) or self._fits(given):
            return ""
        return (
            f" This looks like the {other.role}'s state (every entry has a name, shape, dtype and "
            f"device of the {other.role}'s): teacher_state and student_state look swapped."
        )

    def _fits(self, given: AbcMapping) -> bool:
        """Every entry of ``given`` is one of this model's, as a call checks it (payload entries aside)."""
        names = [k for k in given if isinstance(k, str) and not k.startswith(f"{_payloads.PREFIX}.")]
        names = [k for k in names if k not in self.ignored]
        return bool(names) and all(k in self.live and self._problem(k, given[k]) is None for k in names)


def _same_specs(values: list[torch.Tensor], refs: list[torch.Tensor]) -> bool:
    """Whether each of ``values`` has the dtype, shape and device of the tensor at its position in ``refs``.

    Three list comparisons at C level, one attribute at a time: half the cost of
    comparing ``(shape, dtype, device)`` tuples, which builds a tuple per tensor
    and compares device objects inside them (dtypes are singletons, compared by
    identity). Raises ``AttributeError`` for a ``None`` among ``refs``.

    Example:
        >>> a, b = torch.zeros(2, 3), torch.zeros(3, 2)
        >>> _same_specs([a, b], [torch.ones(2, 3), torch.ones(3, 2)]), _same_specs([a, b], [b, a])
        (True, False)
    """
    return (
        list(map(_DTYPE, values)) == list(map(_DTYPE, refs))
        and list(map(_SHAPE, values)) == list(map(_SHAPE, refs))
        and list(map(_DEVICE, values)) == list(map(_DEVICE, refs))
    )


def _detached_view(v: torch.Tensor, live: torch.Tensor | None) -> bool:
    """Whether ``v`` is a detached view of ``live``, a tensor that requires grad (``state_dict()``'s values)."""
    if live is None or not live.requires_grad or v.requires_grad:
        return False
    try:
        return v.data_ptr() == live.data_ptr() != 0 and v.shape == live.shape
    except RuntimeError:  # no storage (a tensor subclass such as DTensor): not a plain detached view
        return False


def _all_names(model: nn.Module) -> frozenset[str]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return frozenset(names)
