"""Fixtures and helpers shared by the tests (the tiny models are in ``tests/models.py``).

The ``seed`` fixture is not autouse: a file whose tests draw from the global
generator opts in with ``pytestmark = pytest.mark.usefixtures("seed")``, so
that each of its tests starts from the same draws whatever ran before it.
The helpers are plain functions, imported by name (``from tests.conftest
import close``).
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture
def seed() -> None:
    """Seed torch's global generator with 0 before the test."""
    torch.manual_seed(0)


def close(a, b, tol: float = 1e-5) -> None:
    """Assert ``a`` and ``b`` (tensors, numbers or lists) equal within ``tol``, absolute and relative, in float32."""
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol
    )


def value_and_grads(fn, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn(t, s)`` and its gradients with respect to ``t`` and ``s`` (both must require grad)."""
    value = fn(t, s)
    return (value, *torch.autograd.grad(value, (t, s)))


def flops(fn, *args, **kwargs) -> int:
    """The FLOPs that ``fn(*args, **kwargs)`` runs, counted by ``FlopCounterMode`` (exact: no timing)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a gloo process group's ``init_method``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int) -> None:
    """Join a gloo process group of ``world`` CPU ranks at ``port``; a spawned rank's first step (one thread)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a collective one rank never joins fails, not hangs 30 min
    )
