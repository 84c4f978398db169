"""A :class:`Point`: where in a model a mapping pair reads its value.

A point is a module (by name or reference, ``''`` for the whole model) or an
FX node, plus *what* is read there (the module's output or its input) and
*which call* (a module can run several times in one forward: weight-shared
layers, recurrent cells, a block reused at several depths).

A plain name means ``Point(name)``: the output of a module that runs exactly
once. A :class:`~funcdistill.Mapping` keeps such points as their names, so
``Mapping.names`` and reprs look as they always did; a point with another
``io``, ``call`` or ``arg`` stays a :class:`Point`.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from torch import nn

from funcdistill._frozen import Frozen, init

__all__ = ["Point"]

IO = ("output", "input")
ALL = "all"


class Point(Frozen):
    """A place in a model where a mapping pair reads a value; usable wherever a point name is.

    Args:
        name: a qualified module name (``'encoder.layer.0'``), ``''`` for the
            whole model, a module reference (resolved to its name by
            :meth:`Mapping.add <funcdistill.Mapping.add>`), or the name of a node of a
            :class:`torch.fx.GraphModule`.
        io: ``"output"`` (default): what the module returns. ``"input"``: what
            it is called with, read before it runs (so a truncated teacher
            stops *before* that module): its positional input, the tensor itself
            when there is exactly one, else the tuple of them.
        call: which call of a module that runs several times in one forward.
            ``None`` (default): the module must run exactly once. An ``int``
            ``k``: the ``k``-th call (0-based; negative counts from the end, as
            in a list). ``"all"``: a tuple with one entry per call, in order.
        arg: with ``io="input"``, one argument instead of the positional
            input: an ``int`` is a position among the positional arguments; a
            ``str`` is a parameter name of the module's ``forward``, found
            whether the caller passed it by position or by keyword (this is how
            to read keyword inputs such as ``attention_mask``).

    A truncated teacher stops right after the last call it needs. ``call=k``
    with ``k >= 0`` is known in advance; ``call="all"`` and negative ``k``
    need the whole forward (the number of calls is known only at its end).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``io`` is not ``"output"``/``"input"``, ``call`` is a string
            other than ``"all"``, or ``arg`` is given without ``io="input"``.

    Example:
        >>> Point("encoder.layer", call=2)
        Point('encoder.layer', call=2)
        >>> Point("lm_head", io="input") == Point("lm_head", io="input")
        True
        >>> Point("layer", io="input", arg="attention_mask")
        Point('layer', io='input', arg='attention_mask')
    """

    __slots__ = ("name", "io", "call", "arg")
    _immutable_hint = " Make a new Point."
    name: str | nn.Module
    """The module or node: a name, or a module reference before the mapping resolves it."""
    io: Literal["output", "input"]
    """``"output"`` or ``"input"``."""
    call: int | Literal["all"] | None
    """``None`` (exactly one call), a call index, or ``"all"``."""
    arg: int | str | None
    """With ``io="input"``: one argument (position or ``forward`` parameter name), or ``None``."""

    def __init__(
        self,
        name: str | nn.Module,
        *,
        io: Literal["output", "input"] = "output",
        call: int | Literal["all"] | None = None,
        arg: int | str | None = None,
    ):
        _check(name, io, call, arg)
        init(self, name=name, io=io, call=call, arg=arg)

    @property
    def whole_forward(self) -> bool:
        """Whether the value is known only at the end of the forward (``call="all"`` or negative)."""
        return self.call == ALL or (isinstance(self.call, int) and self.call < 0)

    @property
    def plain(self) -> bool:
        """Whether this is just ``name``: the output of a module that runs once."""
        return self.io == "output" and self.call is None

    def with_name(self, name: str) -> Point:
        """The same point at another name (a module reference resolved to its name)."""
        return Point(name, io=self.io, call=self.call, arg=self.arg)

    def _key(self) -> tuple:
        name = self.name if isinstance(self.name, str) else ("<module>", id(self.name))
        return (name, self.io, self.call, self.arg)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Point):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(("Point", *self._key()))

    def __repr__(self) -> str:
        name = self.name if isinstance(self.name, str) else f"<{type(self.name).__name__}>"
        parts = [repr(name)]
        if self.io != "output":
            parts.append(f"io={self.io!r}")
        if self.call is not None:
            parts.append(f"call={self.call!r}")
        if self.arg is not None:
            parts.append(f"arg={self.arg!r}")
        return f"Point({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.name, self.io, self.call, self.arg))


def _rebuild(name: Any, io: Any, call: Any, arg: Any) -> Point:
    return Point(name, io=io, call=call, arg=arg)


def _check(name: Any, io: Any, call: Any, arg: Any) -> None:
    if not isinstance(name, (str, nn.Module)):
        raise TypeError(f"Point(name) must be a module name (str) or an nn.Module, got {type(name).__name__}.")
    if io not in IO:
        close = difflib.get_close_matches(str(io), IO, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Point(io=...) must be 'output' or 'input', got {io!r}.{hint}")
    if isinstance(call, str):
        if call != ALL:
            raise ValueError(
                f"Point(call=...) must be None, an int call index or 'all', got {call!r}; "
                "'all' gives a tuple with one entry per call."
            )
    elif call is not None and (isinstance(call, bool) or not isinstance(call, int)):
        raise TypeError(f"Point(call=...) must be None, an int call index or 'all', got {type(call).__name__}.")
    if arg is None:
        return
    if io != "input":
        raise ValueError(
            f"Point(arg={arg!r}) selects one input argument, so it needs io='input' (got io={io!r}); "
            "an output has no arguments."
        )
    if isinstance(arg, bool) or not isinstance(arg, (int, str)):
        raise TypeError(
            f"Point(arg=...) must be a position (int) or a forward() parameter name (str), got {type(arg).__name__}."
        )
    if isinstance(arg, int) and arg < 0:
        raise ValueError(f"Point(arg={arg}) must be a position >= 0 among the positional arguments.")


def as_point(point: str | Point) -> Point:
    """``point`` as a :class:`Point` (a plain name is ``Point(name)``)."""
    return point if isinstance(point, Point) else Point(point)


def canonical(point: Point) -> str | Point:
    """The form a mapping keeps: a plain point as its name, any other as the Point."""
    assert isinstance(point.name, str)  # internal: resolved before this is called
    return point.name if point.plain else point
