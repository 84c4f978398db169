"""Tests of funcdistill.losses against hand-computed and independent reference values."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from funcdistill import Mapping, distill, state
from funcdistill import losses as L
from tests.conftest import close

pytestmark = pytest.mark.usefixtures("seed")


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


# ---------------------------------------------------------------- FitNets (Romero 2015)


def test_fitnets_value_and_adapter_shapes():
    conv = L.hint_adapter(3, 5)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (3, 5)
    lin = L.hint_adapter(3, 5, ndim=3)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (3, 5)
    t, s = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    loss = L.FitNetsLoss(conv)
    mapped = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], s)
    close(loss(t, s), ((t - mapped) ** 2).mean())
    assert L.FitNetsLoss(conv, reduction="none")(t, s).shape == (2, 5, 4, 4)
    close(L.FitNetsLoss(reduction="sum")(t, t + 1), t.numel())


def test_fitnets_adapter_trains_through_functional_api():
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    student = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU())
    hint = L.FitNetsLoss(L.hint_adapter(2, 8))
    mapping = Mapping(teacher, student).add("1", "1", hint)
    fn = distill(teacher, student, mapping)
    ss = state(student, mapping)
    assert {"payloads.0.adapter.weight", "0.weight", "0.bias"} <= ss.keys()
    x = torch.randn(4, 3, 6, 6)
    ts = state(teacher)

    def loss(ss):
        return sum(c(t, s) for t, s, c in fn(ts, ss, x))

    grads = grad(loss)(ss)
    assert grads["payloads.0.adapter.weight"].abs().sum() > 0
    assert grads["0.weight"].abs().sum() > 0
    # the gradient is that of the loss written by hand with the given adapter weight
    w = ss["payloads.0.adapter.weight"].detach().clone().requires_grad_()
    with torch.no_grad():
        target = teacher[:2](x)
    F.mse_loss(F.conv2d(student(x), w), target).backward()
    close(grads["payloads.0.adapter.weight"], w.grad)
    # a few SGD steps on the state (adapter included) lower the loss
    with torch.no_grad():
        before = float(loss(ss))
    for _ in range(20):
        g = grad(loss)(ss)
        ss = {k: v - 0.2 * g[k] for k, v in ss.items()}
    with torch.no_grad():
        after = float(loss(ss))
    assert after < 0.9 * before
    # .backward() reaches the adapter's own parameters
    hint.adapter.zero_grad()
    loss(state(student, mapping)).backward()
    assert hint.adapter.weight.grad is not None and hint.adapter.weight.grad.abs().sum() > 0


def test_fitnets_and_adapter_errors():
    with pytest.raises(
        ValueError, match=r"mse_loss: teacher and student shapes differ.*hint_adapter\(student_width, teacher_width\)"
    ):
        L.FitNetsLoss()(torch.randn(2, 8, 3, 3), torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match=r"FitNetsLoss: adapter must be an nn\.Module or None .*got function"):
        L.FitNetsLoss(lambda x: x)
    with pytest.raises(ValueError, match=r"hint_adapter: ndim must be 4 .* got 5"):
        L.hint_adapter(2, 4, ndim=5)
    with pytest.raises(TypeError, match="hint_adapter: student_channels must be an int, got float"):
        L.hint_adapter(2.0, 4)
    with pytest.raises(ValueError, match="teacher_channels must be positive, got 0"):
        L.hint_adapter(2, 0)


# ---------------------------------------------------------------- attention transfer


def test_attention_transfer_hand_computed():
    # teacher attention [1, 0]; student (2 channels) attention [0, 1]: distance^2 = 2
    t = torch.tensor([[[[1.0, 0.0]]]])
    s = torch.tensor([[[[0.0, 1.0]], [[0.0, -2.0]]]])
    close(L.attention_transfer_loss(t, s), 2.0)
    # p=2 on teacher [3, 4] -> [9, 16]/sqrt(337); student [4, 3] -> [16, 9]/sqrt(337)
    t = torch.tensor([[[[3.0, 4.0]]]])
    s = torch.tensor([[[[4.0, 3.0]]]])
    close(L.attention_transfer_loss(t, s), 2 * 49 / 337)
    # p=1: [3, 4]/5 vs [4, 3]/5 -> 2 / 25
    close(L.attention_transfer_loss(t, s, p=1), 2 / 25)


def test_attention_transfer_reference_and_reductions():
    t, s = torch.randn(3, 16, 5, 5), torch.randn(3, 4, 5, 5)

    def attention(x):  # summed over channels instead of averaged: the normalisation cancels it
        q = (x**2).sum(1).reshape(x.shape[0], -1)
        return q / q.norm(dim=1, keepdim=True)

    per_sample = ((attention(s) - attention(t)) ** 2).sum(1)
    close(L.attention_transfer_loss(t, s, reduction="none"), per_sample)
    close(L.attention_transfer_loss(t, s), per_sample.mean())
    close(L.AttentionTransferLoss(reduction="sum")(t, s), per_sample.sum())
    close(L.attention_transfer_loss(t, 7 * t), 0.0)


def test_attention_transfer_errors():
    with pytest.raises(ValueError, match=r"same batch and spatial sizes .*functional\.interpolate"):
        L.attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"teacher must be a feature map \(\.\.\., C, H, W\), got shape \(2, 3\)"):
        L.attention_transfer_loss(torch.randn(2, 3), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="p must be a positive finite number, got -2"):
        L.AttentionTransferLoss(p=-2)


# ---------------------------------------------------------------- RKD (Park 2019)


def _rkd_reference(t, s, wd, wa):
    """RKD from the paper's definitions with explicit loops over pairs and triplets."""
    n = len(t)

    def sub(a, b):
        return [x - y for x, y in zip(a, b)]

    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def psi_d(x):
        dist = [[norm(sub(x[i], x[j])) for j in range(n)] for i in range(n)]
        mu = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d / mu for d in row] for row in dist]

    def cos_at(x, i, j, k):
        a, b = sub(x[j], x[i]), sub(x[k], x[i])
        if norm(a) == 0 or norm(b) == 0:
            return 0.0
        return sum(p * q for p, q in zip(a, b)) / (norm(a) * norm(b))

    dt, ds = psi_d(t), psi_d(s)
    dist = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    angle = sum(huber(cos_at(s, *ijk), cos_at(t, *ijk)) for ijk in triplets) / n**3
    return wd * dist + wa * angle


