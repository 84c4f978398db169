"""Losses across tokenizers (ULD, the GOLD hybrid) against their definitions.

The references are written independently of the library, one position at a
time: plain Python floats for the values (softmax, Python's ``sorted``, the
zero padding of the ULD paper, Boizard et al. 2024, arXiv:2402.12030) and, for
the gradients, float64 autograd through the same loop (Python's ``sorted`` on
0-d tensors, so the gradient follows each probability to its class without
``torch.sort``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from funcdistill import losses as L

pytestmark = pytest.mark.usefixtures("seed")

VT, VS = 7, 5  # two vocabularies of different sizes


def logits(*shape):
    return (2 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()


# ---------------------------------------------------------------- references (one position at a time)


def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def ref_uld(pt, ps):
    """The paper's definition: sort each in decreasing order, pad the shorter with zeros, sum |differences|."""
    a, b = sorted(pt, reverse=True), sorted(ps, reverse=True)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_jsd(pt, ps, beta):
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def ref_hybrid(t_row, s_row, t_ids, s_ids, exact_weight, uld_weight, beta, T):
    """Exact part: JSD of the shared columns, each side renormalised; ULD part: the unshared full-softmax mass."""
    pt, ps = softmax(t_row, T), softmax(s_row, T)
    shared_t, shared_s = [pt[i] for i in t_ids], [ps[j] for j in s_ids]
    shared_t, shared_s = [p / sum(shared_t) for p in shared_t], [p / sum(shared_s) for p in shared_s]
    rest_t = [p for i, p in enumerate(pt) if i not in t_ids]
    rest_s = [p for j, p in enumerate(ps) if j not in s_ids]
    return exact_weight * ref_jsd(shared_t, shared_s, beta) + uld_weight * ref_uld(rest_t, rest_s)


def per_position(ref, t, s, *args):
    """Apply a one-position reference over the leading shape; a nested list of floats -> tensor."""
    flat_t, flat_s = t.detach().reshape(-1, t.shape[-1]).tolist(), s.detach().reshape(-1, s.shape[-1]).tolist()
    values = [ref(a, b, *args) for a, b in zip(flat_t, flat_s)]
    return torch.tensor(values, dtype=torch.float64).reshape(t.shape[:-1])


def ref_reduce(values, counted, reduction):
    values = values.masked_fill(~counted, 0.0)
    if reduction == "none":
        return values
    total = float(values.sum())
    return total if reduction == "sum" else total / max(int(counted.sum()), 1)


def loop_uld_autograd(t, s, T, counted):
    """Differentiable float64 loop: per counted position, Python's sorted on 0-d tensors (no torch.sort)."""
    total = t.new_zeros(())
    for row_t, row_s, keep in zip(t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1]), counted.reshape(-1)):
        if not keep:
            continue
        pt, ps = torch.softmax(row_t / T, -1), torch.softmax(row_s / T, -1)
        a = sorted(pt.unbind(), key=lambda x: x.detach().item(), reverse=True)
        b = sorted(ps.unbind(), key=lambda x: x.detach().item(), reverse=True)
        zero = t.new_zeros(())
        a, b = a + [zero] * (len(b) - len(a)), b + [zero] * (len(a) - len(b))
        total = total + sum((x - y).abs() for x, y in zip(a, b))
    return total / max(int(counted.sum()), 1)


MASK = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])


# ---------------------------------------------------------------- uld_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("vt", "vs"), [(VT, VS), (VS, VT), (VT, VT)])
def test_uld_matches_the_papers_definition(reduction, vt, vs):
    t, s = logits(3, 4, vt), logits(3, 4, vs)
    got = L.uld_loss(t, s, mask=MASK, temperature=1.5, reduction=reduction)
    expected = ref_reduce(per_position(lambda a, b: ref_uld(softmax(a, 1.5), softmax(b, 1.5)), t, s), MASK, reduction)
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(("vt", "vs"), [(VT, VS), (VS, VT)])
def test_uld_gradients_match_the_loop_reference_and_gradcheck(vt, vs):
    t, s = logits(3, 4, vt), logits(3, 4, vs)
    got = torch.autograd.grad(L.uld_loss(t, s, mask=MASK, temperature=0.7), (t, s))
    expected = torch.autograd.grad(loop_uld_autograd(t, s, 0.7, MASK), (t, s))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert got[1][0, 1].abs().sum() == 0 and got[1][0, 0].abs().sum() > 0  # an uncounted position: no gradient
    # and against finite differences (float64; random logits have no tied probabilities, where |.| and sort kink)
    assert torch.autograd.gradcheck(lambda a, b: L.uld_loss(a, b, mask=MASK, reduction="sum"), (t, s))


