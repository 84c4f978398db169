"""Token-level divergences (generalized JSD, skew KL, top-k KL) against their definitions.

The references are written independently of the library: plain Python floats
for the values (softmax, KL, mixture, one token at a time) and, for the
gradients, float64 autograd through the probability-space formulas (the
library works with log-probabilities).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from funcdistill import Mapping, distill, state
from funcdistill import losses as L

pytestmark = pytest.mark.usefixtures("seed")


def logits(*shape):
    return (2 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()


# ---------------------------------------------------------------- references (plain Python, one token at a time)


def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_jsd(t_row, s_row, beta, T=1.0):
    pt, ps = softmax(t_row, T), softmax(s_row, T)
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def ref_skew(t_row, s_row, alpha, reverse, T=1.0):
    pt, ps = softmax(t_row, T), softmax(s_row, T)
    if reverse:
        return kl(ps, [(1 - alpha) * a + alpha * b for a, b in zip(pt, ps)])
    return kl(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])


def ref_topk(logprobs, indices, s_row, renormalize):
    pt = [math.exp(v) for v in logprobs]
    if renormalize:
        pt = [v / sum(pt) for v in pt]
    ps = softmax(s_row)
    return sum(p * (math.log(p) - math.log(ps[i])) for p, i in zip(pt, indices) if p > 0)


def per_token(ref, t, s, *args):
    """Apply a one-token reference over the leading shape; a nested list of floats -> tensor."""
    flat_t, flat_s = t.detach().reshape(-1, t.shape[-1]).tolist(), s.detach().reshape(-1, s.shape[-1]).tolist()
    values = [ref(a, b, *args) for a, b in zip(flat_t, flat_s)]
    return torch.tensor(values, dtype=torch.float64).reshape(t.shape[:-1])


def ref_reduce(values, counted, reduction):
    values = values.masked_fill(~counted, 0.0)
    if reduction == "none":
        return values
    total = float(values.sum())
    return total if reduction == "sum" else total / max(int(counted.sum()), 1)


def prob_jsd(t, s, beta, T):
    """Probability-space generalized JSD, per token (for reference gradients)."""
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)


# ---------------------------------------------------------------- generalized JSD


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_jsd_matches_definition_with_mask(beta, reduction):
    t, s = logits(2, 3, 7), logits(2, 3, 7)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    got = L.generalized_jsd_loss(t, s, beta=beta, temperature=1.5, mask=mask, reduction=reduction)
    expected = ref_reduce(per_token(ref_jsd, t, s, beta, 1.5), mask, reduction)
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.8])
def test_jsd_gradients_match_probability_space_definition(beta):
    t, s = logits(4, 6), logits(4, 6)
    mask = torch.tensor([True, True, False, True])
    got = torch.autograd.grad(L.generalized_jsd_loss(t, s, beta=beta, temperature=2.0, mask=mask), (t, s))
    ref = prob_jsd(t, s, beta, 2.0)[mask].sum() / 3
    expected = torch.autograd.grad(ref, (t, s))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert got[1][2].abs().sum() == 0  # the masked token gets no gradient


def test_jsd_ends_are_forward_and_reverse_kl():
    t, s = logits(5, 9), logits(5, 9)
    kd = L.kd_loss(t, s, temperature=3.0, reduction="none")  # T^2 KL(p_T || p_S)
    fwd = L.generalized_jsd_loss(t, s, beta=0.0, temperature=3.0, reduction="none")
    torch.testing.assert_close(fwd * 9, kd)  # no T^2 factor in the generalized JSD
    rev = L.generalized_jsd_loss(t, s, beta=1.0, reduction="none")
    torch.testing.assert_close(rev, L.kd_loss(s, t, reduction="none"))
    # the gradient too: beta=0 gives (p_S - p_T) / T per token, over 5 tokens
    g = torch.autograd.grad(L.generalized_jsd_loss(t, s, beta=0.0, temperature=3.0), s)[0]
    torch.testing.assert_close(g, (torch.softmax(s / 3, -1) - torch.softmax(t / 3, -1)).detach() / 3 / 5)


def test_jsd_tensor_beta_and_temperature_under_vmap():
    t, s = logits(3, 5).detach(), logits(3, 5).detach()
    betas = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    swept = vmap(lambda b: L.generalized_jsd_loss(t, s, beta=b, temperature=torch.tensor(2.0)))(betas)
    looped = torch.stack([L.generalized_jsd_loss(t, s, beta=float(b), temperature=2.0) for b in betas])
    torch.testing.assert_close(swept, looped)

    # a tensor beta at an end: the student's gradient is finite and equals the number's
    def student_grad(beta):
        return grad(lambda x: L.generalized_jsd_loss(t, x, beta=beta))(s)

    for b in (0.0, 1.0):
        torch.testing.assert_close(student_grad(torch.tensor(b, dtype=torch.float64)), student_grad(b))


def test_jsd_classes_with_zero_probability_give_finite_gradients():
    t = torch.tensor([[2.0, float("-inf"), 0.0, float("-inf")]], requires_grad=True)
    s = torch.tensor([[1.0, 3.0, -1.0, float("-inf")]], requires_grad=True)
    loss = L.generalized_jsd_loss(t, s, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    expected = ref_jsd([2.0, -1e300, 0.0, -1e300], [1.0, 3.0, -1.0, -1e300], 0.5)
    assert abs(float(loss.detach()) - expected) < 1e-6


# ---------------------------------------------------------------- skew KL


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7, 1.0])
def test_skew_matches_definition(alpha, reverse):
    t, s = logits(2, 4, 6), logits(2, 4, 6)
    got = L.skew_kl_loss(t, s, alpha=alpha, reverse=reverse, temperature=0.5, reduction="none")
    torch.testing.assert_close(got, per_token(ref_skew, t, s, alpha, reverse, 0.5))


@pytest.mark.parametrize("reverse", [False, True])
def test_skew_gradients_match_probability_space_definition(reverse):
    t, s = logits(3, 8), logits(3, 8)
    alpha = 0.1
    got = torch.autograd.grad(L.skew_kl_loss(t, s, alpha=alpha, reverse=reverse, reduction="sum"), (t, s))
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    if reverse:
        ref = (ps * (ps / ((1 - alpha) * pt + alpha * ps)).log()).sum()
    else:
        ref = (pt * (pt / (alpha * pt + (1 - alpha) * ps)).log()).sum()
    for a, b in zip(got, torch.autograd.grad(ref, (t, s))):
        torch.testing.assert_close(a, b)


def test_skew_ends():
    t, s = logits(4, 5), logits(4, 5)
    torch.testing.assert_close(L.skew_kl_loss(t, s, alpha=0.0), L.generalized_jsd_loss(t, s, beta=0.0))
    torch.testing.assert_close(L.skew_kl_loss(t, s, alpha=0.0, reverse=True), L.generalized_jsd_loss(t, s, beta=1.0))
    assert float(L.skew_kl_loss(t, s, alpha=1.0).detach()) == 0.0
    swept = vmap(lambda a: L.skew_kl_loss(t.detach(), s.detach(), alpha=a))(
        torch.tensor([0.0, 0.1], dtype=torch.float64)
    )
    torch.testing.assert_close(swept[1], L.skew_kl_loss(t, s, alpha=0.1).detach())


# ---------------------------------------------------------------- top-k KL


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_matches_definition(renormalize):
    t, s = logits(2, 3, 10).detach(), logits(2, 3, 10)
    logprobs, indices = torch.log_softmax(t, -1).topk(4)
    got = L.topk_kl_loss(logprobs, indices, s, renormalize=renormalize, reduction="none")
    flat_lp, flat_ix = logprobs.reshape(-1, 4).tolist(), indices.reshape(-1, 4).tolist()
    flat_s = s.detach().reshape(-1, 10).tolist()
    expected = [ref_topk(a, b, c, renormalize) for a, b, c in zip(flat_lp, flat_ix, flat_s)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64).reshape(2, 3))


def test_topk_with_k_equal_v_is_the_forward_kl():
    t, s = logits(5, 7).detach(), logits(5, 7)
    logprobs, indices = torch.log_softmax(t, -1).topk(7)
    got = L.topk_kl_loss(logprobs, indices, s)
    full = L.generalized_jsd_loss(t, s, beta=0.0)
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(full, s)[0])


def test_topk_unused_slot_and_mask():
    s = logits(2, 5)
    logprobs = torch.tensor([[-0.5, -1.5, float("-inf")], [-0.1, -3.0, -4.0]], dtype=torch.float64)
    indices = torch.tensor([[1, 3, 0], [4, 2, 0]])
    got = L.topk_kl_loss(logprobs, indices, s, mask=torch.tensor([True, False]), reduction="sum")
    expected = ref_topk([-0.5, -1.5], [1, 3], s[0].tolist(), False)
    assert abs(float(got.detach()) - expected) < 1e-9
    assert torch.isfinite(torch.autograd.grad(got, s)[0]).all()


# ---------------------------------------------------------------- masks, labels, vocabularies


def test_labels_and_mask_combine():
    t, s = logits(2, 4, 5), logits(2, 4, 5)
    labels = torch.tensor([[3, -100, 1, 2], [-100, 0, 4, 4]])
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    both = labels.ne(-100) & mask
    for loss in (L.generalized_jsd_loss, L.skew_kl_loss):
        got = loss(t, s, labels=labels, mask=mask)
        torch.testing.assert_close(got, loss(t, s, mask=both))
        torch.testing.assert_close(loss(t, s, labels=labels), loss(t, s, mask=labels.ne(-100)))
        torch.testing.assert_close(loss(t, s, labels=labels.masked_fill(~both, 7), ignore_index=7), got)


def test_uncounted_tokens_are_exact_zeros():
    t, s = logits(3, 4), logits(3, 4)
    mask = torch.tensor([True, False, True])
    loss = L.generalized_jsd_loss(t, s, mask=mask)
    g = torch.autograd.grad(loss, s)[0]
    assert g[1].abs().sum() == 0 and g[0].abs().sum() > 0
    with torch.no_grad():
        s[1] = float("nan")  # the value ignores a token that does not count, whatever its logits
    torch.testing.assert_close(L.generalized_jsd_loss(t, s, mask=mask), loss)
    none = L.skew_kl_loss(t, s, mask=torch.zeros(3, dtype=torch.bool), reduction="none")
    assert none.tolist() == [0.0, 0.0, 0.0]
    assert (
        float(L.generalized_jsd_loss(t, s, mask=torch.zeros(3, dtype=torch.bool)).detach()) == 0.0
    )  # no token: 0, not nan


def test_vocabulary_mismatch_raises_and_vocab_size_compares_the_first_classes():
    t, s = logits(3, 9), logits(3, 7)
    with pytest.raises(ValueError, match=r"vocabularies differ: 9 vs 7 classes.*pass vocab_size=7"):
        L.generalized_jsd_loss(t, s)
    with pytest.raises(ValueError, match=r"skew_kl_loss: teacher and student vocabularies differ"):
        L.skew_kl_loss(t, s)
    got = L.generalized_jsd_loss(t, s, vocab_size=7)
    torch.testing.assert_close(got, L.generalized_jsd_loss(t[:, :7], s))
    torch.testing.assert_close(L.skew_kl_loss(t, s, vocab_size=5), L.skew_kl_loss(t[:, :5], s[:, :5]))
    with pytest.raises(ValueError, match=r"vocab_size must be between 1 and the smaller vocabulary \(7\), got 8"):
        L.generalized_jsd_loss(t, s, vocab_size=8)
    with pytest.raises(TypeError, match="vocab_size must be an int or None, got float"):
        L.generalized_jsd_loss(t, s, vocab_size=7.0)


def test_errors():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"generalized_jsd_loss: teacher and student token shapes differ: \(2, 3\) vs"):
        L.generalized_jsd_loss(x, torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .*got torch.int64; .*attention_mask.bool\(\)"):
        L.generalized_jsd_loss(x, x, mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\) but the logits have \(2, 3\) tokens.*shift"):
        L.skew_kl_loss(x, x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        L.generalized_jsd_loss(x, x, labels=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
        L.generalized_jsd_loss(x, x, labels=torch.zeros(2, 3, dtype=torch.long), ignore_index=-100.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        L.generalized_jsd_loss(x, x, beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
        L.skew_kl_loss(x, x, alpha=-0.1)
    with pytest.raises(TypeError, match="reverse must be True or False, got str"):
        L.skew_kl_loss(x, x, reverse="yes")
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"):
        L.generalized_jsd_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        L.generalized_jsd_loss(x, x, temperature=0)
    with pytest.raises(ValueError, match="the teacher's logits must have a last dimension, got a 0-d tensor"):
        L.generalized_jsd_loss(torch.tensor(1.0), x)
    with pytest.raises(TypeError, match=r"student_logits must be a tensor, got dict \(a model output object"):
        L.generalized_jsd_loss(x, {"logits": x})


def test_topk_errors():
    s = torch.randn(2, 3, 9)
    lp, ix = torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="teacher_topk_indices must hold integer class indices"):
        L.topk_kl_loss(lp, ix.float(), s)
    with pytest.raises(TypeError, match=r"teacher_topk_logprobs must be floating point, got torch\.int64"):
        L.topk_kl_loss(ix, ix, s)
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 3, 4\) vs \(2, 3, 5\)"):
        L.topk_kl_loss(lp, torch.zeros(2, 3, 5, dtype=torch.long), s)
    with pytest.raises(ValueError, match=r"top-k has shape \(2, 3, 4\) but the student has \(2, 4\) tokens"):
        L.topk_kl_loss(lp, ix, torch.randn(2, 4, 9))
    with pytest.raises(TypeError, match="renormalize must be True or False, got int"):
        L.topk_kl_loss(lp, ix, s, renormalize=1)


def test_modules_equal_the_functions_and_work_as_payloads():
    t, s = logits(2, 3, 6).detach(), logits(2, 3, 6).detach()
    mask = torch.tensor([[True, True, False], [True, False, True]])
    jsd = L.GeneralizedJSDLoss(beta=0.3, temperature=2.0, reduction="sum")
    torch.testing.assert_close(
        jsd(t, s, mask), L.generalized_jsd_loss(t, s, beta=0.3, temperature=2.0, mask=mask, reduction="sum")
    )
    skew = L.SkewKLLoss(alpha=0.2, reverse=True)
    torch.testing.assert_close(skew(t, s), L.skew_kl_loss(t, s, alpha=0.2, reverse=True))
    assert "beta=0.3" in repr(jsd) and "reverse=True" in repr(skew)
    with pytest.raises(ValueError, match=r"GeneralizedJSDLoss: beta must be in \[0, 1\], got 2"):
        L.GeneralizedJSDLoss(beta=2)
    teacher, student = torch.nn.Linear(4, 6).eval(), torch.nn.Linear(4, 6)
    fn = distill(teacher, student, Mapping(teacher, student).add("", "", payload=L.GeneralizedJSDLoss()))
    x = torch.randn(3, 5, 4)
    grads = grad(lambda ss: sum(c(a, b) for a, b, c in fn(state(teacher), ss, x)))(state(student))
    expected = grad(lambda w: L.generalized_jsd_loss(teacher(x).detach(), x @ w.T + student.bias))(student.weight)
    torch.testing.assert_close(grads["weight"], expected)


@pytest.mark.compile
def test_compiled_without_graph_break():
    t, s = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def f(x, beta):
        return L.generalized_jsd_loss(t, x, beta=beta, mask=mask) + L.skew_kl_loss(t, x, reverse=True, mask=mask)

    step = torch.compile(grad(f), fullgraph=True)
    torch.testing.assert_close(step(s, torch.tensor(0.4)), grad(f)(s, 0.4))
