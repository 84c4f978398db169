"""Per-call and input points through distill: each call of a shared module, all calls, module inputs."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from funcdistill import Mapping, Point, distill, state
from tests.conftest import flops
from tests.models import Scaled, Unrolled


def unrolled(model, x):
    """What each point of ``Unrolled`` should give, written out by hand."""
    inputs, outputs, h = [], [], x
    for _ in range(model.steps):
        inputs.append(h)
        outputs.append(model.cell(h))
        h = torch.tanh(outputs[-1])
    return {"cell_in": inputs, "cell_out": outputs, "head_in": h, "scale": h.mean(-1, keepdim=True)}


@pytest.fixture
def models():
    torch.manual_seed(0)
    return Unrolled(width=4).eval(), Unrolled(width=4)


def test_each_call_negative_calls_all_calls_and_inputs(models):
    t, s = models
    x = torch.randn(5, 4)
    points = [
        (Point("cell", call=0), lambda r: r["cell_out"][0]),
        (Point("cell", call=2), lambda r: r["cell_out"][2]),
        (Point("cell", call=-1), lambda r: r["cell_out"][-1]),
        (Point("cell", call=-3), lambda r: r["cell_out"][0]),
        (Point("cell", call="all"), lambda r: tuple(r["cell_out"])),
        (Point("cell", io="input", call=1), lambda r: r["cell_in"][1]),
        (Point("cell", io="input", call="all"), lambda r: tuple(r["cell_in"])),
        (Point("head", io="input"), lambda r: r["head_in"]),  # the one positional input
        (Point("head", io="input", arg=0), lambda r: r["head_in"]),
        (Point("head", io="input", arg="h"), lambda r: r["head_in"]),  # by name, passed by position
        (Point("head", io="input", arg="scale"), lambda r: r["scale"]),  # by name, passed by keyword
    ]
    for point, expected in points:
        m = Mapping(t, s).add(point, point)
        for truncate in (True, False):
            (pair,) = distill(t, s, m, truncate=truncate)(state(t), state(s), x)
            with torch.no_grad():
                torch.testing.assert_close(pair.teacher, expected(unrolled(t, x)), msg=repr(point))
            torch.testing.assert_close(pair.student, expected(unrolled(s, x)), msg=repr(point))


def test_several_points_on_one_module_and_the_whole_output(models):
    t, s = models
    x = torch.randn(5, 4)
    m = (
        Mapping(t, s)
        .add(Point("cell", call=1), Point("cell", io="input", call=1))
        .add(Point("cell", io="input", call=1), Point("cell", call=0))
        .add("", "")
    )
    pairs = distill(t, s, m)(state(t), state(s), x)
    rt, rs = unrolled(t, x), unrolled(s, x)
    torch.testing.assert_close(pairs[0].teacher, rt["cell_out"][1].detach())
    torch.testing.assert_close(pairs[1].teacher, rt["cell_in"][1].detach())
    torch.testing.assert_close(pairs[0].student, rs["cell_in"][1])
    torch.testing.assert_close(pairs[1].student, rs["cell_out"][0])
    torch.testing.assert_close(pairs[2].student, s(x))


def test_truncation_stops_after_the_selected_call(models):
    t, s = models
    x = torch.randn(5, 4)
    cell, head = flops(lambda: t.cell(x)), flops(lambda: t.head.lin(x))
    student = flops(lambda: s(x))
    expected = {
        Point("cell", call=0): cell,
        Point("cell", call=1): 2 * cell,
        Point("cell", io="input", call=1): cell,  # read before the second call runs
        Point("head", io="input"): 3 * cell,  # the head never runs
        Point("", io="input"): 0,  # nothing runs
        Point("cell", call=-1): 3 * cell + head,  # negative and "all" need the whole forward
        Point("cell", call="all"): 3 * cell + head,
    }
    for point, teacher_flops in expected.items():
        fn = distill(t, s, Mapping(t, s).add(point, ""))
        calls = [flops(lambda fn=fn: fn(state(t), state(s), x)) - student for _ in range(2)]
        assert calls == [teacher_flops] * 2, point


def test_errors_say_how_many_calls_there_were(models):
    t, s = models
    x = torch.randn(5, 4)
    cases = [
        (
            Point("cell", call=3),
            "runs 3 times in one forward pass of the {role} Unrolled, so Point\\('cell', call=3\\) "
            "selects a call that never happens; valid calls are 0\\.\\.2 \\(or -3\\.\\.-1 from the end\\)",
        ),
        (Point("cell", call=-4), "so Point\\('cell', call=-4\\) selects a call that never happens"),
        (
            "cell",
            "module 'cell' runs 3 times in one forward pass of the {role} Unrolled, so its output is ambiguous\\. "
            "Select one call with funcdistill\\.Point\\('cell', call=k\\)",
        ),
        (Point("cell", io="input"), "runs 3 times .*, so its input is ambiguous"),
    ]
    for point, match in cases:
        # the eval teacher is checked by the dry run before it runs (unless the point needs the whole
        # forward: then it runs in full), the training student after its forward
        dry = "" if isinstance(point, Point) and point.whole_forward else ".*Seen by the shape-only dry run"
        with pytest.raises(RuntimeError, match=match.format(role="teacher") + dry):
            distill(t, s, Mapping(t, s).add(point, ""))(state(t), state(s), x)
        with pytest.raises(RuntimeError, match=match.format(role="student")):
            distill(t, s, Mapping(t, s).add("", point))(state(t), state(s), x)


def test_all_problems_of_a_model_in_one_message(models):
    t, s = models
    m = Mapping(t, s).add("", Point("cell", call=7)).add("", "cell")
    with pytest.raises(RuntimeError, match=r"(?s)call=7\) selects a call that never happens.*\n.*'cell' runs 3 times"):
        distill(t, s, m)(state(t), state(s), torch.randn(2, 4))


def test_an_argument_the_call_does_not_pass_is_an_error(models):
    t, s = models
    m = Mapping(t, s).add("", Point("head", io="input", arg=1))
    with pytest.raises(
        RuntimeError,
        match=r"Point\('head', io='input', arg=1\): the Scaled at 'head' was called with 1 positional "
        r"argument\(s\) and keyword\(s\) \['scale'\], without argument 1",
    ):
        distill(t, s, m)(state(t), state(s), torch.randn(2, 4))


def test_gradients_under_grad_equal_a_hand_written_reference(models):
    t, s = models
    x = torch.randn(5, 4)
    m = (
        Mapping(t, s)
        .add(Point("cell", call=1), Point("cell", call=-2))
        .add(Point("cell", call="all"), Point("cell", call="all"))
        .add(Point("head", io="input", arg="scale"), Point("head", io="input", arg="scale"))
    )
    fn = distill(t, s, m)

    def loss(params):
        pairs = fn(state(t), params, x)
        return sum(
            sum(
                (a - b).pow(2).sum()
                for a, b in zip(torch.utils._pytree.tree_leaves(p.teacher), torch.utils._pytree.tree_leaves(p.student))
            )
            for p in pairs
        )

    def reference(params):
        with torch.no_grad():
            rt = unrolled(t, x)
        module = _WithParams(s, params)
        rs = unrolled(module, x)
        total = (rt["cell_out"][1] - rs["cell_out"][1]).pow(2).sum()
        total = total + sum((a - b).pow(2).sum() for a, b in zip(rt["cell_out"], rs["cell_out"]))
        return total + (rt["scale"] - rs["scale"]).pow(2).sum()

    params = state(s, buffers=False)
    got = grad(loss)(params)
    want = grad(reference)(params)
    torch.testing.assert_close(got, want)
    assert float(got["cell.weight"].detach().abs().sum()) > 0
    assert float(got["head.lin.weight"].detach().abs().sum()) == 0  # only the head's input is mapped


class _WithParams:
    """``model`` with ``params`` in place of its own, for a hand-written reference (a functional_call view)."""

    def __init__(self, model, params):
        self.steps = model.steps
        self.cell = lambda h: functional_call(model.cell, _sub(params, "cell."), (h,))


def _sub(params, prefix):
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def test_vmap_and_jacrev(models):
    t, s = models
    m = Mapping(t, s).add(Point("cell", call=1), Point("cell", call=2)).add(Point("head", io="input"), "")
    fn = distill(t, s, m)
    xs = torch.randn(3, 2, 4)
    batched = vmap(lambda x: [(p.teacher, p.student) for p in fn(state(t), state(s), x)])(xs)
    for i, x in enumerate(xs):
        looped = fn(state(t), state(s), x)
        for (bt, bs), p in zip(batched, looped):
            torch.testing.assert_close(bt[i], p.teacher)
            torch.testing.assert_close(bs[i], p.student)
    x = xs[0]
    jac = jacrev(lambda x: fn(state(t), state(s), x)[0].student)(x)
    want = jacrev(lambda x: unrolled(s, x)["cell_out"][2])(x)
    torch.testing.assert_close(jac, want)


def test_teacher_dtype_casts_every_call(models):
    t, s = models
    x = torch.randn(5, 4)
    m = Mapping(t, s).add(Point("cell", call="all"), Point("cell", call="all"))
    (pair,) = distill(t, s, m, teacher_dtype=torch.float64)(state(t), state(s), x)
    with torch.no_grad():
        want = unrolled(t.double(), x.double())["cell_out"]
    t.float()
    assert [v.dtype for v in pair.teacher] == [torch.float32] * 3
    torch.testing.assert_close(pair.teacher, tuple(w.float() for w in want))


def test_through_the_compat_shim(models):
    compat = pytest.importorskip("funcdistill.compat")
    t, s = models
    x = torch.randn(5, 4)
    mapping = compat.Mapping(t, s)
    mapping.add(Point(t.cell, call=1), Point("cell", call=1))
    mapping.add(Point("head", io="input"), Point(s.head, io="input"))
    with compat.distill(teacher=t, student=s, mapping=mapping) as model:
        out = model(x)
    rt, rs = unrolled(t, x), unrolled(s, x)
    torch.testing.assert_close(out[0][0], rt["cell_out"][1].detach())
    torch.testing.assert_close(out[0][1], rs["cell_out"][1])
    torch.testing.assert_close(out[1][1], rs["head_in"])
    assert out[0][0].grad_fn is None and out[0][1].grad_fn is not None


def test_a_recipe_with_a_module_reused_at_two_depths():
    """A block reused before and after a head: each use mapped to a different student module."""
    torch.manual_seed(0)
    t, s = Unrolled(width=4, steps=2).eval(), Unrolled(width=4, steps=2)
    m = Mapping(t, s).add(Point("cell", call=0), Point("cell", call=0)).add(Point("cell", call=1), "head.lin")
    pairs = distill(t, s, m)(state(t), state(s), torch.randn(3, 4))
    assert [p.student.shape for p in pairs] == [torch.Size([3, 4]), torch.Size([3, 3])]


@pytest.mark.compile
def test_no_graph_break_with_per_call_and_input_points(models):
    t, s = models
    m = (
        Mapping(t, s)
        .add(Point("cell", call=1), Point("cell", call="all"))
        .add(Point("cell", io="input", call=2), Point("head", io="input", arg="scale"))
    )
    fn = distill(t, s, m)
    x = torch.randn(5, 4)

    def step(x):
        return fn(state(t), state(s), x)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # truncated in the graph too: the teacher's cell runs twice (the input of call 2 is read before it runs),
    # the student's three times and its head once
    (graph,) = explanation.graphs
    linears = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(linears) == 2 + 4
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), step(x))


def test_a_value_modified_in_place_later_is_refused_not_returned():
    torch.manual_seed(0)
    t = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2)).eval()
    s = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    match = (
        r"the {role}'s forward modified the value of {point} in place after it was read \(an in-place op such as "
        r"ReLU\(inplace=True\).*set inplace=False on the module before calling distill\)"
    )
    for point, shown in (("0", "'0'"), (Point("1", io="input"), r"Point\('1', io='input'\)")):
        with pytest.raises(RuntimeError, match=match.format(role="teacher", point=shown)):
            distill(t, s, Mapping(t, s).add(point, "2"), truncate=False)(state(t), state(s), x)
        # truncated, the teacher stops before the in-place op: the value is right
        (pair,) = distill(t, s, Mapping(t, s).add(point, "2"))(state(t), state(s), x)
        torch.testing.assert_close(pair.teacher, t[0](x).detach())
        fn = distill(t, s, Mapping(t, s).add("2", point))
        with pytest.raises(RuntimeError, match=match.format(role="student", point=shown)):
            grad(lambda p, fn=fn: fn(state(t), p, x)[0].student.sum())(state(s))
    (pair,) = distill(t, s, Mapping(t, s).add("1", "1"))(state(t), state(s), x)  # the in-place op's own output
    torch.testing.assert_close(pair.student, torch.relu(s[0](x)))


class _ByKeyword(torch.nn.Module):
    """Calls its ``sub`` with keyword arguments only, as transformers layers call their attention."""

    def __init__(self):
        super().__init__()
        self.sub = Scaled(4)

    def forward(self, x):
        return self.sub(h=torch.tanh(x), scale=x.mean(-1, keepdim=True))


def test_the_input_of_a_module_called_with_keywords_only_is_an_error_not_an_empty_tuple():
    torch.manual_seed(0)
    t, s = _ByKeyword().eval(), _ByKeyword()
    x = torch.randn(2, 4)
    match = (
        r"{role} Point\('sub', io='input'\): the Scaled at 'sub' was called with keyword arguments only "
        r"\('h', 'scale'\), and io='input' without arg reads the positional ones; read one keyword with "
        r"Point\('sub', io='input', arg='h'\) \(or another of them\)\."
    )
    for truncate in (True, False):
        fn = distill(t, s, Mapping(t, s).add(Point("sub", io="input"), "sub"), truncate=truncate)
        with pytest.raises(RuntimeError, match=match.format(role="teacher")):
            fn(state(t), state(s), x)
    fn = distill(t, s, Mapping(t, s).add("sub", Point("sub", io="input")))
    with pytest.raises(RuntimeError, match=match.format(role="student")):
        fn(state(t), state(s), x)
    # the fix the message gives reads the keyword
    fn = distill(t, s, Mapping(t, s).add(Point("sub", io="input", arg="h"), Point("sub", io="input", arg="h")))
    (pair,) = fn(state(t), state(s), x)
    torch.testing.assert_close(pair.student, torch.tanh(x))


# --- how a tap reads: a wrapped forward where the module has no hooks, a hook where it has ---


def test_a_tapped_module_without_hooks_keeps_the_hook_free_call_path():
    from torch import nn

    torch.manual_seed(0)
    t, s = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    fn = distill(t, s, Mapping(t, s).add("0", "0").add(Point("1", io="input"), Point("1", io="input")))
    x = torch.randn(3, 4)
    pairs = fn(state(t), state(s), x)
    shadow = fn._student._local.shadow.module
    # no hook on the shadow's tapped modules: their calls skip nn.Module's hook handling
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in shadow.modules())
    torch.testing.assert_close(pairs[0].student, s[0](x))
    torch.testing.assert_close(pairs[1].student, s[0](x))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in s.modules())  # nor on the live model


def test_a_module_with_its_own_hook_is_read_after_that_hook():
    from torch import nn

    torch.manual_seed(0)
    t, s = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    s[0].register_forward_hook(lambda m, args, out: out * 10.0)  # a user's hook that replaces the output
    s[0].register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    fn = distill(t, s, Mapping(t, s).add("0", "0").add(Point("0", io="input"), Point("0", io="input")))
    x = torch.randn(3, 4)
    pairs = fn(state(t), state(s), x)
    torch.testing.assert_close(pairs[0].student, s[0](x))  # what the module's caller gets: after the hooks
    torch.testing.assert_close(pairs[0].student, 10.0 * (x + 1.0) @ s[0].weight.T + 10.0 * s[0].bias)
    torch.testing.assert_close(pairs[1].student, x + 1.0)  # the input as the module's forward gets it
