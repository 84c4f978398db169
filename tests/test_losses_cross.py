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
