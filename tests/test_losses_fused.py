"""Fused chunked losses: equal in value and gradients to the unfused losses on full logits.

The unfused losses are checked against their definitions in
tests/test_losses_divergence.py; here the fused ones must agree with them for
every chunk size (one token, uneven last chunks, one chunk for everything),
through ``.backward()``, :func:`torch.func.grad`, ``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from funcdistill import losses as L

TOKENS, HT, HS, V = (2, 5), 6, 4, 13  # 10 tokens


pytestmark = pytest.mark.usefixtures("seed")


def heads(dtype=torch.float64, vocab=(V, V)):
    ht, hs = torch.randn(*TOKENS, HT, dtype=dtype), torch.randn(*TOKENS, HS, dtype=dtype)
    wt, ws = torch.randn(vocab[0], HT, dtype=dtype), torch.randn(vocab[1], HS, dtype=dtype)
    bt, bs = torch.randn(vocab[0], dtype=dtype), torch.randn(vocab[1], dtype=dtype)
    return ht, hs, wt, ws, bt, bs


def unfused_jsd(ht, hs, wt, ws, bt, bs, **kw):
    return L.generalized_jsd_loss(ht @ wt.T + bt, hs @ ws.T + bs, **kw)


def fused_jsd(ht, hs, wt, ws, bt, bs, **kw):
    return L.fused_linear_jsd_loss(ht, hs, wt, ws, teacher_bias=bt, student_bias=bs, **kw)


def student_grads(loss, ht, hs, wt, ws, bt, bs, **kw):
    """Value and gradients for the student's hidden states, weight and bias (torch.func.grad)."""
    return torch.func.grad_and_value(lambda *s: loss(ht, s[0], wt, s[1], bt, s[2], **kw), argnums=(0, 1, 2))(hs, ws, bs)


MASK = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]])


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
@pytest.mark.parametrize(("beta", "reduction"), [(0.0, "mean"), (0.5, "sum"), (1.0, "mean"), (0.3, "mean")])
def test_fused_jsd_equals_unfused(chunk_size, beta, reduction):
    args = heads()
    kw = {"beta": beta, "temperature": 1.7, "mask": MASK, "reduction": reduction}
    (g_fused, v_fused), (g_ref, v_ref) = (
        student_grads(fused_jsd, *args, chunk_size=chunk_size, **kw),
        student_grads(unfused_jsd, *args, **kw),
    )
    torch.testing.assert_close(v_fused, v_ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)
    assert g_fused[0][0, 1].abs().sum() == 0  # an uncounted token's hidden state gets no gradient


def test_backward_loop_equals_torch_func_grad_and_teacher_gets_nothing():
    ht, hs, wt, ws, bt, bs = heads()
    leaves = [x.clone().requires_grad_() for x in (ht, hs, wt, ws, bt, bs)]
    loss = fused_jsd(*leaves, chunk_size=3, labels=torch.where(MASK, 1, -100))
    loss.backward()
    g, v = student_grads(fused_jsd, ht, hs, wt, ws, bt, bs, chunk_size=3, mask=MASK)
    torch.testing.assert_close(loss.detach(), v)
    for leaf, expected in zip(leaves[1::2], g):  # hs, ws, bs
        torch.testing.assert_close(leaf.grad, expected)
    assert all(leaf.grad is None for leaf in leaves[0::2])  # the teacher side is a constant
    with torch.no_grad():  # the value alone
        torch.testing.assert_close(fused_jsd(*leaves, chunk_size=3, mask=MASK), v)


