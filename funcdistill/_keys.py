"""The stable key of a teacher point: a canonical string of its fields, not its ``repr``.

Teacher outputs made outside a call name the teacher points they hold by these
keys (:class:`~funcdistill._outputs.BuiltFor` ``.keys``), and a distill function's
points are matched by them. A cache writes them in ``index.json`` (``points``,
and ``point`` in each layout entry). The key is the point's name as a JSON
string, then each field that is not its default, in the order ``io``,
``call``, ``arg``, as `` field=<JSON value>``::

    ""                                            the whole model's output
    "encoder.layer.0"                             a module's output (a plain name, or Point with defaults)
    "head" io="input"                             Point("head", io="input")
    "blocks.0" call="all"                         Point("blocks.0", call="all")
    "layer" io="input" call=-1 arg="attention_mask"

This format is part of the cache's file format (its version is in
``cache._store.VERSION``): it is defined here only, and does not change when
:class:`~funcdistill.Point`'s ``repr`` does. :func:`display` gives the
``repr`` of the point for messages.
"""

from __future__ import annotations

import json
from typing import Any

from funcdistill._point import Point

__all__: list[str] = []

_FIELDS = ("io", "call", "arg")
_DEFAULTS = {"io": "output", "call": None, "arg": None}
_DECODER = json.JSONDecoder()


def point_key(point: Any) -> str:
    """The stable key of a teacher point (a name or a :class:`~funcdistill.Point` with a resolved name).

    Example:
        >>> point_key("encoder.layer.0")
        '"encoder.layer.0"'
        >>> point_key(Point("layer", io="input", call=2, arg="attention_mask"))
        '"layer" io="input" call=2 arg="attention_mask"'
    """
    if isinstance(point, str):
        return json.dumps(point)
    if not isinstance(point, Point) or not isinstance(point.name, str):
        raise TypeError(f"a teacher cache keys points by name; cannot key {point!r}.")
    fields = [json.dumps(point.name)]
    for field in _FIELDS:
        value = getattr(point, field)
        if value != _DEFAULTS[field]:
            fields.append(f"{field}={json.dumps(value)}")
    return " ".join(fields)


def parse_key(key: str) -> str | Point:
    """The point a key names: a plain name (``str``) when every field is its default, else a Point.

    Raises:
        ValueError: ``key`` is not a key :func:`point_key` writes.

    Example:
        >>> parse_key('"head" io="input"')
        Point('head', io='input')
    """
    if not isinstance(key, str):
        raise ValueError(f'{key!r} is not a teacher point key (a string such as \'"name" io="input"\').')
    try:
        name, at = _DECODER.raw_decode(key)
        fields: dict[str, Any] = {}
        while at < len(key):
            field, sep, _ = key[at + 1 :].partition("=")
            if key[at] != " " or not sep or field not in _FIELDS:
                raise ValueError
            fields[field], at = _DECODER.raw_decode(key, at + len(field) + 2)
        point: str | Point = Point(name, **fields)
    except (ValueError, TypeError):
        raise ValueError(f'{key!r} is not a teacher point key (such as \'"name" io="input" call=2\').') from None
    if isinstance(point, Point) and point.plain and point.arg is None:
        point = name
    if point_key(point) != key:  # fields out of order, defaults written out, other spacing or escapes
        raise ValueError(f"{key!r} is not in the canonical form of a teacher point key ({point_key(point)!r}).")
    return point


def display(key: str) -> str:
    """How messages show the point of a key: its ``repr`` (``'head'``, ``Point('head', io='input')``).

    Example:
        >>> display('"head" io="input"'), display('""')
        ("Point('head', io='input')", "''")
    """
    return repr(parse_key(key))
