import copy
import sys
import threading

import pytest
import torch
from torch import nn
from torch.func import grad, grad_and_value, jacrev, stack_module_state, vmap

import funcdistill as fd
from funcdistill import Mapping, distill, state
from funcdistill._distill import distill_inplace
from tests.models import Branchy, Labelled, Net, Shared, Tied, image, mlp


@pytest.fixture
def models():
    torch.manual_seed(0)
    return Net(width=4, depth=2), Net(width=4, depth=1)


def snapshot(model):
    return {k: v.detach().clone() for k, v in state(model).items()}


def assert_same_state(model, snap):
    now = state(model)
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k


def no_hooks_anywhere(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def reference_features(model, names, x):
    """Hand-written capture with forward hooks on a copy of the model."""
    model = copy.deepcopy(model)
    got = {}
    mods = dict(model.named_modules())
    for n in names:
        if n:
            mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o))
    got[""] = model(x)
    return got


def test_pairs_come_in_mapping_order_with_payloads(models):
    t, s = models
    m = (
        Mapping(t, s)
        .add("features.2", "features.1", payload="deep")
        .add("features.0", "features.0", payload="stem")
        .add("", "", payload=None)
    )
    x = image()
    pairs = distill(t, s, m, mutable=False)(state(t), state(s), x)
    assert [p.payload for p in pairs] == ["deep", "stem", None]
    ref_t, ref_s = (
        reference_features(t, ["features.2", "features.0"], x),
        reference_features(s, ["features.1", "features.0"], x),
    )
    torch.testing.assert_close(pairs[0].teacher, ref_t["features.2"])
    torch.testing.assert_close(pairs[0].student, ref_s["features.1"])
    torch.testing.assert_close(pairs[1].teacher, ref_t["features.0"])
    torch.testing.assert_close(pairs[2].student, ref_s[""])
    assert isinstance(pairs, tuple) and isinstance(pairs[0], fd.Pair)


def test_no_mapping_pairs_final_outputs(models):
    t, s = models
    x = image()
    (pair,) = distill(t, s, mutable=False)(state(t), state(s), x)
    torch.testing.assert_close(pair.teacher, t(x))
    torch.testing.assert_close(pair.student, s(x))
    assert pair.payload is None


def test_pytree_outputs_keep_their_structure():
    t, s = Branchy(), Branchy()
    m = Mapping(t, s).add("split", "split").add("", "")
    x = torch.randn(2, 4)
    split, whole = distill(t, s, m)(state(t), state(s), x)
    assert isinstance(split.teacher, tuple) and len(split.teacher) == 2
    torch.testing.assert_close(split.student[1], x - 1)
    assert set(whole.teacher) == {"a", "b"}
    torch.testing.assert_close(whole.student["b"], (x - 1) * 2)


def test_kwargs_reach_both_models():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, *, scale=1.0):
            return self.lin(x) * scale

    t, s = Scaled(), Scaled()
    x = torch.randn(3, 2)
    (p,) = distill(t, s)(state(t), state(s), x, scale=3.0)
    torch.testing.assert_close(p.teacher, t(x) * 3.0)


# --- gradients ----------------------------------------------------------------


def kd(pairs):
    return sum(((p.teacher - p.student) ** 2).mean() for p in pairs)


def test_teacher_gets_no_gradient_under_grad(models):
    t, s = models
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.1").add("", ""), mutable=False)
    x = image()
    params = state(t, buffers=False), state(s, buffers=False)
    gt, gs = grad(lambda ts, ss: kd(fn(ts, ss, x)), argnums=(0, 1))(*params)
    assert all(torch.count_nonzero(g) == 0 for g in gt.values())
    assert any(torch.count_nonzero(g) > 0 for g in gs.values())


def test_teacher_gets_no_gradient_under_backward(models):
    t, s = models
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.1").add("", ""), mutable=False)
    kd(fn(state(t), state(s), image())).backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in s.parameters())


