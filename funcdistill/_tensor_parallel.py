"""Tensor-parallel models (``parallelize_module``): their placements, their layout hooks, full values.

``torch.distributed.tensor.parallel.parallelize_module`` makes a module's
parameters ``DTensor``\\ s placed ``Shard(dim)`` or ``Replicate()`` over a
device mesh and registers *layout hooks* on the module (the parallel style's
forward pre-hook and hook, defined in ``torch.distributed.tensor``) that turn
its inputs into ``DTensor``\\ s with the layouts the style wants and its
outputs back into local tensors. A shadow (:mod:`funcdistill._shadow`) keeps
those hooks, so a call on a state of ``DTensor`` entries runs as the model
does; with FSDP2 on top (a 2-D mesh), :mod:`funcdistill._sharded` gathers a
unit over FSDP's mesh dimension into the tensor-parallel ``DTensor`` the
module computes with (:func:`as_tensor_parallel`).

A :class:`Parallel` on a shadow makes the values of a call full tensors on
every rank: a ``DTensor`` leaf of a mapped value is gathered
(``full_tensor()``), and so is a local shard that a layout hook returned
(a ``ColwiseParallel`` output, by default ``use_local_output=True``), which
the hook's wrapper remembers by identity, weakly, with its placements. The
shape-only dry run (truncation's check) runs the shadow without layout hooks
on full-size fake tensors: the unsharded model. Its shapes also show a value
that is a local shard no hook returned (a sequence-parallel residual stream),
which is refused (:class:`Shapes`).

``torch.func`` transforms cannot run ``DTensor``'s autograd Functions
(``DTensor.from_local`` and the styles' redistributions: "an autograd.Function
... must override the setup_context staticmethod", torch 2.13). A teacher
run under ``no_grad`` inside ``torch.func.grad`` therefore runs outside the
transforms (their interpreters set aside, the tensors under their ``grad``
wrappers): its values are constants to the transform, as under ``no_grad``
they are. A differentiated tensor-parallel model is refused there
(:func:`refuse_under_transforms`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from funcdistill._pytree import tree_flatten, tree_map
from funcdistill._tensors import levels

__all__: list[str] = []

_TENSOR_PACKAGE = "torch/distributed/tensor/"


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (``False`` without importing it when nothing made one).

    Example:
        >>> is_dtensor(torch.ones(1))
        False
    """
    api = sys.modules.get("torch.distributed.tensor")
    return api is not None and isinstance(t, api.DTensor)


def layout_hook(hook: Any) -> bool:
    """Whether a module hook is a parallel style's (defined in ``torch.distributed.tensor``).

    Example:
        >>> layout_hook(lambda module, args: None)  # a user's hook
        False
    """
    code = getattr(hook, "__code__", None) or getattr(getattr(hook, "func", None), "__code__", None)
    return code is not None and _TENSOR_PACKAGE in code.co_filename.replace("\\", "/")


def styled(module: nn.Module) -> bool:
    """Whether ``module`` carries a parallel style's layout hooks."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(map(layout_hook, hooks))


def fsdp_specs(model: nn.Module) -> dict[str, Any]:
    """The tensor-parallel spec of each FSDP2 parameter that was a ``DTensor`` before ``fully_shard``.

    By qualified name: the ``DTensorSpec`` a gathered unit's tensor has (its
    tensor-parallel mesh and placements), what FSDP2 itself unshards into.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    by_id: dict[int, Any] = {}
    for m in model.modules():
        group = getattr(_get_module_fsdp_state(m), "_fsdp_param_group", None) if isinstance(m, FSDPModule) else None
        for fp in getattr(group, "fsdp_params", ()):
            spec = getattr(fp, "_unsharded_dtensor_spec", None)
            if spec is not None:
                by_id[id(fp.sharded_param)] = spec
    if not by_id:
        return {}
    return {
        f"{name}.{key}" if name else key: by_id[id(p)]
        for name, m in model.named_modules(remove_duplicate=False)
        for key, p in m._parameters.items()
        if id(p) in by_id
    }