def test_rkd_matches_loop_reference():
    t = torch.randn(5, 7, dtype=torch.float64)
    s = torch.randn(5, 3, dtype=torch.float64) * 3  # different width; large enough for both Huber branches
    expected = _rkd_reference(t.tolist(), s.tolist(), 25.0, 50.0)
    torch.testing.assert_close(L.rkd_loss(t, s), torch.tensor(expected, dtype=torch.float64))
    only_d = _rkd_reference(t.tolist(), s.tolist(), 1.0, 0.0)
    torch.testing.assert_close(
        L.rkd_loss(t, s, distance_weight=1.0, angle_weight=0.0), torch.tensor(only_d, dtype=torch.float64)
    )
    per_sample = L.rkd_loss(t, s, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample.mean(), L.rkd_loss(t, s))
    torch.testing.assert_close(per_sample.sum(), L.RKDLoss(reduction="sum")(t, s))


def test_rkd_invariances_and_finite_gradients():
    t = torch.randn(6, 4)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    rotated_scaled_padded = torch.cat([3 * t @ q + 1.0, torch.zeros(6, 2)], dim=1)
    close(L.rkd_loss(t, rotated_scaled_padded), 0.0, tol=1e-4)
    s = torch.randn(6, 3)
    s[1] = s[0]  # a duplicate: zero distance, undefined direction
    s.requires_grad_()
    loss = L.rkd_loss(t, s)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_errors():
    with pytest.raises(
        ValueError, match=r"rkd_loss: teacher must be a batch of at least 2 embeddings .*got shape \(1, 4\)"
    ):
        L.rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="batch sizes differ: 4 vs 3"):
        L.rkd_loss(torch.randn(4, 2), torch.randn(3, 2))


# ---------------------------------------------------------------- cosine and MSE


