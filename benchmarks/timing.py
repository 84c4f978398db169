"""Interleaved, paired timing: every candidate runs once per round, in a shuffled order.

A ratio is taken *within* a round (candidate time / reference time of that
round) and the median over rounds is reported, so slow phases of a busy machine
hit both sides of a ratio alike. Absolute times are kept only as context.

>>> t = paired_rounds({"a": lambda: None, "b": lambda: None}, rounds=3, inner=2)
>>> sorted(t), len(t["a"])
(['a', 'b'], 3)
>>> summary = ratio(t, "a", "a")
>>> summary["median"], summary["rounds"]
(1.0, 3)
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["paired_rounds", "ratio"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paired_rounds(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int,
    inner: int = 1,
    warmup: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per round.

    Args:
        candidates: name -> a callable running one step.
        rounds: number of paired rounds.
        inner: calls per candidate and round (their mean is the round's time).
        warmup: untimed calls of each candidate first.
        seed: seed of the per-round shuffles of the running order.
        device: ``"cuda..."`` synchronises before reading the clock.
    """
    if rounds < 1 or inner < 1:
        raise ValueError(f"rounds and inner must be >= 1, got rounds={rounds}, inner={inner}.")
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    _sync(device)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            fn = candidates[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def ratio(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """Median and quartiles over rounds of ``times[name] / times[reference]``."""
    per_round = sorted(a / b for a, b in zip(times[name], times[reference]))
    q = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
    return {
        "median": round(statistics.median(per_round), 3),
        "p25": round(q[0], 3),
        "p75": round(q[2], 3),
        "rounds": len(per_round),
    }
