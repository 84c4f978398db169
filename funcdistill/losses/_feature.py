"""Losses between intermediate features: MSE, cosine, FitNets hints, attention transfer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from funcdistill.losses._checks import (
    REDUCTIONS,
    check_positive,
    check_reduction,
    check_same_shape,
    check_tensors,
    reduce,
)
from funcdistill.losses._module import LossModule, check_module, reduction_in

__all__ = [
    "AttentionTransferLoss",
    "CosineLoss",
    "FitNetsLoss",
    "attention_transfer_loss",
    "cosine_loss",
    "hint_adapter",
    "mse_loss",
]

_ADAPTER_HINT = "Put an adapter on the student side: funcdistill.losses.hint_adapter(student_width, teacher_width)."


def mse_loss(teacher: torch.Tensor, student: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error between teacher and student features.

    The plain feature-matching loss used by FitNets (Romero et al. 2015) and
    most feature-distillation methods. Unlike :func:`torch.nn.functional.mse_loss`
    it refuses tensors of different shapes instead of broadcasting them.

    Args:
        teacher: teacher features.
        student: student features, same shape.
        reduction: ``"none"`` (elementwise), ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: the shapes differ, or the reduction is unknown.

    Example:
        >>> import torch
        >>> float(mse_loss(torch.zeros(2, 2), torch.ones(2, 2)))
        1.0
    """
    check_reduction("mse_loss", reduction)
    check_tensors("mse_loss", teacher=teacher, student=student)
    check_same_shape("mse_loss", teacher, student, _ADAPTER_HINT)
    return reduce((student - teacher).pow(2), reduction)


def cosine_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    dim: int = -1,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """One minus the cosine similarity of teacher and student feature vectors.

    The hidden-state loss of DistilBERT (Sanh et al. 2019, arXiv:1910.01108),
    which aligns the directions of the hidden states; insensitive to their scale.

    Args:
        teacher: teacher features.
        student: student features, same shape.
        dim: the feature dimension the vectors lie along.
        eps: guards the division for zero vectors.
        reduction: ``"none"`` (one value per vector, ``dim`` removed), ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: the shapes differ, or the reduction is unknown.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cosine_loss(x, torch.tensor([[3.0, 0.0], [1.0, 0.0]]), reduction="none")
        tensor([0., 1.])
    """
    check_reduction("cosine_loss", reduction)
    check_tensors("cosine_loss", teacher=teacher, student=student)
    check_same_shape("cosine_loss", teacher, student, _ADAPTER_HINT)
    return reduce(1.0 - F.cosine_similarity(student, teacher, dim=dim, eps=eps), reduction)


