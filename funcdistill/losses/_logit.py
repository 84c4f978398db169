"""Losses between logits: Hinton's KD, decoupled KD (DKD), DIST, and logit standardization."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import (
    REDUCTIONS_BATCHMEAN,
    check_integer,
    check_positive,
    check_reduction,
    check_same_shape,
    check_tensors,
    check_weight,
    kl_terms,
    reduce,
)
from funcdistill.losses._module import LossModule, check_temperature, reduction_in

__all__ = [
    "DISTLoss",
    "DKDLoss",
    "KDLoss",
    "LogitStandardization",
    "dist_loss",
    "dkd_loss",
    "kd_loss",
    "standardize_logits",
]

Temperature = float | torch.Tensor


def kd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Knowledge-distillation loss of Hinton, Vinyals & Dean (2015).

    "Distilling the Knowledge in a Neural Network", arXiv:1503.02531:
    :math:`T^2 \, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T))`,
    the divergence of the student's softened distribution from the teacher's,
    scaled by :math:`T^2` so that gradient magnitudes do not shrink as ``T`` grows.

    Classes are the last dimension; the KL divergence always sums over them, and
    ``reduction`` acts on the remaining dimensions: ``"none"`` returns one value
    per row (shape ``logits.shape[:-1]``, e.g. per token for ``(batch, length,
    vocab)`` logits), ``"batchmean"`` sums and divides by the batch size (the
    first dimension), ``"mean"`` averages over all rows, ``"sum"`` sums.

    Args:
        teacher_logits: the teacher's logits, ``(..., classes)``.
        student_logits: the student's logits, same shape.
        temperature: softening temperature ``T > 0``; a Python number or a 0-d
            tensor, so a :func:`torch.func.vmap` sweep can pass one per student
            (tensor values are not checked).
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"batchmean"``.

    Raises:
        TypeError: a logits argument is not a tensor, or the temperature has the wrong type.
        ValueError: the shapes differ, the temperature is not positive, or the
            reduction is unknown.

    Example:
        >>> import torch
        >>> t = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(kd_loss(t, t, temperature=4.0))
        0.0
        >>> float(kd_loss(t, torch.zeros(1, 3), temperature=1.0)) > 0
        True
    """
    name = "kd_loss"
    check_reduction(name, reduction, REDUCTIONS_BATCHMEAN)
    check_tensors(name, teacher_logits=teacher_logits, student_logits=student_logits)
    check_same_shape(name, teacher_logits, student_logits)
    check_positive(name, "temperature", temperature, allow_tensor=True)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    per_row = kl_terms(log_t, log_s).sum(-1) * (temperature * temperature)
    return reduce(per_row, reduction)