def test_cosine_and_mse_values():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = torch.tensor([[2.0, 0.0], [3.0, 0.0], [-1.0, -1.0]])
    close(L.cosine_loss(t, s, reduction="none"), [0.0, 1.0, 2.0])
    close(L.cosine_loss(t, s), 1.0)
    close(L.cosine_loss(t, s, reduction="sum"), 3.0)
    close(L.cosine_loss(t.T, s.T, dim=0, reduction="none"), [0.0, 1.0, 2.0])
    close(L.mse_loss(t, s, reduction="none"), (s - t) ** 2)
    close(L.mse_loss(t, s), F.mse_loss(s, t))
    close(L.mse_loss(t, s, reduction="sum"), 1 + 9 + 4 + 4 + 4)
    lin = L.hint_adapter(3, 2, ndim=2)
    x = torch.randn(4, 3)
    close(L.CosineLoss(lin)(t[:1].expand(4, 2), x), L.cosine_loss(t[:1].expand(4, 2), lin(x)))


def test_cosine_shape_error():
    with pytest.raises(ValueError, match=r"cosine_loss: teacher and student shapes differ: \(2, 8\) vs \(2, 4\)"):
        L.cosine_loss(torch.randn(2, 8), torch.randn(2, 4))


# ---------------------------------------------------------------- all losses


def _cases():
    y = torch.tensor([0, 2, 1, 3])
    return {
        "kd_loss": (L.kd_loss, (torch.randn(4, 5), torch.randn(4, 5)), {"temperature": 2.0}),
        "dkd_loss": (functools.partial(L.dkd_loss, target=y), (torch.randn(4, 5), torch.randn(4, 5)), {}),
        "attention_transfer_loss": (L.attention_transfer_loss, (torch.randn(4, 6, 3, 3), torch.randn(4, 2, 3, 3)), {}),
        "rkd_loss": (L.rkd_loss, (torch.randn(4, 6), torch.randn(4, 3)), {}),
        "cosine_loss": (L.cosine_loss, (torch.randn(4, 5), torch.randn(4, 5)), {}),
        "mse_loss": (L.mse_loss, (torch.randn(4, 5), torch.randn(4, 5)), {}),
        "pkt_loss": (L.pkt_loss, (torch.randn(4, 6), torch.randn(4, 3)), {}),
        "sp_loss": (L.sp_loss, (torch.randn(4, 6, 2, 2), torch.randn(4, 3, 3, 3)), {}),
        "crd_loss": (_crd_case(), (torch.randn(4, 6), torch.randn(4, 6)), {}),
        "dist_loss": (L.dist_loss, (torch.randn(4, 5), torch.randn(4, 5)), {"temperature": 2.0}),
        "standardized_kd": (_standardized(L.kd_loss), (torch.randn(4, 5), torch.randn(4, 5)), {"temperature": 2.0}),
        "standardized_dkd": (
            _standardized(functools.partial(L.dkd_loss, target=y)),
            (torch.randn(4, 5), torch.randn(4, 5)),
            {"temperature": 2.0},
        ),
    }


def _crd_case():
    """crd_loss on a fixed state and fixed indices, returning the loss only."""
    state = L.crd_init(10, 6, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 3, 4, 9])
    negatives = L.crd_negatives(index, 10, 5, generator=torch.Generator().manual_seed(1))

    def crd(t, s, **kwargs):
        return L.crd_loss(t, s, state, index, negatives, **kwargs)[0]

    return crd


def _standardized(loss):
    def standardized(t, s, **kwargs):
        return loss(L.standardize_logits(t), L.standardize_logits(s), **kwargs)

    return standardized


CASES = list(_cases())
KL_LOSSES = {"kd_loss", "dkd_loss", "standardized_kd", "standardized_dkd"}
LOSS_NAMES = {"standardized_kd": "kd_loss", "standardized_dkd": "dkd_loss"}
REDUCED = [name for name in CASES if name != "dist_loss"]  # DIST's intra-class term has no per-sample value


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("bad", ["avg", None, "batchmean"])
def test_bad_reduction_names_valid_values(name, bad):
    fn, args, kwargs = _cases()[name]
    if bad == "batchmean" and name in KL_LOSSES:
        fn(*args, reduction=bad, **kwargs)  # valid for the KL losses
        return
    valid = "'none', 'mean', 'sum'" + (", 'batchmean'" if name in KL_LOSSES else "")
    with pytest.raises(
        ValueError, match=rf"{LOSS_NAMES.get(name, name)}: reduction must be one of {valid}, got {bad!r}"
    ):
        fn(*args, reduction=bad, **kwargs)


