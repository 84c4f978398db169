"""The losses every benchmarked step uses (parameter-free, so all styles share them).

>>> import torch
>>> t, s = torch.randn(4, 8), torch.randn(4, 3)
>>> float(similarity_loss(t, t)) == 0.0, kd_loss(t[:, :3], s).shape
(True, torch.Size([]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "similarity_loss", "step_loss"]


def similarity_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, 2019): compares batch Gram matrices.

    Works across feature widths, so no adapter is needed.
    """
    t = teacher.flatten(1)
    s = student.flatten(1)
    gt = F.normalize(t @ t.T, dim=1)
    gs = F.normalize(s @ s.T, dim=1)
    return (gt - gs).pow(2).mean()


def kd_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: KL divergence of temperature-softened outputs, times T^2."""
    log_t = F.log_softmax(teacher / temperature, dim=1)
    log_s = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def step_loss(pairs, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the pairs' payload losses plus cross-entropy of the student's logits.

    ``pairs`` are ``(teacher, student, payload)`` triples; a ``None`` payload adds nothing.
    """
    loss = F.cross_entropy(logits, target)
    for t, s, payload in pairs:
        if payload is not None:
            loss = loss + payload(t, s)
    return loss
