"""Distillation losses, as pure functions and as modules usable as mapping payloads.

Argument order: every loss takes ``(teacher, student, ...)``, teacher first,
in the order of :class:`funcdistill.Pair` ``(teacher_output, student_output,
payload)``, so a training loop reads ``payload(teacher_output, student_output)``.
(This differs from :mod:`torch.nn` losses, which take ``(input, target)``.)

All of them accept ``reduction`` (``"none"``, ``"mean"``, ``"sum"``, and
``"batchmean"`` for the KL-based ones), refuse tensors of mismatched shapes
instead of broadcasting, and look only at shapes, never at tensor values, to
decide anything: they run under :func:`torch.func.grad`, :func:`torch.func.vmap`
and ``torch.compile(fullgraph=True)``. Hyper-parameters such as the temperature
may be 0-d tensors, so a vmapped sweep can give each student its own.

The losses and their papers:

- `kd_loss` / `KDLoss`: Hinton, Vinyals & Dean 2015 (softened logits, T²-scaled KL).
- `dkd_loss` / `DKDLoss`: Zhao et al. 2022 (decoupled KD: TCKD + NCKD; needs labels).
- `FitNetsLoss` with `hint_adapter`: Romero et al. 2015 (hints through a trainable adapter).
- `attention_transfer_loss` / `AttentionTransferLoss`: Zagoruyko & Komodakis 2017.
- `rkd_loss` / `RKDLoss`: Park et al. 2019 (relational: distance + angle).
- `cosine_loss` / `CosineLoss`: the hidden-state loss of DistilBERT (Sanh et al. 2019).
- `mse_loss`: plain feature matching (or `torch.nn.MSELoss`, which is symmetric).
- `pkt_loss` / `PKTLoss`: Passalis & Tefas 2018 (probabilistic knowledge transfer: cosine-kernel KL).
- `sp_loss` / `SPLoss`: Tung & Mori 2019 (similarity-preserving: batch Gram matrices).
- `crd_loss` / `CRDLoss` with `crd_init`, `crd_head`, `crd_negatives`: Tian et al. 2020
  (contrastive; its memory banks are an explicit `CRDState`, returned updated).
- `dist_loss` / `DISTLoss`: Huang et al. 2022 (DIST: inter- and intra-class Pearson correlation).
- `standardize_logits` / `LogitStandardization`: Sun et al. 2024 (logit standardization, a
  transform for `kd_loss` and `dkd_loss`).
- `generalized_jsd_loss` / `GeneralizedJSDLoss`: Agarwal et al. 2024 (GKD's generalized JSD over tokens).
- `skew_kl_loss` / `SkewKLLoss`: Ko et al. 2024 (DistiLLM's skew KL and skew reverse KL over tokens).
- `topk_kl_loss`: forward KL on a teacher's stored top-k log-probabilities (offline logits).
- `fused_linear_jsd_loss`, `fused_linear_topk_kl_loss`: the same from hidden states and head
  weights, chunk by chunk over tokens, never holding the full logits.
- `uld_loss` / `ULDLoss`: Boizard et al. 2024 (Universal Logit Distillation: sorted probabilities,
  across tokenizers).
- `hybrid_loss` / `HybridLoss`: TRL's GOLD (shared tokens by a generalized JSD, the rest by ULD).
- `fused_linear_uld_loss`, `fused_linear_hybrid_loss`: the same from hidden states and head weights,
  chunk by chunk.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from funcdistill import Mapping, distill, state
    >>> from funcdistill.losses import FitNetsLoss, KDLoss, hint_adapter
    >>> t = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> s = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> m = (Mapping(t, s)
    ...      .add("", "", KDLoss(temperature=4.0))
    ...      .add("1", "1", FitNetsLoss(hint_adapter(8, 16, ndim=2))))
    >>> fn = distill(t, s, m)
    >>> def loss(ss, x):
    ...     return sum(c(a, b) for a, b, c in fn(state(t), ss, x))
    >>> grads = torch.func.grad(loss)(state(s, m), torch.randn(5, 4))
    >>> sorted(k for k in grads if k.startswith("payloads"))
    ['payloads.1.adapter.bias', 'payloads.1.adapter.weight']
"""

from __future__ import annotations

from funcdistill.losses._contrastive import CRDLoss, CRDState, crd_head, crd_init, crd_loss, crd_negatives
from funcdistill.losses._cross import HybridLoss, ULDLoss, hybrid_loss, uld_loss
from funcdistill.losses._cross_fused import fused_linear_hybrid_loss, fused_linear_uld_loss
from funcdistill.losses._divergence import (
    GeneralizedJSDLoss,
    SkewKLLoss,
    generalized_jsd_loss,
    skew_kl_loss,
    topk_kl_loss,
)
from funcdistill.losses._feature import (
    AttentionTransferLoss,
    CosineLoss,
    FitNetsLoss,
    attention_transfer_loss,
    cosine_loss,
    hint_adapter,
    mse_loss,
)
from funcdistill.losses._fused import fused_linear_jsd_loss, fused_linear_topk_kl_loss
from funcdistill.losses._logit import (
    DISTLoss,
    DKDLoss,
    KDLoss,
    LogitStandardization,
    dist_loss,
    dkd_loss,
    kd_loss,
    standardize_logits,
)
from funcdistill.losses._relational import RKDLoss, rkd_loss
from funcdistill.losses._similarity import PKTLoss, SPLoss, pkt_loss, sp_loss

__all__ = [
    "AttentionTransferLoss",
    "CRDLoss",
    "CRDState",
    "CosineLoss",
    "DISTLoss",
    "DKDLoss",
    "FitNetsLoss",
    "GeneralizedJSDLoss",
    "HybridLoss",
    "KDLoss",
    "LogitStandardization",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "SkewKLLoss",
    "ULDLoss",
    "attention_transfer_loss",
    "cosine_loss",
    "crd_head",
    "crd_init",
    "crd_loss",
    "crd_negatives",
    "dist_loss",
    "dkd_loss",
    "fused_linear_hybrid_loss",
    "fused_linear_jsd_loss",
    "fused_linear_topk_kl_loss",
    "fused_linear_uld_loss",
    "generalized_jsd_loss",
    "hint_adapter",
    "hybrid_loss",
    "kd_loss",
    "mse_loss",
    "pkt_loss",
    "rkd_loss",
    "skew_kl_loss",
    "sp_loss",
    "standardize_logits",
    "topk_kl_loss",
    "uld_loss",
]
