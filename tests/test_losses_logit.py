"""KD, DKD, DIST and logit standardization: hand-computed values, the papers' formulas, torchdistill 1.1.5, extremes."""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from funcdistill import Mapping, distill, state
from funcdistill import losses as L
from tests.conftest import close, value_and_grads
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


# ---------------------------------------------------------------- KD (Hinton 2015)


def test_kd_hand_computed_and_asymmetric():
    # teacher softmax = [1/4, 3/4], student softmax = [1/2, 1/2]
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    close(L.kd_loss(t, s), expected)
    # teacher first: swapping the arguments gives the other KL direction
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    close(L.kd_loss(s, t), reverse)
    assert abs(expected - reverse) > 1e-3
    # at T = 2 the same distributions come from doubled logits, and the loss is scaled by T^2 = 4
    close(L.kd_loss(2 * t, 2 * s, temperature=2.0), 4 * expected)


def test_kd_matches_torch_kl_div():
    t, s = torch.randn(6, 10), torch.randn(6, 10)
    T = 3.0
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    close(L.kd_loss(t, s, temperature=T), ref)


def test_kd_gradient_is_T_times_probability_difference():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    T = 2.5
    g = grad(lambda x: L.kd_loss(t, x, temperature=T))(s)
    expected = T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / 4  # batchmean over 4 rows
    close(g, expected)


def test_kd_reductions_on_token_logits():
    t, s = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    per_token = L.kd_loss(t, s, reduction="none")
    assert per_token.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            close(per_token[b, i], L.kd_loss(t[b, i : i + 1], s[b, i : i + 1]))
    close(L.kd_loss(t, s, reduction="sum"), per_token.sum())
    close(L.kd_loss(t, s, reduction="mean"), per_token.sum() / 6)
    close(L.kd_loss(t, s, reduction="batchmean"), per_token.sum() / 2)


def test_kd_vmap_over_temperatures_matches_loop():
    t, s = torch.randn(5, 4), torch.randn(5, 4)
    temps = torch.tensor([0.5, 1.0, 2.0, 8.0])
    swept = vmap(lambda T: L.kd_loss(t, s, temperature=T))(temps)
    looped = torch.stack([L.kd_loss(t, s, temperature=float(T)) for T in temps])
    close(swept, looped)
    assert len(set(looped.tolist())) == 4


def test_kd_masked_teacher_class_gives_finite_loss_and_gradient():
    t = torch.tensor([[2.0, float("-inf"), 0.0]], requires_grad=True)
    s = torch.tensor([[1.0, 3.0, -1.0]], requires_grad=True)
    loss = L.kd_loss(t, s)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    p_t = F.softmax(t.detach(), -1)[0]
    log_s = F.log_softmax(s.detach(), -1)[0]
    expected = sum(float(p_t[i] * (p_t[i].log() - log_s[i])) for i in (0, 2))
    close(loss, expected)


def test_kd_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"kd_loss: teacher and student shapes differ: \(2, 3\) vs \(2, 4\)"):
        L.kd_loss(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        L.kd_loss(x, x, temperature=0)
    with pytest.raises(TypeError, match="temperature must be a positive number or a 0-d tensor, got str"):
        L.kd_loss(x, x, temperature="4")
    with pytest.raises(ValueError, match=r"tensor temperature must be 0-d .*got shape \(3,\)"):
        L.kd_loss(x, x, temperature=torch.ones(3))
    with pytest.raises(TypeError, match=r"student_logits must be a tensor, got tuple \(a module that returns a tuple"):
        L.kd_loss(x, (x,))
    with pytest.raises(
        TypeError,
        match=r"teacher_logits must be a tensor, got dict \(a model output object: pass the field you mean, e.g. output.logits\)",
    ):
        L.kd_loss({"logits": x}, x)
    with pytest.raises(ValueError, match="KDLoss: temperature must be a positive finite number, got -1"):
        L.KDLoss(temperature=-1.0)


# ---------------------------------------------------------------- DKD (Zhao 2022)


def _dkd_reference(t, s, y, alpha, beta, T):
    """Per-sample DKD written from the paper's definitions, in plain Python floats."""
    out = []
    for row_t, row_s, g in zip(t.tolist(), s.tolist(), y.tolist()):

        def softmax(row):
            e = [math.exp(v / T) for v in row]
            return [v / sum(e) for v in e]

        pt, ps = softmax(row_t), softmax(row_s)
        bt, bs = [pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]]
        tckd = sum(a * math.log(a / b) for a, b in zip(bt, bs))
        nt = [p / (1 - pt[g]) for i, p in enumerate(pt) if i != g]
        ns = [p / (1 - ps[g]) for i, p in enumerate(ps) if i != g]
        nckd = sum(a * math.log(a / b) for a, b in zip(nt, ns))
        out.append((alpha * tckd + beta * nckd) * T * T)
    return out


