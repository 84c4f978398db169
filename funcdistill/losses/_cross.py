r"""Token losses across tokenizers: teacher and student vocabularies that do not correspond.

The token divergences of :mod:`funcdistill.losses._divergence` compare class
``i`` of the teacher with class ``i`` of the student, which only means
something when the two models share a vocabulary. The losses here do not need
that:

* :func:`uld_loss` (Universal Logit Distillation, Boizard et al. 2024) compares
  the two distributions *sorted*: per token, the sum over ranks ``i`` of
  ``|sorted p_T(i) - sorted p_S(i)|``, the shorter sorted vector padded with
  zeros. It needs no correspondence between the vocabularies at all, and their
  sizes may differ.
* :func:`hybrid_loss` (TRL's GOLD) compares the tokens both vocabularies have
  (the pairs of ids :func:`funcdistill.align.shared_vocab` returns) directly,
  with the generalized JSD, and the rest with ULD.

Both take logits at *aligned positions*: one row per position where both
models have read the same text (for two tokenizations of one text, the logits
at each alignment group's last token, ``funcdistill.align.at_groups``), so the
leading shapes of the two sides are equal while their last (vocabulary)
dimensions ``V_T`` and ``V_S`` may differ. The other conventions are those of
the token divergences: ``mask`` / ``labels`` with ``ignore_index``,
``"mean"`` / ``"sum"`` / ``"none"`` over the counted positions (none counted:
0 with a zero gradient), the wider of the two dtypes, ``temperature`` dividing
both logits, no :math:`T^2` factor.

Cost: ULD sorts each side's probabilities at every position, ``O(V log V)``
per position and side, against ``O(V)`` for a KL; the gradient flows through
the sort (``torch.sort`` is differentiable with respect to the values: each
sorted entry's gradient goes back to the class it came from).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from funcdistill.losses._checks import (
    check_fraction,
    check_integer,
    check_positive,
    check_reduction,
    check_tensors,
    check_weight,
)
from funcdistill.losses._divergence import jsd_rows
from funcdistill.losses._module import TokenLossModule, _shown, check_temperature, reduction_in
from funcdistill.losses._tokens import (
    IGNORE_INDEX,
    TOKEN_REDUCTIONS,
    check_leading,
    compute_dtype,
    counted_tokens,
    reduce_tokens,
)

__all__ = ["HybridLoss", "ULDLoss", "hybrid_loss", "uld_loss"]

Number = float | torch.Tensor


# ---------------------------------------------------------------- per-token terms (shared with the fused losses)


def probs(logits: torch.Tensor, temperature: Number) -> torch.Tensor:
    """``softmax(logits / T)`` over the last dimension (no division when ``T`` is the number 1)."""
    if not isinstance(temperature, torch.Tensor) and temperature == 1:
        return F.softmax(logits, dim=-1)
    return F.softmax(logits / temperature, dim=-1)


def sorted_gap(p_t: torch.Tensor, p_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted p_S - sorted p_T`` rank by rank (descending, the shorter padded with zeros), and the student's order.

    Returns the differences, ``(..., max(V_T, V_S))``, and the student's sort
    permutation, ``(..., V_S)`` (rank ``i`` holds class ``order[i]``). The sort is
    stable, so tied probabilities keep one order whatever the batch.
    """
    teacher = p_t.sort(dim=-1, descending=True, stable=True).values
    student, order = p_s.sort(dim=-1, descending=True, stable=True)
    width = max(teacher.shape[-1], student.shape[-1])
    teacher = F.pad(teacher, (0, width - teacher.shape[-1]))
    student = F.pad(student, (0, width - student.shape[-1]))
    return student - teacher, order