def test_uld_of_identical_distributions_is_zero_whatever_the_order_and_padding():
    t = logits(2, 3, VS)
    permuted = t[..., torch.randperm(VS)]
    padded = torch.cat([t, torch.full((2, 3, 4), -math.inf, dtype=t.dtype)], -1)  # 4 classes of probability 0
    for s in (t, permuted, padded):
        value, (g,) = L.uld_loss(t.detach(), s), torch.autograd.grad(L.uld_loss(t.detach(), s), (t,))
        assert value.item() == pytest.approx(0.0, abs=1e-15)
        assert torch.all(g.abs() < 1e-12)  # sign(0) = 0: no gradient at the minimum
    assert L.uld_loss(t, logits(2, 3, VS)).item() > 0.1


def test_uld_is_the_total_variation_bound_and_symmetric():
    # each sorted vector sums to 1, so the sum of |differences| is at most 2; swapping the sides changes nothing
    t, s = logits(5, VT), logits(5, VS)
    both = L.uld_loss(t, s, reduction="none"), L.uld_loss(s, t, reduction="none")
    torch.testing.assert_close(*both)
    assert torch.all((both[0] > 0) & (both[0] <= 2))
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]]), torch.tensor([[-math.inf, -math.inf, -math.inf, 0.0]])
    assert L.uld_loss(*one_hot).item() == 0.0  # sure of one token each: the same sorted vector (1, 0, ...)


def test_uld_labels_mask_and_no_position():
    t, s = logits(3, 4, VT), logits(3, 4, VS)
    labels = torch.tensor([[5, -100, 1, 2], [0, 0, 0, 0], [-1, 3, 3, -100]])
    counted = MASK & (labels != -100)
    expected = ref_reduce(per_position(lambda a, b: ref_uld(softmax(a), softmax(b)), t, s), counted, "mean")
    torch.testing.assert_close(L.uld_loss(t, s, mask=MASK, labels=labels), torch.tensor(expected, dtype=t.dtype))
    for reduction in ("mean", "sum"):
        none = L.uld_loss(t, s, mask=torch.zeros(3, 4, dtype=torch.bool), reduction=reduction)
        assert none.item() == 0.0
        assert torch.equal(torch.autograd.grad(none, s)[0], torch.zeros_like(s))
    empty = L.uld_loss(torch.randn(0, VT), torch.randn(0, VS))
    assert empty.item() == 0.0 and not empty.isnan()


def test_uld_computes_in_the_wider_dtype():
    t, s = torch.randn(4, VT).bfloat16(), torch.randn(4, VS)
    value = L.uld_loss(t, s)
    assert value.dtype == torch.float32
    # the same loss on float64 copies of the (already rounded) inputs: float32 arithmetic is within ~1e-7
    torch.testing.assert_close(value.double(), L.uld_loss(t.double(), s.double()), rtol=1e-5, atol=1e-6)


def test_uld_under_grad_vmap_and_a_tensor_temperature():
    t, s = torch.randn(3, 4, VT), torch.randn(3, 4, VS)
    g = grad(lambda x: L.uld_loss(t, x, mask=MASK))(s)
    torch.testing.assert_close(g, torch.autograd.grad(L.uld_loss(t, s.requires_grad_(), mask=MASK), s)[0])
    temperatures = torch.tensor([0.5, 1.0, 4.0])
    swept = vmap(lambda T: L.uld_loss(t, s, temperature=T))(temperatures)
    looped = torch.stack([L.uld_loss(t, s, temperature=float(T)) for T in temperatures])
    torch.testing.assert_close(swept, looped)
    students = torch.stack([s, s.flip(0), torch.randn_like(s)])
    per_student = vmap(grad(lambda x: L.uld_loss(t, x)))(students)
    torch.testing.assert_close(per_student[1], grad(lambda x: L.uld_loss(t, x))(students[1]))