def test_student_gradients_match_hand_written_reference(models):
    t, s = models
    x = image()
    fn = distill(t, s, Mapping(t, s).add("features.2", "features.1").add("", ""), mutable=False)
    got = grad(lambda ss: kd(fn(state(t), ss, x)))(state(s, buffers=False))

    ref_s = copy.deepcopy(s)
    with torch.no_grad():
        rt = reference_features(t, ["features.2"], x)
    feats = {}
    ref_s.features[1].register_forward_hook(lambda m, a, o: feats.__setitem__("f", o))
    out = ref_s(x)
    loss = ((rt["features.2"] - feats["f"]) ** 2).mean() + ((rt[""] - out) ** 2).mean()
    loss.backward()
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_teacher_saves_nothing_for_backward(models):
    t, s = models
    x = image()
    # mutable=True: the student's BatchNorm runs with (cloned) running statistics, as in a plain forward
    fn = distill(t, s, Mapping(t, s).add("", ""), mutable=True)
    target = torch.zeros(2, 3)
    with_teacher = saved_bytes(lambda: ((fn(state(t), state(s), x)[0][0].student - target) ** 2).mean())
    student_alone = saved_bytes(lambda: ((s(x) - target) ** 2).mean())
    assert with_teacher == student_alone > 0
    # mutable=False: its running statistics are swapped out (nothing to keep), and the saved
    # running statistics of torch's BatchNorm backward go with them
    dropped = distill(t, s, Mapping(t, s).add("", ""), mutable=False)
    assert 0 < saved_bytes(lambda: ((dropped(state(t), state(s), x)[0].student - target) ** 2).mean()) < student_alone
    grad_teacher = distill(t, s, Mapping(t, s).add("", ""), nograd_teacher=False, mutable=False)
    assert saved_bytes(lambda: ((grad_teacher(state(t), state(s), x)[0].student - target) ** 2).mean()) > student_alone


def test_nograd_teacher_false_lets_gradients_reach_the_teacher(models):
    t, s = models
    x = image()
    fn = distill(t, s, Mapping(t, s).add("", ""), nograd_teacher=False, mutable=False)
    gt = grad(lambda ts: fn(ts, state(s), x)[0].teacher.sum())(state(t, buffers=False))
    ref = copy.deepcopy(t)
    ref(x).sum().backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(gt[name], p.grad, msg=name)


# --- purity -------------------------------------------------------------------


def test_call_changes_no_module_tensor_flag_or_hook(models):
    t, s = models
    t.train(), s.train()
    t.features[1].eval()
    snaps = snapshot(t), snapshot(s)
    modes = [m.training for m in t.modules()], [m.training for m in s.modules()]
    x = image()
    x_copy = x.clone()
    ts, ss = state(t), state(s)
    ts_items, ss_items = list(ts.items()), list(ss.items())
    fn = distill(t, s, Mapping(t, s).add("features.1.bn", "features.1").add("", ""))
    with pytest.warns(fd.BufferUpdateWarning, match="^the teacher and the student have"):  # the default drops
        kd(fn(ts, ss, x)).backward()
    assert_same_state(t, snaps[0]) and None
    assert_same_state(s, snaps[1])
    assert ([m.training for m in t.modules()], [m.training for m in s.modules()]) == modes
    assert no_hooks_anywhere(t) and no_hooks_anywhere(s)
    assert torch.equal(x, x_copy)
    assert list(ts.items()) == ts_items and list(ss.items()) == ss_items


def test_mutable_returns_batchnorm_statistics(models):
    t, s = models
    t.train(), s.train()
    x = image(4)
    before = snapshot(s)
    _, buffers = distill(t, s, mutable=True)(state(t), state(s), x)
    assert isinstance(buffers, fd.Buffers)
    assert_same_state(s, before)
    ref = copy.deepcopy(s)
    ref(x)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(buffers.student[name], b, msg=name)
    assert buffers.student["features.1.bn.num_batches_tracked"].item() == 1
    assert set(buffers.teacher) == {n for n, _ in t.named_buffers()}


def test_buffers_thread_through_a_functional_loop(models):
    t, s = models
    s.train()
    fn = distill(t, s, mutable=True)
    ss = state(s)
    ref = copy.deepcopy(s)
    for _ in range(3):
        x = image(4)
        _, buffers = fn(state(t), ss, x)
        ss = {**ss, **buffers.student}
        ref(x)
    torch.testing.assert_close(ss["features.1.bn.running_var"], ref.features[1].bn.running_var)


