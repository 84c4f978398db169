"""Properties of the functional core over random architectures and mappings."""

import copy

import optree
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given

import funcdistill as fd
from property_tests.strategies import any_points, feature_loss, mappings, model_pairs, payloads, recorded, select


def _hand_written_student_grads(teacher, student, mapping, x):
    """Hooks recording every call on copies, teacher under no_grad, .backward()."""
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    with torch.no_grad():
        _, seen_t = recorded(teacher, x)
    _, seen_s = recorded(student, x)
    loss = feature_loss([(select(t, seen_t), select(s, seen_s), w) for t, s, w in mapping])
    if loss.requires_grad:  # not when only the student's input is mapped
        loss.backward()
    return {n: p.grad for n, p in student.named_parameters()}


@given(model_pairs())
def test_student_grads_match_hooks_and_teacher_gets_none(case):
    teacher, student, mapping, x = case
    fn = fd.distill(teacher, student, mapping, mutable=False)  # random modes: dropping BatchNorm updates is fine
    params = fd.state(teacher, buffers=False), fd.state(student, buffers=False)
    g_t, g_s = torch.func.grad(lambda tp, sp: feature_loss(fn(tp, sp, x)), argnums=(0, 1))(*params)
    assert all(torch.count_nonzero(g) == 0 for g in g_t.values())
    expected = _hand_written_student_grads(teacher, student, mapping, x)
    for name, g in expected.items():
        torch.testing.assert_close(g_s[name], torch.zeros_like(g_s[name]) if g is None else g, msg=name)


@given(model_pairs())
def test_backward_never_reaches_the_teacher(case):
    teacher, student, mapping, x = case
    fn = fd.distill(teacher, student, mapping, mutable=False)  # random modes: dropping BatchNorm updates is fine
    loss = feature_loss(fn(fd.state(teacher), fd.state(student), x))
    if loss.requires_grad:  # not when only the student's input is mapped
        loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


@given(model_pairs())
def test_calls_are_pure(case):
    teacher, student, mapping, x = case
    before = [{k: v.detach().clone() for k, v in fd.state(m).items()} for m in (teacher, student)]
    modes = [[m.training for m in model.modules()] for model in (teacher, student)]
    x_before = x.clone()
    fn = fd.distill(teacher, student, mapping, mutable=True)
    (pairs, buffers) = fn(fd.state(teacher), fd.state(student), x)
    loss = feature_loss(pairs)
    if loss.requires_grad:  # not when only the student's input is mapped
        loss.backward()
    for model, snap, mode in zip((teacher, student), before, modes):
        now = fd.state(model)
        assert all(torch.equal(now[k], snap[k]) for k in snap)
        assert [m.training for m in model.modules()] == mode
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(x, x_before)
    assert set(buffers.student) == {n for n, _ in student.named_buffers()}


@given(mappings())
def test_mapping_flatten_unflatten_round_trips(m):
    leaves, spec = optree.tree_flatten(m, namespace="funcdistill")
    assert optree.tree_unflatten(spec, leaves) == m
    t_leaves, t_spec = torch_pytree.tree_flatten(m)
    assert torch_pytree.tree_unflatten(t_leaves, t_spec) == m
    assert t_leaves == leaves == [p for p in m.payload() if p is not None]


def _kept(point):
    """How a mapping keeps a point: a plain Point as its name."""
    return point.name if isinstance(point, fd.Point) and point.io == "output" and point.call is None else point


@given(mappings(), any_points, any_points, payloads)
def test_add_never_mutates(m, t, s, p):
    before = (m.names, m.payload(), len(m))
    bigger = m.add(t, s, payload=p)
    assert (m.names, m.payload(), len(m)) == before
    assert bigger.names == before[0] + ((_kept(t), _kept(s)),) and len(bigger) == before[2] + 1
    assert bigger.payload()[-1] == p


@given(model_pairs())
def test_truncated_calls_equal_full_calls(case):
    teacher, student, mapping, x = case
    teacher.eval()  # same statistics on every call
    fn = fd.distill(teacher, student, mapping, mutable=False)  # the student may train: its updates are not the point
    full = fd.distill(teacher, student, mapping, truncate=False, mutable=False)
    fn(fd.state(teacher), fd.state(student), x)  # the checking call
    for cut, ref in zip(fn(fd.state(teacher), fd.state(student), x), full(fd.state(teacher), fd.state(student), x)):
        torch.testing.assert_close(cut.teacher, ref.teacher)
