"""The one immutability idiom of the package: slotted values whose fields are set once.

:class:`Frozen` subclasses declare their fields in ``__slots__``, set them in
``__init__`` (or a private builder) with :func:`init`, and refuse every later
assignment or deletion with a message that says how to get an updated value.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__: list[str] = []


class Frozen:
    """Base of the immutable values: :class:`~funcdistill.Mapping`, distill functions, bound payloads."""

    __slots__ = ()
    _immutable_hint: ClassVar[str] = ""
    """What to do instead of assigning, appended to the error message."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{_what(self)} is immutable: cannot set {name!r}.{self._immutable_hint}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{_what(self)} is immutable: cannot delete {name!r}.{self._immutable_hint}")


def init(obj: Frozen, **fields: Any) -> None:
    """Set the fields of a :class:`Frozen` value that is being built."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


def _what(obj: Frozen) -> str:
    return getattr(type(obj), "_immutable_name", type(obj).__name__)