def dkd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 8.0,
    temperature: Temperature = 4.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Decoupled knowledge distillation of Zhao, Cui, Song, Qiu & Liang (2022).

    "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679. The KD loss
    is split at the true class into

    * TCKD, the KL divergence between the binary distributions
      (target, all other classes) of teacher and student, and
    * NCKD, the KL divergence between the distributions over the non-target
      classes only (each renormalised to sum to one),

    both at temperature ``T`` and scaled by :math:`T^2`; the loss is
    ``alpha * TCKD + beta * NCKD``. (Classic KD equals
    ``TCKD + (1 - p_target_teacher) * NCKD`` per sample.) Classes are the last
    dimension; ``reduction`` acts on the others, as in :func:`kd_loss`.

    DKD needs the labels, so it takes three arguments. As a mapping payload,
    put :class:`DKDLoss` (or ``functools.partial(dkd_loss, beta=...)``) in the
    mapping and pass the batch's labels where the loop calls it:
    ``loss = payload(teacher_out, student_out, labels)``; for code that calls
    payloads with two arguments, bind the labels per batch with
    ``functools.partial(payload, target=labels)``.

    Args:
        teacher_logits: the teacher's logits, ``(..., classes)``, at least 2 classes.
        student_logits: the student's logits, same shape.
        target: integer class indices, shape ``logits.shape[:-1]``. An index out
            of range raises (CPU) or gives an undefined result (GPU).
        alpha: weight of TCKD (number >= 0 or 0-d tensor).
        beta: weight of NCKD (number >= 0 or 0-d tensor); the paper uses 8 on
            CIFAR-100 and 0.5 on ImageNet.
        temperature: ``T > 0``, a number or a 0-d tensor.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"batchmean"``.

    Raises:
        TypeError: an argument has the wrong type (``target`` must be an integer tensor).
        ValueError: shapes do not fit, or a value is out of range.

    Example:
        >>> import torch
        >>> t = torch.tensor([[3.0, 1.0, 0.0]])
        >>> float(dkd_loss(t, t, torch.tensor([0])))
        0.0
        >>> float(dkd_loss(t, torch.zeros(1, 3), torch.tensor([0]), beta=0.0)) > 0
        True
    """
    name = "dkd_loss"
    check_reduction(name, reduction, REDUCTIONS_BATCHMEAN)
    check_tensors(name, teacher_logits=teacher_logits, student_logits=student_logits, target=target)
    check_same_shape(name, teacher_logits, student_logits)
    check_integer(name, "target", target, "class indices")
    if target.shape != teacher_logits.shape[:-1]:
        raise ValueError(
            f"dkd_loss: target has shape {tuple(target.shape)} but the logits "
            f"{tuple(teacher_logits.shape)} need one class index per row, shape "
            f"{tuple(teacher_logits.shape[:-1])}."
        )
    if teacher_logits.dim() == 0 or teacher_logits.shape[-1] < 2:
        raise ValueError(
            f"dkd_loss: needs at least 2 classes in the last dimension, got logits of "
            f"shape {tuple(teacher_logits.shape)}."
        )
    check_weight(name, "alpha", alpha)
    check_weight(name, "beta", beta)
    check_positive(name, "temperature", temperature, allow_tensor=True)

    classes = torch.arange(teacher_logits.shape[-1], device=target.device)
    is_target = target.unsqueeze(-1) == classes
    index = target.unsqueeze(-1).long()
    t = teacher_logits / temperature
    s = student_logits / temperature
    tckd = kl_terms(_binary_log_probs(t, is_target, index), _binary_log_probs(s, is_target, index)).sum(-1)
    nckd = _non_target_kl_terms(t, s, is_target).sum(-1)
    per_row = (alpha * tckd + beta * nckd) * (temperature * temperature)
    return reduce(per_row, reduction)


def _binary_log_probs(logits: torch.Tensor, is_target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log [p_target, 1 - p_target]`` along the last dimension, computed stably."""
    everything = torch.logsumexp(logits, dim=-1)
    log_target = logits.gather(-1, index).squeeze(-1) - everything
    rest = logits.masked_fill(is_target, float("-inf"))
    log_rest = torch.logsumexp(rest, dim=-1) - everything
    return torch.stack([log_target, log_rest], dim=-1)