def test_uld_errors():
    t, s = torch.randn(3, VT), torch.randn(3, VS)
    with pytest.raises(ValueError, match=r"uld_loss: teacher and student token shapes differ: \(3,\) vs \(4,\)"):
        L.uld_loss(t, torch.randn(4, VS))
    with pytest.raises(ValueError, match="uld_loss: student_logits have no class"):
        L.uld_loss(t, torch.randn(3, 0))
    with pytest.raises(ValueError, match="uld_loss: temperature must be a positive finite number, got 0"):
        L.uld_loss(t, s, temperature=0)
    with pytest.raises(ValueError, match="uld_loss: reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"):
        L.uld_loss(t, s, reduction="batchmean")
    with pytest.raises(TypeError, match="uld_loss: mask must be a bool tensor"):
        L.uld_loss(t, s, mask=torch.ones(3))
    with pytest.raises(TypeError, match=r"uld_loss: student_logits must be a tensor, got tuple \(a module that"):
        L.uld_loss(t, (s,))


def test_uld_module_equals_the_function():
    t, s = torch.randn(3, 4, VT), torch.randn(3, 4, VS)
    module = L.ULDLoss(temperature=2.0, reduction="sum")
    torch.testing.assert_close(module(t, s, mask=MASK), L.uld_loss(t, s, temperature=2.0, reduction="sum", mask=MASK))
    assert repr(module) == "ULDLoss(temperature=2.0, reduction='sum')"
    with pytest.raises(ValueError, match="ULDLoss: temperature must be a positive finite number, got -1"):
        L.ULDLoss(temperature=-1)


# ---------------------------------------------------------------- hybrid_loss

T_IDS, S_IDS = torch.tensor([5, 0, 3]), torch.tensor([1, 4, 0])  # 3 shared tokens, in no particular order


