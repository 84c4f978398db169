"""The distillation model that the shim's ``distill`` context hands out.

A stateful ``nn.Module`` around one :func:`funcdistill.distill` function built
with the private ``funcdistill._distill.distill_inplace`` (training-mode
modules update the buffers they run with, in place): each forward runs it on
the models' own tensors (an empty state dict means "every entry from the live
model", the very tensors :func:`funcdistill.state` returns, without building
the dict), so ``loss.backward()`` fills ``.grad`` and BatchNorm updates its
running statistics in place, as in plain training.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from funcdistill import DistillFn, Pair
from funcdistill import Mapping as FunctionalMapping
from funcdistill._distill import distill_inplace
from funcdistill._roles import model_name

__all__: list[str] = []


class DistillationModel(nn.Module):
    """Teacher and student glued into one model that returns paired outputs.

    Its forward runs the teacher and the student on the same inputs and
    returns a list of ``(teacher_output, student_output, payload)`` tuples
    (:class:`funcdistill.Pair`), one per mapping pair, in mapping order; each
    payload is the object put in the mapping.

    Its submodules are the student (``.student``) and the payloads that are
    modules (``.payloads``; a payload that shares a parameter with the teacher,
    such as the teacher's own classifier, is left out), so ``parameters()``
    are the student's and the adapters'; the teacher is reachable as
    ``.teacher`` but is not a submodule: ``parameters()``, ``state_dict()``,
    ``.to()`` and ``.train()`` leave it out.

    Made by :class:`funcdistill.compat.distill`; usable only inside its context.

    It can be copied (:func:`copy.deepcopy`, :mod:`pickle`, :func:`torch.save`).
    A copy made inside the context runs on copies of the teacher, the student
    and the payloads, outside any context (nothing closes it), and
    ``loss.backward()`` on it fills ``.grad`` of the copied student only. A
    copy of a model whose context has exited stays closed. A student wrapped in
    DistributedDataParallel cannot be copied, nor therefore this model.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, mapping: FunctionalMapping, *, nograd_teacher: bool):
        super().__init__()
        self.student = student
        self._student: nn.Module
        object.__setattr__(self, "_student", student)  # the same, as a plain attribute
        self.payloads = nn.ModuleList(_trainable_payloads(mapping.payload(), teacher))
        self._teacher: nn.Module
        object.__setattr__(self, "_teacher", teacher)  # kept out of the submodules
        self._mapping = mapping
        self._nograd_teacher = nograd_teacher
        self._fns: dict[Any, DistillFn] = {}
        self._rebind = any(isinstance(p, nn.Module) for p in mapping.payload())
        # a plain attribute beside the submodule: the per-forward lookup skips nn.Module.__getattr__
        ddp = student if isinstance(student, nn.parallel.DistributedDataParallel) else None
        self._ddp_student: nn.parallel.DistributedDataParallel | None
        object.__setattr__(self, "_ddp_student", ddp)  # not a second submodule
        self._closed = False
        self._function()  # build now, so that errors show at __enter__

    @property
    def teacher(self) -> nn.Module:
        """The teacher (not a submodule of this model)."""
        return self._teacher

    @property
    def mapping(self) -> FunctionalMapping:
        """The :class:`funcdistill.Mapping` this model runs."""
        return self._mapping

    def forward(self, *args: Any, **kwargs: Any) -> list[Pair]:
        """Run teacher and student on the inputs; return the paired outputs."""
        if self._closed:
            raise RuntimeError(
                "this distillation model was used after its distill context exited; "
                "call it inside `with distill(teacher, student, mapping) as model:`, "
                "or enter a new distill context."
            )
        pairs = self._function()({}, {}, *args, **kwargs)
        if not self._rebind:
            return list(pairs)
        # the core binds adapter payloads to the call's state; hand back the objects put in the mapping
        return [Pair(p.teacher, p.student, payload) for p, payload in zip(pairs, self._mapping.payload())]

    def extra_repr(self) -> str:
        return (
            f"teacher={model_name(self._teacher)}, pairs={len(self._mapping)}, "
            f"nograd_teacher={self._nograd_teacher}, closed={self._closed}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # The built distill functions are derived state (and hold thread-local
        # capture state, which cannot be pickled): `_function()` rebuilds them.
        del state["_fns"]
        # A funcdistill.Mapping deep-copies its payloads but keeps its models, so
        # keep its pairs only; `__setstate__` puts them back over the copied models.
        mapping: FunctionalMapping = state.pop("_mapping")
        state["_mapping_pairs"] = (mapping.names, mapping.payload())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        names, payloads = state.pop("_mapping_pairs")
        super().__setstate__(state)
        mapping = FunctionalMapping(self._teacher, self._student)
        for (t, s), payload in zip(names, payloads):
            mapping = mapping.add(t, s, payload)
        self._mapping = mapping
        self._fns = {}

    def _close(self) -> None:
        self._closed = True
        self._fns.clear()

    def _function(self) -> DistillFn:
        # A distill function works on a snapshot of each model's Python attributes,
        # so keep one per value of the live flag it must follow: DDP's `no_sync()`
        # flips `require_backward_grad_sync` on the live wrapper. (The core itself
        # truncates an eval-mode teacher and runs one in training mode in full, so
        # that all its BatchNorm statistics update as in plain PyTorch.)
        ddp = self._ddp_student
        key = None if ddp is None else ddp.require_backward_grad_sync
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = distill_inplace(
                self._teacher, self._student, self._mapping, nograd_teacher=self._nograd_teacher
            )
        return fn


def _trainable_payloads(payloads: list[Any], teacher: nn.Module) -> list[nn.Module]:
    """Payload modules, once each, except those that share a parameter with the teacher."""
    teacher_params = {id(p) for p in teacher.parameters()}
    modules = dict.fromkeys(p for p in payloads if isinstance(p, nn.Module))
    return [m for m in modules if not any(id(p) in teacher_params for p in m.parameters())]