def _non_target_kl_terms(t: torch.Tensor, s: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """KL terms between the teacher's and student's distributions over non-target classes."""
    # The target class gets log-probability -inf on both sides; kl_terms gives it 0.
    log_t = F.log_softmax(t.masked_fill(is_target, float("-inf")), dim=-1)
    log_s = F.log_softmax(s.masked_fill(is_target, float("-inf")), dim=-1)
    return kl_terms(log_t, log_s)


def dist_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    beta: float | torch.Tensor = 1.0,
    gamma: float | torch.Tensor = 1.0,
    temperature: Temperature = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""DIST, inter- and intra-class relations, of Huang, You, Wang, Qian & Xu (2022).

    "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    arXiv:2205.10536. Instead of matching probabilities exactly (KL), the
    student matches their *relations* with the Pearson correlation
    :math:`\rho`, on :math:`Y = \mathrm{softmax}(z / \tau)` of shape ``(N, C)``:

    * inter-class: :math:`1 - \frac{1}{N} \sum_i \rho(Y^s_{i,:}, Y^t_{i,:})`, each
      sample's ranking of the classes;
    * intra-class: :math:`1 - \frac{1}{C} \sum_j \rho(Y^s_{:,j}, Y^t_{:,j})`, each
      class's ranking of the samples of the batch;

    and the loss is :math:`\tau^2 (\beta \cdot \text{inter} + \gamma \cdot \text{intra})`.
    The intra-class term is a statistic of the whole batch, so there is no
    per-sample value and no ``reduction``. The defaults are those of the
    authors' code (``DIST_KD``, ``dist_kd.py``), and so is the correlation:
    after centring, :math:`\rho(a, b) = a \cdot b / (\|a\| \|b\| + \epsilon)`,
    so a constant row or column (a zero vector) correlates 0. torchdistill's
    ``DISTLoss`` calls :func:`torch.nn.functional.cosine_similarity` instead,
    which clamps each norm at ``eps`` rather than adding ``eps`` to their
    product; the two agree as ``eps`` goes to 0, and differ where the centred
    probabilities are small (a near-uniform softmax, a few samples).

    Args:
        teacher_logits: the teacher's logits ``(N, C)``, ``N >= 2``, ``C >= 2``.
        student_logits: the student's logits, same shape.
        beta: weight of the inter-class term (number >= 0 or 0-d tensor).
        gamma: weight of the intra-class term (number >= 0 or 0-d tensor).
        temperature: ``tau > 0``, a number or a 0-d tensor.
        eps: added to the product of the norms in the correlation (a positive number).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: the shapes differ or are not ``(N, C)`` with ``N, C >= 2``,
            or a value is out of range.

    Example:
        >>> import torch
        >>> t = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
        >>> abs(float(dist_loss(t, t))) < 1e-5
        True
        >>> float(dist_loss(t, torch.randn(4, 10), temperature=4.0)) > 0
        True
    """
    name = "dist_loss"
    check_tensors(name, teacher_logits=teacher_logits, student_logits=student_logits)
    check_same_shape(name, teacher_logits, student_logits)
    if teacher_logits.dim() != 2 or min(teacher_logits.shape) < 2:
        raise ValueError(
            f"{name}: needs logits (N, C) with at least 2 samples and 2 classes (the correlations run "
            f"along both dimensions), got shape {tuple(teacher_logits.shape)}; for token logits "
            "(N, L, C) pass logits.flatten(0, 1)."
        )
    check_weight(name, "beta", beta)
    check_weight(name, "gamma", gamma)
    check_positive(name, "temperature", temperature, allow_tensor=True)
    check_positive(name, "eps", eps)
    y_t = F.softmax(teacher_logits / temperature, dim=-1)
    y_s = F.softmax(student_logits / temperature, dim=-1)
    inter = 1.0 - _pearson_rows(y_t, y_s, eps).mean()
    intra = 1.0 - _pearson_rows(y_t.T, y_s.T, eps).mean()
    return (beta * inter + gamma * intra) * (temperature * temperature)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, as the DIST authors compute it.

    ``a . b / (|a| |b| + eps)`` after centring (not :func:`torch.nn.functional.cosine_similarity`,
    which divides by ``max(|a|, eps) * max(|b|, eps)``).
    """
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def standardize_logits(logits: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    r"""Logit standardization of Sun, Ren, Li, Wang & Cao (2024): the Z-score of each row.

    "Logit Standardization in Knowledge Distillation", CVPR 2024,
    arXiv:2403.01427: :math:`(z - \bar z) / (\sigma(z) + \epsilon)` along the
    last dimension, so that the student matches the *shape* of the teacher's
    logits rather than their range. It is a transform, not a loss: apply it to
    both sides of a logit loss, e.g.
    ``kd_loss(standardize_logits(t), standardize_logits(s), temperature=2.0)``
    or ``dkd_loss(standardize_logits(t), standardize_logits(s), labels)``
    (:class:`LogitStandardization` does it for a loss module). The temperature
    of the loss is then the paper's base temperature.

    Conventions of the authors' code (and torchdistill's ``LogitStdKDLoss``):
    :math:`\sigma` is the standard deviation with Bessel's correction
    (``torch.std``), and ``eps = 1e-7``; a constant row maps to zeros.
    ``kd_loss`` of standardized logits equals ``T**2`` times
    torchdistill's ``LogitStdKDLoss`` without labels, which leaves out the
    ``T**2``.

    Args:
        logits: logits ``(..., C)``, ``C >= 2``.
        eps: added to the standard deviation (a positive number).

    Raises:
        TypeError: ``logits`` is not a tensor or ``eps`` not a number.
        ValueError: fewer than 2 classes, or ``eps`` not positive.

    Example:
        >>> import torch
        >>> z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [10.0, 30.0, 50.0]]))
        >>> torch.allclose(z[0], z[1]), torch.allclose(z[0], torch.tensor([-1.0, 0.0, 1.0]))
        (True, True)
    """
    name = "standardize_logits"
    check_tensors(name, logits=logits)
    check_positive(name, "eps", eps)
    if logits.dim() == 0 or logits.shape[-1] < 2:
        raise ValueError(
            f"{name}: needs logits (..., C) with at least 2 classes in the last dimension, "
            f"got shape {tuple(logits.shape)}."
        )
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return centred / (logits.std(dim=-1, keepdim=True) + eps)


class KDLoss(LossModule):
    """:func:`kd_loss` as a module, for use as a mapping payload.

    Args:
        temperature: softening temperature ``T > 0``.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"batchmean"``.

    Example:
        >>> import torch
        >>> loss = KDLoss(temperature=4.0)
        >>> float(loss(torch.ones(2, 5), torch.ones(2, 5)))
        0.0
    """

    temperature: Temperature
    reduction: str
    _function = staticmethod(kd_loss)
    _checks = (("temperature", check_temperature), ("reduction", reduction_in(REDUCTIONS_BATCHMEAN)))

    def __init__(self, temperature: Temperature = 1.0, *, reduction: str = "batchmean"):
        super().__init__(temperature=temperature, reduction=reduction)


class DKDLoss(LossModule):
    """:func:`dkd_loss` as a module; call it as ``loss(teacher_logits, student_logits, target)``.

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softening temperature ``T > 0``.
        reduction: ``"none"``, ``"mean"``, ``"sum"`` or ``"batchmean"``.

    Example:
        >>> import torch
        >>> loss = DKDLoss(beta=8.0)
        >>> float(loss(torch.ones(2, 5), torch.ones(2, 5), torch.tensor([0, 3])))
        0.0
    """

    alpha: float | torch.Tensor
    beta: float | torch.Tensor
    temperature: Temperature
    reduction: str
    _function = staticmethod(dkd_loss)
    _checks = (
        ("alpha", check_weight),
        ("beta", check_weight),
        ("temperature", check_temperature),
        ("reduction", reduction_in(REDUCTIONS_BATCHMEAN)),
    )

    def __init__(
        self,
        alpha: float | torch.Tensor = 1.0,
        beta: float | torch.Tensor = 8.0,
        temperature: Temperature = 4.0,
        *,
        reduction: str = "batchmean",
    ):
        super().__init__(alpha=alpha, beta=beta, temperature=temperature, reduction=reduction)


class DISTLoss(LossModule):
    """:func:`dist_loss` as a module, for use as a mapping payload.

    Args:
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: softening temperature ``tau > 0``.
        eps: added to the product of the norms in the correlation (as in the authors' code).

    Example:
        >>> import torch
        >>> x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
        >>> loss = DISTLoss(temperature=4.0)
        >>> float(loss(x, x)) < 1e-4  # not exactly 0: eps is added to the norms' product
        True
        >>> float(loss(x, x.flip(0))) > 1.0
        True
    """

    beta: float | torch.Tensor
    gamma: float | torch.Tensor
    temperature: Temperature
    eps: float
    _function = staticmethod(dist_loss)
    _checks = (
        ("beta", check_weight),
        ("gamma", check_weight),
        ("temperature", check_temperature),
        ("eps", check_positive),
    )

    def __init__(
        self,
        beta: float | torch.Tensor = 1.0,
        gamma: float | torch.Tensor = 1.0,
        temperature: Temperature = 1.0,
        *,
        eps: float = 1e-8,
    ):
        super().__init__(beta=beta, gamma=gamma, temperature=temperature, eps=eps)


def _check_logit_loss(loss: str, name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(
            f"{loss}: {name} must be a logit loss (a module or function such as "
            f"KDLoss(temperature=2.0) or kd_loss), got {type(value).__name__}."
        )


class LogitStandardization(LossModule):
    """A logit loss on standardized logits (Sun et al. 2024), for use as a mapping payload.

    ``LogitStandardization(loss)(t, s, *args)`` is
    ``loss(standardize_logits(t), standardize_logits(s), *args)``: it composes
    with :class:`KDLoss`, :class:`DKDLoss` (pass the labels as the third
    argument) or any loss that takes ``(teacher_logits, student_logits, ...)``.
    See :func:`standardize_logits`.

    Args:
        loss: the logit loss, a module or a function.
        eps: added to the standard deviation.

    Raises:
        TypeError: ``loss`` is not callable.

    Example:
        >>> import torch
        >>> loss = LogitStandardization(KDLoss(temperature=2.0))
        >>> t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
        >>> abs(float(loss(t, 4 * t + 1))) < 1e-5  # same logits up to scale and shift
        True
    """

    loss: Any
    eps: float
    _checks = (("loss", _check_logit_loss), ("eps", check_positive))
    _parts = ("loss",)

    def __init__(self, loss: Any, *, eps: float = 1e-7):
        super().__init__(loss=loss, eps=eps)

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.loss(
            standardize_logits(teacher_logits, eps=self.eps),
            standardize_logits(student_logits, eps=self.eps),
            *args,
            **kwargs,
        )
