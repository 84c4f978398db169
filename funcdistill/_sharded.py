"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): gathering their state per unit.

``fully_shard`` turns a module into an *FSDP unit*: its parameters become
``DTensor`` shards (``Shard(0)`` over a 1-D device mesh; with HSDP, over one
dimension of a 2-D mesh and replicated over the other) and forward hooks
all-gather them before the unit runs and free them after. Those hooks work on
the module's own parameters, so a stateless call with other tensors (a state
dict, ``torch.func.grad``'s tracked copies) cannot go through them.

A shadow (:mod:`funcdistill._shadow`) of a sharded model runs the plain
module classes without FSDP's hooks, and :class:`Units` does their work on the
state of the call instead: before a unit's forward it gathers the unit's
``DTensor`` entries into full tensors (one all-gather per tensor, straight
into its own buffer), and after it puts the ``DTensor`` entries back, so the
full tensors live only while the unit runs (unless autograd saves them for
backward: a student's stay until its backward). Units after a
truncated teacher's deepest mapped point never run, so they are never gathered.

The gather is differentiable (:class:`_Gather`, an ``autograd.Function`` with
``setup_context``, so it also runs under ``torch.func.grad``): the gradient of
each gathered tensor is reduce-scattered and divided by the mesh size, as
FSDP2 does, and comes back as a ``DTensor`` with the parameter's placements.
Each rank runs on its own inputs (data parallel over the mesh), so the
gradient is that of the mean of the ranks' losses. A unit's
``MixedPrecisionPolicy`` applies as in FSDP2's forward (inputs and shards cast
to ``param_dtype``, gradients reduced in ``reduce_dtype``, outputs cast to
``output_dtype``).
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn

from funcdistill import _tensor_parallel
from funcdistill._tensors import cast_floating, levels

__all__: list[str] = []

_FSDP = "torch.distributed.fsdp"
_MIXED = "mixed torch.Tensor and DTensor"
_Slot = tuple[dict, str, str]  # a shadow's _parameters dict, the key in it, the entry's qualified name


def _fsdp() -> Any:
    """The FSDP package when it has been imported (no model can be sharded before), else ``None``."""
    return sys.modules.get(_FSDP)


def check(model: nn.Module, role: str) -> None:
    """Raise for a sharded model funcdistill cannot run.

    FSDP1 wrappers, and ``DTensor`` parameters placed other than FSDP2 and
    tensor parallelism place them (:func:`funcdistill._tensor_parallel.check_placement`).
    """
    fsdp = _fsdp()
    if fsdp is None and sys.modules.get("torch.distributed.tensor") is None:
        return
    specs = _tensor_parallel.fsdp_specs(model) if fsdp is not None else {}
    for name, m in model.named_modules():
        where = f"at {name!r}" if name else f"({_plain_name(m)})"
        if fsdp is not None and isinstance(m, fsdp.FullyShardedDataParallel):
            raise TypeError(
                f"the {role} is wrapped in FullyShardedDataParallel {where}, FSDP1, whose flat parameters "
                "a state dict cannot address; funcdistill runs FSDP2 models: shard the unwrapped "
                "model with torch.distributed.fsdp.fully_shard (per block, then the root) instead."
            )
        for key, p in m._parameters.items():
            if _is_dtensor(p):
                entry = f"{name}.{key}" if name else key
                _tensor_parallel.check_placement(p, role, entry, m, specs.get(entry))


def units(shadow: nn.Module, model: nn.Module) -> Units | None:
    """The FSDP units of ``model`` on its ``shadow``, made plain modules; ``None`` if it is not sharded."""
    fsdp = _fsdp()
    if fsdp is None:
        return None
    live = dict(model.named_modules(remove_duplicate=False))
    names = [name for name, m in live.items() if isinstance(m, fsdp.FSDPModule)]
    if not names:
        return None
    shadows = dict(shadow.named_modules(remove_duplicate=False))
    units = Units(_plain_name(model), _tensor_parallel.fsdp_specs(model))
    for name in names:
        units.add(name, shadows[name], _unit_slots(name, live, shadows), _policy(live[name]))
    return units


