"""funcdistill.state, and the checks a distill call makes of each state entry."""

import pytest
import torch
from torch import nn

from funcdistill import Mapping, distill, state
from tests.models import Net, Tied, image, mlp


def reference_state(model, buffers=True):
    out = dict(model.named_parameters())
    if buffers:
        out.update(model.named_buffers())
    return out


def same(a, b):
    return list(a) == list(b) and all(a[k] is b[k] for k in a)


def test_state_equals_named_parameters_and_buffers_after_every_kind_of_change():
    model = Net(width=4, depth=2)
    assert same(state(model), reference_state(model))
    assert same(state(model, buffers=False), reference_state(model, buffers=False))
    model.head.weight = nn.Parameter(torch.zeros(3, 4))  # a replaced tensor
    assert same(state(model), reference_state(model))
    model.features[1].bn = nn.BatchNorm2d(4)  # a replaced submodule
    assert same(state(model), reference_state(model))
    model.head.register_buffer("extra", torch.ones(1))  # a new name
    assert same(state(model), reference_state(model))
    del model.head.extra
    model.head.register_buffer("other", torch.ones(1))  # same count, other name
    assert same(state(model), reference_state(model))
    model.head.bias = None  # a None entry
    assert same(state(model), reference_state(model))
    model.head.bias = nn.Parameter(torch.zeros(3))  # and back
    assert same(state(model), reference_state(model))
    model.features[2].conv.weight = model.features[1].conv.weight  # tied after the fact
    assert same(state(model), reference_state(model))
    shared = nn.Linear(2, 2)
    both = nn.Sequential(shared, shared)  # a shared submodule
    assert same(state(both), reference_state(both))


def test_state_of_a_transformers_model_equals_named_parameters():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForMaskedLM(config)  # tied decoder/embedding weights
    assert same(state(model), reference_state(model))


@pytest.fixture
def models():
    torch.manual_seed(0)
    return Net(width=8, depth=2).eval(), Net(width=4, depth=1).eval()


def test_a_broadcastable_entry_of_another_shape_is_refused(models):
    t, s = models
    fn = distill(t, s)
    bad = {**state(s), "head.bias": torch.zeros(1)}
    with pytest.raises(
        ValueError,
        match=r"student_state does not fit the student Net: 'head.bias' has shape \(1,\), the model's has \(3,\).*Pass funcdistill.state\(student\)",
    ):
        fn(state(t), bad, image())


def test_every_bad_entry_is_named_in_one_message(models):
    t, s = models
    fn = distill(t, s)
    bad = {
        **state(s),
        "head.weight": torch.zeros(4, 3),
        "head.bias": torch.zeros(3, dtype=torch.float64),
        "features.0.bias": torch.zeros(4, device="meta"),
    }
    with pytest.raises(ValueError) as info:
        fn(state(t), bad, image())
    msg = str(info.value)
    assert "'head.weight' has shape (4, 3), the model's has (3, 4)" in msg
    assert "'head.bias' has dtype torch.float64, the model's has torch.float32" in msg
    assert "'features.0.bias' is on meta, the model's is on cpu" in msg


def test_the_other_models_state_is_recognised(models):
    t, s = Net(width=8, depth=1), Net(width=4, depth=1)  # same names, other widths
    fn = distill(t, s)
    with pytest.raises(
        ValueError,
        match=r"student_state does not fit the student Net: .*This looks like the teacher's state \(every entry has a name, shape, dtype and device of the teacher's\): teacher_state and student_state look swapped\. Pass funcdistill.state\(student\)",
    ):
        fn(state(t), state(t), image())
    with pytest.raises(
        ValueError, match=r"teacher_state does not fit the teacher Net: .*This looks like the student's state"
    ):
        fn(state(s), state(s), image())
    t, s = models  # the teacher is deeper: its extra names are reported, with the same hint
    with pytest.raises(
        ValueError,
        match=r"student_state has 6 key\(s\) that are not parameters or buffers of the student Net: .*This looks like the teacher's state",
    ):
        distill(t, s)(state(t), state(t), image())