def test_inplace_buffers_update_the_models_statistics_like_a_plain_forward(models):
    t, s = models
    t.eval(), s.train()
    ref = copy.deepcopy(s)
    teacher_before = snapshot(t)
    fn = distill_inplace(t, s, None)
    for _ in range(2):
        x = image(4)
        fn({}, state(s, buffers=False), x)
        ref(x)
    for name, b in ref.named_buffers():  # exact: the same forwards on the same batches, in this process
        assert torch.equal(dict(s.named_buffers())[name], b), name
    assert_same_state(t, teacher_before)  # eval-mode teacher: nothing to update


def test_mode_is_read_from_the_live_model_at_each_call(models):
    t, s = models
    fn = distill(t, s, mutable=False)
    x = image()
    t.train()
    t_train = fn(state(t), state(s), x)[0].teacher
    t.eval()
    t_eval = fn(state(t), state(s), x)[0].teacher
    torch.testing.assert_close(t_eval, t(x))
    assert not torch.allclose(t_train, t_eval)


def test_missing_state_entries_come_from_the_live_model(models):
    t, s = models
    t.eval()
    fn = distill(t, s, mutable=False)
    x = image()
    params_only = dict(t.named_parameters())
    torch.testing.assert_close(fn(params_only, {}, x)[0].teacher, t(x))
    t.double(), s.double()  # replaces buffer tensors after distill()
    out = fn({}, {}, x.double())[0]
    assert out.teacher.dtype == torch.float64
    torch.testing.assert_close(out.teacher, t(x.double()))


def test_tied_weights():
    t, s = Tied(), Tied()
    w = torch.eye(3) * 2
    (p,) = distill(t, s)(state(t), {"a.weight": w}, torch.ones(1, 3))
    torch.testing.assert_close(p.student, torch.full((1, 3), 4.0))


def test_threads_get_their_own_pairs(models):
    t, s = models
    t.eval(), s.eval()
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.0"))
    states = [{k: v + i for k, v in state(s).items()} for i in range(4)]
    xs = [image() for _ in range(4)]
    expected = [reference_features(_loaded(s, states[i]), ["features.0"], xs[i])["features.0"] for i in range(4)]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                (p,) = fn(state(t), states[i], xs[i])
                torch.testing.assert_close(p.student, expected[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def _loaded(model, st):
    m = copy.deepcopy(model)
    m.load_state_dict(st)
    return m


# --- transforms -----------------------------------------------------------------


def test_grad_and_value_vmap_over_stacked_students(models):
    t, _ = models
    torch.manual_seed(1)
    students = [Net(width=4, depth=1) for _ in range(3)]
    for st in students:
        st.eval()
    t.eval()
    params, buffers = stack_module_state(students)
    fn = distill(t, students[0], Mapping(t, students[0]).add("features.1", "features.1").add("", ""))
    x = image()

    def loss(ss):
        return kd(fn(state(t), ss, x))

    grads, values = vmap(grad_and_value(lambda p, b: loss({**p, **b})))(params, buffers)
    for i, st in enumerate(students):
        g, v = grad_and_value(lambda p, st=st: loss({**p, **dict(st.named_buffers())}))(state(st, buffers=False))
        torch.testing.assert_close(values[i], v)
        torch.testing.assert_close(grads["features.0.weight"][i], g["features.0.weight"])


def test_vmap_over_inputs(models):
    t, s = models
    t.eval(), s.eval()
    fn = distill(t, s, Mapping(t, s).add("features.1", "features.1"))
    xs = torch.randn(3, 2, 1, 6, 6)
    out = vmap(lambda x: fn(state(t), state(s), x)[0].student)(xs)
    for i in range(3):
        torch.testing.assert_close(out[i], fn(state(t), state(s), xs[i])[0].student)


def test_jacrev_of_student_features():
    t, s = mlp((3, 4, 2)), mlp((3, 5, 2))
    fn = distill(t, s, Mapping(t, s).add("1", "1"))
    x = torch.randn(1, 3)
    jac = jacrev(lambda w: fn(state(t), {**state(s), "0.weight": w}, x)[0].student)(s[0].weight)
    assert jac.shape == (1, 5, 5, 3)
    expected = torch.autograd.functional.jacobian(lambda w: torch.relu(x @ w.T + s[0].bias), s[0].weight)
    torch.testing.assert_close(jac, expected)


@pytest.mark.compile
def test_compiled_grad_step_has_no_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 8, 3)), mlp((4, 6, 3))
    fn = distill(t, s, Mapping(t, s).add("2", "0").add("", ""))
    ts = {k: v.detach() for k, v in state(t).items()}
    ss = {k: v.detach() for k, v in state(s).items()}
    x = torch.randn(5, 4)

    def step(ts, ss, x):
        def loss(ss):
            (mid, out) = fn(ts, ss, x)
            return ((mid.teacher[:, :6] - mid.student) ** 2).mean() + ((out.teacher - out.student) ** 2).mean()

        return grad_and_value(loss)(ss)

    explained = torch._dynamo.explain(step)(ts, ss, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    g_eager, v_eager = step(ts, ss, x)
    g_comp, v_comp = torch.compile(step, fullgraph=True)(ts, ss, x)
    torch.testing.assert_close(v_comp, v_eager)
    for k in g_eager:
        torch.testing.assert_close(g_comp[k], g_eager[k])


@pytest.mark.compile
def test_compiled_vmap_over_students_with_batchnorm_has_no_graph_breaks_and_matches_eager():
    """vmap(grad(...)) over stacked training-mode students, buffers threaded by mutable=True, in one graph."""
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    students = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(3)]
    fn = distill(t, students[0], Mapping(t, students[0]).add("", ""), mutable=True)
    ts = {k: v.detach() for k, v in state(t).items()}
    params, buffers = stack_module_state(students)
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(5, 4)

    def loss(p, b, x):
        (out,), new = fn(ts, {**p, **b}, x)
        return ((out.teacher - out.student) ** 2).mean(), new.student

    step = vmap(grad(loss, has_aux=True), in_dims=(0, 0, None))
    g_eager, b_eager = step(params, buffers, x)
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; the eager backend keeps the test to Dynamo's tracing
    g_comp, b_comp = torch.compile(step, fullgraph=True, backend="eager")(params, buffers, x)
    for k in g_eager:
        torch.testing.assert_close(g_comp[k], g_eager[k])
    assert b_eager.keys() == b_comp.keys() == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for k in b_eager:
        torch.testing.assert_close(b_comp[k], b_eager[k])
    # the running statistics moved, per student, as three separate forwards would move them
    for i, st in enumerate(students):
        st(x)
        torch.testing.assert_close(b_eager["1.running_mean"][i], st[1].running_mean)