def uld_rows(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """Per position, ``sum_i |sorted p_T(i) - sorted p_S(i)|`` (the shorter sorted vector padded with zeros)."""
    return sorted_gap(p_t, p_s)[0].abs().sum(-1)


def shared_columns(ids: torch.Tensor, classes: int) -> torch.Tensor:
    """A bool ``(classes,)`` vector: ``True`` at the shared ids (``ids`` any integer dtype, on any device)."""
    return torch.zeros(classes, dtype=torch.bool, device=ids.device).index_fill(0, ids.long(), True)


def exact_rows(
    teacher: torch.Tensor, student: torch.Tensor, teacher_ids: torch.Tensor, student_ids: torch.Tensor, beta: Number
) -> torch.Tensor:
    """The generalized JSD over the shared columns of two logits (already divided by ``T``), each side renormalised."""
    log_t = F.log_softmax(teacher.index_select(-1, teacher_ids), dim=-1)
    log_s = F.log_softmax(student.index_select(-1, student_ids), dim=-1)
    return jsd_rows(log_t, log_s, beta)


def unshared_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` with the shared columns set to 0 (the unshared mass, not renormalised)."""
    p = F.softmax(logits, dim=-1)
    return p.masked_fill(shared_columns(ids, logits.shape[-1]), 0)


def is_zero(weight: Number) -> bool:
    """A weight that is the number 0: its part of a loss is not computed (a tensor weight always is)."""
    return not isinstance(weight, torch.Tensor) and weight == 0


def hybrid_rows(
    teacher: torch.Tensor,
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    weights: tuple[Number, Number],
    beta: Number,
    temperature: Number,
) -> torch.Tensor:
    """Per position, ``exact_weight * JSD over the shared columns + uld_weight * ULD over the unshared ones``."""
    exact_weight, uld_weight = weights
    if not isinstance(temperature, torch.Tensor) and temperature == 1:
        scaled = teacher, student
    else:
        scaled = teacher / temperature, student / temperature
    teacher_ids, student_ids = teacher_ids.to(teacher.device).long(), student_ids.to(student.device).long()
    total = torch.zeros(teacher.shape[:-1], dtype=teacher.dtype, device=teacher.device)
    if not is_zero(exact_weight):
        total = total + exact_weight * exact_rows(*scaled, teacher_ids, student_ids, beta)
    if not is_zero(uld_weight):
        rest_t, rest_s = unshared_probs(scaled[0], teacher_ids), unshared_probs(scaled[1], student_ids)
        total = total + uld_weight * uld_rows(rest_t, rest_s)
    return total


# ---------------------------------------------------------------- argument checks


def check_pair(loss: str, teacher: Any, student: Any, temperature: Any, what: str = "logits") -> torch.dtype:
    """Two tensors of one leading (position) shape, each with at least one class; ``temperature``; the wider dtype.

    The vocabularies (last dimensions) may differ: that is the point.
    """
    names = {f"teacher_{what.replace(' ', '_')}": teacher, f"student_{what.replace(' ', '_')}": student}
    check_tensors(loss, **names)
    check_leading(loss, teacher, student, what)
    empty = [name for name, value in names.items() if value.shape[-1] == 0]
    if empty:
        raise ValueError(f"{loss}: {' and '.join(empty)} have no class (last dimension 0); a distribution needs one.")
    check_positive(loss, "temperature", temperature, allow_tensor=True)
    return compute_dtype(teacher, student)


def check_shared_ids(loss: str, teacher_ids: Any, student_ids: Any, teacher_classes: int, student_classes: int) -> None:
    """The shared vocabulary: two 1-d integer tensors of one length, no longer than either vocabulary.

    Problems are collected into one message. The ids' values (in range,
    distinct) are not checked: that would read the data.
    """
    check_tensors(loss, teacher_ids=teacher_ids, student_ids=student_ids)
    check_integer(loss, "teacher_ids", teacher_ids, "token ids")
    check_integer(loss, "student_ids", student_ids, "token ids")
    problems = []
    for side, ids, classes in (("teacher", teacher_ids, teacher_classes), ("student", student_ids, student_classes)):
        if ids.dim() != 1:
            problems.append(f"{side}_ids must be 1-d (one id per shared token), got shape {tuple(ids.shape)}")
        elif ids.shape[0] > classes:
            problems.append(
                f"{side}_ids has {ids.shape[0]} ids but the {side}'s logits have {classes} classes "
                f"(a shared id is one of the {side}'s classes, each at most once)"
            )
    if teacher_ids.dim() == 1 and student_ids.dim() == 1 and teacher_ids.shape != student_ids.shape:
        problems.append(
            f"teacher_ids and student_ids must have one length (pair k is teacher_ids[k], student_ids[k]), "
            f"got {teacher_ids.shape[0]} and {student_ids.shape[0]}"
        )
    if problems:
        raise ValueError(f"{loss}: {'; '.join(problems)}. Pass the two tensors funcdistill.align.shared_vocab returns.")


def check_hybrid_options(loss: str, exact_weight: Any, uld_weight: Any, beta: Any) -> None:
    """The hybrid's weights (numbers >= 0 or 0-d tensors) and ``beta`` (in [0, 1])."""
    check_weight(loss, "exact_weight", exact_weight)
    check_weight(loss, "uld_weight", uld_weight)
    check_fraction(loss, "beta", beta)


# ---------------------------------------------------------------- the losses


def uld_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: Number = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Universal Logit Distillation (Boizard et al., 2024): sorted probabilities, any two vocabularies.

    "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
    Loss for LLMs", arXiv:2402.12030. With :math:`p_T, p_S` the softmaxes of
    ``logits / T`` at one position, each sorted in decreasing order and the
    shorter padded with zeros to :math:`\max(V_T, V_S)` entries, per position

    .. math:: \mathrm{ULD} = \sum_i \left| p_T^\downarrow(i) - p_S^\downarrow(i) \right|,

    the Wasserstein-1 distance of the paper's closed form. It ignores which
    token each probability belongs to, so it needs no correspondence between
    the vocabularies; it is 0 for identical distributions, and for two
    distributions that differ only by a permutation of the classes or by
    classes of probability 0. It is the paper's distillation term alone: add
    the student's cross-entropy (the paper weighs the two) yourself. No
    :math:`T^2` factor.

    Sorting makes it ``O(V log V)`` per position and side; the gradient flows
    through the sort to the classes the sorted probabilities came from.

    Args:
        teacher_logits: the teacher's logits at aligned positions, ``(..., V_T)``.
        student_logits: the student's, ``(..., V_S)``: the same leading shape, any ``V_S``.
        mask: bool tensor of the leading shape, ``True`` where the position counts.
        temperature: ``T > 0``, dividing both logits; a number or a 0-d tensor.
        reduction: ``"mean"`` (sum over ranks, mean over counted positions),
            ``"sum"`` or ``"none"`` (one value per position, 0 where not counted).
            No counted position gives 0 (and a zero gradient) for each.
        labels: token ids of the leading shape; positions equal to ``ignore_index`` do not count.
        ignore_index: the label of positions that do not count (default ``-100``).

    Returns:
        The loss, in the wider of the two logits' dtypes (computed in it).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: the leading shapes differ, a side has no class, or a value is out of range.

    Example:
        >>> import torch
        >>> t = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(uld_loss(t, t.flip(-1)))  # the same probabilities, in another order
        0.0
        >>> s = torch.zeros(1, 5)  # another vocabulary: five classes, uniform
        >>> round(float(uld_loss(t, s)), 4)  # |0.8438 - 0.2| + |0.1142 - 0.2| + |0.0420 - 0.2| + 0.2 + 0.2
        1.2876
    """
    name = "uld_loss"
    check_reduction(name, reduction, TOKEN_REDUCTIONS)
    dtype = check_pair(name, teacher_logits, student_logits, temperature)
    counted = counted_tokens(name, teacher_logits.shape[:-1], mask, labels, ignore_index)
    p_t, p_s = (probs(x.to(dtype), temperature) for x in (teacher_logits, student_logits))
    return reduce_tokens(uld_rows(p_t, p_s), counted, reduction)


def hybrid_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    *,
    exact_weight: Number = 1.0,
    uld_weight: Number = 1.0,
    beta: Number = 0.0,
    mask: torch.Tensor | None = None,
    temperature: Number = 1.0,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""The hybrid of TRL's GOLD: the shared tokens compared directly, ULD for the rest.

    ``teacher_ids[k]`` and ``student_ids[k]`` are the same token in the two
    vocabularies (what :func:`funcdistill.align.shared_vocab` returns). Per
    position, with :math:`p_T, p_S` the softmaxes of ``logits / T``:

    * the **exact part** is the generalized JSD of
      :func:`~funcdistill.losses.generalized_jsd_loss` (``beta`` 0: forward
      KL, 1: reverse KL) between the two sides' shared columns, each side's
      probabilities *renormalised* over its shared columns (the softmax of the
      gathered logits), so that it compares two distributions;
    * the **ULD part** is :func:`uld_loss`'s sorted-probability distance
      between the two sides' remaining (unshared) columns, with their
      probabilities under the full softmax (not renormalised: the difference
      of the unshared masses counts too).

    The loss is ``exact_weight * exact + uld_weight * uld``. With every token
    shared (``teacher_ids = student_ids = arange(V)``) the ULD part vanishes and
    the loss is ``exact_weight * generalized_jsd_loss(..., beta=beta)``; with
    none shared it is ``uld_weight * uld_loss``. A weight that is the number 0
    skips its part (and the ULD part's sort). No :math:`T^2` factor.

    GOLD itself takes the JSD of the shared probabilities *without*
    renormalising them (clamped at 1e-8) and, by default, weighs the parts by
    the shared fraction of the teacher's vocabulary; here the weights are
    explicit. The ids must be distinct within each side and in range (they are
    not checked: that would read the data); they may have any integer dtype and
    are moved to the logits' device.

    Args:
        teacher_logits: the teacher's logits at aligned positions, ``(..., V_T)``.
        student_logits: the student's, ``(..., V_S)``: the same leading shape, any ``V_S``.
        teacher_ids: the shared tokens' teacher ids, ``(K,)``.
        student_ids: the same tokens' student ids, ``(K,)``.
        exact_weight: weight of the exact part, a number >= 0 or a 0-d tensor.
        uld_weight: weight of the ULD part, a number >= 0 or a 0-d tensor.
        beta: the exact part's mixture weight in [0, 1] (0: forward KL, 1: reverse KL).
        mask: bool tensor of the leading shape, ``True`` where the position counts.
        temperature: ``T > 0``, dividing both logits; a number or a 0-d tensor.
        reduction: ``"mean"`` (over counted positions; 0 when none counts), ``"sum"`` or ``"none"``.
        labels: token ids of the leading shape; positions equal to ``ignore_index`` do not count.
        ignore_index: the label of positions that do not count (default ``-100``).

    Returns:
        The loss, in the wider of the two logits' dtypes (computed in it).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes do not fit, or a value is out of range.

    Example:
        >>> import torch
        >>> from funcdistill.losses import generalized_jsd_loss
        >>> t, s = torch.randn(4, 6), torch.randn(4, 6)
        >>> every = torch.arange(6)  # identical vocabularies: every token shared
        >>> torch.allclose(hybrid_loss(t, s, every, every, beta=0.5), generalized_jsd_loss(t, s, beta=0.5))
        True
        >>> s = torch.randn(4, 9)  # a student with another vocabulary: 3 tokens shared
        >>> float(hybrid_loss(t, s, torch.tensor([0, 2, 5]), torch.tensor([7, 1, 4]))) > 0
        True
    """
    name = "hybrid_loss"
    check_reduction(name, reduction, TOKEN_REDUCTIONS)
    dtype = check_pair(name, teacher_logits, student_logits, temperature)
    check_shared_ids(name, teacher_ids, student_ids, teacher_logits.shape[-1], student_logits.shape[-1])
    check_hybrid_options(name, exact_weight, uld_weight, beta)
    counted = counted_tokens(name, teacher_logits.shape[:-1], mask, labels, ignore_index)
    teacher, student = teacher_logits.to(dtype), student_logits.to(dtype)
    per_token = hybrid_rows(teacher, student, teacher_ids, student_ids, (exact_weight, uld_weight), beta, temperature)
    return reduce_tokens(per_token, counted, reduction)


# ---------------------------------------------------------------- module forms


class ULDLoss(TokenLossModule):
    """:func:`uld_loss` as a module; call it as ``loss(teacher_logits, student_logits, mask=...)``.

    Args:
        temperature: ``T > 0``, dividing both logits.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = ULDLoss(temperature=2.0)
        >>> float(loss(torch.ones(2, 3, 4), torch.ones(2, 3, 4)))
        0.0
    """

    temperature: Number
    reduction: str
    _function = staticmethod(uld_loss)
    _checks = (("temperature", check_temperature), ("reduction", reduction_in(TOKEN_REDUCTIONS)))

    def __init__(self, temperature: Number = 1.0, *, reduction: str = "mean"):
        super().__init__(temperature=temperature, reduction=reduction)


def _check_ids(loss: str, name: str, value: Any) -> None:
    check_tensors(loss, **{name: value})
    check_integer(loss, name, value, "token ids")
    if value.dim() != 1:
        raise ValueError(f"{loss}: {name} must be 1-d (one id per shared token), got shape {tuple(value.shape)}.")


class HybridLoss(TokenLossModule):
    """:func:`hybrid_loss` as a module, with the shared vocabulary bound; call it as ``loss(teacher_logits,
    student_logits, mask=...)``.

    The ids are kept as they are given (not buffers: they are not state) and
    moved to the logits' device at each call; build the module with them on
    that device to avoid the copy.

    Args:
        teacher_ids: the shared tokens' teacher ids, ``(K,)`` (from ``shared_vocab``).
        student_ids: the same tokens' student ids, ``(K,)``.
        exact_weight: weight of the exact (shared-token) part.
        uld_weight: weight of the ULD (unshared) part.
        beta: the exact part's mixture weight in [0, 1] (0: forward KL).
        temperature: ``T > 0``, dividing both logits.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import torch
        >>> loss = HybridLoss(torch.tensor([0, 1]), torch.tensor([1, 0]), beta=0.5)
        >>> loss
        HybridLoss(teacher_ids=<2 ids>, student_ids=<2 ids>, exact_weight=1.0, uld_weight=1.0, beta=0.5, temperature=1.0, reduction='mean')
        >>> t, s = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 1.0]])  # shared tokens: equal logits
        >>> round(float(loss(t, s)), 4)  # so only the ULD part: the teacher's mass on its unshared token
        0.09
    """

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    exact_weight: Number
    uld_weight: Number
    beta: Number
    temperature: Number
    reduction: str
    _function = staticmethod(hybrid_loss)
    _checks = (
        ("teacher_ids", _check_ids),
        ("student_ids", _check_ids),
        ("exact_weight", check_weight),
        ("uld_weight", check_weight),
        ("beta", check_fraction),
        ("temperature", check_temperature),
        ("reduction", reduction_in(TOKEN_REDUCTIONS)),
    )

    def __init__(
        self,
        teacher_ids: torch.Tensor,
        student_ids: torch.Tensor,
        *,
        exact_weight: Number = 1.0,
        uld_weight: Number = 1.0,
        beta: Number = 0.0,
        temperature: Number = 1.0,
        reduction: str = "mean",
    ):
        super().__init__(
            teacher_ids=teacher_ids,
            student_ids=student_ids,
            exact_weight=exact_weight,
            uld_weight=uld_weight,
            beta=beta,
            temperature=temperature,
            reduction=reduction,
        )
        if teacher_ids.shape != student_ids.shape:
            raise ValueError(
                f"HybridLoss: teacher_ids and student_ids must have one length (pair k is teacher_ids[k], "
                f"student_ids[k]), got {teacher_ids.shape[0]} and {student_ids.shape[0]}. Pass the two tensors "
                "funcdistill.align.shared_vocab returns."
            )

    def extra_repr(self) -> str:
        """The options, each id tensor as its length (the ids themselves would fill the screen)."""
        return ", ".join(
            f"{name}=<{value.shape[0]} ids>" if name.endswith("_ids") else f"{name}={_shown(value)}"
            for name, value in self.options.items()
        )