def test_the_swap_hint_only_when_the_state_fits_the_other_model_and_not_this_one():
    torch.manual_seed(0)
    t, s = Net(width=4, depth=1).eval(), Net(width=4, depth=1)  # one architecture: same names and shapes
    fn = distill(t, s)
    on_meta = {k: v.to("meta") for k, v in state(s).items()}  # fits neither model: both are on cpu
    with pytest.raises(ValueError, match=r"'features.0.weight' is on meta, the model's is on cpu") as info:
        fn(state(t), on_meta, image())
    assert "swapped" not in str(info.value)
    t.double()  # now the teacher's state fits the teacher only, by dtype
    fn = distill(t, s, teacher_dtype=torch.float32)
    with pytest.raises(
        ValueError,
        match=r"student_state does not fit the student Net: 'features.0.weight' has dtype torch.float64, .*"
        r"This looks like the teacher's state .*: teacher_state and student_state look swapped",
    ):
        fn(state(t), state(t), image())
    a, b = Tied(), Tied()  # fits both models; the problem is the tie, not the model
    with pytest.raises(ValueError, match=r"'b.weight' is tied to 'a.weight'") as info:
        distill(a, b)(state(a), {"a.weight": torch.eye(3), "b.weight": torch.eye(3) * 2}, torch.ones(1, 3))
    assert "swapped" not in str(info.value)


def test_non_string_keys_and_non_tensor_values(models):
    t, s = models
    fn = distill(t, s)
    with pytest.raises(
        TypeError,
        match=r"student_state has 1 key\(s\) that are not strings: 0 \(int\)\. Keys are qualified names such as 'features.0.weight'",
    ):
        fn(state(t), {**state(s), 0: torch.zeros(1)}, image())
    with pytest.raises(ValueError, match=r"'head.bias' is a list, not a tensor"):
        fn(state(t), {**state(s), "head.bias": [0.0, 0.0, 0.0]}, image())


def test_a_meta_model_entry_left_out_is_an_error():
    torch.manual_seed(0)
    t = mlp((4, 8, 3)).eval()
    with torch.device("meta"):
        s = mlp((4, 8, 3))
    fn = distill(t, s)
    real = {k: torch.randn(v.shape) for k, v in state(s).items()}
    (p,) = fn(state(t), real, torch.randn(2, 4))  # a meta skeleton with real state works
    assert p.student.device.type == "cpu"
    with pytest.raises(
        ValueError,
        match=r"student entry '2.bias' is on the meta device .* pass real tensors for the model's meta entries",
    ):
        fn(state(t), {k: v for k, v in real.items() if k != "2.bias"}, torch.randn(2, 4))


def test_a_teacher_of_another_dtype_points_to_teacher_dtype():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 3)).double().eval(), mlp((4, 8, 3))
    fn = distill(t, s)
    with pytest.raises(
        TypeError,
        match=r"the teacher Sequential failed on inputs of dtype torch.float32 while its state is torch.float64 .*pass distill\(\.\.\., teacher_dtype=torch.float32\)",
    ):
        fn(state(t), state(s), torch.randn(2, 4))
    (p,) = distill(t, s, teacher_dtype=torch.float32)(state(t), state(s), torch.randn(2, 4))
    assert p.teacher.dtype == torch.float32


def test_tied_names_given_different_tensors_are_refused():
    t, s = Tied(), Tied()
    fn = distill(t, s)
    with pytest.raises(
        ValueError, match=r"'b.weight' is tied to 'a.weight' in the model, but the state gives them different tensors"
    ):
        fn(state(t), {"a.weight": torch.eye(3), "b.weight": torch.eye(3) * 2}, torch.ones(1, 3))


def test_an_unknown_key_suggests_the_closest_name(models):
    t, s = models
    fn = distill(t, s)
    with pytest.raises(
        ValueError,
        match=r"student_state has 1 key\(s\) that are not parameters or buffers of the student Net: 'head.weigth'\. Did you mean 'head.weight'\?",
    ):
        fn(state(t), {"head.weigth": torch.zeros(3, 4)}, image())


def test_the_fast_path_passes_the_models_own_tensors_without_copies(models):
    t, s = models
    fn = distill(t, s, Mapping(t, s).add("head", "head"))
    x = image()
    (p,) = fn(state(t), state(s), x)
    torch.testing.assert_close(p.student, s(x))


# --- the fast paths: a state made once, or copies in state() order, is still read at every call ---


def fast_pair():
    torch.manual_seed(0)
    t, s = mlp((4, 8, 3)), mlp((4, 6, 3))
    return t, s, distill(t, s, Mapping(t, s).add("0", "0").add("", "")), torch.randn(5, 4)


def copies(model):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in state(model).items()}