# --- FX graph modules -------------------------------------------------------------


def test_graph_module_nodes_are_captured():
    torch.manual_seed(0)
    net = Net(width=4, depth=2).eval()
    t = torch.fx.symbolic_trace(net)
    s = Net(width=4, depth=2).eval()
    m = Mapping(t, s).add("features_1_conv", "features.1.conv").add("add", "features.1")
    x = image()
    conv, add = distill(t, s, m)(state(t), state(s), x)
    ref = reference_features(net, ["features.1.conv", "features.1"], x)
    torch.testing.assert_close(conv.teacher, ref["features.1.conv"])
    torch.testing.assert_close(add.teacher, ref["features.1"])
    assert no_hooks_anywhere(t) and "_funcdistill_tap_0" not in dict(t.named_modules())


# --- adapters ---------------------------------------------------------------------


class Hint(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.adapter = nn.Linear(cin, cout)

    def forward(self, teacher, student):
        return ((self.adapter(student) - teacher) ** 2).mean()


def test_adapter_parameters_are_student_state():
    t, s = mlp((3, 6, 2)), mlp((3, 4, 2))
    hint = Hint(4, 6)
    m = Mapping(t, s).add("0", "0", payload=hint)
    fn = distill(t, s, m)
    ss = state(s, m)
    assert {"payloads.0.adapter.weight", "payloads.0.adapter.bias"} <= set(ss)
    x = torch.randn(5, 3)

    def loss(ss):
        (p,) = fn(state(t), ss, x)
        return p.payload(p.teacher, p.student)

    g = grad(loss)(ss)
    assert torch.count_nonzero(g["payloads.0.adapter.weight"]) > 0
    ref = copy.deepcopy(hint)
    with torch.no_grad():
        tf = t[0](x)
    ref(tf, s[0](x)).backward()
    torch.testing.assert_close(g["payloads.0.adapter.weight"], ref.adapter.weight.grad)
    zero = {**ss, "payloads.0.adapter.weight": torch.zeros(6, 4), "payloads.0.adapter.bias": torch.zeros(6)}
    (p,) = fn(state(t), zero, x)
    torch.testing.assert_close(p.payload(p.teacher, p.student), (p.teacher**2).mean())
    assert isinstance(p.payload, fd.BoundPayload) and p.payload.module is hint


def test_adapter_trains_with_backward_without_payload_state():
    t, s = mlp((3, 6, 2)), mlp((3, 4, 2))
    hint = Hint(4, 6)
    fn = distill(t, s, Mapping(t, s).add("0", "0", payload=hint))
    (p,) = fn(state(t), state(s), torch.randn(5, 3))
    p.payload(p.teacher, p.student).backward()
    assert hint.adapter.weight.grad is not None and s[0].weight.grad is not None


def test_student_state_named_payloads_clashes():
    t = mlp((3, 6, 2))
    s = nn.Sequential()
    s.add_module("payloads", nn.ModuleList([Hint(6, 6)]))
    with pytest.raises(ValueError, match=r"the student has state named 'payloads.0.adapter.bias'"):
        distill(t, s, Mapping(t, s).add("0", "payloads.0.adapter", payload=Hint(6, 6)))


# --- errors -----------------------------------------------------------------------


def test_unknown_name_at_distill_time(models):
    t, s = models
    with pytest.raises(ValueError, match=r"student Net has no module or node named 'features\.9'\. Did you mean"):
        distill(t, s, Mapping().add("head", "features.9"))


def test_names_from_the_other_model_say_swapped():
    t, s = Net(width=4, depth=3), Net(width=4, depth=1)
    with pytest.raises(ValueError, match=r"'features.3' is a module of the teacher: teacher and student look swapped"):
        distill(t, s, Mapping().add("features.3", "features.3"))


def test_mapping_for_other_models(models):
    t, s = models
    other = Net()
    with pytest.raises(
        ValueError,
        match=r"the mapping was built for another student \(Net at 0x[0-9a-f]+\) than the one passed to distill",
    ):
        distill(t, other, Mapping(t, s).add("", ""))
    with pytest.raises(ValueError, match="got the other way round: teacher and student look swapped"):
        distill(s, t, Mapping(t, s).add("", ""))


def test_bad_arguments(models):
    t, s = models
    with pytest.raises(TypeError, match=r"distill\(student=...\) must be an nn.Module, got function"):
        distill(t, lambda x: x)
    with pytest.raises(ValueError, match="the same model was passed as teacher and student"):
        distill(t, t)
    with pytest.raises(TypeError, match=r"mapping must be a funcdistill.Mapping, got list"):
        distill(t, s, [("", "")])
    with pytest.raises(ValueError, match="the mapping is empty"):
        distill(t, s, Mapping())
    with pytest.raises(TypeError, match=r"mutable must be True, False or None, got 'yes'"):
        distill(t, s, mutable="yes")


def test_module_that_never_ran():
    t, s = Branchy(), Branchy()
    fn = distill(t, s, Mapping(t, s).add("split", "unused"))
    with pytest.raises(
        RuntimeError, match=r"student module\(s\) 'unused' never ran during the forward pass of the student Branchy"
    ):
        fn(state(t), state(s), torch.randn(2, 4))


def test_module_that_ran_twice():
    t, s = Shared(), Shared()
    fn = distill(t, s, Mapping(t, s).add("lin", "out"))
    with pytest.raises(
        RuntimeError,
        match=r"teacher module 'lin' runs 2 times in one forward pass of the teacher Shared, so its output is "
        r"ambiguous\. Select one call with funcdistill\.Point\('lin', call=k\)",
    ):
        fn(state(t), state(s), torch.randn(2, 4))


def test_output_that_is_not_tensors():
    t, s = Labelled(), Labelled()
    fn = distill(t, s, Mapping(t, s).add("tag", "lin"))
    with pytest.raises(TypeError, match="the output of teacher module 'tag' contains a str, not only tensors"):
        fn(state(t), state(s), torch.randn(2, 4))


def test_none_entries_in_outputs_are_allowed():
    class MaybeCache(nn.Module):
        def forward(self, x):
            return x * 2, None

    t, s = nn.Sequential(MaybeCache()), nn.Sequential(MaybeCache())
    (p,) = distill(t, s, Mapping(t, s).add("0", "0"))({}, {}, torch.ones(2))
    assert p.teacher[1] is None and torch.equal(p.student[0], torch.full((2,), 2.0))


def test_bad_states(models):
    t, s = models
    fn = distill(t, s)
    with pytest.raises(
        TypeError, match=r"teacher_state must be a dict of name -> tensor \(funcdistill.state\(teacher\)\), got list"
    ):
        fn([], state(s), image())
    wide = Net(width=4, depth=3)
    fn = distill(wide, s)
    with pytest.raises(
        ValueError,
        match=r"student_state has 12 key\(s\) that are not parameters or buffers of the student Net: 'features.2.bn.bias'.*teacher_state and student_state look swapped",
    ):
        fn(state(s), state(wide), image())


def test_distill_fn_calling_itself_is_rejected():
    s = mlp((2, 2))
    holder = {}

    class Recurse(nn.Module):
        def forward(self, x):
            return holder["fn"]({}, {}, x)[0].teacher

    outer_t = nn.Sequential(Recurse())
    holder["fn"] = distill(outer_t, s)
    with pytest.raises(RuntimeError, match="the teacher is already running in a distill call on this thread"):
        holder["fn"]({}, {}, torch.randn(1, 2))


def test_distill_fn_is_immutable_and_has_a_repr(models):
    fn = distill(*models)
    with pytest.raises(AttributeError, match="a distill function is immutable"):
        fn.mapping = None
    assert repr(fn) == "<distill fn: teacher=Net, student=Net, 1 pairs, nograd_teacher=True>"


def test_student_state_dict_in_a_backward_loop_points_to_state(models):
    t, s = models
    t.eval()
    fn = distill(t, s, Mapping(t, s).add("head", "head"), mutable=False)  # a training student: drop statistics
    x = image()
    with pytest.raises(
        ValueError,
        match=r"student_state holds detached views of the student's parameters \('features.0.weight' and \d+ more\), "
        r"as student.state_dict\(\) gives them, .*loss.backward\(\) would fail with 'element 0 of tensors does not "
        r"require grad'.*Pass funcdistill.state\(student\), the live parameters, in a loss.backward\(\) loop",
    ):
        fn(state(t), s.state_dict(), x)
    (p,) = fn(state(t), state(s), x)  # the fix it gives: the step works
    torch.nn.functional.mse_loss(p.student, p.teacher).backward()
    assert s.head.weight.grad is not None
    # not refused: without grad mode, inside torch.func, detached copies, the teacher's state_dict(), a frozen student
    with torch.no_grad():
        fn(state(t), s.state_dict(), x)
    grad(lambda ss: fn(t.state_dict(), ss, x)[0].student.sum())(
        {k: v.detach() for k, v in state(s, buffers=False).items()}
    )
    copies = {k: v.detach().clone() for k, v in state(s).items()}
    fn(t.state_dict(), copies, x)  # an EMA-style copy, evaluated
    fn(t.state_dict(), copies, x)  # and again (the same dict, recognised without the full check)
    one_view = {**copies, "head.bias": s.head.bias.detach()}  # one detached view among copies: still refused
    with pytest.raises(
        ValueError, match=r"student_state holds detached views of the student's parameters \('head.bias'\),"
    ):
        fn(state(t), one_view, x)
    s.eval()  # BatchNorm in training mode cannot run under vmap
    vmap(lambda xb: fn(t.state_dict(), s.state_dict(), xb)[0].student)(x.unsqueeze(1))
    s.requires_grad_(False)
    fn(t.state_dict(), s.state_dict(), x)


def test_a_forward_that_fails_on_the_inputs_names_the_model_and_the_shapes():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 3)).eval(), mlp((5, 6, 3))  # the student takes 5 features, the teacher 4
    fn = distill(t, s)
    message = (
        r"the {role} Sequential failed on its inputs \(input 0: shape \({shape}\), torch.float32\): RuntimeError: "
        r"mat1 and mat2 shapes cannot be multiplied .*check that the {role} takes inputs of these shapes"
    )
    with pytest.raises(RuntimeError, match=message.format(role="teacher", shape="2, 5")) as info:
        fn({}, {}, torch.randn(2, 5))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, chained
    with pytest.raises(RuntimeError, match=message.format(role="student", shape="2, 4")):
        fn({}, {}, torch.randn(2, 4))

    class Custom(Exception):
        pass

    class Raises(nn.Module):
        def __init__(self, error):
            super().__init__()
            self.lin, self.error = nn.Linear(4, 3), error

        def forward(self, x):
            raise self.error

    custom = Custom("odd input")  # a type of its own keeps its type, with the same text as a note
    with pytest.raises(Custom) as info:
        distill(t, Raises(custom))({}, {}, torch.randn(2, 4))
    assert info.value is custom
    if sys.version_info >= (3, 11):  # notes (PEP 678) are new in 3.11
        assert "funcdistill: the student Raises failed on its inputs (input 0: shape (2, 4)" in custom.__notes__[0]
    interrupt = KeyboardInterrupt()  # a BaseException goes through untouched
    with pytest.raises(KeyboardInterrupt) as info:
        distill(t, Raises(interrupt))({}, {}, torch.randn(2, 4))
    assert info.value is interrupt and not getattr(interrupt, "__notes__", None)


