"""What every loss in funcdistill.losses does alike: reductions, vmap, no graph breaks, compile, module forms.

Also the losses as payloads (functional step, compat shim) and the public names. The per-loss
values are checked in the file of each loss module: ``tests/test_losses_<module>.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from funcdistill import Mapping, distill, state
from funcdistill import losses as L
from tests.conftest import close

pytestmark = pytest.mark.usefixtures("seed")


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
        # across tokenizers: two vocabularies (5 and 7 classes), 3 shared tokens for the hybrid
        "uld_loss": (L.uld_loss, (torch.randn(4, 5), torch.randn(4, 7)), {"temperature": 2.0}),
        "hybrid_loss": (
            functools.partial(L.hybrid_loss, teacher_ids=torch.tensor([0, 3, 4]), student_ids=torch.tensor([6, 0, 2])),
            (torch.randn(4, 5), torch.randn(4, 7)),
            {"beta": 0.5},
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
            "HybridLoss",
            "ULDLoss",
            "hybrid_loss",
            "uld_loss",
            "fused_linear_hybrid_loss",
            "fused_linear_uld_loss",
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
        "uld_loss": "Boizard",
        "hybrid_loss": "GOLD",
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