def loop_hybrid_autograd(t, s, t_ids, s_ids, exact_weight, uld_weight, beta, T, counted):
    """Differentiable float64 loop over positions: probability-space JSD, Python-sorted ULD."""
    t_ids, s_ids = t_ids.tolist(), s_ids.tolist()
    total = t.new_zeros(())
    for row_t, row_s, keep in zip(t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1]), counted.reshape(-1)):
        if not keep:
            continue
        pt, ps = torch.softmax(row_t / T, -1), torch.softmax(row_s / T, -1)
        a, b = pt[t_ids] / pt[t_ids].sum(), ps[s_ids] / ps[s_ids].sum()
        m = beta * a + (1 - beta) * b
        exact = {0.0: (a * (a / b).log()).sum(), 1.0: (b * (b / a).log()).sum()}.get(
            beta, beta * (a * (a / m).log()).sum() + (1 - beta) * (b * (b / m).log()).sum()
        )
        rest_t = sorted((pt[i] for i in range(len(pt)) if i not in t_ids), key=lambda x: x.item(), reverse=True)
        rest_s = sorted((ps[j] for j in range(len(ps)) if j not in s_ids), key=lambda x: x.item(), reverse=True)
        zero = t.new_zeros(())
        rest_t += [zero] * (len(rest_s) - len(rest_t))
        rest_s += [zero] * (len(rest_t) - len(rest_s))
        total = total + exact_weight * exact + uld_weight * sum((x - y).abs() for x, y in zip(rest_t, rest_s))
    return total / max(int(counted.sum()), 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_hybrid_matches_its_definition(beta, reduction):
    t, s = logits(3, 4, VT), logits(3, 4, VS)
    kw = {"exact_weight": 0.7, "uld_weight": 1.3, "beta": beta, "temperature": 1.5}
    got = L.hybrid_loss(t, s, T_IDS, S_IDS, mask=MASK, reduction=reduction, **kw)
    ids = T_IDS.tolist(), S_IDS.tolist()
    values = per_position(ref_hybrid, t, s, *ids, 0.7, 1.3, beta, 1.5)
    torch.testing.assert_close(got, torch.as_tensor(ref_reduce(values, MASK, reduction), dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_gradients_match_the_loop_reference_and_gradcheck(beta):
    t, s = logits(3, 4, VT), logits(3, 4, VS)
    kw = {"exact_weight": 0.7, "uld_weight": 1.3, "beta": beta}
    got = torch.autograd.grad(L.hybrid_loss(t, s, T_IDS, S_IDS, mask=MASK, temperature=0.8, **kw), (t, s))
    expected = torch.autograd.grad(loop_hybrid_autograd(t, s, T_IDS, S_IDS, 0.7, 1.3, beta, 0.8, MASK), (t, s))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: L.hybrid_loss(a, b, T_IDS, S_IDS, beta=beta, mask=MASK), (t, s))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_with_every_token_shared_is_the_generalized_jsd(beta):
    # identical tokenizers: shared_vocab pairs every id with itself, the ULD part has no column left
    t, s = logits(3, 4, VT), logits(3, 4, VT)
    every = torch.arange(VT)
    kw = {"beta": beta, "temperature": 1.7, "mask": MASK}
    hybrid, jsd = L.hybrid_loss(t, s, every, every, **kw), L.generalized_jsd_loss(t, s, **kw)
    torch.testing.assert_close(hybrid, jsd)
    for a, b in zip(torch.autograd.grad(hybrid, (t, s)), torch.autograd.grad(jsd, (t, s))):
        torch.testing.assert_close(a, b)
    # a student whose vocabulary is the teacher's in another order: the same loss through the pairing
    order = torch.randperm(VT)
    permuted = L.hybrid_loss(t, s[..., order], every, torch.argsort(order), **kw)
    torch.testing.assert_close(permuted, jsd)


def test_hybrid_forward_kl_is_kd():
    t, s = logits(6, VT), logits(6, VT)
    every = torch.arange(VT)
    torch.testing.assert_close(L.hybrid_loss(t, s, every, every, beta=0.0), L.kd_loss(t, s))
    # kd_loss multiplies by T^2 (Hinton's gradient scale); the token losses do not
    torch.testing.assert_close(4 * L.hybrid_loss(t, s, every, every, temperature=2.0), L.kd_loss(t, s, temperature=2.0))


def test_hybrid_with_no_token_shared_is_uld_and_zero_weights_drop_their_part():
    t, s = logits(3, 4, VT), logits(3, 4, VS)
    none = torch.zeros(0, dtype=torch.long)
    torch.testing.assert_close(L.hybrid_loss(t, s, none, none, uld_weight=2.0), 2 * L.uld_loss(t, s))
    ids = T_IDS.tolist(), S_IDS.tolist()
    for exact_weight, uld_weight in ((0, 1.0), (1.0, 0)):
        got = L.hybrid_loss(t, s, T_IDS, S_IDS, exact_weight=exact_weight, uld_weight=uld_weight, reduction="none")
        values = per_position(ref_hybrid, t, s, *ids, exact_weight, uld_weight, 0.0, 1.0)
        torch.testing.assert_close(got, values)
    tensor_weights = L.hybrid_loss(t, s, T_IDS, S_IDS, exact_weight=torch.tensor(0.0), uld_weight=torch.tensor(1.0))
    torch.testing.assert_close(tensor_weights, L.hybrid_loss(t, s, T_IDS, S_IDS, exact_weight=0))


def test_hybrid_under_grad_and_vmap_over_tensor_options():
    t, s = torch.randn(3, 4, VT), torch.randn(3, 4, VS)
    g = grad(lambda x: L.hybrid_loss(t, x, T_IDS, S_IDS, mask=MASK, beta=0.5))(s)
    reference = torch.autograd.grad(L.hybrid_loss(t, s.requires_grad_(), T_IDS, S_IDS, mask=MASK, beta=0.5), s)[0]
    torch.testing.assert_close(g, reference)
    betas, weights = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 3.0])
    swept = vmap(lambda b, w: L.hybrid_loss(t, s, T_IDS, S_IDS, beta=b, uld_weight=w))(betas, weights)
    looped = [L.hybrid_loss(t, s, T_IDS, S_IDS, beta=float(b), uld_weight=float(w)) for b, w in zip(betas, weights)]
    torch.testing.assert_close(swept, torch.stack(looped))