def expected(t, s, ts, ss, x):
    """What a call must return: plain functional_call on the same states."""
    with torch.no_grad():
        t_out = torch.func.functional_call(t, ts, (x,))
    return t_out, torch.func.functional_call(s, ss, (x,))


@pytest.mark.parametrize("kind", ["own", "copies"])
def test_a_state_made_once_sees_in_place_updates_and_mutations_of_the_dict(kind):
    t, s, fn, x = fast_pair()
    ts, ss = (state(t), state(s)) if kind == "own" else (copies(t), copies(s))
    fn(ts, ss, x)  # a first call: whatever a call keeps, it has seen these dicts
    with torch.no_grad():
        ss["2.weight"].mul_(-3.0)  # in place: same tensor, same version-independent identity
        ts["0.bias"].add_(1.0)
    t_exp, s_exp = expected(t, s, ts, ss, x)
    _, out = fn(ts, ss, x)
    torch.testing.assert_close(out.teacher, t_exp)
    torch.testing.assert_close(out.student, s_exp)
    ss["0.weight"] = torch.randn(6, 4)  # the dict itself changes: a new tensor under the same name
    ts["2.bias"] = torch.randn(3)
    t_exp, s_exp = expected(t, s, ts, ss, x)
    _, out = fn(ts, ss, x)
    torch.testing.assert_close(out.teacher, t_exp)
    torch.testing.assert_close(out.student, s_exp)


@pytest.mark.parametrize("kind", ["own", "copies"])
def test_a_state_made_once_is_checked_again_after_a_change_of_shape_dtype_or_device(kind):
    t, s, fn, x = fast_pair()
    ss = state(s) if kind == "own" else copies(s)
    fn(state(t), ss, x)
    ss["2.weight"] = torch.zeros(3, 7)  # a new tensor of another shape, same name and order
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(3, 7\), the model's has \(3, 6\)"):
        fn(state(t), ss, x)
    ss = copies(s)
    fn(state(t), ss, x)
    ss["0.bias"].data = torch.zeros(6, dtype=torch.float64)  # .data= keeps the tensor and its version
    with pytest.raises(ValueError, match=r"'0\.bias' has dtype torch\.float64, the model's has torch\.float32"):
        fn(state(t), ss, x)
    ss = copies(s)
    fn(state(t), ss, x)
    ss["0.bias"].data = torch.zeros(2, 3)  # same dtype, another shape
    with pytest.raises(ValueError, match=r"'0\.bias' has shape \(2, 3\), the model's has \(6,\)"):
        fn(state(t), ss, x)
    ss = copies(s)
    fn(state(t), ss, x)
    ss["0.bias"] = torch.zeros(6, device="meta")
    with pytest.raises(ValueError, match=r"'0\.bias' is on meta, the model's is on cpu"):
        fn(state(t), ss, x)


def test_copies_are_checked_against_the_live_model_after_it_changes():
    t, s, fn, x = fast_pair()
    ss = copies(s)
    fn(state(t), ss, x)
    s[2].weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))  # the live model changes dtype
    with pytest.raises(ValueError, match=r"'2\.weight' has dtype torch\.float32, the model's has torch\.float64"):
        fn(state(t), ss, x)


def test_copies_in_another_order_or_partly_swapped_run_each_tensor_under_its_name():
    t, s, fn, x = fast_pair()
    ss = copies(s)
    with torch.no_grad():
        for v in ss.values():
            v.mul_(0.5)
    reordered = dict(reversed(list(ss.items())))
    partly = {**state(s), "2.weight": ss["2.weight"]}  # state() order, one entry swapped
    for given in (ss, reordered, partly):
        _, out = fn(state(t), given, x)
        torch.testing.assert_close(out.student, torch.func.functional_call(s, given, (x,)))
    _, out = fn(state(t), state(s), x)  # and the model's own tensors again afterwards
    torch.testing.assert_close(out.student, s(x))


def test_a_call_on_copies_puts_the_shadows_own_tensors_back():
    t, s, fn, x = fast_pair()
    fn(copies(t), copies(s), x)
    with torch.no_grad():
        s[0].weight.mul_(2.0)  # the live model's own tensors, changed in place after the swap call
    _, out = fn(state(t), state(s), x)
    torch.testing.assert_close(out.student, s(x))
    _, out = fn({}, {}, x)
    torch.testing.assert_close(out.student, s(x))


