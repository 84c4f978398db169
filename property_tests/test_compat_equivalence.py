"""The compat shim computes exactly what the functional core computes.

For random teachers, students and mappings (``property_tests.strategies``),
plus an optional trainable adapter payload, one step through
``funcdistill.compat.distill`` and ``.backward()`` gives the same pairs, loss,
gradients (student, adapter, and teacher when ``nograd_teacher=False``) and
updated buffers as the pure function of ``funcdistill.distill``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcdistill as fd
from funcdistill.compat import Mapping, distill
from property_tests.strategies import model_pairs, summary


def loss_of(pairs) -> torch.Tensor:
    """Weights (floats) scale a shape-agnostic feature loss; adapters map student to teacher."""
    total = torch.zeros(())
    for t, s, payload in pairs:
        if callable(payload):
            total = total + ((payload(s) - t) ** 2).mean()
        else:
            total = total + payload * ((summary(t) - summary(s)) ** 2).mean()
    return total


@st.composite
def cases(draw):
    teacher, student, mapping, x = draw(model_pairs())
    if draw(st.booleans()):
        torch.manual_seed(draw(st.integers(0, 100)))
        classes = teacher.head.out_features
        mapping = mapping.add("", "", payload=nn.Linear(student.head.out_features, classes))
    return teacher, student, mapping, x, draw(st.booleans())


def functional_step(teacher, student, mapping, x, nograd_teacher):
    """Pairs, loss, gradients and buffers from the pure function, on copies of the state."""

    def leaves(model, extra=None):
        return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in fd.state(model, extra).items()}

    t_state, s_state = leaves(teacher), leaves(student, mapping)
    fn = fd.distill(
        teacher, student, mapping, nograd_teacher=nograd_teacher, mutable=True, truncate=not teacher.training
    )  # as the shim does
    pairs, buffers = fn(t_state, s_state, x)
    loss = loss_of(pairs)
    wrt = {("student", k): v for k, v in s_state.items() if v.requires_grad}
    if not nograd_teacher:
        wrt.update({("teacher", k): v for k, v in t_state.items() if v.requires_grad})
    if not loss.requires_grad:  # only the student's input is mapped: nothing to differentiate
        return pairs, loss, dict.fromkeys(wrt), buffers
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return pairs, loss, dict(zip(wrt, grads)), buffers


def live_grads(teacher, student, mapping, nograd_teacher):
    out = {("student", k): p.grad for k, p in student.named_parameters()}
    for i, payload in enumerate(mapping.payload()):
        if isinstance(payload, nn.Module):
            out.update({("student", f"payloads.{i}.{k}"): p.grad for k, p in payload.named_parameters()})
    teacher_grads = {("teacher", k): p.grad for k, p in teacher.named_parameters()}
    if nograd_teacher:
        assert all(g is None for g in teacher_grads.values())
    else:
        out.update(teacher_grads)
    return out


@settings(max_examples=15, deadline=None)
@given(cases())
def test_shim_equals_functional_core(case):
    teacher, student, mapping, x, nograd_teacher = case
    f_pairs, f_loss, f_grads, f_buffers = functional_step(teacher, student, mapping, x, nograd_teacher)

    compat_mapping = Mapping.from_functional(mapping)
    with distill(teacher=teacher, student=student, mapping=compat_mapping, nograd_teacher=nograd_teacher) as model:
        pairs = model(x)
        loss = loss_of(pairs)
        if loss.requires_grad:  # not when only the student's input is mapped
            loss.backward()

    assert isinstance(pairs, list) and len(pairs) == len(f_pairs) == len(mapping)
    for (t, s, p), (ft, fs, fp), original in zip(pairs, f_pairs, mapping.payload()):
        torch.testing.assert_close(t, ft)
        torch.testing.assert_close(s, fs)
        assert p is original and (fp is original or fp.module is original)
    torch.testing.assert_close(loss, f_loss)

    got = live_grads(teacher, student, mapping, nograd_teacher)
    assert got.keys() == f_grads.keys()
    for key, want in f_grads.items():
        if want is None:  # a parameter after the deepest mapped point
            assert got[key] is None, key
        else:
            torch.testing.assert_close(got[key], want, msg=str(key))

    live = {
        **{("teacher", k): b for k, b in teacher.named_buffers()},
        **{("student", k): b for k, b in student.named_buffers()},
    }
    for role, updated in (("teacher", f_buffers.teacher), ("student", f_buffers.student)):
        for name, want in updated.items():
            torch.testing.assert_close(live[(role, name)], want, msg=f"{role} {name}")