def check_placement(p: Any, role: str, name: str, module: nn.Module, spec: Any = None) -> None:
    """Raise for a ``DTensor`` parameter placed in a way funcdistill does not run.

    ``spec``: for an FSDP2 parameter, its tensor-parallel spec (``None`` when
    it was a plain tensor: FSDP2's own placements are then all it has).
    Accepted: ``Shard(dim)`` and ``Replicate()`` on every tensor-parallel mesh
    dimension (a parameter no FSDP2 unit holds is tensor-parallel on every
    dimension).
    """
    from torch.distributed.tensor import Replicate, Shard

    from funcdistill._sharded import fsdp_placements_ok

    if spec is None and fsdp_placements_ok(p):
        return
    placements = tuple(p.placements if spec is None else spec.placements)
    bad = [x for x in placements if type(x) not in (Shard, Replicate)]
    if bad:
        owner = name.rpartition(".")[0]
        where = f"of module {owner!r} ({type(module).__name__})" if owner else f"of the {type(module).__name__}"
        raise ValueError(
            f"the {role} parameter {name!r} {where} is a DTensor placed {placements}; funcdistill runs "
            "tensor-parallel parameters placed Shard(dim) or Replicate() on each mesh dimension "
            "(parallelize_module's ColwiseParallel, RowwiseParallel, embedding and SequenceParallel "
            "styles), with FSDP2 (fully_shard) shards on top or alone. "
            f"{', '.join(dict.fromkeys(map(repr, bad)))} is not supported: redistribute the "
            "parameter to Shard or Replicate placements (param.redistribute(mesh, [Replicate()])) or "
            f"parallelize {repr(owner) if owner else 'the module'} with one of those styles."
        )