def reraise(error: Exception, role: str) -> None:
    """A clearer error for a sharded parameter used outside its unit's forward."""
    if _MIXED in str(error):
        raise RuntimeError(
            f"the {role} used a parameter of an FSDP unit outside that unit's forward ({error}). "
            "funcdistill gathers a unit's parameters only while the unit runs, as FSDP2 does: shard "
            "modules whose parameters are used only inside their own forward (for example the "
            "decoder blocks and the root), or leave the module that shares them unsharded."
        ) from error


def _unit_slots(name: str, live: dict[str, nn.Module], shadows: dict[str, nn.Module]) -> list[_Slot]:
    """The shadow's parameter slots that the unit ``name`` gathers (those of nested units excluded)."""
    from torch.distributed.fsdp import FSDPModule

    prefix = f"{name}." if name else ""
    nested = [f"{n}." for n, m in live.items() if n != name and n.startswith(prefix) and isinstance(m, FSDPModule)]
    slots = []
    for sub, m in live.items():
        if (sub == name or sub.startswith(prefix)) and not any(f"{sub}.".startswith(n) for n in nested):
            table = shadows[sub]._parameters
            slots += [
                (table, key, f"{sub}.{key}" if sub else key) for key, p in m._parameters.items() if _is_dtensor(p)
            ]
    return slots


