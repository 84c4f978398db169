"""Recorded random augmentation: ``K`` draws per sample of a pure ``augment(x, generator)``.

FKD-style (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022): the build augments every sample ``K`` times and
stores the teacher outputs of each draw; training picks a draw and replays
exactly the augmented input those outputs belong to. A draw is identified by
the seed of the CPU :class:`torch.Generator` it was made with,
``seed * 2**40 + index * K + draw``, which the cache stores next to the
outputs. ``augment`` must be pure: its result may depend only on ``x`` and on
what it draws from the generator (no global random state), so the same seed
gives the same input, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
MAX_SEED = 1 << 22
_SPAN = 1 << 40


def check_seed(seed: Any) -> int:
    """The build's augmentation seed, checked."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}), got {seed!r}.")
    return seed


def seeds(seed: int, first: int, count: int, draws: int) -> torch.Tensor:
    """The generator seeds of samples ``first .. first + count - 1``, one column per draw (``int64``).

    Example:
        >>> seeds(0, 10, 2, 3).tolist()
        [[30, 31, 32], [33, 34, 35]]
    """
    if (first + count) * draws >= _SPAN:
        raise ValueError(f"too many samples x draws for recorded augmentation ({(first + count) * draws} >= 2**40).")
    rows = torch.arange(first, first + count, dtype=torch.int64)[:, None] * draws
    return seed * _SPAN + rows + torch.arange(draws, dtype=torch.int64)


def apply(augment: Augment, x: torch.Tensor, seed: int) -> torch.Tensor:
    """``augment(x, generator)`` with a CPU generator seeded with ``seed``."""
    out = augment(x, torch.Generator().manual_seed(seed))
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"augment(x, generator) must return a tensor, got {type(out).__name__}; it gets one input "
            "sample and returns its augmented version."
        )
    return out


def replay(augment: Augment, x: torch.Tensor, draw_seeds: torch.Tensor) -> torch.Tensor:
    """The augmented inputs of a batch: ``augment(x[b], generator seeded with draw_seeds[b])``, stacked.

    Example:
        >>> def jitter(x, g):
        ...     return x + torch.rand(x.shape, generator=g)
        >>> x = torch.zeros(2, 3)
        >>> torch.equal(replay(jitter, x, torch.tensor([5, 7])), replay(jitter, x, torch.tensor([5, 7])))
        True
    """
    return torch.stack([apply(augment, xb, s) for xb, s in zip(x, draw_seeds.tolist())])


def name(augment: Augment) -> str:
    """``module.qualname`` of the augmentation, recorded in the cache and checked when it is opened."""
    module = getattr(augment, "__module__", None) or type(augment).__module__
    qualname = getattr(augment, "__qualname__", None) or type(augment).__qualname__
    return f"{module}.{qualname}"
