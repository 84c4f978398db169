"""PKT and SP against loop references in float64, torchdistill 1.1.5, and at extreme inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad

from funcdistill import losses as L
from tests.conftest import value_and_grads
from tests.torchdistill_losses import mid_level

DOUBLE = torch.float64


pytestmark = pytest.mark.usefixtures("seed")


def _pair(n=5, d_t=7, d_s=3, **kw):
    t = torch.randn(n, d_t, dtype=DOUBLE, **kw)
    s = torch.randn(n, d_s, dtype=DOUBLE, **kw)
    return t.requires_grad_(), s.requires_grad_()


def _assert_same(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- PKT (Passalis & Tefas 2018)


def _pkt_reference(t, s, eps=1e-7, total=False):
    """The paper's KL over pairs with the authors' eps, one scalar at a time."""
    n = t.shape[0]

    def conditional(x):
        x = x.flatten(1)
        units = [row / (sum(v * v for v in row).sqrt() + eps) for row in x]
        kernel = [[(1 + (units[i] * units[j]).sum()) / 2 for j in range(n)] for i in range(n)]
        return [[kernel[i][j] / sum(kernel[i]) for j in range(n)] for i in range(n)]

    p_t, p_s = conditional(t), conditional(s)
    pairs = sum(p_t[i][j] * ((p_t[i][j] + eps) / (p_s[i][j] + eps)).log() for i in range(n) for j in range(n))
    return pairs if total else pairs / n**2


def test_pkt_matches_loop_reference_values_and_gradients():
    t, s = _pair()
    _assert_same(value_and_grads(L.pkt_loss, t, s), value_and_grads(_pkt_reference, t, s))
    total = value_and_grads(lambda a, b: L.pkt_loss(a, b, reduction="sum"), t, s)
    _assert_same(total, value_and_grads(lambda a, b: _pkt_reference(a, b, total=True), t, s))
    terms = L.pkt_loss(t, s, reduction="none")
    assert terms.shape == (5, 5)
    torch.testing.assert_close(terms.mean(), L.pkt_loss(t, s))


def test_pkt_gradcheck():
    t, s = _pair(n=4, d_t=3, d_s=2)
    assert torch.autograd.gradcheck(lambda a, b: L.pkt_loss(a, b, reduction="none"), (t, s))


def test_pkt_matches_torchdistill():
    td = mid_level()
    t, s = _pair()
    for eps in (1e-7, 1e-3):
        ref = td.PKTLoss("student", "output", "teacher", "output", eps=eps)

        def theirs(a, b, ref=ref):
            return ref({"student": {"output": b}}, {"teacher": {"output": a}})

        _assert_same(value_and_grads(functools.partial(L.pkt_loss, eps=eps), t, s), value_and_grads(theirs, t, s))


def test_pkt_identical_scaled_and_extreme_inputs():
    t = torch.randn(6, 4, 2, 2)
    assert abs(float(L.pkt_loss(t, t))) == 0.0
    assert abs(float(L.pkt_loss(t, 5 * t))) < 1e-6
    for s in (torch.zeros(6, 3), torch.full((6, 3), 1e4), 1e4 * torch.randn(6, 3), torch.ones(6, 3)):
        s = s.requires_grad_()
        loss = L.pkt_loss(1e4 * t, s)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # a zero student embedding sits at cosine 0 from all others: kernel 1/2
    s = torch.randn(6, 3)
    s[2] = 0
    g = grad(lambda x: L.pkt_loss(t, x))(s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_pkt_errors():
    with pytest.raises(ValueError, match=r"pkt_loss: teacher and student batch sizes differ: 4 vs 3"):
        L.pkt_loss(torch.randn(4, 2), torch.randn(3, 2))
    with pytest.raises(
        ValueError, match=r"pkt_loss: student must be a batch of at least 1 embeddings .*got shape \(3,\)"
    ):
        L.pkt_loss(torch.randn(3, 2), torch.randn(3))
    with pytest.raises(ValueError, match="pkt_loss: eps must be a positive finite number, got 0"):
        L.pkt_loss(torch.randn(3, 2), torch.randn(3, 2), eps=0)
    with pytest.raises(ValueError, match="PKTLoss: eps must be a positive finite number, got -1"):
        L.PKTLoss(eps=-1.0)


# ---------------------------------------------------------------- SP (Tung & Mori 2019)


def _sp_reference(t, s, p=2, total=False):
    """1/b^2 ||G_t - G_s||_F^2 with row-normalised Gram matrices, one scalar at a time."""
    n = t.shape[0]

    def gram(x):
        q = x.flatten(1)
        g = [[(q[i] * q[j]).sum() for j in range(n)] for i in range(n)]
        norms = [sum(v.abs() ** p for v in row) ** (1 / p) for row in g]
        return [[g[i][j] / norms[i] for j in range(n)] for i in range(n)]

    g_t, g_s = gram(t), gram(s)
    total_sq = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(n) for j in range(n))
    return total_sq if total else total_sq / n**2


def test_sp_matches_loop_reference_values_and_gradients():
    t = torch.randn(4, 3, 2, 2, dtype=DOUBLE, requires_grad=True)  # feature maps, flattened
    s = torch.randn(4, 5, dtype=DOUBLE, requires_grad=True)
    _assert_same(value_and_grads(L.sp_loss, t, s), value_and_grads(_sp_reference, t, s))
    total = value_and_grads(lambda a, b: L.sp_loss(a, b, reduction="sum"), t, s)
    _assert_same(total, value_and_grads(lambda a, b: _sp_reference(a, b, total=True), t, s))
    assert L.sp_loss(t, s, reduction="none").shape == (4, 4)
    assert torch.autograd.gradcheck(lambda a, b: L.sp_loss(a, b, reduction="none"), (t, s))


def test_sp_against_torchdistill_which_normalises_rows_in_l1():
    # torchdistill's SPKDLoss calls normalize(G, 1): p=1, an L1 norm per row, where the
    # paper (and the authors' RepDistiller code) use the L2 norm. With that one
    # difference spelled out in the reference, both agree with it.
    td = mid_level()
    t, s = _pair(n=6)
    for reduction, total in (("batchmean", False), ("sum", True)):
        ref = td.SPKDLoss("student", "teacher", reduction)

        def theirs(a, b, ref=ref):
            return ref({"student": {"output": b}}, {"teacher": {"output": a}})

        expected = value_and_grads(lambda a, b, total=total: _sp_reference(a, b, p=1, total=total), t, s)
        _assert_same(value_and_grads(theirs, t, s), expected)
        ours = value_and_grads(lambda a, b, total=total: _sp_reference(a, b, p=2, total=total), t, s)
        mine = L.sp_loss(t, s, reduction="sum" if total else "mean")
        torch.testing.assert_close(mine, ours[0])
        assert abs(float(mine.detach()) - float(expected[0].detach())) > 1e-3


def test_sp_identical_scaled_and_extreme_inputs():
    t = torch.randn(5, 8, 3, 3)
    assert float(L.sp_loss(t, t)) == 0.0
    assert float(L.sp_loss(t, 7 * t)) < 1e-10
    for s in (torch.zeros(5, 4), 1e4 * torch.randn(5, 4), torch.full((5, 4), -1e4)):
        s = s.requires_grad_()
        loss = L.sp_loss(1e4 * t, s)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    s = torch.randn(5, 4)
    s[0] = 0  # a zero activation: its Gram row is zero
    g = grad(lambda x: L.sp_loss(t, x))(s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_sp_errors():
    with pytest.raises(ValueError, match=r"sp_loss: teacher and student batch sizes differ: 2 vs 3"):
        L.sp_loss(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"sp_loss: teacher must be a batch .*got shape \(\)"):
        L.sp_loss(torch.tensor(1.0), torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"sp_loss: student must be a tensor, got list"):
        L.sp_loss(torch.randn(3, 4), [1.0])