def test_the_dtype_advice_for_a_failed_forward_makes_both_models_run():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 3)).eval(), mlp((4, 6, 3))
    x = torch.randn(2, 4, dtype=torch.float64)  # float64 inputs, float32 models
    with pytest.raises(
        TypeError,
        match=r"the teacher Sequential failed on inputs of dtype torch.float64 while its state is torch.float32 "
        r"\(RuntimeError: .*\); convert the inputs to the student's dtype, x.to\(torch.float32\)\.$",
    ):
        distill(t, s)({}, {}, x)
    distill(t, s)({}, {}, x.to(torch.float32))  # the advice works
    t64 = copy.deepcopy(t).double()  # a float64 teacher runs on them; the student fails
    with pytest.raises(
        TypeError,
        match=r"the student Sequential failed on inputs of dtype torch.float64 while its state is torch.float32 "
        r".*convert the inputs to the student's dtype, x.to\(torch.float32\), and pass "
        r"distill\(\.\.\., teacher_dtype=torch.float32\) so that the teacher runs in it too; or convert the "
        r"student \(student.to\(torch.float64\)\)",
    ):
        distill(t64, s)({}, {}, x)
    distill(t64, s, teacher_dtype=torch.float32)({}, {}, x.to(torch.float32))  # the advice works
    distill(t64, copy.deepcopy(s).double())({}, {}, x)  # and so does the other


