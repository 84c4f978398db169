"""The fused losses' compiled chunks: same values as the eager chunks, compiled once per shape family.

The compiled and the eager chunk run the same arithmetic in a different order
(Inductor fuses the softmax, the divergence and its gradient into loops over
each row and may reassociate the row sums), so they agree to float32 rounding,
not bit for bit: a relative 1e-5 on values of order 1 and gradients of order
1/tokens is a few hundred float32 ulps of a length-13 row sum, far below any
wrong-formula difference (the tests in test_losses_fused.py pin the formulas
on the eager chunks in float64). The compiled tests are few and small: a
compile costs seconds on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch.func import grad, grad_and_value, vmap

from funcdistill import losses as L
from funcdistill.losses import _compiled

pytestmark = pytest.mark.usefixtures("seed")

ROOT = Path(__file__).resolve().parent.parent
HT, HS, V = 6, 4, 13
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding of reordered row sums (see the module docstring)


def graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def heads(tokens: int):
    ht, hs = torch.randn(tokens, HT), torch.randn(tokens, HS)
    return ht, hs, torch.randn(V, HT), torch.randn(V, HS), torch.randn(V)


def jsd(ht, wt, compiled, **kw):
    def loss(h, w, b):
        return L.fused_linear_jsd_loss(ht, h, wt, w, student_bias=b, chunk_size=8, compiled=compiled, **kw)

    return loss


def test_compiled_must_be_a_bool_or_none():
    ht, hs, wt, ws, _ = heads(4)
    with pytest.raises(TypeError, match=r"fused_linear_jsd_loss: compiled must be True, False or None .*got str"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, compiled="yes")
    with pytest.raises(TypeError, match=r"fused_linear_topk_kl_loss: compiled must be True, False or None .*got int"):
        L.fused_linear_topk_kl_loss(*torch.randn(4, V).topk(3), hs, ws, compiled=1)


def test_which_calls_compile(monkeypatch):
    big = _compiled.MIN_COMPILED_LOGITS
    supported = torch._dynamo.is_dynamo_supported()
    assert [_compiled.use_compiled(c, n) for c, n in ((None, big - 1), (False, big), (True, 1))] == [
        False,
        False,
        supported,
    ]
    assert _compiled.use_compiled(None, big) is supported
    monkeypatch.setenv(_compiled.EAGER_ENV, "1")  # forces eager, even over compiled=True
    assert not _compiled.use_compiled(True, big) and not _compiled.use_compiled(None, big)


@pytest.mark.compile
def test_compiled_chunks_equal_eager_compile_once_per_shape_family_and_are_pure():
    ht, hs, wt, ws, bs = heads(20)  # chunks of 8, 8 and 4 tokens
    eager = grad_and_value(jsd(ht, wt, False), argnums=(0, 1, 2))(hs, ws, bs)
    compiled = grad_and_value(jsd(ht, wt, True), argnums=(0, 1, 2))(hs, ws, bs)
    torch.testing.assert_close(compiled, eager, **TOL)
    before = graphs()
    again = grad_and_value(jsd(ht, wt, True), argnums=(0, 1, 2))(hs, ws, bs)  # the compiled code, cached
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)  # the cache changes nothing it returns
    for tokens in (13, 29):  # other lengths, other last chunks (5 tokens): the token dimension is symbolic
        h = torch.randn(tokens, HS, requires_grad=True)
        t = torch.randn(tokens, HT)
        loss = jsd(t, wt, True)(h, ws, bs)
        loss.backward()  # the .backward() path runs the same compiled chunks
        (expected,) = torch.autograd.grad(jsd(t, wt, False)(h, ws, bs), h)
        torch.testing.assert_close(h.grad, expected, **TOL)
    with torch.no_grad():  # the value alone: its own chunk function, compiled once
        torch.testing.assert_close(jsd(ht, wt, True)(hs, ws, bs), eager[1], **TOL)
    assert graphs() == before + 1


@pytest.mark.compile
def test_compiled_chunks_under_vmap_and_topk():
    ht, hs, wt, ws, bs = heads(20)
    seqs = ht.reshape(2, 10, HT), hs.reshape(2, 10, HS)

    def per_sequence(compiled):
        return vmap(grad(lambda t, h, w: jsd(t, wt, compiled)(h, w, bs), argnums=2), (0, 0, None))(*seqs, ws)

    def of_total(compiled):
        return grad(lambda w: vmap(lambda t, h: jsd(t, wt, compiled)(h, w, bs))(*seqs).sum())(ws)

    torch.testing.assert_close(per_sequence(True), per_sequence(False), **TOL)
    torch.testing.assert_close(of_total(True), of_total(False), **TOL)
    logprobs, indices = torch.randn(20, V).log_softmax(-1).topk(5)

    def topk(compiled):
        def loss(h, w):
            return L.fused_linear_topk_kl_loss(logprobs, indices, h, w, chunk_size=8, compiled=compiled)

        return grad_and_value(loss, argnums=(0, 1))(hs, ws)

    torch.testing.assert_close(topk(True), topk(False), **TOL)


@pytest.mark.compile
def test_a_compile_that_fails_falls_back_to_the_eager_chunk(monkeypatch):
    ht, hs, wt, ws, bs = heads(12)
    monkeypatch.setattr(_compiled, "_KERNELS", {})  # a fresh compile, not one cached by an earlier test
    monkeypatch.setattr(_compiled, "_BROKEN", set())
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))  # no C++ compiler
    loss = jsd(ht, wt, True, temperature=3.0)  # a new graph (not in Inductor's caches)
    with pytest.warns(RuntimeWarning, match=r"compiling the per-chunk work failed .*running it eagerly"):
        value = grad_and_value(loss, argnums=(0, 1, 2))(hs, ws, bs)
    torch.testing.assert_close(
        value, grad_and_value(jsd(ht, wt, False, temperature=3.0), argnums=(0, 1, 2))(hs, ws, bs)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is reported once; later calls run eagerly at once
        grad_and_value(loss, argnums=(0, 1, 2))(hs, ws, bs)


def peak_above_results(step) -> int:
    """Bytes that ``step`` (a forward + backward) allocates at its peak above what it still holds at its end.

    Counted from the profiler's allocation events (every CPU tensor, Inductor's
    buffers included), so it is exact and deterministic, not a timing or an
    RSS reading. What the step holds at its end is its results (the student's
    gradients, which replace the previous step's): subtracting them gives, in
    allocator terms, the benchmark's "peak RSS above the inputs" (benchmarks/llm.py).
    """
    step()  # compile first: its allocations are not the step's
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak - live


def training_step(loss, *params):
    def step():
        for p in params:
            p.grad = None
        loss().backward()

    return step


def default_chunk_peaks(*, naive: bool = True) -> dict[str, float]:
    """Peaks of each loss's training step on the benchmark's smallest case, in ``(chunk, V)`` float32 buffers.

    1,024 tokens and H = 256 as in the benchmark, a smaller vocabulary (8,000);
    the fused losses run their default chunk, compiled; ``naive``: the unfused
    losses on the full logits too.
    """
    from funcdistill.losses._fused import CHUNK_TOKENS

    torch.manual_seed(0)
    tokens, vocab, hidden = 1024, 8_000, 256
    ht, hs = torch.randn(tokens, hidden), torch.randn(tokens, hidden, requires_grad=True)
    wt, ws = torch.randn(vocab, hidden) / 8, (torch.randn(vocab, hidden) / 16).requires_grad_()
    logprobs, indices = (ht @ wt.T).log_softmax(-1).topk(32)
    losses = {
        "topk fused": lambda: L.fused_linear_topk_kl_loss(logprobs, indices, hs, ws),  # compiled (the default)
        "fused": lambda: L.fused_linear_jsd_loss(ht, hs, wt, ws),
    }
    if naive:
        losses["topk naive"] = lambda: L.topk_kl_loss(logprobs, indices, hs @ ws.T)
        losses["naive"] = lambda: L.generalized_jsd_loss(ht @ wt.T, hs @ ws.T)
    chunk = CHUNK_TOKENS * vocab * 4  # bytes of one (chunk, V) float32 buffer
    return {name: peak_above_results(training_step(loss, hs, ws)) / chunk for name, loss in losses.items()}


def check_fused_peaks(peaks: dict[str, float]) -> None:
    # a compiled chunk holds 2 (chunk, V) buffers for the top-k KL (the student's logits, their gradient) and 3
    # for the JSD (both logits, one intermediate), plus the hidden states' gradient (tokens x H, 1 MiB here,
    # under half a buffer); a buffer more (e.g. a chunk's gradient kept while the next chunk runs, or the
    # gradient weighted in a pass of its own, which Inductor gives a buffer of its own on one thread) fails this
    assert peaks["topk fused"] <= 2.5, peaks
    assert peaks["fused"] <= 3.5, peaks


@pytest.mark.compile
def test_default_chunks_keep_the_peak_under_0_15x_the_naive_loss_at_1024_tokens():
    peaks = default_chunk_peaks()
    # the goal, each fused loss against its own naive form (measured 0.10x and 0.03x)
    assert peaks["topk fused"] <= 0.15 * peaks["topk naive"], peaks
    assert peaks["fused"] <= 0.15 * peaks["naive"], peaks
    check_fused_peaks(peaks)


@pytest.mark.compile
def test_the_compiled_chunks_keep_their_buffers_on_one_thread():
    # Inductor generates other kernels for one thread (measured: the top-k KL's gradient weighted in a pass of its
    # own took a third buffer there, 2.98 chunks against 2.26 on two threads), so compile in a process that has
    # one thread from the start (Inductor's caches key their kernels by the thread count)
    code = (
        "import json; from tests.test_losses_compiled import default_chunk_peaks as p; "
        "print(json.dumps(p(naive=False)))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_fused_peaks(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.compile
def test_the_default_chunk_compiles_once_for_every_token_count():
    wt, ws, bs = torch.randn(V, HT), torch.randn(V, HS), torch.randn(V)

    def value_and_grads(tokens, compiled):
        ht, hs = torch.randn(tokens, HT), torch.randn(tokens, HS)

        def loss(h, w, b):
            return L.fused_linear_jsd_loss(ht, h, wt, w, student_bias=b, compiled=compiled)  # the default chunk

        return grad_and_value(loss, argnums=(0, 1, 2))(hs, ws, bs)

    value_and_grads(200, True)  # 128 + 72 tokens: compiled here (or by an earlier test of the same shape family)
    before = graphs()
    for tokens in (300, 1000, 2000):  # 2, 7 and 15 chunks of 128 tokens, and last chunks of 44, 104 and 80
        torch.manual_seed(tokens)
        compiled = value_and_grads(tokens, True)
        torch.manual_seed(tokens)
        torch.testing.assert_close(compiled, value_and_grads(tokens, False), **TOL)
    assert graphs() == before
