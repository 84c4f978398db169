"""Losses between the similarity matrices of a batch: PKT and similarity-preserving KD (SP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import REDUCTIONS, check_positive, check_reduction, check_tensors, reduce
from funcdistill.losses._module import LossModule, reduction_in
from funcdistill.losses._relational import check_batches

__all__ = ["PKTLoss", "SPLoss", "pkt_loss", "sp_loss"]


def pkt_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    eps: float = 1e-7,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (PKT) of Passalis & Tefas (2018).

    "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018, arXiv:1803.10837. Each side's batch of embeddings becomes a
    matrix of conditional probabilities from the cosine kernel,
    :math:`p_{j|i} = K_{ij} / \sum_k K_{ik}` with
    :math:`K_{ij} = (1 + \cos(x_i, x_j)) / 2` (the diagonal included), and the
    student matches the teacher's in KL divergence,
    :math:`p^t_{j|i} \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}`,
    summed over the pairs in the paper. Widths may differ.

    Conventions: as in the authors' code (and torchdistill's ``PKTLoss``), the
    vectors are divided by ``norm + eps`` and ``eps`` is added inside the
    logarithm; ``reduction="mean"`` (the default) averages the ``N * N`` terms
    as their code does, ``"sum"`` is the paper's sum, ``"none"`` returns the
    ``(N, N)`` terms (row ``i``: the KL terms of sample ``i``'s distribution).

    Args:
        teacher: teacher embeddings ``(N, ...)``, flattened to ``(N, D_t)``.
        student: student embeddings ``(N, ...)``, flattened to ``(N, D_s)``.
        eps: the stabilising constant of the authors' code (a positive number).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: not batches ``(N, ...)`` of one size, ``eps`` not positive,
            or an unknown reduction.

    Example:
        >>> import torch
        >>> t = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
        >>> abs(float(pkt_loss(t, 3 * t))) < 1e-5  # the cosine kernel ignores scale
        True
        >>> pkt_loss(t, torch.randn(6, 8), reduction="none").shape
        torch.Size([6, 6])
    """
    name = "pkt_loss"
    check_reduction(name, reduction)
    check_tensors(name, teacher=teacher, student=student)
    check_positive(name, "eps", eps)
    check_batches(name, teacher, student, minimum=1, method="PKT")
    p_t = _kernel_probabilities(teacher.flatten(1), eps)
    p_s = _kernel_probabilities(student.flatten(1), eps)
    return reduce(p_t * torch.log((p_t + eps) / (p_s + eps)), reduction)


def _kernel_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of the cosine kernel ``(1 + cos) / 2``, each divided by its sum."""
    unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def sp_loss(teacher: torch.Tensor, student: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""Similarity-preserving knowledge distillation (SP) of Tung & Mori (2019).

    "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682.
    Each side's activations ``(N, ...)`` are flattened to ``Q`` ``(N, D)``; the
    Gram matrix :math:`G = Q Q^\top` has each row L2-normalised, and the loss is
    :math:`\frac{1}{N^2} \| G_t - G_s \|_F^2`. Widths (channels and spatial
    sizes) may differ, only the batch size must agree.

    ``reduction="mean"`` (the default) is the paper's loss, as in RepDistiller
    (the code base of the CRD paper, which reimplements SP); ``"sum"`` drops the :math:`1/N^2`; ``"none"``
    returns the ``(N, N)`` squared differences. For several layer pairs the
    paper sums the losses of the pairs. torchdistill's ``SPKDLoss`` differs:
    it normalises the rows by their L1 norm (``normalize(G, 1)`` sets
    ``p=1``), so its values differ from the paper's.

    Args:
        teacher: teacher activations ``(N, ...)``.
        student: student activations ``(N, ...)``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: not batches ``(N, ...)`` of one size, or an unknown reduction.

    Example:
        >>> import torch
        >>> t = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0))
        >>> abs(float(sp_loss(t, 2 * t))) < 1e-5  # row normalisation removes the scale
        True
        >>> sp_loss(t, torch.randn(4, 8, 5, 5), reduction="none").shape
        torch.Size([4, 4])
    """
    name = "sp_loss"
    check_reduction(name, reduction)
    check_tensors(name, teacher=teacher, student=student)
    check_batches(name, teacher, student, minimum=1, method="SP")
    difference = _normalised_gram(teacher) - _normalised_gram(student)
    return reduce(difference.pow(2), reduction)


def _normalised_gram(x: torch.Tensor) -> torch.Tensor:
    q = x.flatten(1)
    return F.normalize(q @ q.T, p=2.0, dim=1)


class PKTLoss(LossModule):
    """:func:`pkt_loss` as a module, for use as a mapping payload.

    Args:
        eps: the stabilising constant of the authors' code.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 8)
        >>> float(PKTLoss()(x, x))
        0.0
    """

    eps: float
    reduction: str
    _function = staticmethod(pkt_loss)
    _checks = (("eps", check_positive), ("reduction", reduction_in(REDUCTIONS)))

    def __init__(self, eps: float = 1e-7, *, reduction: str = "mean"):
        super().__init__(eps=eps, reduction=reduction)


class SPLoss(LossModule):
    """:func:`sp_loss` as a module, for use as a mapping payload.

    Args:
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 8)
        >>> float(SPLoss()(x, x))
        0.0
    """

    reduction: str
    _function = staticmethod(sp_loss)
    _checks = (("reduction", reduction_in(REDUCTIONS)),)

    def __init__(self, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
