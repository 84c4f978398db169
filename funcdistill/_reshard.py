"""Resharding a student unit after its forward: its gathered tensors freed, and gathered again for its backward.

FSDP2 frees a unit's unsharded parameters after the unit's forward
(``reshard_after_forward``, on by default for every unit but the root) and
all-gathers them again just before the unit's backward, so a rank never
holds the whole model gathered. funcdistill does the same for the units it
gathers (:mod:`funcdistill._sharded`), on the call's state and without FSDP's
hooks:

- after a unit's forward, the storage of each tensor its gather made is
  resized to zero bytes (the tensors themselves stay, so what autograd saved
  for the backward keeps pointing at them);
- a hook on the unit's outputs (and on values a tap reads inside the unit)
  runs when their gradient arrives, before autograd reaches the unit's own
  backward: it gives each storage its bytes back and all-gathers the shards
  into it again (in the dtype they were gathered in), then lets go of them.

Tensor hooks run in a ``.backward()`` loop and under ``torch.func.grad``
alike (the refill works on the tensors under ``torch.func``'s wrappers, with
the version counters kept, so autograd does not see an in-place change).
Only a unit whose outputs carry a gradient is freed; the teacher runs under
``no_grad`` and keeps freeing its units as before. A unit on a mesh dimension
of one rank gathers nothing, so there is nothing to free.
"""

from __future__ import annotations

from typing import Any

import torch

from funcdistill import _sharded
from funcdistill._pytree import tree_leaves
from funcdistill._tensors import levels

__all__: list[str] = []


def after_forward(module: Any, *, root: bool) -> bool:
    """Whether FSDP2 would free the FSDP unit ``module``'s gathered parameters after its forward.

    Its ``reshard_after_forward``: ``True`` (or a group size: resharded here
    to the whole mesh dimension) unless set ``False``; a root unit (one no
    other unit holds) left at the default is not resharded, as FSDP2 decides
    on its first forward. Read at each call, so ``set_reshard_after_forward``
    takes effect at the next one.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    state = _get_module_fsdp_state(module)
    if state is None:
        return False
    if root and getattr(state, "_auto_reshard_after_forward", True):
        return False
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch releases with one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return any(g.post_forward_mesh_info is not None for g in groups)


class Refill:
    """The tensors one call of a unit gathered: freed after its forward, gathered again for its backward.

    ``fulls``: the gathered tensors (as the unit uses them); ``shards``: the
    ``DTensor`` each was gathered from (under any ``torch.func`` wrapper);
    ``param_dtype``: the unit's mixed-precision compute dtype, if any;
    ``tp``: each tensor's tensor-parallel spec (2-D meshes), as gathered.
    Tensors of a mesh dimension of one rank are left out (they share the
    shard's storage), and so are empty ones. A tensor's storage says its
    state: zero bytes while freed.
    """

    __slots__ = ("items",)

    def __init__(self, fulls: list[Any], shards: list[Any], param_dtype: torch.dtype | None, tp: list[Any]):
        self.items: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        for full, shard, spec in zip(fulls, shards, tp):
            lay = _sharded._layout(shard, param_dtype, None, spec)
            if lay.spec.mesh.size(lay.mesh_dim) > 1 and full.numel():
                plain = levels(full)[-1]
                buffer = plain if plain._base is None else plain._base  # the gather's padded buffer
                if full.requires_grad:  # its gradient complete: the unit's backward is done with it
                    full.register_hook(self._freer(len(self.items)))
                self.items.append((buffer, shard._local_tensor, lay))

    def __bool__(self) -> bool:
        return bool(self.items)

    def arm(self, value: Any) -> bool:
        """Hook the refill on the tensors of ``value`` that carry a gradient; whether any does."""
        armed = False
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._fill)
                armed = True
        return armed

    def free(self) -> None:
        """Give back the gathered tensors' memory (their storage shrinks to zero bytes)."""
        for i in range(len(self.items)):
            self._free(i)

    def _freer(self, i: int) -> Any:
        return lambda grad: self._free(i)

    def _free(self, i: int) -> None:
        with torch._C._DisableFuncTorch():
            self.items[i][0].untyped_storage().resize_(0)

    def _fill(self, *_: Any) -> None:
        """All-gather the shards into the freed storages again (those not freed are left as they are).

        Under ``torch.func.grad`` autograd keeps the graph, and what it saved,
        until the transform returns, so each tensor is freed again once its
        gradient is complete (a second backward through the graph refills it).
        """
        gather = _sharded._collective("all_gather_single", "all_gather_into_tensor")
        with torch._C._DisableFuncTorch(), torch.no_grad():
            for buffer, local, lay in self.items:
                storage = buffer.untyped_storage()
                if storage.nbytes():
                    continue
                mesh = lay.spec.mesh
                part = _sharded._padded(local.movedim(lay.dim, 0), lay.rows)
                part = part.to(_sharded._device(local, mesh), lay.param_dtype)
                storage.resize_(buffer.numel() * buffer.element_size())
                with torch.autograd._unsafe_preserve_version_counter(buffer):
                    gather(buffer, part, group=mesh.get_group(lay.mesh_dim))