# --- inputs, adapters and BatchNorm: no silent traps -------------------------------


def test_one_shot_iterator_inputs_are_refused(models):
    t, s = models
    fn = distill(t, s)
    with pytest.raises(
        TypeError,
        match=r"positional input 0 is a one-shot generator: the teacher would use it up and the student would get an empty one\. Pass a list or tuple instead",
    ):
        fn(state(t), state(s), (x for x in [image()]))
    with pytest.raises(TypeError, match=r"keyword input 'x' is a one-shot list_iterator"):
        fn(state(t), state(s), x=iter([image()]))


def test_an_adapter_left_out_of_a_differentiated_student_state_is_an_error():
    t, s = mlp((3, 6, 2)), mlp((3, 4, 2))
    hint = Hint(4, 6)
    m = Mapping(t, s).add("0", "0", payload=hint)
    fn = distill(t, s, m)
    x = torch.randn(5, 3)

    def loss(ss):
        (p,) = fn(state(t), ss, x)
        return p.payload(p.teacher, p.student)

    with pytest.raises(
        ValueError,
        match=r"student_state is being differentiated \(torch.func.grad\) but has no entries for the adapter payload\(s\) of pair\(s\) \[0\] \(Hint\).*Pass funcdistill.state\(student, mapping\)",
    ):
        grad(loss)(state(s, buffers=False))
    assert set(grad(loss)(state(s, m, buffers=False))) >= {"payloads.0.adapter.weight"}


