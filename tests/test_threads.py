"""Distill functions called from many threads: each thread's clones live only as long as the thread."""

from __future__ import annotations

import gc
import threading
import time

import torch
from torch import nn

import funcdistill as fd
from funcdistill import _shadow
from tests.models import mlp


def live_objects(*models: nn.Module) -> tuple[int, int]:
    """How many shadows (per-thread instrumented clones) and clones of ``models``' modules are alive.

    A clone shares its model's tensors, so a module holding one of ``models``' parameters is one of
    them or a clone: modules that other tests left for the garbage collector are not counted.
    """
    gc.collect()
    ids = {id(p) for m in models for p in m.parameters()}
    objects = gc.get_objects()
    return (
        sum(1 for o in objects if type(o) is _shadow.Shadow),
        sum(
            1
            for o in objects
            if issubclass(type(o), nn.Module)  # type(): no attribute read
            and any(id(p) in ids for p in o.__dict__.get("_parameters", {}).values())
        ),
    )


def settled(count, before: tuple[int, int], limit_s: float = 5.0) -> tuple[int, int]:
    """``count()`` once it equals ``before``, or after ``limit_s``: ``Thread.join`` returns before the
    interpreter frees the finished thread's state (its thread-local clones), so the last few threads'
    clones may take a moment to go. A leak never settles."""
    end = time.monotonic() + limit_s
    now = count()
    while now != before and time.monotonic() < end:
        time.sleep(0.05)
        now = count()
    return now


def run_in_threads(work, n: int, at_once: int = 8) -> list:
    """Run ``work(i)`` in ``n`` short-lived threads, ``at_once`` alive at a time; their results, in order."""
    results: list = [None] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(error)

    for start in range(0, n, at_once):
        threads = [threading.Thread(target=target, args=(i,)) for i in range(start, min(n, start + at_once))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return results


def test_a_threads_clones_are_freed_when_the_thread_ends():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 8, 8, 3)).eval(), mlp((4, 8, 8, 3))
    fn = fd.distill(t, s, fd.Mapping(t, s).add("2", "2").add("", ""))
    x = torch.randn(2, 4)
    run_in_threads(lambda i: fn({}, {}, x), 8)  # warm up: imports, caches and the like
    before = live_objects(t, s)
    run_in_threads(lambda i: fn({}, {}, x), 1000)
    after = settled(lambda: live_objects(t, s), before)
    # every thread made its own clones of both models; none may outlive its thread
    assert after == before, f"(shadows, modules) alive: {before} before 1,000 threads, {after} after"


def test_every_thread_gets_what_the_calling_thread_gets():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 8, 3)).eval(), mlp((4, 8, 3))
    fn = fd.distill(t, s, fd.Mapping(t, s).add("2", "0").add("", ""))
    xs = [torch.randn(3, 4) for _ in range(24)]
    states = [{k: v + 0.01 * i for k, v in fd.state(s).items()} for i in range(24)]
    expected = [fn(fd.state(t), states[i], xs[i]) for i in range(24)]
    got = run_in_threads(lambda i: fn(fd.state(t), states[i], xs[i]), 24)
    for want, pairs in zip(expected, got):
        for a, b in zip(want, pairs):
            # the same kernels on the same inputs, only from another Python thread: equal up to
            # the default float32 tolerance (nothing here is reduced in another order on purpose)
            torch.testing.assert_close(b.teacher, a.teacher)
            torch.testing.assert_close(b.student, a.student)


def test_a_distill_function_that_is_dropped_frees_its_clones():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 3)).eval(), mlp((4, 8, 3))
    x = torch.randn(2, 4)
    fd.distill(t, s, fd.Mapping(t, s).add("0", "0"))({}, {}, x)  # warm up
    before = live_objects(t, s)
    for _ in range(50):  # as the compat shim does: a new function for every `with distill(...)`
        fd.distill(t, s, fd.Mapping(t, s).add("0", "0"))({}, {}, x)
    assert live_objects(t, s) == before
