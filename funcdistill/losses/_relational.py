"""Relational knowledge distillation (RKD): match distances and angles within a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import REDUCTIONS, check_reduction, check_tensors, check_weight, reduce
from funcdistill.losses._module import LossModule, reduction_in

__all__ = ["RKDLoss", "rkd_loss"]

_EPS = 1e-12


def rkd_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    distance_weight: float | torch.Tensor = 25.0,
    angle_weight: float | torch.Tensor = 50.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Relational knowledge distillation of Park, Kim, Lu & Cho (2019).

    "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Instead of
    matching each sample's features, the student matches the *structure* of the
    batch, so teacher and student widths may differ:

    * distance-wise (RKD-D): pairwise distances
      :math:`\psi_D(x_i, x_j) = \|x_i - x_j\|_2 / \mu`, where :math:`\mu` is the
      mean distance over the pairs of the batch;
    * angle-wise (RKD-A): :math:`\psi_A(x_i, x_j, x_k) = \cos\angle x_j x_i x_k`,
      the cosine of the angle at :math:`x_i`,

    each compared with the Huber (smooth L1, :math:`\delta = 1`) loss and averaged
    over all ``N**2`` pairs and ``N**3`` triplets (degenerate ones contribute 0),
    then weighted. The default weights are the paper's for image classification
    (25 and 50).

    ``reduction="none"`` returns one value per sample ``i``: its weighted mean
    over the pairs ``(i, j)`` and the triplets with vertex ``i``; ``"mean"``
    (the usual RKD loss) and ``"sum"`` reduce those.

    Args:
        teacher: teacher embeddings ``(N, ...)``, flattened to ``(N, D_t)``.
        student: student embeddings ``(N, ...)``, flattened to ``(N, D_s)``.
        distance_weight: weight of RKD-D (number >= 0 or 0-d tensor).
        angle_weight: weight of RKD-A (number >= 0 or 0-d tensor).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: fewer than 2 samples, different batch sizes, or an unknown reduction.

    Example:
        >>> import torch
        >>> t = torch.randn(6, 32)
        >>> round(float(rkd_loss(t, 2 * t)), 6)  # a scaled copy has the same structure
        0.0
    """
    name = "rkd_loss"
    check_reduction(name, reduction)
    check_tensors(name, teacher=teacher, student=student)
    check_weight(name, "distance_weight", distance_weight)
    check_weight(name, "angle_weight", angle_weight)
    check_batches(name, teacher, student, minimum=2, method="RKD")
    t = teacher.flatten(1)
    s = student.flatten(1)
    t_diff, s_diff = _differences(t), _differences(s)
    distance = F.smooth_l1_loss(_normalised_distances(s_diff), _normalised_distances(t_diff), reduction="none")
    angle = F.smooth_l1_loss(_angles(s_diff), _angles(t_diff), reduction="none")
    per_sample = distance_weight * distance.mean(-1) + angle_weight * angle.flatten(1).mean(-1)
    return reduce(per_sample, reduction)


def check_batches(loss: str, teacher: torch.Tensor, student: torch.Tensor, *, minimum: int, method: str) -> None:
    """Check two batches ``(N, ...)`` of the same size ``N >= minimum`` (their widths may differ)."""
    for role, x in (("teacher", teacher), ("student", student)):
        if x.dim() < 2 or x.shape[0] < minimum:
            raise ValueError(
                f"{loss}: {role} must be a batch of at least {minimum} embeddings (N, ...), "
                f"got shape {tuple(x.shape)}; {method} compares samples within a batch."
            )
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{loss}: teacher and student batch sizes differ: {teacher.shape[0]} vs {student.shape[0]}.")


def _differences(x: torch.Tensor) -> torch.Tensor:
    """``d[i, j] = x[j] - x[i]``, shape ``(N, N, D)``."""
    return x.unsqueeze(0) - x.unsqueeze(1)


def _normalised_distances(diff: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over the ``N * (N - 1)`` pairs ``i != j``."""
    n = diff.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=diff.device)
    # clamp before sqrt: the gradient of sqrt at 0 (the diagonal) would be infinite
    dist = diff.pow(2).sum(-1).clamp_min(_EPS).sqrt() * off_diagonal
    mean = dist.sum() / (n * (n - 1))
    return dist / mean.clamp_min(_EPS)


def _angles(diff: torch.Tensor) -> torch.Tensor:
    """``a[i, j, k]`` = cosine of the angle at ``x[i]`` between ``x[j]`` and ``x[k]``."""
    unit = F.normalize(diff, p=2, dim=-1)
    return unit @ unit.transpose(-1, -2)


class RKDLoss(LossModule):
    """:func:`rkd_loss` as a module, for use as a mapping payload.

    Args:
        distance_weight: weight of the distance term.
        angle_weight: weight of the angle term.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 8)
        >>> float(RKDLoss()(x, x))
        0.0
    """

    distance_weight: float | torch.Tensor
    angle_weight: float | torch.Tensor
    reduction: str
    _function = staticmethod(rkd_loss)
    _checks = (
        ("distance_weight", check_weight),
        ("angle_weight", check_weight),
        ("reduction", reduction_in(REDUCTIONS)),
    )

    def __init__(
        self,
        distance_weight: float | torch.Tensor = 25.0,
        angle_weight: float | torch.Tensor = 50.0,
        *,
        reduction: str = "mean",
    ):
        super().__init__(distance_weight=distance_weight, angle_weight=angle_weight, reduction=reduction)