def attention_transfer_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    p: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Attention transfer of Zagoruyko & Komodakis (2017).

    "Paying More Attention to Attention", ICLR 2017, arXiv:1612.03928. Each
    feature map ``(..., C, H, W)`` becomes a spatial attention map
    :math:`Q = \frac{1}{C}\sum_c |A_c|^p` (channels are averaged away, so teacher
    and student may have different channel counts), flattened and
    L2-normalised; the loss per sample is the squared L2 distance
    :math:`\| Q_s/\|Q_s\| - Q_t/\|Q_t\| \|_2^2`. (The authors' code also
    divides by ``H * W``; scale the weight of this loss accordingly.)

    Args:
        teacher: teacher feature map, ``(..., C_t, H, W)``.
        student: student feature map, ``(..., C_s, H, W)``: same leading and
            spatial dimensions.
        p: exponent of the attention map (the paper uses 2).
        reduction: ``"none"`` (one value per map, shape ``(...)``), ``"mean"`` or ``"sum"``.

    Raises:
        TypeError: an argument is not a tensor, or ``p`` is not a number.
        ValueError: shapes do not fit, ``p`` is not positive, or the reduction is unknown.

    Example:
        >>> import torch
        >>> t = torch.randn(2, 8, 4, 4)
        >>> s = 3 * torch.cat([t, t], dim=1)  # 16 channels, same attention map
        >>> round(float(attention_transfer_loss(t, s)), 6)
        0.0
    """
    name = "attention_transfer_loss"
    check_reduction(name, reduction)
    check_tensors(name, teacher=teacher, student=student)
    check_positive(name, "p", p)
    for role, x in (("teacher", teacher), ("student", student)):
        if x.dim() < 3:
            raise ValueError(f"{name}: {role} must be a feature map (..., C, H, W), got shape {tuple(x.shape)}.")
    if teacher.shape[:-3] != student.shape[:-3] or teacher.shape[-2:] != student.shape[-2:]:
        raise ValueError(
            f"{name}: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} must "
            "have the same batch and spatial sizes (channels may differ); map layers of equal "
            "resolution or resize one with torch.nn.functional.interpolate."
        )
    diff = _attention_map(student, p) - _attention_map(teacher, p)
    return reduce(diff.pow(2).sum(-1), reduction)


def _attention_map(x: torch.Tensor, p: float) -> torch.Tensor:
    q = x.abs().pow(p).mean(dim=-3).flatten(-2)
    return F.normalize(q, dim=-1)


def hint_adapter(student_channels: int, teacher_channels: int, *, ndim: int = 4) -> nn.Module:
    """A trainable regressor that maps student features to the teacher's width.

    The "regressor" of FitNets (Romero et al. 2015): a 1x1 :class:`torch.nn.Conv2d`
    for feature maps ``(N, C, H, W)`` (``ndim=4``), or a :class:`torch.nn.Linear`
    on the last dimension for ``(N, C)`` or ``(N, L, C)`` features (``ndim`` 2
    or 3, e.g. transformer hidden states). Give it to :class:`FitNetsLoss` or
    :class:`CosineLoss`; its parameters then train with the student
    (``funcdistill.state(student, mapping)``).

    Args:
        student_channels: width of the student features.
        teacher_channels: width of the teacher features.
        ndim: number of dimensions of the features (2, 3 or 4).

    Raises:
        TypeError: a width or ``ndim`` is not an int.
        ValueError: a width is not positive, or ``ndim`` is not 2, 3 or 4.

    Example:
        >>> hint_adapter(16, 64)
        Conv2d(16, 64, kernel_size=(1, 1), stride=(1, 1), bias=False)
        >>> hint_adapter(256, 768, ndim=3)
        Linear(in_features=256, out_features=768, bias=True)
    """
    for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels), ("ndim", ndim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"hint_adapter: {name} must be an int, got {type(value).__name__}.")
    for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
        if value < 1:
            raise ValueError(f"hint_adapter: {name} must be positive, got {value}.")
    if ndim == 4:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    if ndim in (2, 3):
        return nn.Linear(student_channels, teacher_channels)
    raise ValueError(
        f"hint_adapter: ndim must be 4 for (N, C, H, W) feature maps (1x1 conv) or 2/3 for "
        f"features on the last dimension (linear), got {ndim}."
    )


_check_adapter = check_module("hint_adapter(...)", optional=True)


class FitNetsLoss(LossModule):
    """FitNets hint loss of Romero et al. (2015), with a trainable adapter.

    "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550:
    ``forward(teacher_feat, student_feat) = mse(teacher_feat, adapter(student_feat))``.
    As a mapping payload its adapter is trained with the student: its
    parameters appear in ``funcdistill.state(student, mapping)`` as
    ``'payloads.<index>.adapter.<name>'``, and the distill function calls it with
    them, so :func:`torch.func.grad` with respect to the student state returns
    their gradients (and ``.backward()`` reaches ``adapter.parameters()``).

    Args:
        adapter: maps student features to the teacher's shape, e.g.
            :func:`hint_adapter`; ``None`` compares the features directly.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> loss = FitNetsLoss(hint_adapter(8, 32))
        >>> loss(torch.randn(2, 32, 4, 4), torch.randn(2, 8, 4, 4)).shape
        torch.Size([])
    """

    adapter: nn.Module | None
    reduction: str
    _function = staticmethod(mse_loss)
    _checks = (("adapter", _check_adapter), ("reduction", reduction_in(REDUCTIONS)))
    _parts = ("adapter",)

    def __init__(self, adapter: nn.Module | None = None, *, reduction: str = "mean"):
        super().__init__(adapter=adapter, reduction=reduction)

    def forward(self, teacher_feat: torch.Tensor, student_feat: torch.Tensor) -> torch.Tensor:
        check_tensors(type(self).__name__, teacher_feat=teacher_feat, student_feat=student_feat)
        if self.adapter is not None:
            student_feat = self.adapter(student_feat)
        return super().forward(teacher_feat, student_feat)


class CosineLoss(LossModule):
    """:func:`cosine_loss` as a module, with an optional student-side adapter.

    ``forward(teacher, student) = cosine_loss(teacher, adapter(student))``. With
    an adapter it trains like :class:`FitNetsLoss`'s (e.g. for DistilBERT-style
    hidden-state distillation into a narrower student).

    Args:
        adapter: maps student features to the teacher's width, or ``None``.
        dim: the feature dimension.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> loss = CosineLoss(hint_adapter(4, 8, ndim=3))
        >>> loss(torch.randn(2, 5, 8), torch.randn(2, 5, 4)).shape
        torch.Size([])
    """

    adapter: nn.Module | None
    dim: int
    reduction: str
    _function = staticmethod(cosine_loss)
    _checks = (("adapter", _check_adapter), ("reduction", reduction_in(REDUCTIONS)))
    _parts = ("adapter",)

    def __init__(self, adapter: nn.Module | None = None, *, dim: int = -1, reduction: str = "mean"):
        super().__init__(adapter=adapter, dim=dim, reduction=reduction)

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        check_tensors(type(self).__name__, teacher=teacher, student=student)
        if self.adapter is not None:
            student = self.adapter(student)
        return super().forward(teacher, student)


class AttentionTransferLoss(LossModule):
    """:func:`attention_transfer_loss` as a module, for use as a mapping payload.

    Args:
        p: exponent of the attention map.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, 3)
        >>> float(AttentionTransferLoss()(x, x))
        0.0
    """

    p: float
    reduction: str
    _function = staticmethod(attention_transfer_loss)
    _checks = (("p", check_positive), ("reduction", reduction_in(REDUCTIONS)))

    def __init__(self, p: float = 2.0, *, reduction: str = "mean"):
        super().__init__(p=p, reduction=reduction)
