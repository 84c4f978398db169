"""DIST and logit standardization against the papers' formulas in float64, torchdistill 1.1.5, extremes."""

from __future__ import annotations

import functools
import statistics

import pytest
import torch
from torch.func import grad, vmap

from funcdistill import losses as L
from tests.conftest import value_and_grads
from tests.torchdistill_losses import mid_level

DOUBLE = torch.float64


pytestmark = pytest.mark.usefixtures("seed")


def _assert_same(got, expected, tol=1e-10):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _logits(n=5, c=6):
    t = torch.randn(n, c, dtype=DOUBLE) * 3
    s = torch.randn(n, c, dtype=DOUBLE) * 3
    return t.requires_grad_(), s.requires_grad_()


# ---------------------------------------------------------------- DIST (Huang et al. 2022)


def _pearson(x, y):
    """Pearson's r from its textbook definition: covariance over the product of deviations."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (sum((a - mx) ** 2 for a in x).sqrt() * sum((b - my) ** 2 for b in y).sqrt())


def _dist_reference(t, s, beta=1.0, gamma=1.0, tau=1.0):
    """Eqs. of the paper: tau^2 (beta (1 - mean_i rho(row_i)) + gamma (1 - mean_j rho(column_j)))."""
    n, c = t.shape
    y_t = [[v for v in (row / tau).exp() / (row / tau).exp().sum()] for row in t]
    y_s = [[v for v in (row / tau).exp() / (row / tau).exp().sum()] for row in s]
    inter = 1 - sum(_pearson(y_s[i], y_t[i]) for i in range(n)) / n
    columns = [([y_s[i][j] for i in range(n)], [y_t[i][j] for i in range(n)]) for j in range(c)]
    intra = 1 - sum(_pearson(a, b) for a, b in columns) / c
    return tau**2 * (beta * inter + gamma * intra)


def _dist_authors(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8, *, cosine=None):
    """DIST as its authors' code computes it (DIST_KD: hunto/image_classification_sota,
    lib/models/losses/dist_kd.py), student first as there: the correlation divides by ``|a| |b| + eps``.

    ``cosine=F.cosine_similarity`` gives torchdistill's variant instead (each norm clamped at ``eps``).
    """

    def correlation(a, b):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        if cosine is not None:
            return cosine(a, b, eps=eps)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def inter_class(y_s, y_t):
        return 1 - correlation(y_s, y_t).mean()

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    return beta * tau**2 * inter_class(y_s, y_t) + gamma * tau**2 * inter_class(y_s.T, y_t.T)


def test_dist_matches_paper_formula_values_and_gradients():
    t, s = _logits()
    # the paper's Pearson correlation has no eps: it is the eps -> 0 limit of the authors' code
    for kwargs, ref in (
        ({"eps": 1e-30}, {}),
        ({"beta": 0.5, "gamma": 2.0, "temperature": 4.0, "eps": 1e-30}, {"beta": 0.5, "gamma": 2.0, "tau": 4.0}),
    ):
        _assert_same(
            value_and_grads(lambda a, b, kw=kwargs: L.dist_loss(a, b, **kw), t, s),
            value_and_grads(lambda a, b, r=ref: _dist_reference(a, b, **r), t, s),
        )
    assert torch.autograd.gradcheck(lambda a, b: L.dist_loss(a, b, temperature=2.0), (t, s))


def test_dist_inter_and_intra_terms_separately():
    t, s = _logits()
    inter = L.dist_loss(t, s, gamma=0.0)
    intra = L.dist_loss(t, s, beta=0.0)
    torch.testing.assert_close(inter, _dist_reference(t, s, gamma=0.0))
    torch.testing.assert_close(intra, _dist_reference(t, s, beta=0.0))
    torch.testing.assert_close(inter + intra, L.dist_loss(t, s))


@pytest.mark.parametrize("scale", [3.0, 1e-2], ids=["spread", "near-constant"])
def test_dist_equals_the_authors_code(scale):
    # few samples, and at scale 1e-2 a near-uniform softmax: the centred probabilities are ~1e-3, their norms'
    # product ~1e-5, so eps = 1e-8 moves the correlation by ~1e-3 and the two ways of applying eps differ
    t, s = (torch.randn(3, 4, dtype=DOUBLE) * scale for _ in range(2))
    t, s = t.requires_grad_(), s.requires_grad_()
    for options in ({}, {"beta": 2.0, "gamma": 0.5, "tau": 4.0, "eps": 1e-6}):
        kwargs = {("temperature" if k == "tau" else k): v for k, v in options.items()}
        ours = value_and_grads(lambda a, b, kw=kwargs: L.dist_loss(a, b, **kw), t, s)
        _assert_same(ours, value_and_grads(lambda a, b, o=options: _dist_authors(b, a, **o), t, s), tol=1e-12)
    if scale < 1:  # the batch tells the formulas apart: torchdistill's clamped norms give another value
        clamped = _dist_authors(s, t, cosine=torch.nn.functional.cosine_similarity)
        assert abs(float(L.dist_loss(t, s).detach()) - float(clamped.detach())) > 1e-3


def test_dist_matches_torchdistill_as_eps_goes_to_0():
    # torchdistill's DISTLoss uses F.cosine_similarity (each norm clamped at eps) where the authors add eps to the
    # product of the norms; with an eps far below the norms (~0.1 here) both are Pearson's r to float64 precision
    td = mid_level()
    t, s = _logits(n=8, c=10)
    for beta, gamma, tau in ((1.0, 1.0, 1.0), (2.0, 0.5, 4.0)):
        ref = td.DISTLoss("student", "output", "teacher", "output", beta=beta, gamma=gamma, tau=tau, eps=1e-30)

        def theirs(a, b, ref=ref):
            return ref({"student": {"output": b}}, {"teacher": {"output": a}})

        ours = functools.partial(L.dist_loss, beta=beta, gamma=gamma, temperature=tau, eps=1e-30)
        _assert_same(value_and_grads(ours, t, s), value_and_grads(theirs, t, s))


def test_dist_identical_affine_and_extreme_inputs():
    t = torch.randn(6, 10) * 2
    # identical inputs: each correlation is |a|^2 / (|a|^2 + eps), not 1 (the authors' eps): 1.2e-6 in all here;
    # the float32 loss is that to float32 rounding of the O(1) correlations (~1e-7)
    assert abs(float(L.dist_loss(t, t)) - float(_dist_authors(t.double(), t.double()))) < 1e-6
    # correlation ignores the scale and shift of the probabilities, not of the logits: no invariance to 2t
    assert float(L.dist_loss(t, 2 * t)) > 1e-3
    for s in (torch.zeros(6, 10), torch.full((6, 10), 1e4), 1e4 * torch.randn(6, 10)):
        s = s.requires_grad_()
        loss = L.dist_loss(1e4 * t, s)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # one-hot teacher rows at logits of 1e4: constant columns; the correlation's eps keeps it finite
    one_hot = torch.zeros(6, 10)
    one_hot[:, 0] = 1e4
    g = grad(lambda x: L.dist_loss(one_hot, x))(torch.randn(6, 10))
    assert torch.isfinite(g).all()
    # a constant student: every centred row and column is 0 and correlates 0 (the authors' code: 0 / eps)
    g, value = torch.func.grad_and_value(lambda x: L.dist_loss(t, x, beta=2.0, gamma=3.0))(torch.zeros(6, 10))
    assert float(value) == 5.0 and torch.isfinite(g).all()


def test_dist_temperature_sweep_under_vmap():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    temps = torch.tensor([1.0, 2.0, 4.0])
    swept = vmap(lambda T: L.dist_loss(t, s, temperature=T))(temps)
    looped = torch.stack([L.dist_loss(t, s, temperature=float(T)) for T in temps])
    torch.testing.assert_close(swept, looped)


def test_dist_errors():
    with pytest.raises(
        ValueError, match=r"dist_loss: needs logits \(N, C\) .*got shape \(2, 3, 4\); .*flatten\(0, 1\)"
    ):
        L.dist_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(
        ValueError, match=r"dist_loss: needs logits \(N, C\) with at least 2 samples .*got shape \(1, 4\)"
    ):
        L.dist_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"dist_loss: teacher and student shapes differ: \(3, 4\) vs \(3, 5\)"):
        L.dist_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="dist_loss: gamma must be a finite number >= 0, got -1"):
        L.dist_loss(torch.randn(3, 4), torch.randn(3, 4), gamma=-1.0)
    with pytest.raises(ValueError, match="DISTLoss: temperature must be a positive finite number, got 0"):
        L.DISTLoss(temperature=0)


# ---------------------------------------------------------------- logit standardization (Sun et al. 2024)


def test_standardize_matches_sample_statistics():
    z = torch.randn(4, 7, dtype=DOUBLE) * 5 + 3
    got = L.standardize_logits(z, eps=1e-7)
    for row, out in zip(z.tolist(), got.tolist()):
        mean, stdev = statistics.mean(row), statistics.stdev(row)  # stdev: Bessel's correction
        assert out == pytest.approx([(v - mean) / (stdev + 1e-7) for v in row], rel=1e-12)


def test_standardize_matches_authors_formula_values_and_gradients():
    def authors(z, eps=1e-7):  # the formula of the authors' code, with torch.std
        return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))

    t, s = _logits(n=3, c=5)
    _assert_same(
        value_and_grads(
            lambda a, b: L.kd_loss(L.standardize_logits(a), L.standardize_logits(b), temperature=2.0), t, s
        ),
        value_and_grads(lambda a, b: L.kd_loss(authors(a), authors(b), temperature=2.0), t, s),
    )
    assert torch.autograd.gradcheck(L.standardize_logits, (t,))
    tokens = torch.randn(2, 3, 5, dtype=DOUBLE)
    torch.testing.assert_close(L.standardize_logits(tokens), authors(tokens))


def test_standardized_kd_matches_torchdistill_times_t_squared():
    td = mid_level()
    t, s = _logits(n=6, c=10)
    T = 3.0
    ref = td.LogitStdKDLoss("student", "output", "teacher", "output", temperature=T, alpha=0.0)

    def theirs(a, b):  # without labels torchdistill returns the KL without the T^2 factor
        return T**2 * ref({"student": {"output": b}}, {"teacher": {"output": a}})

    loss = L.LogitStandardization(L.KDLoss(temperature=T))
    _assert_same(value_and_grads(loss, t, s), value_and_grads(theirs, t, s))


def test_standardized_dkd_and_kd_ignore_scale_and_shift():
    t = torch.randn(5, 8, dtype=DOUBLE)
    y = torch.tensor([0, 3, 7, 7, 1])
    s = 0.25 * t - 4.0  # same logits up to a positive scale and a shift
    z = L.standardize_logits
    assert float(L.kd_loss(z(t), z(s), temperature=2.0)) < 1e-12
    assert float(L.dkd_loss(z(t), z(s), y)) < 1e-12
    assert float(L.kd_loss(t, s, temperature=2.0)) > 0.1  # plain KD sees the difference
    # composing by hand and through the module form give the same DKD
    other = torch.randn(5, 8, dtype=DOUBLE)
    torch.testing.assert_close(
        L.LogitStandardization(L.DKDLoss(beta=2.0))(t, other, y), L.dkd_loss(z(t), z(other), y, beta=2.0)
    )


def test_standardize_constant_and_extreme_logits_stay_finite():
    constant = torch.full((2, 5), 3.0, requires_grad=True)
    out = L.standardize_logits(constant)
    (g,) = torch.autograd.grad(out[:, 0].sum() + L.kd_loss(torch.randn(2, 5), out), constant)
    assert out.abs().max() == 0 and torch.isfinite(g).all()
    for x in (1e4 * torch.randn(3, 6), torch.tensor([[1e4, -1e4, 0.0, 0.0]]), torch.zeros(3, 6)):
        x = x.requires_grad_()
        t = 1e4 * torch.randn(x.shape)
        y = torch.zeros(x.shape[0], dtype=torch.long)
        loss = L.kd_loss(L.standardize_logits(t), L.standardize_logits(x)) + L.dkd_loss(
            L.standardize_logits(t), L.standardize_logits(x), y
        )
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_standardize_errors():
    with pytest.raises(
        ValueError, match=r"standardize_logits: needs logits \(\.\.\., C\) with at least 2 classes .*\(3, 1\)"
    ):
        L.standardize_logits(torch.randn(3, 1))
    with pytest.raises(TypeError, match="standardize_logits: logits must be a tensor, got tuple"):
        L.standardize_logits((torch.randn(3, 2),))
    with pytest.raises(ValueError, match="standardize_logits: eps must be a positive finite number, got 0"):
        L.standardize_logits(torch.randn(3, 2), eps=0.0)
    with pytest.raises(TypeError, match=r"LogitStandardization: loss must be a logit loss .*got str"):
        L.LogitStandardization("kd")