def local_shape(spec: Any) -> tuple[int, ...]:
    """This rank's shard shape of a ``DTensorSpec`` (its tensor-parallel shard)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return tuple(compute_local_shape_and_global_offset(spec.shape, spec.mesh, spec.placements)[0])


def as_tensor_parallel(full: list[torch.Tensor], specs: list[Any]) -> list[Any]:
    """FSDP2-gathered tensors as the tensor-parallel ``DTensor``\\ s of ``specs`` (plain where ``None``).

    Differentiable (``DTensor.from_local``): a gradient comes back as the local
    gradient of this rank's tensor-parallel shard.
    """
    from torch.distributed.tensor import DTensor

    return [
        t
        if spec is None
        else DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)
        for t, spec in zip(full, specs)
    ]


class Parallel:
    """The layout hooks of one shadow, and making a call's values full tensors.

    Args:
        module: the shadow's module tree (its hook dicts are its own copies).
        dry: for the shape-only dry run: remove the layout hooks, so the
            shadow runs as the unsharded model on full-size fake tensors.
    """

    __slots__ = ("module", "role", "shards")

    def __init__(self, module: nn.Module, role: str, *, dry: bool = False):
        self.module = module
        self.role = role
        self.shards: dict[int, tuple[weakref.ref, Any]] = {}  # id of a local shard -> (it, its DTensor spec)
        for m in module.modules():
            for table in (m._forward_pre_hooks, m._forward_hooks):
                for key, hook in list(table.items()):
                    if not layout_hook(hook):
                        continue
                    if dry:
                        del table[key]
                        m._forward_pre_hooks_with_kwargs.pop(key, None)
                        m._forward_hooks_with_kwargs.pop(key, None)
                    elif table is m._forward_hooks and key not in m._forward_hooks_with_kwargs:
                        table[key] = self._noting(hook)

    def _noting(self, hook: Callable) -> Callable:
        shards = self.shards

        def noted(module: nn.Module, args: Any, output: Any) -> Any:
            result = hook(module, args, output)
            before, after = tree_flatten(output)[0], tree_flatten(output if result is None else result)[0]
            if len(before) == len(after):
                for d, t in zip(before, after):
                    if is_dtensor(d) and isinstance(t, torch.Tensor) and not is_dtensor(t):
                        spec = _spec_of_local(d, t)
                        if spec is not None:
                            shards[id(t)] = (weakref.ref(t), spec)
            return result

        return noted

    def run(
        self, forward: Callable[[dict, tuple, dict], Any], values: Any, swaps: dict, args: tuple, kwargs: dict
    ) -> Any:
        """``forward(swaps, args, kwargs)``, then ``values`` (filled by the taps) and its output made full tensors.

        Inside ``torch.func`` transforms a forward under ``no_grad`` (a
        teacher's) runs with the transforms disabled, on the tensors under
        their ``grad`` wrappers; a differentiated one is refused.
        """
        from funcdistill._taps import Stop

        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"funcdistill does not compile tensor-parallel models (the {self.role}): call the distill "
                "function eagerly and compile the loss that takes its pairs."
            )
        nograd = not torch.is_grad_enabled()
        off = torch._C._are_functorch_transforms_active()
        if off:
            if not nograd:
                refuse_under_transforms(self.role, self.module)
            swaps, args, kwargs = unwrap((swaps, args, kwargs), self.role)
        self.shards.clear()
        try:
            with _outside_transforms() if off else contextlib.nullcontext():
                try:
                    output = forward(swaps, args, kwargs)
                except Stop:
                    self._finish(values, nograd)
                    raise
                self._finish(values, nograd)
                return self.full(output, nograd)
        finally:
            self.shards.clear()

    def _finish(self, values: dict[Any, Any] | None, nograd: bool) -> None:
        if values is not None:
            for point, value in values.items():
                values[point] = self.full(value, nograd)

    def full(self, value: Any, nograd: bool) -> Any:
        """``value`` with each ``DTensor`` leaf and each noted local shard gathered into a full tensor."""
        return tree_map(lambda t: self._full(t, nograd) if isinstance(t, torch.Tensor) else t, value)

    def _full(self, t: torch.Tensor, nograd: bool) -> torch.Tensor:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor
        from torch.distributed.tensor import DTensor

        noted = self.shards.get(id(t))
        if noted is not None and noted[0]() is t:
            spec = noted[1]
            t = DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if nograd and isinstance(t, AsyncCollectiveTensor):
            t = t.wait()  # a plain tensor for the transform the values go back to
        return t


def _spec_of_local(d: Any, t: torch.Tensor) -> Any:
    """The spec of the ``DTensor`` whose local tensor a layout hook returned as ``t`` (``d``: its output).

    ``None`` when ``t`` is the full value (a replicated output). The hook
    redistributes ``d`` to the style's output layouts, then takes the local
    tensor: ``t`` is ``d``'s own local tensor when nothing moved, else this
    rank's shard of the one dimension whose shard has ``t``'s shape.
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    local = d._local_tensor
    if t.shape == local.shape and (t is local or t.data_ptr() == local.data_ptr()):
        return None if all(x.is_replicate() for x in d.placements) else d._spec
    if t.shape == d.shape or d.device_mesh.ndim != 1:
        return None
    found = [
        DTensorSpec(d.device_mesh, (Shard(i),), tensor_meta=d._spec.tensor_meta)
        for i in range(d.ndim)
        if local_shape(DTensorSpec(d.device_mesh, (Shard(i),), tensor_meta=d._spec.tensor_meta)) == tuple(t.shape)
    ]
    return found[0] if len(found) == 1 else None


def _outside_transforms() -> Any:
    """Run outside every active ``torch.func`` transform (its interpreters set aside, then put back)."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def unwrap(tree: Any, role: str) -> Any:
    """The tensors of ``tree`` without ``torch.func.grad`` wrappers (a no-grad run's inputs).

    ``vmap``'s batched tensors are refused: a tensor-parallel model runs one
    set of shards per rank.
    """
    functorch = torch._C._functorch

    def base(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        under = levels(t)
        if any(map(functorch.is_batchedtensor, under[:-1])):
            raise RuntimeError(
                f"funcdistill cannot run a tensor-parallel {role} under torch.func.vmap (each rank runs "
                "one set of DTensor shards); vmap a model that is not parallelized, or loop over the batch."
            )
        return under[-1]

    return tree_map(base, tree)


def refuse_under_transforms(role: str, model: nn.Module) -> None:
    """Raise for a differentiated tensor-parallel model inside a ``torch.func`` transform."""
    styled_modules = [n for n, m in model.named_modules() if styled(m)]
    name = styled_modules[0] if styled_modules else "?"
    raise RuntimeError(
        f"the {role} is tensor parallel (its module {name!r} has a parallel style) and is differentiated "
        "inside a torch.func transform, which cannot run DTensor's autograd Functions "
        "(DTensor.from_local and the parallel styles' redistributions fail with 'an autograd.Function "
        "... must override the setup_context staticmethod', torch 2.13). Differentiate it with "
        "loss.backward() instead (fn(...) on funcdistill.state(model), then loss.backward() and "
        "optimizer.step()); a teacher run under no_grad (nograd_teacher=True) works under torch.func.grad."
    )


class Shapes:
    """The unsharded model's shapes of a side's values, per input signature, and the check against them.

    A value that a layout hook did not return (a sum of local shards outside
    any style: a sequence-parallel residual stream) is a local shard that
    funcdistill cannot gather; its shape differs from the unsharded model's,
    which the shape-only dry run of a shadow without layout hooks gives.
    Where the dry run cannot run, nothing is checked.
    """

    __slots__ = ("_side", "_cache", "_lock", "_dry")

    def __init__(self, side: Any):
        self._side = side
        self._cache: dict[tuple, dict[Any, list[tuple[int, ...]]] | None] = {}
        self._lock = threading.Lock()
        self._dry: Any = None

    def check(self, values: dict[Any, Any], args: tuple, kwargs: dict) -> None:
        """Raise for a value whose shape is not the unsharded model's (a local shard)."""
        from funcdistill import _dryrun

        sig = _dryrun.signature(args, kwargs)
        if sig is None:
            return
        with self._lock:
            if sig not in self._cache:
                if len(self._cache) >= 1024:
                    self._cache.clear()
                specs = self._side._verdicts._fake_specs(sig)
                self._cache[sig] = cast(Any, _dryrun.count_calls(cast(Any, self._shapes), specs, sig))
            expected = self._cache[sig]
        for point, value in values.items():
            want = (expected or {}).get(point)
            got = [tuple(t.shape) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            if want is not None and len(want) == len(got) and want != got:
                i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                raise RuntimeError(
                    f"the {self._side.role}'s value at {point!r} is a local shard of a tensor-parallel "
                    f"model (shape {got[i]}; the unsharded model's is {want[i]}): the model computes it "
                    "from a parallel style's local outputs outside any style (a sequence-parallel residual "
                    "stream, say), so funcdistill cannot gather it. Map a point whose value a style returns "
                    "(a module with ColwiseParallel, RowwiseParallel or SequenceParallel, or the model's "
                    "replicated logits), or give the style use_local_output=False so it stays a DTensor."
                )

    def _shapes(self, fake_state: dict, args: tuple, kwargs: dict) -> dict[Any, list[tuple[int, ...]]]:
        from funcdistill._taps import CallRecord

        if self._dry is None:
            self._dry = self._side.new_shadow(dry=True)
        shadow = self._dry
        shadow.sync_modes()
        record = CallRecord(versions=False)
        output = shadow.run(record, fake_state, args, kwargs, functional=True)
        values = {**(record.values or {}), "": output}
        return {
            p: [tuple(t.shape) for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)] for p, v in values.items()
        }