def _policy(module: nn.Module) -> Any:
    """The unit's ``MixedPrecisionPolicy`` (``None`` when FSDP keeps it elsewhere)."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    return getattr(_get_module_fsdp_state(module), "_mp_policy", None)


def fsdp_placements_ok(p: Any) -> bool:
    """Whether ``p`` is placed as FSDP2 places a plain parameter: one ``Shard``, ``Replicate`` elsewhere (HSDP)."""
    from torch.distributed.tensor import Replicate, Shard

    kinds = [type(x) for x in p.placements]
    return kinds.count(Shard) == 1 and all(k in (Shard, Replicate) for k in kinds)


def _strip_fsdp(module: nn.Module) -> None:
    """Make a shadow of an FSDP module a plain module: its original class, without FSDP's forward hooks."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    module.__class__ = cast("type[nn.Module]", next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)))
    for table in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in table.items() if _fsdp_hook(h, FSDPState)]:
            del table[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def _fsdp_hook(hook: Any, state_type: type) -> bool:
    """Whether ``hook`` is FSDP's: a method of its state, or a wrapper of one (group hooks)."""
    owner = getattr(hook, "__self__", None) or getattr(getattr(hook, "__wrapped__", None), "__self__", None)
    return isinstance(owner, state_type)


class Units:
    """The FSDP units of one shadow: hooks that gather each unit's entries while it runs.

    A unit's pre-forward hook replaces its ``DTensor`` entries in the shadow's
    ``_parameters`` by full tensors and its post-forward hook puts back what
    was there (the call's shards); :meth:`release` puts the shadow's own
    tensors back in the slots of units a stop left gathered.
    """

    __slots__ = ("model", "stack", "tp")

    def __init__(self, model: str, tp: dict[str, Any] | None = None):
        self.model = model  # the model's class name, for messages
        self.tp = tp or {}  # the tensor-parallel spec of an entry FSDP2 shards on top of TP (2-D meshes)
        self.stack: list[tuple[list[_Slot], list[Any], list[Any]]] = []  # (slots, before, own) of running units

    def add(self, name: str, module: nn.Module, slots: list[_Slot], policy: Any) -> None:
        """Make ``module`` (the shadow of the unit ``name``) a plain module that gathers ``slots`` while it runs.

        ``policy``: the unit's ``MixedPrecisionPolicy``, applied as FSDP2 does (floating inputs
        cast to ``param_dtype``, shards cast before the gather, gradients reduced in
        ``reduce_dtype``, outputs cast to ``output_dtype``).
        """
        _strip_fsdp(module)
        param_dtype = getattr(policy, "param_dtype", None)
        if slots:  # first among the hooks, so the module's other hooks see full tensors
            gather, restore = self._hooks(name, slots, param_dtype, getattr(policy, "reduce_dtype", None))
            module.register_forward_pre_hook(gather, prepend=True)
            module.register_forward_hook(restore, prepend=True)
        if param_dtype is not None and policy.cast_forward_inputs:
            module.register_forward_pre_hook(
                lambda m, a, k: cast_floating((a, k), param_dtype), prepend=True, with_kwargs=True
            )
        if getattr(policy, "output_dtype", None) is not None:
            module.register_forward_hook(lambda m, a, out: cast_floating(out, policy.output_dtype), prepend=True)

    def _hooks(self, name: str, slots: list[_Slot], param_dtype: Any, reduce_dtype: Any) -> tuple[Any, Any]:
        own = [table[key] for table, key, _ in slots]
        specs = [self.tp.get(entry) for _, _, entry in slots]

        def gather(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"funcdistill does not compile FSDP-sharded models (the {self.model}): call the "
                    "distill function eagerly and compile the loss that takes its pairs."
                )
            before = [table[key] for table, key, _ in slots]
            bases = [_base(v) for v in before]
            if not any(map(_is_dtensor, bases)) and all(map(_is_fake, bases)):  # the shape-only dry run
                self.stack.append(([], [], []))
                return
            plain = [entry for (_, _, entry), b in zip(slots, bases) if not _is_dtensor(b)]
            if plain:
                raise ValueError(_unsharded_message(self.model, name, plain))
            self.stack.append((slots, before, own))
            first: dict[int, int] = {}  # a tensor under several names (tied) is gathered once
            index = [first.setdefault(id(v), len(first)) for v in before]
            unique = list({id(v): (v, b, tp) for v, b, tp in zip(before, bases, specs)}.values())
            tp = [s for _, _, s in unique]
            full = gather_full([v for v, _, _ in unique], [b for _, b, _ in unique], param_dtype, reduce_dtype, tp)
            placed = _tensor_parallel.as_tensor_parallel(full, tp) if self.tp else full
            for (table, key, _), i in zip(slots, index):
                table[key] = placed[i]

        def restore(module: nn.Module, args: Any, output: Any) -> None:
            done, before, _ = self.stack.pop()
            for (table, key, _), t in zip(done, before):
                table[key] = t

        return gather, restore

    def release(self) -> None:
        """After a call: the shadow's own tensors back in the slots of units left gathered (an early stop)."""
        while self.stack:
            slots, _, own = self.stack.pop()
            for (table, key, _), t in zip(slots, own):
                table[key] = t


def _unsharded_message(model: str, unit: str, entries: list[str]) -> str:
    return (
        f"the FSDP unit {unit!r} of the {model} got plain tensors, not DTensor shards, for "
        + ", ".join(map(repr, entries[:4]))
        + (" ..." if len(entries) > 4 else "")
        + ". FSDP2 leaves a root unit unsharded after a forward outside backward (an evaluation under "
        "no_grad, say), and funcdistill.state() then returns those tensors: call reshard() on the "
        "model's FSDP modules first ([m.reshard() for m in model.modules() if isinstance(m, FSDPModule)]), "
        "or pass the DTensor shards."
    )


def _plain_name(model: nn.Module) -> str:
    """The class name of ``model`` without FSDP's wrapper class."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _base(t: Any) -> Any:
    """``t`` without ``torch.func`` wrappers (the tensor a transform tracks)."""
    return levels(t)[-1]


class _Layout(NamedTuple):
    """Where one shard sits in the gathered buffer, and the dtypes it is gathered and reduced in."""

    spec: Any  # the DTensor's spec (mesh, placements, global shape, dtype)
    mesh_dim: int  # the mesh dimension it is sharded over (the others replicate it)
    dim: int  # the sharded dimension
    local: torch.Size  # this rank's shard (after moving ``dim`` first)
    rows: int  # rows per rank, padded (ceil(full / mesh size))
    full: int  # rows gathered: the global size, or the tensor-parallel shard's on a 2-D (FSDP x TP) mesh
    replicas: tuple[int, ...]  # the other FSDP mesh dimensions (HSDP's replicas), all-reduced over
    ranks: int  # the data-parallel ranks the gradient is the mean over
    param_dtype: torch.dtype  # gathered and computed in
    reduce_dtype: torch.dtype  # gradients reduced in


def gather_full(
    values: list[Any],
    bases: list[Any],
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    tp: list[Any] | None = None,
) -> list[torch.Tensor]:
    """Full tensors for DTensor shards ``values`` (``bases``: the DTensors under any ``torch.func`` wrapper).

    Floating shards are cast to ``param_dtype`` before they are gathered and their gradients
    reduced in ``reduce_dtype`` (default: the dtype they are gathered in), as FSDP2's mixed
    precision does. ``tp``: each tensor's tensor-parallel spec (2-D meshes; ``None`` for a
    plain parameter): it is gathered over FSDP's mesh dimensions only, into this rank's
    tensor-parallel shard. One ``_Gather`` per mesh, placement and dtype.
    """
    out = list(values)
    specs = tp or [None] * len(values)
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(bases):
        key = (b.device_mesh, b.placements, b.dtype, None if specs[i] is None else specs[i].mesh.ndim)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        layouts = tuple(_layout(bases[i], param_dtype, reduce_dtype, specs[i]) for i in idx)
        for i, full in zip(idx, _Gather.apply(layouts, *[values[i] for i in idx])):
            out[i] = full
    return out


def _layout(d: Any, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None, tp: Any = None) -> _Layout:
    mesh = d.device_mesh
    fsdp = mesh.ndim - (0 if tp is None else tp.mesh.ndim)  # FSDP2 puts its mesh dimensions first
    mesh_dim = next(i for i in range(fsdp) if not d.placements[i].is_replicate())
    dim = d.placements[mesh_dim].dim % d.ndim
    n = mesh.size(mesh_dim)
    local = d._local_tensor.movedim(dim, 0).shape
    full = d.shape[dim] if tp is None else _tensor_parallel.local_shape(tp)[dim]
    compute = param_dtype if param_dtype is not None and d.dtype.is_floating_point else d.dtype
    reduce = reduce_dtype if reduce_dtype is not None and d.dtype.is_floating_point else compute
    replicas = tuple(i for i in range(fsdp) if i != mesh_dim)
    ranks = math.prod(mesh.size(i) for i in range(fsdp))
    return _Layout(d._spec, mesh_dim, dim, local, -(-full // n), full, replicas, ranks, compute, reduce)


class _Gather(torch.autograd.Function):
    """All-gather a unit's shards into full tensors; backward: reduce-scatter the gradients, averaged.

    One all-gather per tensor over the mesh dimension it is sharded on, straight into the
    tensor's own buffer (no copy out of a shared one), so a unit's gather holds little more than
    the unit; the backward packs the gradients into one reduce-scatter, then (HSDP) one
    all-reduce per replicating mesh dimension, and divides by the mesh size. On a mesh of one
    rank a shard is the whole tensor: nothing is moved.
    """

    @staticmethod
    def forward(layouts: tuple[_Layout, ...], *shards: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        with torch._C._DisableFuncTorch():
            mesh, mesh_dim = layouts[0].spec.mesh, layouts[0].mesh_dim
            n = mesh.size(mesh_dim)
            device = _device(shards[0]._local_tensor, mesh)
            if n == 1:  # the shard is the whole tensor (a view of it: a new tensor object)
                return tuple(
                    s._local_tensor.to(device, lay.param_dtype).view_as(s._local_tensor)
                    for s, lay in zip(shards, layouts)
                )
            gather = _collective("all_gather_single", "all_gather_into_tensor")
            fulls = []
            for s, lay in zip(shards, layouts):
                part = _padded(s._local_tensor.movedim(lay.dim, 0), lay.rows).to(device, lay.param_dtype)
                out = part.new_empty((n * lay.rows, *part.shape[1:]))
                gather(out, part, group=mesh.get_group(mesh_dim))
                fulls.append(out[: lay.full].movedim(0, lay.dim))
            return tuple(fulls)

    @staticmethod
    def vmap(info: Any, in_dims: Any, layouts: Any, *shards: Any) -> Any:
        raise RuntimeError(
            "funcdistill cannot run an FSDP-sharded model under torch.func.vmap (each rank gathers one "
            "set of shards); vmap a model that is not sharded, or loop over the batch of states."
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.layouts = inputs[0]
        ctx.devices = [_base(s)._local_tensor.device for s in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:  # type: ignore[override]
        grads = tuple(None if g is None else _first_order(g) for g in grads)
        layouts = ctx.layouts
        with torch._C._DisableFuncTorch():
            mesh, mesh_dim = layouts[0].spec.mesh, layouts[0].mesh_dim
            n = mesh.size(mesh_dim)
            if layouts[0].ranks == 1:
                return (None, *(_shard_of(g, lay, d) for g, lay, d in zip(grads, layouts, ctx.devices)))
            parts = []
            device = _mesh_device(mesh)
            for g, lay in zip(grads, layouts):
                shape = (lay.full, *lay.local[1:])
                g = (
                    torch.zeros(shape, dtype=lay.reduce_dtype, device=device)
                    if g is None
                    else g.movedim(lay.dim, 0).to(lay.reduce_dtype)
                )
                parts.append(_padded(g, n * lay.rows).reshape(n, -1))
            flat = torch.cat(parts, dim=1).contiguous()
            if n == 1:
                out = flat.flatten()
            else:
                out = flat.new_empty(flat.shape[1])
                scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
                scatter(out, flat.flatten(), group=mesh.get_group(mesh_dim))
            for replicated in (d for d in layouts[0].replicas if mesh.size(d) > 1):
                dist.all_reduce(out, group=mesh.get_group(replicated))  # HSDP: sum over the replicas too
            out /= layouts[0].ranks  # the mean over every data-parallel rank of the mesh
            shards, offset = [], 0
            for lay, device in zip(layouts, ctx.devices):
                size = lay.rows * math.prod(lay.local[1:])
                local = out[offset : offset + size].view(lay.rows, *lay.local[1:])[: lay.local[0]]
                offset += size
                shards.append(_shard_of(local.movedim(0, lay.dim), lay, device))
        return (None, *shards)


def _shard_of(local: torch.Tensor | None, lay: _Layout, device: torch.device) -> Any:
    """The gradient shard ``local`` as a DTensor placed like the parameter (``None`` stays ``None``)."""
    from torch.distributed.tensor import DTensor

    if local is None:
        return None
    local = local.contiguous().to(device, lay.spec.tensor_meta.dtype).detach()  # the parameter's own dtype
    return DTensor(local, lay.spec, requires_grad=False)


def _collective(name: str, old: str) -> Any:
    """``torch.distributed.<name>``, or its older name (torch 2.13 renamed the flat collectives)."""
    return getattr(dist, name, None) or getattr(dist, old)


def _first_order(g: torch.Tensor) -> torch.Tensor:
    """The plain tensor under the one ``torch.func.grad`` wrapper a first-order gradient may carry."""
    under = levels(g)
    if len(under) > 2:
        raise RuntimeError(
            "funcdistill cannot differentiate twice (nested torch.func transforms) through the gather "
            "of an FSDP-sharded model's shards; take first-order gradients of it."
        )
    return under[-1]


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (itself when it has them)."""
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _device(local: torch.Tensor, mesh: Any) -> torch.device:
    """Where the mesh computes (shards offloaded to the CPU are moved there to be gathered)."""
    return local.device if local.device.type == mesh.device_type else _mesh_device(mesh)


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