@pytest.mark.parametrize("name", REDUCED)
def test_reductions_agree(name):
    fn, args, kwargs = _cases()[name]
    none = fn(*args, reduction="none", **kwargs)
    close(fn(*args, reduction="mean", **kwargs), none.mean())
    close(fn(*args, reduction="sum", **kwargs), none.sum())
    assert none.numel() > 1 and float(none.abs().sum()) > 0


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_a_sweep_matches_loop(name):
    fn, (t, s), kwargs = _cases()[name]
    students = torch.stack([s, torch.randn_like(s), s.flip(0)])
    swept = vmap(lambda x: fn(t, x, **kwargs))(students)
    looped = torch.stack([fn(t, x, **kwargs) for x in students])
    close(swept, looped)
    assert len(set(looped.tolist())) == 3


@pytest.mark.parametrize("name", CASES)
def test_no_graph_breaks(name):
    fn, args, kwargs = _cases()[name]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, b: fn(a, b, **kwargs))(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.compile
def test_compiled_losses_fullgraph_match_eager():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 2, 1, 3])

    def total(t, s, T):
        return L.kd_loss(t, s, temperature=T) + L.dkd_loss(t, s, y, temperature=T)

    torch._dynamo.reset()
    compiled = torch.compile(total, fullgraph=True)
    T = torch.tensor(3.0)
    close(compiled(t, s, T), total(t, s, T))


@pytest.mark.compile
def test_compiled_new_losses_fullgraph_match_eager():
    # PKT, SP, DIST, standardized KD and DKD, and CRD with its state, in one graph
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 2, 1, 3])
    index = torch.tensor([1, 6, 2, 7])
    negatives = L.crd_negatives(index, 8, 3, generator=torch.Generator().manual_seed(0))
    crd_state = L.crd_init(8, 5, generator=torch.Generator().manual_seed(1))

    def total(t, s, T, crd_state):
        zt, zs = L.standardize_logits(t), L.standardize_logits(s)
        crd, new_state = L.crd_loss(t, s, crd_state, index, negatives, temperature=T / 10)
        relational = L.pkt_loss(t, s) + L.sp_loss(t, s) + L.dist_loss(t, s, temperature=T)
        return relational + L.kd_loss(zt, zs, temperature=T) + L.dkd_loss(zt, zs, y, temperature=T) + crd, new_state

    torch._dynamo.reset()
    compiled = torch.compile(total, fullgraph=True)
    T = torch.tensor(2.0)
    got, got_state = compiled(t, s, T, crd_state)
    expected, expected_state = total(t, s, T, crd_state)
    close(got, expected)
    for a, b in zip(got_state, expected_state):
        close(a, b)


def test_module_forms_match_functions():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 2, 1, 3])
    close(L.KDLoss(temperature=3.0, reduction="sum")(t, s), L.kd_loss(t, s, temperature=3.0, reduction="sum"))
    close(L.DKDLoss(0.5, 2.0, 3.0)(t, s, y), L.dkd_loss(t, s, y, alpha=0.5, beta=2.0, temperature=3.0))
    close(L.RKDLoss(1.0, 2.0)(t, s), L.rkd_loss(t, s, distance_weight=1.0, angle_weight=2.0))
    close(L.CosineLoss(reduction="sum")(t, s), L.cosine_loss(t, s, reduction="sum"))
    close(L.PKTLoss(1e-5, reduction="sum")(t, s), L.pkt_loss(t, s, eps=1e-5, reduction="sum"))
    close(L.SPLoss(reduction="none")(t, s), L.sp_loss(t, s, reduction="none"))
    close(L.DISTLoss(0.5, 2.0, 3.0)(t, s), L.dist_loss(t, s, beta=0.5, gamma=2.0, temperature=3.0))
    z = L.standardize_logits
    close(L.LogitStandardization(L.KDLoss(temperature=2.0))(t, s), L.kd_loss(z(t), z(s), temperature=2.0))
    close(L.LogitStandardization(L.DKDLoss(beta=2.0))(t, s, y), L.dkd_loss(z(t), z(s), y, beta=2.0))
    close(L.LogitStandardization(L.kd_loss, eps=1e-3)(t, s), L.kd_loss(z(t, eps=1e-3), z(s, eps=1e-3)))
    assert "temperature=3.0" in repr(L.KDLoss(temperature=3.0))
    with pytest.raises(ValueError, match="CosineLoss: reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"):
        L.CosineLoss(reduction="batchmean")


