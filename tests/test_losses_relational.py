"""RKD (distance and angle) against a loop reference from the paper's definitions; invariances, errors."""

from __future__ import annotations

import math

import pytest
import torch

from funcdistill import losses as L
from tests.conftest import close

pytestmark = pytest.mark.usefixtures("seed")


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
