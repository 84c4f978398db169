"""Names of the points a mapping can refer to, and the errors for bad ones.

A *point* of a model is where a mapping pair reads an output:

* ``''``: the whole model (its final output);
* a qualified submodule name (``'features.5.conv'``), as in ``named_modules()``;
* for a :class:`torch.fx.GraphModule`, also the name of any graph node
  (``'features_18_0'``, ``'add_3'``) except placeholders and the output node.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from funcdistill._point import Point, canonical
from funcdistill._roles import Role, model_name, other_role, swapped

__all__: list[str] = []


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every qualified submodule name of ``model`` (``''`` included) to its module."""
    return dict(model.named_modules(remove_duplicate=False))


def node_names(model: nn.Module) -> list[str]:
    """FX node names that can be captured, or ``[]`` when ``model`` is not a GraphModule."""
    graph = getattr(model, "graph", None)
    if graph is None or not _is_graph_module(model):
        return []
    return [n.name for n in graph.nodes if n.op not in ("placeholder", "output")]


def _is_graph_module(model: nn.Module) -> bool:
    from torch.fx import GraphModule

    return isinstance(model, GraphModule)


def point_names(model: nn.Module) -> list[str]:
    """All names :func:`resolve` accepts for ``model``, modules first."""
    names = list(module_names(model))
    seen = set(names)
    names += [n for n in node_names(model) if n not in seen]
    return names


def unknown_name_message(name: str, role: Role, model: nn.Module, other: nn.Module | None) -> str:
    """Say that ``name`` is not a point of ``model`` and how to fix it."""
    valid = point_names(model)
    msg = f"{role} {model_name(model)} has no module or node named {name!r}."
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    if other is not None and name in point_names(other):
        msg += " " + swapped(f"{name!r} is a module of the {other_role(role)}")
    if not close:
        shown = ", ".join(repr(n) for n in valid[:8])
        more = "" if len(valid) <= 8 else f", ... ({len(valid)} in all)"
        msg += f" Valid names: {shown}{more}; '' is the whole model."
    return msg


def resolve(point: Any, role: Role, model: nn.Module | None, other: nn.Module | None) -> str | Point:
    """Turn a name, a module reference or a :class:`Point` into a validated point.

    A plain point comes back as its name (a string); a :class:`Point` with another
    ``io``, ``call`` or ``arg`` as a Point whose name is resolved.

    Args:
        point: a qualified name, an FX node name, ``''``, a submodule of ``model``, or a
            :class:`Point` of one of these.
        role: ``"teacher"`` or ``"student"``, for messages.
        model: the model the point belongs to, or ``None`` when unknown yet
            (then only names are accepted and they are checked later).
        other: the other model, to detect swapped arguments.

    Raises:
        TypeError: ``point`` is neither a string nor an ``nn.Module``.
        ValueError: the name or module does not belong to ``model``.
    """
    if isinstance(point, Point):
        resolved = point.with_name(str(resolve(point.name, role, model, other)))
        if model is not None:
            _check_point(resolved, role, model)
        return canonical(resolved)
    if isinstance(point, str):
        if model is not None and point not in _name_set(model):
            raise ValueError(unknown_name_message(point, role, model, other))
        return point
    if isinstance(point, nn.Module):
        if model is None:
            raise ValueError(
                f"cannot resolve the {role} module reference {model_name(point)} "
                "without the models: build the mapping as Mapping(teacher, student), "
                "or give the module's qualified name as a string."
            )
        found = _qualified_name(model, point)
        if found is not None:
            return found
        msg = f"the {role} module {model_name(point)} is not a submodule of the {role} {model_name(model)}."
        if other is not None and _qualified_name(other, point) is not None:
            msg += " " + swapped(f"It belongs to the {other_role(role)}")
        else:
            msg += " Pass a module of that model, or its qualified name as a string."
        raise ValueError(msg)
    raise TypeError(
        f"a {role} point must be a module name (str), an nn.Module or a funcdistill.Point, got {type(point).__name__}."
    )


def _check_point(point: Point, role: Role, model: nn.Module) -> None:
    """Check what a :class:`Point` reads against the module it names."""
    name = str(point.name)
    module = module_names(model).get(name)
    if module is None:  # an FX node: it has one value, computed once
        if point.io == "input":
            raise ValueError(
                f"{point!r}: {name!r} is a node of the {role} {model_name(model)}'s graph, not a module, "
                "so it has no input to read; map the node that computes that input instead."
            )
        return
    if isinstance(point.arg, str):
        params = forward_parameters(module)
        if params is not None and point.arg not in params:
            close = difflib.get_close_matches(point.arg, params, n=1, cutoff=0.5)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{point!r}: the forward of the {role}'s {model_name(module)} at {name!r} has no "
                f"parameter {point.arg!r}. {hint}Its parameters: {', '.join(map(repr, params))}."
            )


def _name_set(model: nn.Module) -> set[str]:
    return set(point_names(model))


def _qualified_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return name
    return None


def forward_signature(module: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``module.forward``, or ``None`` when it has no signature."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def forward_parameters(module: nn.Module) -> list[str] | None:
    """The parameter names of ``module.forward``, or ``None`` when it takes ``**kwargs`` or has no signature."""
    params = forward_signature(module)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