def test_losses_as_payloads_in_a_functional_step():
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    student = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 4))
    mapping = (
        Mapping(teacher, student)
        .add("", "", L.KDLoss(temperature=4.0))
        .add("1", "1", L.RKDLoss())
        .add("1", "1", L.CosineLoss(L.hint_adapter(3, 12, ndim=2)))
    )
    fn = distill(teacher, student, mapping)
    x = torch.randn(8, 6)

    def loss(ss):
        return sum(c(t, s) for t, s, c in fn(state(teacher), ss, x))

    ss = state(student, mapping)
    g = grad(loss)(ss)
    assert g.keys() == ss.keys()
    assert all(v.abs().sum() > 0 for v in g.values())
    with torch.no_grad():
        ht, hs = teacher[:2](x), student[:2](x)
        expected = (
            L.kd_loss(teacher(x), student(x), temperature=4.0)
            + L.rkd_loss(ht, hs)
            + L.cosine_loss(ht, mapping[2].payload.adapter(hs))
        )
    close(loss(ss), expected)


def test_public_names():
    assert sorted(L.__all__) == sorted(
        [
            "AttentionTransferLoss",
            "CosineLoss",
            "DKDLoss",
            "FitNetsLoss",
            "KDLoss",
            "RKDLoss",
            "attention_transfer_loss",
            "cosine_loss",
            "dkd_loss",
            "hint_adapter",
            "kd_loss",
            "mse_loss",
            "rkd_loss",
            "CRDLoss",
            "CRDState",
            "DISTLoss",
            "LogitStandardization",
            "PKTLoss",
            "SPLoss",
            "crd_head",
            "crd_init",
            "crd_loss",
            "crd_negatives",
            "dist_loss",
            "pkt_loss",
            "sp_loss",
            "standardize_logits",
            "GeneralizedJSDLoss",
            "SkewKLLoss",
            "fused_linear_jsd_loss",
            "fused_linear_topk_kl_loss",
            "generalized_jsd_loss",
            "skew_kl_loss",
            "topk_kl_loss",
        ]
    )
    papers = {
        "kd_loss": "Hinton",
        "dkd_loss": "Zhao",
        "FitNetsLoss": "Romero",
        "attention_transfer_loss": "Zagoruyko",
        "rkd_loss": "Park",
        "cosine_loss": "DistilBERT",
        "pkt_loss": "Passalis",
        "sp_loss": "Tung",
        "crd_loss": "Tian",
        "dist_loss": "Huang",
        "standardize_logits": "Sun",
    }
    for name, author in papers.items():
        assert author in getattr(L, name).__doc__, name
    assert "(teacher, student, ...)" in L.__doc__


def test_losses_as_payloads_through_the_compat_shim():
    compat = pytest.importorskip("funcdistill.compat")
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    student = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 5))
    hint = L.FitNetsLoss(L.hint_adapter(2, 8))
    mapping = compat.Mapping(teacher, student)
    mapping.add("", "", payload=L.KDLoss(temperature=4.0))
    mapping.add(teacher[1], student[1], payload=hint)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        expected = L.kd_loss(teacher(x), student(x), temperature=4.0) + hint(teacher[:2](x), student[:2](x))
    with compat.distill(teacher=teacher, student=student, mapping=mapping) as model:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = sum(criterion(t, s) for t, s, criterion in model(x))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    close(losses[0], expected)
    assert hint.adapter.weight.grad is not None and hint.adapter.weight.grad.abs().sum() > 0
    assert teacher[0].weight.grad is None
    assert losses[-1] < losses[0]