def test_a_mode_change_is_seen_by_the_next_call():
    torch.manual_seed(0)
    t = mlp((4, 8, 3)).eval()
    s = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).eval()
    fn = distill(t, s, mutable=False)
    x = torch.randn(64, 4)
    ts, ss = state(t), state(s)
    (p,) = fn(ts, ss, x)
    torch.testing.assert_close(p.student, s(x))
    s[1].train()  # one submodule only
    torch.manual_seed(1)
    (p,) = fn(ts, ss, x)
    torch.manual_seed(1)
    torch.testing.assert_close(p.student, s(x))
    assert not torch.equal(p.student, s.eval()(x))


# --- memos: the same dict passed again is recognised exactly, never by a stale check ---


def test_copies_are_checked_again_after_the_live_model_changes_dtype_in_place():
    t, s, fn, x = fast_pair()
    ss = copies(s)
    fn(state(t), ss, x)
    fn(state(t), ss, x)  # the second call recognises the dict it checked
    s.double()  # .data= on every live tensor: the same objects, another dtype
    with pytest.raises(ValueError, match=r"'0\.weight' has dtype torch\.float32, the model's has torch\.float64"):
        fn(state(t), ss, x)


def test_a_memo_keeps_no_state_alive():
    import gc
    import weakref

    t, s, fn, x = fast_pair()
    ss = copies(s)
    fn(state(t), ss, x)
    fn(state(t), ss, x)
    alive = weakref.ref(ss["0.weight"])
    del ss
    gc.collect()
    assert alive() is None


def test_copies_whose_requires_grad_changes_give_the_gradients_asked_for():
    t, s, fn, x = fast_pair()
    ss = copies(s)
    fn(state(t), ss, x)
    ss["2.weight"].requires_grad_(False)  # same tensor, same dict: what the guards saw has changed
    _, out = fn(state(t), ss, x)
    out.student.sum().backward()
    assert ss["2.weight"].grad is None and ss["0.weight"].grad is not None


def test_an_ordered_dict_state_is_read_in_its_current_order():
    from collections import OrderedDict

    t, s, fn, x = fast_pair()
    ss = OrderedDict(copies(s))
    with torch.no_grad():
        ss["2.weight"].mul_(0.5)
    fn(state(t), ss, x)
    ss.move_to_end("0.weight")  # reordered without a new version of the dict: no memo may be trusted
    _, out = fn(state(t), ss, x)
    torch.testing.assert_close(out.student, torch.func.functional_call(s, dict(ss), (x,)))


# --- a training-mode BatchNorm in a call that keeps no buffer update ---


def bn_pair(norm=nn.BatchNorm1d):
    torch.manual_seed(0)
    t = mlp((4, 8, 3)).eval()
    s = nn.Sequential(nn.Linear(4, 6), norm(6), nn.ReLU(), nn.Linear(6, 3)).train()
    return t, s, torch.randn(16, 4)


def test_mutable_false_runs_batch_norm_without_statistics_and_leaves_them_untouched():
    t, s, x = bn_pair()
    before = {k: v.clone() for k, v in s.state_dict().items()}
    ss = state(s)
    (p,) = distill(t, s, mutable=False)(state(t), ss, x)
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing written: neither the live buffers nor the given ones
    expected_out = torch.func.functional_call(s, {k: v.clone() for k, v in ss.items()}, (x,))
    # the same batch statistics either way; torch's kernel takes the same path, but allow
    # float32 rounding in case a build reduces in another order without running statistics
    torch.testing.assert_close(p.student, expected_out, rtol=1e-6, atol=1e-6)
    (_,), buffers = distill(t, s, mutable=True)(state(t), ss, x)
    assert buffers.student["1.num_batches_tracked"].item() == 1  # mutable=True still gets the updates


class ReadsStatistics(nn.BatchNorm1d):
    """A BatchNorm subclass whose forward reads its running mean in training mode too."""

    def forward(self, x):
        return super().forward(x) + self.running_mean.sum()


def test_a_batch_norm_subclass_keeps_its_statistics():
    t, s, x = bn_pair(ReadsStatistics)
    with torch.no_grad():
        s[1].running_mean.fill_(2.0)
    (p,) = distill(t, s, mutable=False)(state(t), state(s), x)
    torch.testing.assert_close(p.student, torch.func.functional_call(s, copies(s), (x,)))
    assert s[1].running_mean.eq(2.0).all()