def test_dkd_matches_paper_definition():
    t, s = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 5, 2, 2, 3])
    got = L.dkd_loss(t, s, y, alpha=0.7, beta=3.0, temperature=2.0, reduction="none")
    expected = _dkd_reference(t, s, y, 0.7, 3.0, 2.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    close(L.dkd_loss(t, s, y, alpha=0.7, beta=3.0, temperature=2.0), sum(expected) / 5)


def test_dkd_decomposes_classic_kd():
    # Eq. (1) of the paper: KD = TCKD + (1 - p_target_teacher) * NCKD, per sample
    t, s = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    T = 3.0
    tckd = L.dkd_loss(t, s, y, alpha=1.0, beta=0.0, temperature=T, reduction="none")
    nckd = L.dkd_loss(t, s, y, alpha=0.0, beta=1.0, temperature=T, reduction="none")
    p_target = F.softmax(t / T, -1).gather(1, y[:, None]).squeeze(1)
    close(L.kd_loss(t, s, temperature=T, reduction="none"), tckd + (1 - p_target) * nckd)


def test_dkd_gradients_finite_for_both_sides_and_vmap():
    t = torch.randn(4, 5, requires_grad=True)
    s = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([1, 0, 4, 4])
    L.dkd_loss(t, s, y).backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    per_sample = vmap(lambda a, b, c: L.dkd_loss(a, b, c, reduction="none"))(t.detach(), s.detach(), y)
    close(per_sample, L.dkd_loss(t.detach(), s.detach(), y, reduction="none"))
    temps = torch.tensor([1.0, 4.0])
    swept = vmap(lambda T: L.dkd_loss(t.detach(), s.detach(), y, temperature=T))(temps)
    close(swept, torch.stack([L.dkd_loss(t.detach(), s.detach(), y, temperature=float(T)) for T in temps]))


def test_dkd_errors():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        L.dkd_loss(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target has shape \(3, 1\) .* shape \(3,\)"):
        L.dkd_loss(x, x, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        L.dkd_loss(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1"):
        L.dkd_loss(x, x, torch.zeros(3, dtype=torch.long), beta=-1.0)


def test_dkd_as_payload_with_labels():
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(6, 4))
    mapping = Mapping(teacher, student).add("", "", L.DKDLoss(beta=2.0, temperature=2.0))
    fn = distill(teacher, student, mapping)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))

    def loss(ss):
        return sum(payload(t, s, y) for t, s, payload in fn(state(teacher), ss, x))

    with torch.no_grad():
        expected = L.dkd_loss(teacher(x), student(x), y, beta=2.0, temperature=2.0)
    close(loss(state(student)), expected)
    grads = grad(loss)(state(student))
    assert grads["0.weight"].abs().sum() > 0
    # a loop that calls payloads with two arguments: bind the labels per batch
    (pair,) = fn(state(teacher), state(student), x)
    two_args = functools.partial(pair.payload, target=y)
    close(two_args(pair.teacher, pair.student), expected)
    bound = functools.partial(L.dkd_loss, target=y, beta=2.0, temperature=2.0)
    close(bound(pair.teacher, pair.student), expected)


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