def test_hybrid_ids_of_any_integer_dtype_and_the_wider_dtype():
    t, s = torch.randn(4, VT).bfloat16(), torch.randn(4, VS)
    value = L.hybrid_loss(t, s, T_IDS.int(), S_IDS.to(torch.int16), beta=0.5)
    assert value.dtype == torch.float32
    reference = L.hybrid_loss(t.double(), s.double(), T_IDS, S_IDS, beta=0.5)
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)  # float32 arithmetic vs float64


def test_hybrid_errors_collect_the_problems_with_the_ids():
    t, s = torch.randn(3, VT), torch.randn(3, VS)
    with pytest.raises(
        ValueError,
        match=r"hybrid_loss: student_ids has 6 ids but the student's logits have 5 classes .*; teacher_ids and "
        r"student_ids must have one length \(pair k is teacher_ids\[k\], student_ids\[k\]\), got 3 and 6\. "
        r"Pass the two tensors funcdistill.align.shared_vocab returns\.",
    ):
        L.hybrid_loss(t, s, T_IDS, torch.arange(6))
    with pytest.raises(ValueError, match=r"hybrid_loss: teacher_ids must be 1-d \(one id per shared token\), got"):
        L.hybrid_loss(t, s, T_IDS[None], S_IDS)
    with pytest.raises(TypeError, match="hybrid_loss: student_ids must hold integer token ids"):
        L.hybrid_loss(t, s, T_IDS, S_IDS.float())
    with pytest.raises(ValueError, match="hybrid_loss: uld_weight must be a finite number >= 0, got -1"):
        L.hybrid_loss(t, s, T_IDS, S_IDS, uld_weight=-1)
    with pytest.raises(ValueError, match=r"hybrid_loss: beta must be in \[0, 1\], got 2"):
        L.hybrid_loss(t, s, T_IDS, S_IDS, beta=2)


def test_hybrid_module_equals_the_function():
    t, s = torch.randn(3, 4, VT), torch.randn(3, 4, VS)
    module = L.HybridLoss(T_IDS, S_IDS, exact_weight=0.5, beta=0.3, reduction="sum")
    expected = L.hybrid_loss(t, s, T_IDS, S_IDS, exact_weight=0.5, beta=0.3, reduction="sum", mask=MASK)
    torch.testing.assert_close(module(t, s, mask=MASK), expected)
    assert "teacher_ids=<3 ids>, student_ids=<3 ids>, exact_weight=0.5" in repr(module)
    with pytest.raises(
        ValueError, match=r"HybridLoss: teacher_ids and student_ids must have one length .* got 3 and 2"
    ):
        L.HybridLoss(T_IDS, S_IDS[:2])
    with pytest.raises(AttributeError, match="HybridLoss's options are immutable: cannot set 'beta'"):
        module.beta = 0.5


# ---------------------------------------------------------------- fused (chunked) forms: equal to the unfused

HT, HS = 6, 4


def heads(dtype=torch.float64, vocab=(VT, VS)):
    ht, hs = torch.randn(3, 4, HT, dtype=dtype), torch.randn(3, 4, HS, dtype=dtype)
    wt, ws = torch.randn(vocab[0], HT, dtype=dtype), torch.randn(vocab[1], HS, dtype=dtype)
    bt, bs = torch.randn(vocab[0], dtype=dtype), torch.randn(vocab[1], dtype=dtype)
    return ht, hs, wt, ws, bt, bs


def unfused(loss, ht, hs, wt, ws, bt, bs, *ids, **kw):
    return loss(ht @ wt.T + bt, hs @ ws.T + bs, *ids, **kw)


