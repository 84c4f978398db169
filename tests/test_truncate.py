"""Teacher truncation, the teacher running once under vmap, and teacher precision.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode: deterministic.
"""

import pytest
import torch
from torch import nn
from torch.func import grad, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

from funcdistill import Mapping, distill, state
from tests.models import Net, Shared, image, mlp


def flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.fixture
def models():
    torch.manual_seed(0)
    return Net(width=8, depth=4).eval(), Net(width=4, depth=1).eval()


def test_teacher_stops_after_its_deepest_mapped_point(models):
    t, s = models
    x = image(4)
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.0").add("features.2", "features.1"))
    prefix = nn.Sequential(*t.features[:3])
    full_flops, prefix_flops, student_flops = flops(t, x), flops(prefix, x), flops(s, x)
    assert prefix_flops < 0.7 * full_flops

    first = flops(fn, state(t), state(s), x)  # checking call: full teacher
    assert first == full_flops + student_flops
    truncated = flops(fn, state(t), state(s), x)
    assert truncated == prefix_flops + student_flops


def test_truncated_pairs_equal_full_pairs(models):
    t, s = models
    x = image()
    m = Mapping(t, s).add("features.2", "features.1")
    full = distill(t, s, m, truncate=False)(state(t), state(s), x)
    cut = distill(t, s, m)
    cut(state(t), state(s), x)
    torch.testing.assert_close(cut(state(t), state(s), x)[0].teacher, full[0].teacher)


def test_whole_model_or_truncate_false_runs_everything(models):
    t, s = models
    x = image()
    full = flops(t, x) + flops(s, x)
    for fn in (
        distill(t, s, Mapping(t, s).add("features.1", "features.0").add("", "")),
        distill(t, s, Mapping(t, s).add("features.1", "features.0"), truncate=False),
    ):
        fn(state(t), state(s), x)
        assert flops(fn, state(t), state(s), x) == full


def test_a_point_that_runs_twice_is_caught_before_truncating():
    t, s = Shared(), Shared()
    fn = distill(t, s, Mapping(t, s).add("lin", "out"))
    with pytest.raises(RuntimeError, match="teacher module 'lin' ran more than once"):
        fn(state(t), state(s), torch.randn(2, 4))


def test_truncation_keeps_gradients_exact(models):
    t, s = models
    x = image()
    m = Mapping(t, s).add("features.2", "features.1")
    ref = distill(t, s, m, truncate=False)
    cut = distill(t, s, m)
    cut(state(t), state(s), x)

    def loss(fn):
        return lambda p: ((lambda pr: (pr.teacher.mean(1) - pr.student.mean(1)).pow(2).mean())(fn(state(t), p, x)[0]))

    params = state(s, buffers=False)
    g_ref, g_cut = grad(loss(ref))(params), grad(loss(cut))(params)
    for k in g_ref:
        torch.testing.assert_close(g_cut[k], g_ref[k])


def test_vmapped_students_share_one_teacher_forward():
    torch.manual_seed(0)
    t = mlp((16, 64, 64, 4))
    students = [mlp((16, 8, 4)) for _ in range(4)]
    fn = distill(t, students[0], Mapping(t, students[0]).add("", ""))
    params, _ = stack_module_state(students)
    x = torch.randn(32, 16)

    def loss(p):
        (pair,) = fn(state(t), p, x)
        return (pair.teacher - pair.student).pow(2).mean()

    teacher_flops, student_flops = flops(t, x), flops(students[0], x)
    assert flops(vmap(loss), params) == teacher_flops + 4 * student_flops


def test_bf16_teacher_pairs_reach_the_loss_in_the_students_dtype(models):
    t, s = models
    x = image()
    m = Mapping(t, s).add("features.2", "features.1").add("", "")
    fp32 = distill(t, s, m)(state(t), state(s), x)
    bf16_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state(t).items()}
    for teacher_state in (bf16_state, state(t), {}):
        pairs = distill(t, s, m, teacher_dtype=torch.bfloat16)(teacher_state, state(s), x)
        for low, ref in zip(pairs, fp32):
            assert low.teacher.dtype == low.student.dtype == torch.float32
            torch.testing.assert_close(low.teacher, ref.teacher, atol=0.1, rtol=0.05)
            assert not torch.equal(low.teacher, ref.teacher)  # it really ran in bf16


def test_teacher_dtype_must_be_floating(models):
    with pytest.raises(TypeError, match="teacher_dtype must be a floating torch.dtype such as torch.bfloat16, got torch.int8"):
        distill(*models, teacher_dtype=torch.int8)