def test_dropped_batchnorm_updates_warn_until_mutable_is_chosen(models):
    t, s = models
    t.eval(), s.train()
    x = image()
    with pytest.warns(
        fd.BufferUpdateWarning,
        match=r"the student has modules in training mode that update buffers .*distill\(\.\.\., mutable=True\).*student.load_state_dict\(buffers.student, strict=False\)",
    ):
        distill(t, s)(state(t), state(s), x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distill(t, s, mutable=False)(state(t), state(s), x)  # chosen: no warning
        distill(t, s, mutable=True)(state(t), state(s), x)
        s.eval()
        distill(t, s)(state(t), state(s), x)  # nothing to drop


# what each case's message must say, and what it must not (advice for the other model)
_TEACHER_ADVICE = r"put the teacher in eval mode \(teacher\.eval\(\)\)"
_STUDENT_ADVICE = r"To keep the student's updates, build the function with distill\(\.\.\., mutable=True\)"


@pytest.mark.parametrize(
    "teacher_trains, student_trains, says, not_says",
    [
        (
            True,
            False,
            r"^the teacher has modules in training mode that update buffers \(such as BatchNorm running "
            r"statistics\): 'features\.1\.bn' \(BatchNorm2d\), 'features\.2\.bn' \(BatchNorm2d\)\. .*"
            r"the teacher keeps its old statistics\. .*" + _TEACHER_ADVICE + r".*mutable=False",
            "student's updates",
        ),
        (
            False,
            True,
            r"^the student has modules in training mode that update buffers \(such as BatchNorm running "
            r"statistics\): 'features\.1\.bn' \(BatchNorm2d\)\. .*the student keeps its old statistics\. "
            + _STUDENT_ADVICE
            + r".*mutable=False",
            "teacher.eval()",
        ),
        (
            True,
            True,
            r"^the teacher and the student have modules in training mode .*: teacher 'features\.1\.bn' "
            r"\(BatchNorm2d\), 'features\.2\.bn' \(BatchNorm2d\); student 'features\.1\.bn' \(BatchNorm2d\)\. "
            r".*both keep their old statistics\. .*" + _TEACHER_ADVICE + ".*" + _STUDENT_ADVICE + r".*mutable=False",
            None,
        ),
    ],
    ids=["teacher", "student", "both"],
)
def test_dropped_updates_warning_names_the_models_in_training_mode(
    models, teacher_trains, student_trains, says, not_says
):
    t, s = models
    t.train(teacher_trains), s.train(student_trains)
    with pytest.warns(fd.BufferUpdateWarning, match=says) as caught:
        distill(t, s)(state(t), state(s), image())
    (warning,) = caught
    assert warning.filename == __file__  # points at the caller's line
    assert not_says is None or not_says not in str(warning.message)  # no advice for the other model


def test_dropped_updates_warning_counts_the_modules_it_does_not_name():
    s = nn.Sequential(*[nn.BatchNorm1d(2) for _ in range(5)])
    t = nn.Sequential(nn.Linear(2, 2)).eval()
    with pytest.warns(fd.BufferUpdateWarning, match=r": '0' \(BatchNorm1d\), '1' \(BatchNorm1d\) and 3 more\. "):
        distill(t, s)(state(t), state(s), torch.randn(4, 2))


def test_the_readme_backward_loop_keeps_batchnorm_statistics(models):
    t, s = models
    t.eval(), s.train()
    ref = copy.deepcopy(s)
    fn = distill(t, s, mutable=True)
    opt, ref_opt = torch.optim.SGD(s.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        x = image(4)
        pairs, buffers = fn(state(t), state(s), x)
        loss = sum((p.teacher - p.student).pow(2).mean() for p in pairs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        s.load_state_dict(buffers.student, strict=False)
        with torch.no_grad():
            target = t(x)
        ((target - ref(x)).pow(2).mean()).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert s.features[1].bn.num_batches_tracked.item() == 3
    for (name, a), b in zip(s.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


# --- copies -----------------------------------------------------------------------


def test_distill_functions_pickle_deepcopy_and_torch_save():
    import io
    import pickle

    torch.manual_seed(0)
    t, s = mlp((3, 6, 2)).eval(), mlp((3, 4, 2))
    m = Mapping(t, s).add("0", "0", payload=Hint(4, 6)).add("", "")
    fn = distill(t, s, m, mutable=False, teacher_dtype=torch.float64)
    x = torch.randn(5, 3)
    expected = fn(state(t), state(s, m), x)
    buffer = io.BytesIO()
    torch.save(fn, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(fn)), copy.deepcopy(fn), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert isinstance(other, fd.DistillFn) and other._teacher.model is not t
        assert (other.mutable, other.teacher_dtype) == (False, torch.float64)
        ct, cs = other._teacher.model, other._student.model
        got = other(state(ct), state(cs, other.mapping), x)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.teacher, b.teacher)
            torch.testing.assert_close(a.student, b.student)
        torch.testing.assert_close(
            got[0].payload(got[0].teacher, got[0].student),
            expected[0].payload(expected[0].teacher, expected[0].student),
        )