def fused(loss, ht, hs, wt, ws, bt, bs, *ids, **kw):
    return loss(ht, hs, wt, ws, *ids, teacher_bias=bt, student_bias=bs, **kw)


def student_grads(run, loss, ht, hs, wt, ws, bt, bs, *ids, **kw):
    """Value and gradients for the student's hidden states, weight and bias (torch.func.grad)."""
    return torch.func.grad_and_value(lambda *s: run(loss, ht, s[0], wt, s[1], bt, s[2], *ids, **kw), argnums=(0, 1, 2))(
        hs, ws, bs
    )


PAIRS = {
    "uld": (L.uld_loss, L.fused_linear_uld_loss, ()),
    "hybrid": (L.hybrid_loss, L.fused_linear_hybrid_loss, (T_IDS, S_IDS)),
}


@pytest.mark.parametrize("name", ["uld", "hybrid"])
def test_default_chunks_equal_unfused(name):
    """300 positions: default chunks of 128, 128 and 44 (as the single-vocabulary fused losses)."""
    loss, fused_loss, ids = PAIRS[name]
    ht, hs, wt, ws, bt, bs = heads()
    ht, hs = torch.randn(300, HT, dtype=torch.float64), torch.randn(300, HS, dtype=torch.float64)
    mask = torch.rand(300) > 0.2
    (g_fused, v_fused), (g_ref, v_ref) = (
        student_grads(fused, fused_loss, ht, hs, wt, ws, bt, bs, *ids, mask=mask),
        student_grads(unfused, loss, ht, hs, wt, ws, bt, bs, *ids, mask=mask),
    )
    torch.testing.assert_close(v_fused, v_ref)  # float64: equal up to the order of the sums
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 64])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("uld", {"temperature": 1.7}),
        ("uld", {"reduction": "sum"}),
        ("hybrid", {"beta": 0.0, "exact_weight": 0.6}),
        ("hybrid", {"beta": 0.5, "temperature": 0.8, "reduction": "sum"}),
        ("hybrid", {"beta": 1.0, "uld_weight": 2.0}),
        ("hybrid", {"beta": 0.3, "uld_weight": 0}),
    ],
)
def test_fused_equals_unfused(name, kw, chunk_size):
    loss, fused_loss, ids = PAIRS[name]
    args = heads()
    (g_fused, v_fused), (g_ref, v_ref) = (
        student_grads(fused, fused_loss, *args, *ids, chunk_size=chunk_size, mask=MASK, **kw),
        student_grads(unfused, loss, *args, *ids, mask=MASK, **kw),
    )
    torch.testing.assert_close(v_fused, v_ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)
    assert g_fused[0][0, 1].abs().sum() == 0  # an uncounted position's hidden state gets no gradient


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_fused_backward_loop_tensor_options_and_teacher_gets_nothing(name):
    loss, fused_loss, ids = PAIRS[name]
    ht, hs, wt, ws, _, _ = (x.requires_grad_() for x in heads(torch.float32))
    T = torch.tensor(1.3)
    options = {"temperature": T} | ({"beta": torch.tensor(0.4), "exact_weight": torch.tensor(0.5)} if ids else {})
    value = fused_loss(ht, hs, wt, ws, *ids, chunk_size=5, labels=torch.where(MASK, 1, -100), **options)
    value.backward()
    expected = loss(ht @ wt.T, hs @ ws.T, *ids, mask=MASK, **options)
    torch.testing.assert_close(value, expected)
    for got, want in zip((hs.grad, ws.grad), torch.autograd.grad(expected, (hs, ws))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    assert ht.grad is None and wt.grad is None


def test_fused_under_vmap():
    ht, hs, wt, ws, *_ = heads()
    per_sample = vmap(lambda a, b: L.fused_linear_uld_loss(a, b, wt, ws, chunk_size=3))(ht, hs)
    torch.testing.assert_close(per_sample, torch.stack([L.uld_loss(a @ wt.T, b @ ws.T) for a, b in zip(ht, hs)]))
    g = vmap(grad(lambda a, b: L.fused_linear_hybrid_loss(a, b, wt, ws, T_IDS, S_IDS), argnums=1))(ht, hs)
    torch.testing.assert_close(g[2], grad(lambda b: L.hybrid_loss(ht[2] @ wt.T, b @ ws.T, T_IDS, S_IDS))(hs[2]))


NO_POSITION = {
    "uld": lambda h, w, ht, wt, **kw: L.uld_loss(ht @ wt.T, h @ w.T, **kw),
    "hybrid": lambda h, w, ht, wt, **kw: L.hybrid_loss(ht @ wt.T, h @ w.T, T_IDS, S_IDS, beta=0.5, **kw),
    "fused uld": lambda h, w, ht, wt, **kw: L.fused_linear_uld_loss(ht, h, wt, w, **kw),
    "fused hybrid": lambda h, w, ht, wt, **kw: L.fused_linear_hybrid_loss(ht, h, wt, w, T_IDS, S_IDS, **kw),
}


@pytest.mark.parametrize("name", sorted(NO_POSITION))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("leading", "masked"), [((0,), False), ((2, 3), True)])
def test_no_position_gives_zero_and_a_zero_gradient(name, reduction, leading, masked):
    ht, hs = torch.randn(*leading, HT), torch.randn(*leading, HS)
    wt, ws = torch.randn(VT, HT), torch.randn(VS, HS)
    kw = {"mask": torch.zeros(leading, dtype=torch.bool)} if masked else {}
    grads, value = torch.func.grad_and_value(
        lambda h, w: NO_POSITION[name](h, w, ht, wt, reduction=reduction, **kw), argnums=(0, 1)
    )(hs, ws)
    assert value.shape == () and value.item() == 0.0, value  # not nan
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_fused_errors():
    ht, hs, wt, ws, *_ = heads()
    with pytest.raises(ValueError, match="fused_linear_uld_loss: reduction='none' is not supported"):
        L.fused_linear_uld_loss(ht, hs, wt, ws, reduction="none")
    with pytest.raises(
        ValueError, match=r"fused_linear_uld_loss: student_weight must have shape \(vocabulary, hidden\)"
    ):
        L.fused_linear_uld_loss(ht, hs, wt, ws.T)
    with pytest.raises(ValueError, match="fused_linear_hybrid_loss: teacher_ids and student_ids must have one length"):
        L.fused_linear_hybrid_loss(ht, hs, wt, ws, T_IDS, S_IDS[:2])
    with pytest.raises(ValueError, match=r"fused_linear_hybrid_loss: beta must be in \[0, 1\], got -0.5"):
        L.fused_linear_hybrid_loss(ht, hs, wt, ws, T_IDS, S_IDS, beta=-0.5)
    with pytest.raises(RuntimeError, match="fused losses give first-order gradients only"):
        torch.func.jacrev(grad(lambda b: L.fused_linear_uld_loss(ht, b, wt, ws)))(hs)


# ---------------------------------------------------------------- torch.compile (tiny, few)


@pytest.mark.compile
def test_compiled_grad_step_fullgraph_matches_eager():
    ht, hs, wt, ws, *_ = heads(torch.float32)
    t, T = ht @ wt.T, torch.tensor(1.5)

    def step(h, w):
        def total(h, w):
            s = h @ w.T
            return (
                L.uld_loss(t, s, mask=MASK, temperature=T)
                + L.hybrid_loss(t, s, T_IDS, S_IDS, beta=0.5, temperature=T)
                + L.fused_linear_uld_loss(ht, h, wt, w, chunk_size=5)
                + L.fused_linear_hybrid_loss(ht, h, wt, w, T_IDS, S_IDS, chunk_size=5, mask=MASK)
            )

        return torch.func.grad_and_value(total, argnums=(0, 1))(h, w)

    torch._dynamo.reset()
    (g_c, v_c), (g_e, v_e) = torch.compile(step, fullgraph=True)(hs, ws), step(hs, ws)
    torch.testing.assert_close(v_c, v_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # compiled float32 kernels sum in another order
