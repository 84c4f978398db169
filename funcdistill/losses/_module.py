"""The base of the loss modules: a functional loss with its keyword options bound.

Each loss module (:class:`~funcdistill.losses.KDLoss`,
:class:`~funcdistill.losses.GeneralizedJSDLoss`, ...) is a functional loss whose
keyword options are fixed when the module is built. :class:`LossModule` does
that one way for all of them: it checks the options at construction (so a bad
one fails where the module is built, with the function's message), keeps them
immutable, shows them in the ``repr``, and passes them to the function at each
call. Submodules a loss carries (an adapter, the heads of CRD) are its *parts*:
registered as children, so they train with the student as a payload's
parameters, and free to be replaced like any submodule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from funcdistill.losses._checks import check_positive, check_reduction

__all__: list[str] = []

Check = Callable[[str, str, Any], None]
"""``check(loss, name, value)``: raise a TypeError or ValueError that names ``loss`` and ``name``."""

check_temperature: Check = functools.partial(check_positive, allow_tensor=True)
"""A positive number, or a 0-d tensor (one value per call; a vmapped sweep gives each its own)."""


def reduction_in(valid: tuple[str, ...]) -> Check:
    """The check of a ``reduction`` option that must be one of ``valid``.

    Example:
        >>> reduction_in(("mean", "sum"))("MyLoss", "reduction", "none")
        Traceback (most recent call last):
        ...
        ValueError: MyLoss: reduction must be one of 'mean', 'sum', got 'none'.
    """

    def check(loss: str, name: str, value: Any) -> None:
        check_reduction(loss, value, valid)

    return check


def check_module(example: str, *, optional: bool = False) -> Check:
    """The check of a part: an ``nn.Module`` (or ``None`` when ``optional``), such as ``example``."""
    kinds = "an nn.Module or None" if optional else "an nn.Module"

    def check(loss: str, name: str, value: Any) -> None:
        if not isinstance(value, nn.Module) and not (optional and value is None):
            raise TypeError(f"{loss}: {name} must be {kinds} (e.g. {example}), got {type(value).__name__}.")

    return check


class LossModule(nn.Module):
    """Base of the loss modules: a loss function with its keyword options bound.

    A subclass sets ``_function`` (the functional loss), ``_checks`` (its
    options' and parts' checks, run in order at construction) and ``_parts``
    (the names that are submodules rather than options), and its ``__init__``
    passes every option and part by keyword, in the order of its ``repr``.
    Calling the module calls ``_function(*inputs, **kwargs, **options)``.

    Example:
        >>> import torch
        >>> from funcdistill.losses import mse_loss
        >>> class MSE(LossModule):
        ...     _function = staticmethod(mse_loss)
        ...     _checks = (("reduction", reduction_in(("mean", "sum"))),)
        ...     def __init__(self, *, reduction="mean"):
        ...         super().__init__(reduction=reduction)
        >>> loss = MSE(reduction="sum")
        >>> loss, float(loss(torch.zeros(2), torch.ones(2))), loss.options
        (MSE(reduction='sum'), 2.0, {'reduction': 'sum'})
        >>> loss.reduction = "mean"
        Traceback (most recent call last):
        ...
        AttributeError: MSE's options are immutable: cannot set 'reduction'. Make a new MSE.
    """

    _function: ClassVar[Callable[..., Any]]
    _checks: ClassVar[tuple[tuple[str, Check], ...]] = ()
    _parts: ClassVar[tuple[str, ...]] = ()
    _option_names: tuple[str, ...]

    def __init__(self, **options: Any):
        super().__init__()
        loss = type(self).__name__
        for name, check in self._checks:
            check(loss, name, options[name])
        for name, value in options.items():
            setattr(self, name, value)
        self.__dict__["_option_names"] = tuple(name for name in options if name not in self._parts)

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options passed to the loss function at each call, by name."""
        return {name: getattr(self, name) for name in self._option_names}

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        return type(self)._function(*inputs, **kwargs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={_shown(value)}" for name, value in self.options.items())

    def __setattr__(self, name: str, value: Any) -> None:
        _refuse_option(self, name, "set")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        _refuse_option(self, name, "delete")
        super().__delattr__(name)


def _refuse_option(module: LossModule, name: str, what: str) -> None:
    if name in module.__dict__.get("_option_names", ()):
        loss = type(module).__name__
        raise AttributeError(f"{loss}'s options are immutable: cannot {what} {name!r}. Make a new {loss}.")


def _shown(value: Any) -> str:
    """An option in a ``repr``: a string quoted, a number or a 0-d tensor as its value."""
    return repr(value) if isinstance(value, str) else f"{value}"


class TokenLossModule(LossModule):
    """A token-level loss with its options bound, called as ``loss(teacher_logits, student_logits, mask, labels)``.

    The base of the token divergences' modules and of the losses at aligned positions across tokenizers.
    """

    def forward(
        self,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().forward(teacher_logits, student_logits, mask=mask, labels=labels)
