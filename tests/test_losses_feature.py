"""FitNets (and hint adapters), attention transfer, cosine and MSE: hand-computed values and references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from funcdistill import Mapping, distill, state
from funcdistill import losses as L
from tests.conftest import close

pytestmark = pytest.mark.usefixtures("seed")


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
