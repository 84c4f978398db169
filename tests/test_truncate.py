"""Teacher truncation, the teacher running once under vmap, and teacher precision.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode: deterministic.
"""

import pytest
import torch
from torch import nn
from torch.func import grad, stack_module_state, vmap

from funcdistill import Mapping, distill, state
from tests.conftest import flops
from tests.models import Net, Shared, image, mlp


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

    calls = [flops(fn, state(t), state(s), x) for _ in range(3)]
    assert calls == [prefix_flops + student_flops] * 3  # truncated from the first call on


def test_truncated_pairs_equal_full_pairs(models):
    t, s = models
    x = image()
    m = Mapping(t, s).add("features.2", "features.1")
    full = distill(t, s, m, truncate=False)(state(t), state(s), x)
    cut = distill(t, s, m)
    for _ in range(2):
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
    with pytest.raises(
        RuntimeError,
        match=r"teacher module 'lin' runs 2 times in one forward pass of the teacher Shared, so its output is "
        r"ambiguous\. Select one call.* or map a module that runs once\.$",  # no dry-run note
    ):
        fn(state(t), state(s), torch.randn(2, 4))  # a training-mode teacher runs in full, no dry run
    t.eval()
    for _ in range(3):  # the second call happens after the stop: the dry run sees it, every time
        with pytest.raises(
            RuntimeError,
            match=r"teacher module 'lin' runs 2 times in one forward pass of the teacher Shared, so its output "
            r"is ambiguous\..* \(Seen by the shape-only dry run that checks a truncated teacher",
        ):
            fn(state(t), state(s), torch.randn(2, 4))


class RepeatsOnWideInputs(nn.Module):
    """Runs ``block`` a second time, after ``head``'s input is ready, only for inputs wider than 4."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x.repeat(1, 8 // x.shape[1]) if x.shape[1] < 8 else x
        h = self.block(x)
        if x.shape[0] > 4:
            h = self.block(h)
        return self.head(h)


def test_a_module_repeated_on_some_shapes_is_an_error_for_those_only_whatever_came_before():
    torch.manual_seed(0)
    t, s = RepeatsOnWideInputs().eval(), mlp((8, 8, 3))
    fn = distill(t, s, Mapping(t, s).add("block", "0"))
    small, large = torch.randn(2, 8), torch.randn(6, 8)
    for order in ((small, large, small, large), (large, small, large, small)):
        for x in order:
            if x.shape[0] > 4:
                with pytest.raises(RuntimeError, match="teacher module 'block' runs 2 times"):
                    fn(state(t), state(s), x)
            else:
                torch.testing.assert_close(fn(state(t), state(s), x)[0].teacher, t.block(x))


class SwallowsErrors(nn.Module):
    """Wraps each layer in ``try/except Exception``, as some models do around optional parts."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x):
        for layer in self.layers:
            try:
                x = layer(x)
            except Exception:  # noqa: BLE001 - what the test is about
                x = x * 0
        return x


def test_the_stop_signal_is_not_swallowed_by_except_exception():
    torch.manual_seed(0)
    t, s = SwallowsErrors().eval(), mlp((4, 8, 3))
    fn = distill(t, s, Mapping(t, s).add("layers.0", "0"))
    x = torch.randn(3, 4)
    (p,) = fn(state(t), state(s), x)
    torch.testing.assert_close(p.teacher, t.layers[0](x))
    assert flops(fn, state(t), state(s), x) == flops(t.layers[0], x) + flops(s, x)