def test_no_bias_tensor_hyper_parameters_and_vocab_size():
    ht, hs, wt, ws, *_ = heads(vocab=(V + 3, V))  # the teacher's embedding is padded by 3 rows
    beta, temperature = torch.tensor(0.4, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    kw = {"beta": beta, "temperature": temperature, "vocab_size": V}

    def fused(h, w):
        return L.fused_linear_jsd_loss(ht, h, wt, w, chunk_size=4, **kw)

    def unfused(h, w):
        return L.generalized_jsd_loss(ht @ wt.T, h @ w.T, **kw)

    for a, b in zip(grad(fused, argnums=(0, 1))(hs, ws), grad(unfused, argnums=(0, 1))(hs, ws)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"fused_linear_jsd_loss: teacher and student vocabularies differ: 16 vs 13"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws)


def test_vmap_over_a_leading_axis_and_grad_of_vmap():
    ht, hs, wt, ws, bt, bs = heads()  # vmap over the first token axis (2 sequences of 5 tokens)

    def fused(h_t, h_s, w, m):
        return L.fused_linear_jsd_loss(h_t, h_s, wt, w, student_bias=bs, teacher_bias=bt, chunk_size=2, mask=m)

    def unfused(h_t, h_s, w, m):
        return L.generalized_jsd_loss(h_t @ wt.T + bt, h_s @ w.T + bs, mask=m)

    in_dims = (0, 0, None, 0)
    torch.testing.assert_close(vmap(fused, in_dims)(ht, hs, ws, MASK), vmap(unfused, in_dims)(ht, hs, ws, MASK))
    per_sequence = vmap(grad(fused, argnums=2), in_dims)(ht, hs, ws, MASK)
    torch.testing.assert_close(per_sequence, vmap(grad(unfused, argnums=2), in_dims)(ht, hs, ws, MASK))

    def total(loss):
        return grad(lambda w: vmap(loss, in_dims)(ht, hs, w, MASK).sum())(ws)

    torch.testing.assert_close(total(fused), total(unfused))


def test_second_derivatives_raise():
    ht, hs, wt, ws, *_ = heads()

    def g(h):
        return grad(lambda x: L.fused_linear_jsd_loss(ht, x, wt, ws, chunk_size=4))(h)

    with pytest.raises(RuntimeError, match="fused losses give first-order gradients only"):
        torch.func.jacrev(g)(hs)
    h = hs.clone().requires_grad_()
    (first,) = torch.autograd.grad(L.fused_linear_jsd_loss(ht, h, wt, ws), h, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        first.sum().backward()


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_topk_equals_unfused(chunk_size, renormalize):
    _, hs, _, ws, _, bs = heads()
    logprobs, indices = torch.randn(*TOKENS, V, dtype=torch.float64).log_softmax(-1).topk(5)
    kw = {"renormalize": renormalize, "mask": MASK}

    def fused(h, w, b):
        return L.fused_linear_topk_kl_loss(logprobs, indices, h, w, student_bias=b, chunk_size=chunk_size, **kw)

    def unfused(h, w, b):
        return L.topk_kl_loss(logprobs, indices, h @ w.T + b, **kw)

    g_f, v_f = torch.func.grad_and_value(fused, argnums=(0, 1, 2))(hs, ws, bs)
    g_u, v_u = torch.func.grad_and_value(unfused, argnums=(0, 1, 2))(hs, ws, bs)
    torch.testing.assert_close(v_f, v_u)
    for a, b in zip(g_f, g_u):
        torch.testing.assert_close(a, b)


def test_fused_topk_with_k_equal_v_is_the_fused_forward_kl():
    ht, hs, wt, ws, *_ = heads()
    logprobs, indices = (ht @ wt.T).log_softmax(-1).topk(V)
    h = hs.clone().requires_grad_()
    topk = L.fused_linear_topk_kl_loss(logprobs, indices, h, ws, chunk_size=3, reduction="sum")
    (g_topk,) = torch.autograd.grad(topk, h)
    forward_kl = L.fused_linear_jsd_loss(ht, h, wt, ws, beta=0.0, chunk_size=4, reduction="sum")
    torch.testing.assert_close(topk, forward_kl)
    torch.testing.assert_close(g_topk, torch.autograd.grad(forward_kl, h)[0])


def test_float32_and_empty_mask():
    ht, hs, wt, ws, bt, bs = heads(torch.float32)
    none = torch.zeros(TOKENS, dtype=torch.bool)
    g, v = student_grads(fused_jsd, ht, hs, wt, ws, bt, bs, chunk_size=3, mask=none)
    assert float(v) == 0.0 and all(float(x.abs().sum()) == 0.0 for x in g)
    g, v = student_grads(fused_jsd, ht, hs, wt, ws, bt, bs, chunk_size=3)
    g_ref, v_ref = student_grads(unfused_jsd, ht, hs, wt, ws, bt, bs)
    torch.testing.assert_close(v, v_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_errors():
    ht, hs, wt, ws, bt, _ = heads()
    name = "fused_linear_jsd_loss"
    with pytest.raises(ValueError, match=rf"{name}: reduction='none' is not supported: per-token losses"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, reduction="none")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', got 'batchmean'"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, reduction="batchmean")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int .*got 0"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, chunk_size=0)
    with pytest.raises(TypeError, match=r"chunk_size must be a positive int .*got bool"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, chunk_size=True)
    with pytest.raises(
        ValueError, match=r"student_weight must have shape \(vocabulary, hidden\) = \(V, 4\).*got \(4, 13\)"
    ):
        L.fused_linear_jsd_loss(ht, hs, wt, ws.T)
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(13,\) to match teacher_weight, got \(12,\)"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, teacher_bias=bt[:12])
    with pytest.raises(ValueError, match=r"teacher and student token shapes differ: \(2, 5\) vs \(10,\)"):
        L.fused_linear_jsd_loss(ht, hs.reshape(10, HS), wt, ws)
    with pytest.raises(TypeError, match=r"student_hidden must be a tensor, got tuple \(a module that returns a tuple"):
        L.fused_linear_jsd_loss(ht, (hs,), wt, ws)
    with pytest.raises(ValueError, match=r"mask has shape \(10,\) but the logits have \(2, 5\) tokens"):
        L.fused_linear_jsd_loss(ht, hs, wt, ws, mask=MASK.reshape(-1))
    lp, ix = torch.randn(*TOKENS, 3), torch.zeros(*TOKENS, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"fused_linear_topk_kl_loss: the teacher's top-k has shape \(2, 5, 3\)"):
        L.fused_linear_topk_kl_loss(lp, ix, hs[:1], ws)


@pytest.mark.compile
def test_compiled_grad_step_without_graph_break():
    ht, hs, wt, ws, *_ = heads(torch.float32, vocab=(V, V + 2))  # the student's head is padded

    def step(h, w):
        return torch.func.grad_and_value(
            lambda x, y: L.fused_linear_jsd_loss(ht, x, wt, y, chunk_size=3, mask=MASK, vocab_size=V), argnums=(0, 1)
        )(h, w)

    (g_c, v_c), (g_e, v_e) = torch.compile(step, fullgraph=True)(hs, ws), step(hs, ws)
    torch.testing.assert_close(v_c, v_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert g_e[1][V:].abs().sum() == 0  # the padded rows get no gradient


def test_default_chunk_is_128_tokens_and_at_most_about_2_to_the_24_logits():
    from funcdistill.losses._fused import _chunk_tokens

    vocabularies = (32_000, 128_256, 152_064, 1 << 25, 1)
    assert [_chunk_tokens("f", None, v) for v in vocabularies] == [128, 128, 64, 1, 128]
    assert _chunk_tokens("f", 7, 32_000) == _chunk_tokens("f", 7, 1 << 25) == 7  # a given size is kept


def test_default_chunks_equal_unfused():
    tokens = 300  # default chunks of 128, 128 and 44 tokens (float64, eager: exact up to the order of the sums)
    ht, hs = torch.randn(tokens, HT, dtype=torch.float64), torch.randn(tokens, HS, dtype=torch.float64)
    _, _, wt, ws, bt, bs = heads()
    g, v = student_grads(fused_jsd, ht, hs, wt, ws, bt, bs, beta=0.3)
    g_ref, v_ref = student_grads(unfused_jsd, ht, hs, wt, ws, bt, bs, beta=0.3)
    torch.testing.assert_close(v, v_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    logprobs, indices = (ht @ wt.T).log_softmax(-1).topk(5)
    fused = torch.func.grad_and_value(lambda h, w: L.fused_linear_topk_kl_loss(logprobs, indices, h, w), (0, 1))
    unfused = torch.func.grad_and_value(lambda h, w: L.topk_kl_loss(logprobs, indices, h @ w.T), (0, 1))
    torch.testing.assert_close(fused(hs, ws), unfused(hs, ws))


def test_bfloat16_inputs_accumulate_in_float32():
    ht, hs, wt, ws, *_ = heads(torch.float32)
    low = [x.to(torch.bfloat16) for x in (ht, hs, wt, ws)]

    def fused(h, w):
        return L.fused_linear_jsd_loss(low[0], h, low[2], w, chunk_size=3)

    g, v = torch.func.grad_and_value(fused, argnums=(0, 1))(low[1], low[3])
    assert v.dtype == g[0].dtype == g[1].dtype == torch.bfloat16
    up = [x.float() for x in low]  # the same bf16 values, the loss in float32
    g_ref, v_ref = torch.func.grad_and_value(
        lambda h, w: L.generalized_jsd_loss(up[0] @ up[2].T, h @ w.T), argnums=(0, 1)
    )(up[1], up[3])
    torch.testing.assert_close(v.float(), v_ref, rtol=2e-2, atol=1e-3)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=2e-3)


def test_vmap_sweep_over_tensor_beta_and_temperature():
    ht, hs, wt, ws, *_ = heads()
    betas = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    temperatures = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def fused(b, t):
        return grad(lambda w: L.fused_linear_jsd_loss(ht, hs, wt, w, beta=b, temperature=t, chunk_size=3))(ws)

    swept = vmap(fused)(betas, temperatures)
    for i, (b, t) in enumerate(zip(betas.tolist(), temperatures.tolist())):
        expected = grad(lambda w: L.generalized_jsd_loss(ht @ wt.T, hs @ w.T, beta=b, temperature=t))(ws)  # noqa: B023
        torch.testing.assert_close(swept[i], expected)
