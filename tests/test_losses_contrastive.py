"""CRD: the NCE loss against a loop reference, torchdistill 1.1.5, the momentum rule, and a pure training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from funcdistill import Mapping, distill, state
from funcdistill import losses as L
from tests.torchdistill_losses import mid_level

DOUBLE = torch.float64
M, D, N, K = 20, 6, 5, 7  # training-set size, embedding width, batch, negatives


pytestmark = pytest.mark.usefixtures("seed")


def _setup(dtype=DOUBLE):
    crd_state = L.crd_init(M, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    index = torch.tensor([3, 0, 19, 7, 11])
    negatives = L.crd_negatives(index, M, K, generator=torch.Generator().manual_seed(2))
    t = torch.randn(N, D, dtype=dtype, requires_grad=True)
    s = torch.randn(N, D, dtype=dtype, requires_grad=True)
    return crd_state, index, negatives, t, s


def _unit(v):
    return v / sum(x * x for x in v).sqrt()


def _crd_reference(t, s, crd_state, index, negatives, tau=0.07, eps=1e-7):
    """The paper's NCE loss with the code's constant Z, one sample and one negative at a time."""
    rows = [[int(i)] + [int(j) for j in js] for i, js in zip(index, negatives)]

    def side(embeds, memory, z):
        scores = [[math.e ** (sum(memory[c] * _unit(e)) / tau) for c in r] for e, r in zip(embeds, rows)]
        if z == 0:  # Z: the mean over the first batch's scores, times the training-set size
            z = sum(sum(x.detach() for x in row) for row in scores) / (len(rows) * (K + 1)) * M
        noise = K / M
        total = 0
        for row in scores:
            p = [x / z for x in row]
            total = total - (p[0] / (p[0] + noise + eps)).log()
            total = total - sum((noise / (q + noise + eps)).log() for q in p[1:])
        return total / len(rows), z

    student, z_s = side(s, crd_state.teacher_memory, math.exp(crd_state.student_log_z))
    teacher, z_t = side(t, crd_state.student_memory, math.exp(crd_state.teacher_log_z))
    return student + teacher, z_s, z_t


def test_crd_matches_loop_reference_values_and_gradients():
    crd_state, index, negatives, t, s = _setup()
    loss, new_state = L.crd_loss(t, s, crd_state, index, negatives)
    expected, z_s, z_t = _crd_reference(t, s, crd_state, index, negatives)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, (t, s)), torch.autograd.grad(expected, (t, s))):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(new_state.student_log_z.exp(), torch.as_tensor(z_s, dtype=DOUBLE))
    torch.testing.assert_close(new_state.teacher_log_z.exp(), torch.as_tensor(z_t, dtype=DOUBLE))
    # with Z set, a second call keeps it and uses it
    loss2, state2 = L.crd_loss(t, s, new_state, index, negatives, temperature=0.2)
    expected2, _, _ = _crd_reference(t, s, new_state, index, negatives, tau=0.2)
    torch.testing.assert_close(loss2, expected2)
    assert torch.equal(state2.student_log_z, new_state.student_log_z)
    per_sample = L.crd_loss(t, s, new_state, index, negatives, reduction="none")[0]
    assert per_sample.shape == (N,)
    torch.testing.assert_close(per_sample.sum(), L.crd_loss(t, s, new_state, index, negatives, reduction="sum")[0])
    torch.testing.assert_close(per_sample.mean(), L.crd_loss(t, s, new_state, index, negatives)[0])


def _torchdistill_crd(td, crd_state, momentum=0.5, tau=0.07):
    ref = td.CRDLoss("norm", "empty", "norm", D, M, K, M, temperature=tau, momentum=momentum).double()
    ref.memory_v1 = crd_state.student_memory.clone()  # v1: the student's bank
    ref.memory_v2 = crd_state.teacher_memory.clone()
    ref.params = ref.params.double()  # a float64 buffer: tau, Z and the momentum without float32 rounding
    ref.params[1], ref.params[4] = tau, momentum
    return ref


def _call_torchdistill(ref, t, s, index, negatives):
    def unit(x):  # their Normalize module, applied before the loss
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)

    contrast = torch.cat([index[:, None], negatives], dim=1)  # their contrast_idx: the positive first
    student = {"norm": {"output": unit(s)}, "empty": {"input": {"pos_idx": index, "contrast_idx": contrast}}}
    return ref(student, {"norm": {"output": unit(t)}}).sum()


def test_crd_matches_torchdistill_loss_gradients_and_memory():
    td = mid_level()
    crd_state, index, negatives, t, s = _setup()
    ref = _torchdistill_crd(td, crd_state, momentum=0.3)
    for step in range(3):  # the first call sets Z; later ones use it and the updated banks
        loss, crd_state = L.crd_loss(t, s, crd_state, index, negatives, momentum=0.3)
        theirs = _call_torchdistill(ref, t, s, index, negatives)
        torch.testing.assert_close(loss, theirs, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(loss, (t, s)), torch.autograd.grad(theirs, (t, s))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(crd_state.student_memory, ref.memory_v1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd_state.teacher_memory, ref.memory_v2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd_state.student_log_z.exp(), ref.params[2])
        torch.testing.assert_close(crd_state.teacher_log_z.exp(), ref.params[3])
        index = (index + 4 * step + 1) % M


def test_memory_update_is_the_papers_momentum_rule_at_the_batch_rows_only():
    crd_state, index, negatives, t, s = _setup()
    m = 0.7
    _, new_state = L.crd_loss(t, s, crd_state, index, negatives, momentum=torch.tensor(m, dtype=DOUBLE))
    for bank, old, embeds in (
        (new_state.student_memory, crd_state.student_memory, s),
        (new_state.teacher_memory, crd_state.teacher_memory, t),
    ):
        expected = old.clone()
        for row, e in zip(index.tolist(), embeds.detach()):
            mixed = m * old[row] + (1 - m) * _unit(e)
            expected[row] = mixed / mixed.norm()
        assert torch.equal(bank[~torch.isin(torch.arange(M), index)], old[~torch.isin(torch.arange(M), index)])
        torch.testing.assert_close(bank, expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(bank[index].norm(dim=1), torch.ones(N, dtype=DOUBLE))
        assert not bank.requires_grad
    # momentum 1 keeps the (normalised) old rows; momentum 0 stores the new embeddings
    _, kept = L.crd_loss(t, s, crd_state, index, negatives, momentum=1.0)
    torch.testing.assert_close(
        kept.student_memory[index], torch.nn.functional.normalize(crd_state.student_memory[index])
    )
    _, fresh = L.crd_loss(t, s, crd_state, index, negatives, momentum=0)
    torch.testing.assert_close(fresh.teacher_memory[index], torch.nn.functional.normalize(t.detach()))


def test_crd_state_and_embeddings_may_differ_in_dtype():
    crd_state, index, negatives, t, s = _setup(torch.float32)
    t, s = t.detach(), s.detach()
    loss, new_state = L.crd_loss(t.double(), s.double(), crd_state, index, negatives)
    assert loss.dtype == DOUBLE and all(x.dtype == torch.float32 for x in new_state)
    torch.testing.assert_close(loss.float(), L.crd_loss(t, s, crd_state, index, negatives)[0])


def test_crd_is_pure():
    crd_state, index, negatives, t, s = _setup()
    before = [x.clone() for x in crd_state]
    first = L.crd_loss(t, s, crd_state, index, negatives)
    second = L.crd_loss(t, s, crd_state, index, negatives)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert all(torch.equal(a, b) for a, b in zip(crd_state, before))  # the input state is untouched
    g = torch.Generator()
    draws = [L.crd_negatives(index, M, K, generator=g.manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_negatives_are_uniform_over_the_other_samples():
    index = torch.tensor([0, 4, 9])
    negatives = L.crd_negatives(index, 10, 9000, generator=torch.Generator().manual_seed(0))
    assert negatives.shape == (3, 9000) and negatives.dtype == torch.long
    for row, positive in zip(negatives, index):
        counts = torch.bincount(row, minlength=10)
        assert counts[positive] == 0
        others = counts[torch.arange(10) != positive].double()
        assert counts.sum() == 9000 and (others - 1000).abs().max() < 150  # ~5 standard deviations


def test_crd_extreme_and_identical_inputs():
    crd_state, index, negatives, _, _ = _setup(torch.float32)
    for t, s in (
        (torch.zeros(N, D), torch.zeros(N, D)),
        (1e4 * torch.randn(N, D), -1e4 * torch.randn(N, D)),
        (torch.full((N, D), 1e4), torch.full((N, D), 1e4)),
    ):
        s = s.requires_grad_()
        for temperature in (0.07, 0.001):
            loss, new_state = L.crd_loss(t, s, crd_state, index, negatives, temperature=temperature)
            (g,) = torch.autograd.grad(loss, s)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert all(torch.isfinite(x).all() for x in new_state)
    # teacher and student embeddings equal to the memory rows of the positives: the positives
    # score highest, so the loss is lower than for embeddings that match a negative instead
    aligned = crd_state._replace(teacher_memory=crd_state.student_memory)
    e = aligned.student_memory[index]
    matched = L.crd_loss(e, e, aligned, index, negatives, reduction="none")[0]
    wrong = aligned.student_memory[negatives[:, 0]]
    mismatched = L.crd_loss(wrong, wrong, aligned, index, negatives, reduction="none")[0]
    assert (matched < mismatched).all()


def test_crd_trains_in_a_pure_grad_loop_with_its_state_threaded():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(M, 8, generator=g)
    teacher_features = torch.tanh(inputs @ torch.randn(8, 12, generator=g))  # a frozen teacher
    params = {
        "student": torch.randn(8, 4, generator=g) * 0.3,
        "student_head": torch.randn(4, D, generator=g) * 0.3,
        "teacher_head": torch.randn(12, D, generator=g) * 0.3,
    }

    def objective(params, crd_state, index, negatives):
        student_features = torch.tanh(inputs[index] @ params["student"])
        t = teacher_features[index] @ params["teacher_head"]
        s = student_features @ params["student_head"]
        return L.crd_loss(t, s, crd_state, index, negatives, temperature=0.1, momentum=0.5)

    step = grad(objective, has_aux=True)
    crd_state = L.crd_init(M, D, generator=g)
    epochs = []
    for _ in range(30):
        losses = []
        for index in torch.randperm(M, generator=g).split(5):
            negatives = L.crd_negatives(index, M, 8, generator=g)
            loss, _ = objective(params, crd_state, index, negatives)
            grads, crd_state = step(params, crd_state, index, negatives)
            params = {k: v - 0.5 * grads[k] for k, v in params.items()}
            losses.append(float(loss))
        epochs.append(sum(losses) / len(losses))
    assert isinstance(crd_state, L.CRDState) and crd_state.student_log_z.isfinite()
    assert epochs[-1] < 0.8 * epochs[0], epochs


def test_crd_payload_heads_train_with_the_student():
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    crd = L.CRDLoss(L.crd_head(16, D), L.crd_head(4, D), temperature=0.1)
    mapping = Mapping(teacher, student).add("1", "1", crd)
    fn = distill(teacher, student, mapping)
    x, index = torch.randn(N, 6), torch.tensor([1, 2, 3, 4, 5])
    negatives = L.crd_negatives(index, M, K, generator=torch.Generator().manual_seed(0))
    crd_state = L.crd_init(M, D)

    def objective(params, crd_state):
        ((t, s, payload),) = fn(state(teacher), params, x)
        return payload(t, s, crd_state, index, negatives)

    params = state(student, mapping)
    grads, new_state = grad(objective, has_aux=True)(params, crd_state)
    heads = [k for k in grads if k.startswith("payloads.0.")]
    assert sorted(heads) == sorted(
        f"payloads.0.{side}_head.1.{p}" for side in ("teacher", "student") for p in ("weight", "bias")
    )
    assert all(grads[k].abs().sum() > 0 for k in heads) and grads["0.weight"].abs().sum() > 0
    # the same as the function on the heads' outputs
    with torch.no_grad():
        t, s = teacher[:2](x), student[:2](x)
        expected = L.crd_loss(crd.teacher_head(t), crd.student_head(s), crd_state, index, negatives, temperature=0.1)
        got = objective(params, crd_state)
    torch.testing.assert_close(got[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(new_state, expected[1]))


def test_crd_vmap_over_temperatures_and_heads_via_functional_call():
    crd_state, index, negatives, t, s = _setup(torch.float32)
    t, s = t.detach(), s.detach()
    temps = torch.tensor([0.05, 0.1, 0.5])
    swept, states = vmap(lambda T: L.crd_loss(t, s, crd_state, index, negatives, temperature=T))(temps)
    for i, T in enumerate(temps):
        loss, new_state = L.crd_loss(t, s, crd_state, index, negatives, temperature=float(T))
        torch.testing.assert_close(swept[i], loss)
        torch.testing.assert_close(states.student_log_z[i], new_state.student_log_z)
        torch.testing.assert_close(states.student_memory[i], new_state.student_memory)
    head = L.crd_head(3, D)
    torch.testing.assert_close(functional_call(head, dict(head.named_parameters()), (s[:, :3],)), head(s[:, :3]))


def test_crd_errors():
    crd_state, index, negatives, t, s = _setup(torch.float32)
    t, s = t.detach(), s.detach()
    with pytest.raises(TypeError, match=r"crd_loss: state must be a CRDState \(from crd_init.*got tuple"):
        L.crd_loss(t, s, tuple(crd_state), index, negatives)
    with pytest.raises(ValueError, match=r"crd_loss: teacher and student embeddings must both be \(N, D\).*crd_head"):
        L.crd_loss(t, s[:, :3], crd_state, index, negatives)
    with pytest.raises(
        ValueError, match=r"crd_loss: state.student_memory has shape \(20, 6\) .*crd_init\(num_samples, 3\)"
    ):
        L.crd_loss(t[:, :3], s[:, :3], crd_state, index, negatives)
    with pytest.raises(TypeError, match=r"crd_loss: index must hold integer dataset indices .*torch.float32"):
        L.crd_loss(t, s, crd_state, index.float(), negatives)
    with pytest.raises(ValueError, match=r"crd_loss: negatives must have shape \(N, K\).*got shape \(35,\)"):
        L.crd_loss(t, s, crd_state, index, negatives.flatten())
    with pytest.raises(
        ValueError, match=r"crd_loss: index \(4,\) and negatives \(5, 7\) need one row per sample of the batch of 5"
    ):
        L.crd_loss(t, s, crd_state, index[:4], negatives)
    with pytest.raises(ValueError, match=r"crd_loss: momentum must be in \[0, 1\], got 1.5"):
        L.crd_loss(t, s, crd_state, index, negatives, momentum=1.5)
    with pytest.raises(ValueError, match="crd_loss: temperature must be a positive finite number, got 0"):
        L.crd_loss(t, s, crd_state, index, negatives, temperature=0)
    with pytest.raises(ValueError, match="crd_init: num_samples must be at least 2, got 1"):
        L.crd_init(1, 4)
    with pytest.raises(TypeError, match="crd_init: embed_dim must be an int, got float"):
        L.crd_init(10, 4.0)
    with pytest.raises(ValueError, match=r"crd_negatives: index must have shape \(N,\)"):
        L.crd_negatives(index[:, None], 10, 3, generator=None)
    with pytest.raises(ValueError, match="crd_negatives: num_negatives must be at least 1, got 0"):
        L.crd_negatives(index, 10, 0, generator=None)
    with pytest.raises(
        TypeError, match=r"CRDLoss: student_head must be an nn.Module \(e.g. crd_head\(...\)\), got function"
    ):
        L.CRDLoss(L.crd_head(3, 2), lambda x: x)
    with pytest.raises(ValueError, match="crd_head: embed_dim must be at least 1, got 0"):
        L.crd_head(3, 0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8])
def test_crd_takes_indices_of_any_integer_dtype(dtype):
    # a teacher cache or a compact dataset may hold indices narrower than int64; the same rows are selected
    crd_state, index, negatives, t, s = _setup()
    loss, new_state = L.crd_loss(t, s, crd_state, index.to(dtype), negatives.to(dtype))
    ref_loss, ref_state = L.crd_loss(t, s, crd_state, index, negatives)
    assert torch.equal(loss, ref_loss)  # the same arithmetic on the same values: exact
    assert all(torch.equal(a, b) for a, b in zip(new_state, ref_state))