class ValueDependent(nn.Module):
    """Control flow on a tensor's value: the shape-only dry run cannot follow it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 1e9:  # never true here
            h = self.a(h)
        return self.c(self.b(h))


def test_value_dependent_control_flow_runs_the_teacher_in_full_every_call():
    torch.manual_seed(0)
    t, s = ValueDependent().eval(), mlp((4, 4))
    fn = distill(t, s, Mapping(t, s).add("a", "0"))
    x = torch.randn(2, 4)
    full = flops(t, x) + flops(s, x)
    assert [flops(fn, state(t), state(s), x) for _ in range(3)] == [full] * 3
    torch.testing.assert_close(fn(state(t), state(s), x)[0].teacher, t.a(x))


def test_a_training_teacher_runs_in_full_and_draws_like_a_plain_forward():
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    s = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    fn = distill(t, s, Mapping(t, s).add("1", "1"))
    x = torch.randn(16, 4)
    assert flops(fn, state(t), state(s), x) == flops(t, x) + flops(s, x)
    outputs = []
    for _ in range(3):
        torch.manual_seed(7)
        (p,) = fn(state(t), state(s), x)
        outputs.append((p.teacher, p.student))
        torch.manual_seed(7)  # the same draws as plain forwards, teacher first
        with torch.no_grad():
            t_ref = t[:2](x)
            t[2:](t_ref)
        torch.testing.assert_close(p.teacher, t_ref)
        torch.testing.assert_close(p.student, s[:2](x))
    for later in outputs[1:]:  # exact: the same call, inputs and seed, in this process
        assert torch.equal(later[0], outputs[0][0]) and torch.equal(later[1], outputs[0][1])


@pytest.mark.compile
def test_compiled_before_any_eager_call_the_graph_holds_only_the_prefix(models):
    t, s = models
    x = image(4)
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.0"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x):
        (p,) = fn(state(t), state(s), x)
        return (p.teacher[:, :4] - p.student).pow(2).mean()

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    got = compiled(x)
    convs = sum(1 for g in graphs for n in g.graph.nodes if n.target is torch.conv2d)
    teacher_convs = 2  # stem + features.1's conv; the two later blocks never run
    student_convs = sum(isinstance(m, nn.Conv2d) for m in s.modules())
    assert convs == teacher_convs + student_convs
    torch.testing.assert_close(got, step(x))


@pytest.mark.compile
def test_compiled_call_reports_a_module_that_runs_again_after_the_stop():
    t, s = Shared().eval(), Shared()
    fn = distill(t, s, Mapping(t, s).add("lin", "out"))
    compiled = torch.compile(lambda x: fn(state(t), state(s), x)[0].teacher, fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match=r"teacher module 'lin' runs 2 times"):
        compiled(torch.randn(2, 4))


def test_truncation_keeps_gradients_exact(models):
    t, s = models
    x = image()
    m = Mapping(t, s).add("features.2", "features.1")
    ref = distill(t, s, m, truncate=False)
    cut = distill(t, s, m)

    def loss(fn):
        return lambda p: (lambda pr: (pr.teacher.mean(1) - pr.student.mean(1)).pow(2).mean())(fn(state(t), p, x)[0])

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
    with pytest.raises(
        TypeError, match=r"teacher_dtype must be a floating torch.dtype such as torch.bfloat16, got torch.int8"
    ):
        distill(*models, teacher_dtype=torch.int8)


def test_truncated_under_vmap_and_grad_from_the_first_call(models):
    t, s = models
    m = Mapping(t, s).add("features.1", "features.0")
    fn, ref = distill(t, s, m), distill(t, s, m, truncate=False)
    xs = torch.stack([image(2) for _ in range(3)])

    def loss(f, ss, x):
        (p,) = f(state(t), ss, x)
        return (p.teacher[:, :4] - p.student).pow(2).mean()

    step = vmap(grad(lambda ss, x: loss(fn, ss, x)), in_dims=(None, 0))
    full_step = vmap(grad(lambda ss, x: loss(ref, ss, x)), in_dims=(None, 0))
    params = state(s, buffers=False)
    skipped = (flops(t, xs[0]) - flops(nn.Sequential(*t.features[:2]), xs[0])) * 3  # after features.1, per sample
    assert flops(step, params, xs) == flops(full_step, params, xs) - skipped  # already on the first call
    got, want = step(params, xs), full_step(params, xs)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_the_compile_constant_marker_is_the_one_torch_sets():
    import subprocess
    import sys

    from funcdistill._verdict import constant_under_compile

    def ours():
        return 0

    def public():
        return 0

    before = set(vars(ours))
    constant_under_compile(ours)
    torch.compiler.assume_constant_result(public)
    assert set(vars(ours)) - before == set(vars(public)) - before == {"_dynamo_marked_constant"}
    code = "import sys, torch, funcdistill as fd; fd.distill(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # building a distill function does not import Dynamo
