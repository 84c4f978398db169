"""Explicit model state: ``{qualified_name: tensor}`` dicts, and how a call checks and uses them."""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Mapping as AbcMapping
from itertools import repeat
from operator import attrgetter, getitem, is_
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from funcdistill import _payloads
from funcdistill._tensors import levels

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
    if torch.compiler.is_compiling():  # traced once: no plan (Dynamo would guard on the cache)
        out = dict(module.named_parameters())
        if buffers:
            out.update(module.named_buffers())
    else:
        plan = _PLANS.get(module)
        try:
            if plan is None or not plan.valid():
                raise KeyError
            out = plan.read(buffers)
        except KeyError:  # a new model, or its tree or names changed: a new plan
            plan = _PLANS[module] = _Plan(module)
            out = plan.read(buffers)
    if mapping is not None:
        for i, payload in _payloads.stateful_modules(mapping.payload()):
            for name, t in state(payload, buffers=buffers).items():
                out[_payloads.key(i, name)] = t
    return out


def uncached_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`state` returns, without keeping a plan for ``module``.

    For modules that must not be kept alive by the plan cache: a plan holds the
    submodules, so a module whose submodules refer back to it (a shadow, through
    its hooks) would never be freed from the cache's weak keys.
    """
    return _Plan(module).read(True)


_NONE_ID = id(None)
_SPEC = attrgetter("shape", "dtype", "device")
_TRAINING = attrgetter("training")


class _Plan:
    """Where a module tree keeps its tensors, and a check that the tree is still so.

    :func:`state` reads the tensors through the plan (C-level ``map`` over the
    live ``_parameters``/``_buffers`` dicts) instead of walking the module tree.
    The plan is used only while the tree has the same submodules and the same
    parameter, buffer and submodule names as when it was made: :meth:`valid`
    checks the submodules and the size of every name table, and :meth:`read`
    finds every name it expects (a ``KeyError`` otherwise), so the names are
    the same sets. :func:`state` thus returns what ``named_parameters()`` and
    ``named_buffers()`` would, whatever happened to the model in between.
    """

    __slots__ = ("_child_tables", "_child_keys", "_children", "_tables", "_sizes", "_params", "_buffers")

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
        self._buffers = _entries(modules, "_buffers")

    def valid(self) -> bool:
        """Same submodules under the same names, and name tables of the same sizes."""
        try:
            same_children = all(map(is_, map(getitem, self._child_tables, self._child_keys), self._children))
        except KeyError:
            return False
        return same_children and list(map(len, self._tables)) == self._sizes

    def read(self, buffers: bool) -> dict[str, torch.Tensor]:
        """The live tensors by name (raises ``KeyError`` when a name it expects is gone)."""
        out = _read(*self._params)
        if buffers:
            out.update(_read(*self._buffers))
        return out


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


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
            names.append(prefix + k)
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


class StateSpec:
    """What a model's forward needs, checked against the state a caller passes.

    Built once per model at ``distill`` time from the module the forward runs on
    (its names) and the live model (where each tensor lives now). For a call,
    :meth:`swaps` checks the caller's state entry by entry (name, shape,
    dtype, device; all problems in one message) and returns only the entries
    that differ from the tensors the runner already holds, completed from the
    live model and with the buffers of training-mode modules cloned (unless
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
        "ignored",
        "other",
        "grad_check",
        "_names",
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
    ):
        self.role = role
        self.model = model
        self.dtype = dtype
        self.clone_buffers = clone_buffers
        self.other: StateSpec | None = None  # the other model's spec, for "looks swapped"
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
        # the live tensor of each canonical name, as parallel lists for C-level checks
        self._names = [n for n in self.live if self.canonical[n] == n]
        self._tables = [self.live[n][1] for n in self._names]
        self._attrs = [self.live[n][2] for n in self._names]
        # names of the live model that the forward does not use (FX drops them)
        self.ignored = _all_names(model) - frozenset(self.live)

    def live_tensor(self, name: str) -> torch.Tensor:
        _, table, attr = self.live[name]
        return table[attr]

    def swaps(self, given: Any, held: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The entries to swap into a runner, by canonical name.

        ``held`` is what the runner holds: ``own`` (name -> tensor), ``own_list``
        (the tensors of :attr:`canonical` names, in order) and ``meta`` (the
        names it holds on the meta device).

        Returns the swaps and the names of the training-mode modules' buffers
        that were cloned for the call.
        """
        if not isinstance(given, AbcMapping):
            raise TypeError(
                f"{self.role}_state must be a dict of name -> tensor "
                f"(funcdistill.state({self.role})), got {type(given).__name__}."
            )
        own = held.own
        swaps: dict[str, torch.Tensor] = {}
        if (
            given
            and not torch.compiler.is_compiling()
            and list(map(id, given.values())) == held.state_ids
            and list(given) == held.state_keys
        ):
            pass  # funcdistill.state(model) itself: the runner holds every one of these tensors
        elif given:
            try:
                swaps = {k: v for k, v in given.items() if own[k] is not v}
            except (KeyError, TypeError):
                given = self._known(given)
                swaps = {k: v for k, v in given.items() if own[k] is not v}
            if swaps and not self._all_fit(swaps, held):
                swaps = self._checked(swaps, given)
            elif self.tied:
                swaps = self._checked(swaps, given)
            if swaps and self.grad_check and not next(iter(swaps.values())).requires_grad:
                self._check_detached(swaps)  # a rare path: the first entry given does not require grad
        if len(given) < len(own):
            self._fill(given, held, swaps)
        cloned = []
        if self.clone_buffers and self.buffer_owners and self._any_training():
            for name, owner in self.buffer_owners:
                if owner.training:
                    t = swaps.get(name)
                    swaps[name] = (own[name] if t is None else t).clone()
                    cloned.append(name)
        if self.dtype is not None:
            self._cast(own, swaps)
        return swaps, cloned

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

    def _all_fit(self, swaps: dict[str, Any], held: Any) -> bool:
        """The fast check: every swapped entry is a tensor like the runner's, which is the live model's."""
        if torch.compiler.is_compiling():
            return False  # the per-entry check traces as well as any
        values = list(swaps.values())
        refs = list(map(held.own.__getitem__, swaps))
        return (
            all(map(isinstance, values, repeat(torch.Tensor)))
            and list(map(_SPEC, values)) == list(map(_SPEC, refs))
            and all(map(is_, map(getitem, self._tables, self._attrs), held.own_list))
        )

    def buffers(self, swaps: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The buffers a call ran with (updated in place by the forward), by every name."""
        return {n: swaps.get(self.canonical[n], own[n]) for n in self.buffer_names}

    def _fill(self, given: Any, held: Any, swaps: dict[str, torch.Tensor]) -> None:
        """Entries left out come from the live model: swap those it no longer shares with the runner."""
        own = held.own
        if not given and all(map(is_, map(getitem, self._tables, self._attrs), held.own_list)):
            missing_meta = held.meta  # the runner holds the live tensors already
        else:
            missing_meta = []
            for name, table, attr in zip(self._names, self._tables, self._attrs):
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
        for name in self._names:
            t = swaps.get(name)
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
