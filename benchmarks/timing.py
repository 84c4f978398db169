"""Interleaved, paired timing: every candidate runs once per round, in a shuffled order.

A ratio is taken *within* a round (candidate time / reference time of that
round) and the median over rounds is reported with its interquartile range, so
slow phases of a busy machine hit both sides of a ratio alike. Absolute times
are kept only as context. Every timing has at least :data:`MIN_ROUNDS` rounds,
and records the machine's load before and after it (:func:`machine_load`); a
goal is met only when the whole interquartile range is on its side
(:func:`verdict`).

>>> t = paired_rounds({"a": lambda: None, "b": lambda: None}, rounds=3, inner=2)
>>> sorted(t), len(t["a"])  # at least MIN_ROUNDS rounds
(['a', 'b'], 5)
>>> sorted(t.load)
['after', 'before']
>>> summary = ratio(t, "a", "a")
>>> summary["median"], summary["rounds"]
(1.0, 5)
>>> verdict({"median": 0.9, "p25": 0.85, "p75": 0.95}, 1.0), verdict({"median": 0.9, "p25": 0.8, "p75": 1.1}, 1.0)
('yes', 'within noise of the goal')
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MIN_ROUNDS",
    "NOISE",
    "Times",
    "fresh_process",
    "machine_load",
    "paired_rounds",
    "ratio",
    "summary",
    "verdict",
]

MIN_ROUNDS = 5
"""The fewest rounds a timing has: fewer give no meaningful interquartile range."""

NOISE = "within noise of the goal"
"""What :func:`verdict` says when the interquartile range straddles the goal."""


class Times(dict):
    """Seconds per call of each candidate, one entry per round; ``load``: the machine's load around the timing."""

    load: dict[str, Any]


def _busy_processes() -> int | None:
    """Processes other than this one that are running or runnable now (Linux ``/proc``), else ``None``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    busy, own = 0, os.getpid()
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        pid, _, rest = text.partition(" (")
        state = rest.rpartition(") ")[2][:1]
        busy += state == "R" and int(pid) != own
    return busy


def machine_load() -> dict[str, Any]:
    """The 1-minute load average and the number of other running processes, now.

    >>> sorted(machine_load())
    ['busy_processes', 'load_1min']
    """
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"load_1min": load, "busy_processes": _busy_processes()}


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
    """Seconds per call of each candidate, one entry per round, and the machine's load before and after.

    Args:
        candidates: name -> a callable running one step.
        rounds: number of paired rounds (at least :data:`MIN_ROUNDS` are run).
        inner: calls per candidate and round (their mean is the round's time).
        warmup: untimed calls of each candidate first.
        seed: seed of the per-round shuffles of the running order.
        device: ``"cuda..."`` synchronises before reading the clock.
    """
    if rounds < 1 or inner < 1:
        raise ValueError(f"rounds and inner must be >= 1, got rounds={rounds}, inner={inner}.")
    rounds = max(rounds, MIN_ROUNDS)
    before = machine_load()
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    _sync(device)
    rng = random.Random(seed)
    times = Times({name: [] for name in candidates})
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
    times.load = {"before": before, "after": machine_load()}
    return times


def summary(values: list[float], digits: int | None = None) -> dict[str, float]:
    """Median and quartiles of per-round values, and how many rounds.

    >>> summary([1.0, 2.0, 3.0, 4.0, 5.0])
    {'median': 3.0, 'p25': 2.0, 'p75': 4.0, 'rounds': 5}
    """
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else v * 3
    out = {"median": statistics.median(v), "p25": q[0], "p75": q[2]}
    if digits is not None:
        out = {k: round(x, digits) for k, x in out.items()}
    return {**out, "rounds": len(v)}


def ratio(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """Median and quartiles over rounds of ``times[name] / times[reference]``."""
    return summary([a / b for a, b in zip(times[name], times[reference])], 3)


def verdict(result: dict[str, float], limit: float, *, higher_is_better: bool = False) -> str:
    """Whether a timed result meets the goal ``<= limit`` (``>= limit`` when ``higher_is_better``).

    ``"yes"`` when the whole interquartile range meets it, ``"no"`` when none of
    it does, and :data:`NOISE` when the range straddles the goal: on this
    machine the rounds cannot tell.
    """
    low, high = result["p25"], result["p75"]
    if higher_is_better:
        low, high, limit = -high, -low, -limit
    if high <= limit:
        return "yes"
    if low > limit:
        return "no"
    return NOISE


def fresh_process(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS`` in a fresh process (``env`` added to this one's); the JSON on its last line.

    Each peak-memory case runs this way, so that one case's allocations never count in another's peak.
    """
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
