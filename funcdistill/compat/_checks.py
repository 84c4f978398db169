"""Matching the shim's mapping to the models given to ``distill``, DDP wrappers included.

A mapping may be built with a model and ``distill`` given the same model
wrapped in :class:`torch.nn.parallel.DistributedDataParallel`. The wrapper's
forward must run, because that is where DDP arranges the all-reduce of
gradients, so points are renamed to the model ``distill`` runs:
``'features.3'`` of the inner model is ``'module.features.3'`` of the wrapper.
The other way round (a mapping built for the wrapper, ``distill`` given the
inner model) is refused: it would silently skip the all-reduce.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from funcdistill import Mapping as FunctionalMapping
from funcdistill._distill import _check_models as check_core_models
from funcdistill._roles import check_distinct, model_name, other_role, swapped
from funcdistill.compat._mapping import Mapping

__all__: list[str] = []

_WRAPPED = "module"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, or ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def same_model(a: nn.Module | None, b: nn.Module | None) -> bool:
    """``a`` and ``b`` are one model, possibly one of them wrapped in DDP."""
    if a is None or b is None:
        return False
    return a is b or unwrap(a) is unwrap(b)


def check_models(teacher: Any, student: Any) -> None:
    """Types, and the same model given twice (also when one of them is its DDP wrapper)."""
    check_core_models(teacher, student)
    check_distinct(unwrap(teacher), unwrap(student))


def functional_mapping(mapping: Any, teacher: nn.Module, student: nn.Module) -> FunctionalMapping:
    """The :class:`funcdistill.Mapping` to run ``distill(teacher, student)`` with.

    Raises:
        TypeError: ``mapping`` is not a Mapping.
        ValueError: it was built for other models, or with the models swapped,
            or names a point its model does not have.
    """
    if mapping is None:
        return FunctionalMapping(teacher, student).add("", "")
    if isinstance(mapping, Mapping):
        mapping = mapping.to_functional()
    elif not isinstance(mapping, FunctionalMapping):
        raise TypeError(
            "distill(mapping=...) must be a funcdistill.compat.Mapping, a funcdistill.Mapping "
            f"or None, got {type(mapping).__name__}."
        )
    _check_built_for(mapping.teacher, mapping.student, teacher, student)
    out = FunctionalMapping(teacher, student)
    for (t, s), payload in zip(mapping.names, mapping.payload()):
        out = out.add(
            _rename(t, mapping.teacher, teacher, "teacher"),
            _rename(s, mapping.student, student, "student"),
            payload,
        )
    return out


def _check_built_for(mt, ms, teacher: nn.Module, student: nn.Module) -> None:
    if same_model(mt, student) and same_model(ms, teacher):
        raise ValueError(
            swapped(
                f"the mapping was built as Mapping(teacher={model_name(mt)}, student={model_name(ms)}), "
                f"but distill() got teacher={model_name(teacher)}, student={model_name(student)}, "
                "the same two models the other way round",
                fix="This API takes the teacher first (distill(teacher, student, mapping)); later releases of "
                "the reference library take the student first, so pass them by keyword: "
                "distill(teacher=..., student=..., mapping=...).",
                certain=True,
            )
        )
    for role, built, given in (("teacher", mt, teacher), ("student", ms, student)):
        if built is None or built is given or unwrap(given) is built:
            continue
        if unwrap(built) is given:
            raise ValueError(
                f"the mapping was built for the {model_name(built)} wrapper of the {role}, but "
                f"distill() got the model inside it: its forward would bypass the wrapper "
                f"(no gradient all-reduce). Pass the wrapper as distill({role}=...), or build "
                f"the mapping for the model inside it."
            )
        if same_model(built, student if role == "teacher" else teacher):
            raise ValueError(
                f"the mapping's {role} {model_name(built)} is the model passed to "
                f"distill() as {other_role(role)}; build the mapping as Mapping(teacher, student) with "
                f"the models distill() gets, teacher first."
            )
        raise ValueError(
            f"the mapping was built for another {role} ({model_name(built)} at "
            f"{id(built):#x}) than the {role} passed to distill() ({model_name(given)} "
            f"at {id(given):#x}); build the mapping with the models you distill."
        )


def _rename(point: str, built: nn.Module | None, given: nn.Module, role: str) -> str:
    """``point`` of ``built`` as a point of ``given``, which may be ``built``'s DDP wrapper."""
    if built is None or built is given or point == "":
        return point
    if point not in dict(built.named_modules()):
        raise ValueError(
            f"the {role} point {point!r} is an FX node of the model inside the "
            f"{model_name(given)} wrapper; nodes can be captured only on an unwrapped "
            "GraphModule. Map a module name instead."
        )
    return f"{_WRAPPED}.{point}"
