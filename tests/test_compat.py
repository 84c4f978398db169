"""funcdistill.compat: the context-manager shim over the functional core."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import funcdistill
from funcdistill.compat import Mapping, distill
from funcdistill.compat import _distill as compat_distill
from tests.compat_nets import pair

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "enot-distillation-api.txt"

# The examples of the reference document, verbatim; only the import lines change.
IMPORTS = """\
from enot.distillation import distill
from enot.distillation import Mapping
"""
EXAMPLE_MAPPING = """\
mapping = Mapping(teacher, student)

mapping.add(teacher.features[3], student.features[3])  # Specify by module reference.
mapping.add('features.5.conv', 'features.5.conv')      # Specify by module name.
mapping.add(teacher.features[7], 'features.7')         # Mixed.
"""
EXAMPLE_LOOP = """\
with distill(teacher=teacher, student=student, mapping=mapping) as distill_model:
    inputs = torch.ones(1, 3, 224, 224)  # Sample from dataloader.
    optimizer.zero_grad()

    output = distill_model(inputs)
    loss: torch.Tensor = torch.zeros(1)
    for teacher_output, student_output, _ in output:  # Paired tensors from mapped modules.
        loss += criterion(teacher_output, student_output)

    loss.backward()
    optimizer.step()
"""
EXAMPLE_PAYLOAD = """\
mapping.add(teacher.features[3], student.features[3], payload=nn.MSELoss())
mapping.add(teacher.features[5], student.features[5], payload=nn.CrossEntropyLoss())
mapping.add(teacher.features[7], student.features[7], payload=nn.MSELoss())
...
for teacher_output, student_output, criterion in output:  # 3rd value is payload from mapping.
    loss += criterion(teacher_output, student_output)
"""
EXAMPLE_GRAPH = """\
>>> mapping = Mapping(teacher, student)  # GraphModule - GraphModule mapping.
>>> mapping.add('features_18_0', 'features_18_0', payload=nn.MSELoss())
>>> mapping.add('features_2_conv_1_0', 'features_2_conv_1_0', payload=nn.CrossEntropyLoss())
>>> mapping.add('features_5_conv_0_2', 'features_5_conv_0_2', payload=nn.MSELoss())
"""
EXAMPLE_GRAPH_OPTIMIZER = """\
>>> optimizer = RAdam(params=student.parameters())
"""
EXAMPLE_GRAPH_LOOP = """\
>>> with distill(teacher=teacher, student=student, mapping=mapping) as distill_model:
>>>     inputs = torch.ones(1, 3, 224, 224)
>>>     optimizer.zero_grad()
>>>     output = distill_model(inputs)
>>>     loss: torch.Tensor = torch.zeros(1)
>>>     for teacher_output, student_output, criterion in output:
>>>         loss += criterion(teacher_output, student_output)
>>>     loss.backward()
>>>     optimizer.step()
"""
EXAMPLES = [
    IMPORTS,
    EXAMPLE_MAPPING,
    EXAMPLE_LOOP,
    EXAMPLE_PAYLOAD,
    EXAMPLE_GRAPH,
    EXAMPLE_GRAPH_OPTIMIZER,
    EXAMPLE_GRAPH_LOOP,
]


def run(source: str, namespace: dict) -> None:
    exec(compile(source, "<reference example>", "exec"), namespace)


def unprompt(source: str) -> str:
    return "".join(line[4:] + "\n" for line in source.splitlines())


def namespace(teacher: nn.Module, student: nn.Module) -> dict:
    ns = {"torch": torch, "nn": nn, "teacher": teacher, "student": student, "RAdam": torch.optim.RAdam}
    run(IMPORTS.replace("enot.distillation", "funcdistill.compat"), ns)
    assert ns["distill"] is distill and ns["Mapping"] is Mapping
    return ns


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in funcdistill.state(model).items()}


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_trained(teacher, student, teacher_before, student_before, trained: list[str]) -> None:
    assert equal(tensors(teacher), teacher_before)  # teacher in eval: untouched
    assert all(p.grad is None for p in teacher.parameters())
    # gradients reach the student up to its deepest mapped point, and no further
    for name in trained:
        assert all(p.grad is not None for p in student.get_submodule(name).parameters()), name
    assert all(p.grad is None for p in student.classifier.parameters())
    after = tensors(student)
    changed = [k for k in after if not torch.equal(after[k], student_before[k])]
    assert "features.3.conv.0.0.weight" in changed
    assert "features.0.1.running_mean" in changed  # student BatchNorm statistics updated


# ---------------------------------------------------------------- reference examples


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference document not in this checkout")
def test_examples_are_verbatim_copies_of_the_reference():
    def lines(text):
        return "\n".join(line.rstrip() for line in text.splitlines())

    reference = lines(REFERENCE.read_text())
    for example in EXAMPLES:
        assert lines(example) in reference, example


def test_reference_mapping_and_training_loop():
    teacher, student = pair(0)
    ns = namespace(teacher, student)
    ns["criterion"] = nn.MSELoss()
    ns["optimizer"] = torch.optim.SGD(student.parameters(), lr=0.1)
    teacher_before, student_before = tensors(teacher), tensors(student)
    run(EXAMPLE_MAPPING, ns)
    assert ns["mapping"].names == (
        ("features.3", "features.3"),
        ("features.5.conv", "features.5.conv"),
        ("features.7", "features.7"),
    )
    run(EXAMPLE_LOOP, ns)
    output, loss = ns["output"], ns["loss"]
    assert isinstance(output, list) and len(output) == 3
    assert output[1][0].shape == output[1][1].shape == (1, 4, 14, 14)
    expected = sum(nn.functional.mse_loss(t, s) for t, s, _ in output)
    assert torch.allclose(loss, expected.detach().reshape(1))
    check_trained(teacher, student, teacher_before, student_before, [f"features.{i}" for i in range(8)])


def test_reference_payload_example():
    teacher, student = pair(1)
    ns = namespace(teacher, student)
    ns["mapping"] = Mapping(teacher, student)
    before, after = EXAMPLE_PAYLOAD.split("...\n")
    run(before, ns)
    assert [type(p) for p in ns["mapping"].payload()] == [nn.MSELoss, nn.CrossEntropyLoss, nn.MSELoss]
    with distill(teacher=teacher, student=student, mapping=ns["mapping"]) as model:
        ns["output"] = model(torch.ones(1, 3, 224, 224))
    ns["loss"] = torch.zeros(1)
    run(after, ns)
    t3, s3, c3 = ns["output"][0]
    assert c3 is ns["mapping"].payload()[0]
    t5, s5, _ = ns["output"][1]
    expected = (
        nn.functional.mse_loss(t3, s3)
        + nn.functional.cross_entropy(t5, s5)
        + nn.functional.mse_loss(*ns["output"][2][:2])
    )
    assert torch.allclose(ns["loss"], expected.reshape(1))
    ns["loss"].backward()
    assert student.features[5].conv[0][0].weight.grad.abs().sum() > 0


def test_reference_graph_module_example():
    teacher, student = pair(2, traced=True)
    assert isinstance(student, torch.fx.GraphModule)
    ns = namespace(teacher, student)
    teacher_before, student_before = tensors(teacher), tensors(student)
    run(unprompt(EXAMPLE_GRAPH), ns)
    run(unprompt(EXAMPLE_GRAPH_OPTIMIZER), ns)
    run(unprompt(EXAMPLE_GRAPH_LOOP), ns)
    output = ns["output"]
    assert [tuple(o[0].shape) for o in output] == [(1, 8, 4, 4), (1, 8, 28, 28), (1, 8, 14, 14)]
    # features_5_conv_0_2 is a ReLU6 output
    assert output[2][1].min() >= 0 and output[2][1].max() <= 6
    assert isinstance(ns["optimizer"], torch.optim.RAdam)
    check_trained(
        teacher, student, teacher_before, student_before, [*(f"features.{i}" for i in range(18)), "features.18.0"]
    )


# ---------------------------------------------------------------- Mapping


def small_pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    return teacher, student


def test_mapping_is_mutable_and_converts_without_loss():
    teacher, student = small_pair()
    adapter = nn.Linear(4, 6)
    m = Mapping(teacher, student)
    assert m.add(teacher[0], "0", payload=adapter) is None
    first = m.to_functional()
    m.add("", "", payload=0.5)
    assert len(first) == 1 and len(m) == 2  # the functional snapshot did not change
    f = m.to_functional()
    assert isinstance(f, funcdistill.Mapping)
    assert (f.teacher, f.student, f.names) == (teacher, student, (("0", "0"), ("", "")))
    assert f.payload()[0] is adapter and m.payload() == [adapter, 0.5]
    back = Mapping.from_functional(f)
    assert back.to_functional() is f and back.teacher is teacher and back.student is student
    assert [tuple(p) for p in back] == [("0", "0", adapter), ("", "", 0.5)]
    assert repr(m).startswith("compat.Mapping(teacher=Sequential, student=Sequential")


def test_mapping_from_functional_rejects_other_types():
    with pytest.raises(TypeError, match=r"from_functional\(\) takes a funcdistill.Mapping, got list"):
        Mapping.from_functional([])


def test_mapping_unknown_name_suggests_close_names():
    teacher, student = pair(0)
    m = Mapping(teacher, student)
    with pytest.raises(
        ValueError,
        match=r"student TinyMobileNet has no module or node named 'features.5.cnv'.*Did you mean 'features.5.conv'",
    ):
        m.add("features.5.conv", "features.5.cnv")
    assert len(m) == 0


def test_mapping_module_of_the_other_model_says_swapped():
    teacher, student = small_pair()
    m = Mapping(teacher, student)
    with pytest.raises(
        ValueError,
        match=r"not a submodule of the teacher .*It belongs to the student: teacher and student look swapped",
    ):
        m.add(student[0], teacher[0])


def test_core_distill_asks_for_to_functional():
    teacher, student = small_pair()
    m = Mapping(teacher, student)
    m.add("", "")
    with pytest.raises(TypeError, match=r"convert it with \.to_functional\(\)"):
        funcdistill.distill(teacher, student, m)
    assert (
        len(
            funcdistill.distill(teacher, student, m.to_functional(), mutable=False)(
                funcdistill.state(teacher), funcdistill.state(student), torch.randn(2, 3)
            )
        )
        == 1
    )


# ---------------------------------------------------------------- distill: the model


def test_distill_model_returns_pairs_and_only_student_and_adapter_parameters():
    teacher, student = small_pair()
    adapter = nn.Linear(4, 6)
    m = Mapping(teacher, student)
    m.add("1", "1", payload=adapter)
    m.add("", "", payload=nn.MSELoss())
    with distill(teacher, student, m) as model:
        assert isinstance(model, nn.Module) and model.teacher is teacher
        params = set(model.parameters())
        assert params == set(student.parameters()) | set(adapter.parameters())
        assert not params & set(teacher.parameters())
        assert all(not k.startswith("teacher") for k in model.state_dict())
        out = model(torch.randn(5, 3))
    assert isinstance(out, list) and [len(p) for p in out] == [3, 3]
    (t1, s1, a), (t, s, crit) = out
    assert a is adapter and isinstance(crit, nn.MSELoss)
    assert t1.shape == (5, 6) and s1.shape == (5, 4) and t.shape == s.shape == (5, 2)
    (nn.functional.mse_loss(a(s1), t1) + crit(t, s)).backward()
    assert adapter.weight.grad is not None and student[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_a_payload_from_the_teacher_stays_out_of_the_parameters():
    teacher, student = small_pair()
    adapter = nn.Linear(4, 6)
    m = Mapping(teacher, student)
    m.add("2", "2", payload=teacher[3])  # the teacher's head, reused on student features
    m.add("1", "1", payload=adapter)
    m.add("0", "0", payload=adapter)  # the same adapter twice
    with distill(teacher, student, m) as model:
        assert list(model.payloads) == [adapter]
        assert set(model.parameters()) == set(student.parameters()) | set(adapter.parameters())


def test_mapping_none_pairs_final_outputs():
    teacher, student = small_pair()
    x = torch.randn(4, 3)
    with distill(teacher, student) as model:
        ((t, s, payload),) = model(x)
    assert payload is None
    assert torch.equal(t, teacher(x))  # exact: the same forward on the same batch, in this process
    student.eval()
    assert torch.allclose(s, copy.deepcopy(student).train()(x))


def test_a_functional_mapping_is_accepted_too():
    teacher, student = small_pair()
    fm = funcdistill.Mapping(teacher, student).add("1", "1")
    with distill(teacher, student, fm) as model:
        ((t, s, _),) = model(torch.randn(3, 3))
    assert t.shape == (3, 6) and s.shape == (3, 4)


def test_training_matches_plain_pytorch_with_hooks():
    teacher, student = pair(3)
    plain = copy.deepcopy(student)
    m = Mapping(teacher, student)
    m.add("features.3", "features.3", payload=nn.MSELoss())
    m.add("features.18", "features.18", payload=nn.MSELoss())
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(3)]

    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    with distill(teacher, student, m) as model:
        for x in inputs:
            opt.zero_grad()
            sum(c(t, s) for t, s, c in model(x)).backward()
            opt.step()

    feats: dict = {}
    handles = [
        mod.register_forward_hook(lambda _m, _i, o, key=key: feats.__setitem__(key, o))
        for key, mod in [
            ("t3", teacher.features[3]),
            ("t18", teacher.features[18]),
            ("s3", plain.features[3]),
            ("s18", plain.features[18]),
        ]
    ]
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x in inputs:
        opt.zero_grad()
        with torch.no_grad():
            teacher(x)
        plain(x)
        (
            nn.functional.mse_loss(feats["t3"], feats["s3"]) + nn.functional.mse_loss(feats["t18"], feats["s18"])
        ).backward()
        opt.step()
    for h in handles:
        h.remove()
    got, want = tensors(student), tensors(plain)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_nograd_teacher_false_gives_teacher_gradients():
    teacher, student = small_pair()
    with distill(teacher, student, nograd_teacher=False) as model:
        ((t, s, _),) = model(torch.randn(4, 3))
        ((t - s) ** 2).mean().backward()
    assert all(p.grad is not None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_in_train_mode_updates_its_statistics_like_a_plain_no_grad_forward():
    teacher, student = small_pair()
    teacher.train()
    plain = copy.deepcopy(teacher)
    m = Mapping(teacher, student)
    m.add("0", "0")  # the teacher's BatchNorm comes after the mapped point
    with distill(teacher, student, m) as model:
        for _ in range(2):
            x = torch.randn(6, 3)
            ((t, _, _),) = model(x)
            with torch.no_grad():
                plain(x)
            assert torch.allclose(t, plain[0](x))
    assert equal(tensors(teacher), tensors(plain))  # all of it ran, statistics included
    assert teacher[1].num_batches_tracked.item() == 2
    assert not t.requires_grad and all(p.grad is None for p in teacher.parameters())


def test_an_eval_teacher_stops_after_its_deepest_mapped_point():
    teacher, student = small_pair()
    from torch._subclasses.fake_tensor import FakeTensor

    calls = []
    hook = teacher[3].register_forward_hook(lambda m, a, out: calls.append(isinstance(out, FakeTensor)))
    m = Mapping(teacher, student)
    m.add("0", "0")
    with distill(teacher, student, m) as model:
        for _ in range(3):
            model(torch.randn(2, 3))
    assert calls == [True]  # never on real data; once in the shape-only dry run that checks the mapping
    hook.remove()


def test_teacher_in_eval_mode_is_untouched_and_saves_nothing():
    teacher, student = small_pair()
    before = tensors(teacher)
    with distill(teacher, student) as model:
        ((t, s, _),) = model(torch.randn(6, 3))
    assert equal(tensors(teacher), before)
    assert t.grad_fn is None and s.grad_fn is not None


def test_model_modes_follow_the_distillation_model_but_never_the_teacher():
    teacher, student = small_pair()
    with distill(teacher, student) as model:
        model.eval()
        assert not student.training and not teacher.training
        before = tensors(student)
        model(torch.randn(4, 3))
        assert equal(tensors(student), before)  # eval: statistics not updated
        teacher.train()
        model.eval()
        assert teacher.training  # not a submodule


def test_models_carry_no_hooks_inside_the_context():
    teacher, student = small_pair()
    with distill(teacher, student, None) as model:
        model(torch.randn(2, 3))
        for mod in [*teacher.modules(), *student.modules()]:
            assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_users_hooks_keep_working_and_stay_registered():
    teacher, student = pair(4)
    calls = []
    counter = student.features[3].register_forward_hook(lambda mod, i, o: calls.append(o.shape))
    shifter = student.features[5].register_forward_hook(lambda mod, i, o: o + 100.0)
    m = Mapping(teacher, student)
    m.add("features.5", "features.5")
    x = torch.randn(2, 3, 32, 32)
    with distill(teacher, student, m) as model:
        ((_, s5, _),) = model(x)
    assert len(calls) == 1
    assert s5.min() > 50  # the user's hook changed the output the pair sees
    assert list(student.features[3]._forward_hooks) == [counter.id]
    assert list(student.features[5]._forward_hooks) == [shifter.id]
    student(x)
    assert len(calls) == 2
    counter.remove()
    shifter.remove()


def test_the_context_is_also_a_decorator():
    teacher, student = small_pair()
    context = distill(teacher, student)
    assert isinstance(context, __import__("contextlib").ContextDecorator)
    seen = []

    @context
    def step(x):
        seen.append(context.model(x))

    step(torch.randn(2, 3))
    step(torch.randn(2, 3))
    assert len(seen) == 2 and len(seen[0]) == 1
    with pytest.raises(RuntimeError, match=r"model exists only inside the context"):
        _ = context.model


def test_keyword_arguments_in_any_order():
    teacher, student = small_pair()
    m = Mapping(teacher, student)
    m.add("1", "1")
    with distill(mapping=m, student=student, nograd_teacher=True, teacher=teacher) as model:
        ((t, s, _),) = model(torch.randn(2, 3))
    assert t.shape == (2, 6) and s.shape == (2, 4)


# ---------------------------------------------------------------- restore on exit


def snapshot(model: nn.Module) -> dict:
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: tuple(
                map(
                    len,
                    (
                        m._forward_hooks,
                        m._forward_pre_hooks,
                        m._backward_hooks,
                        m._backward_pre_hooks,
                        m._state_dict_hooks,
                    ),
                )
            )
            for n, m in model.named_modules()
        },
        "params": {n: (id(p), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: id(b) for n, b in model.named_buffers()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


def test_exit_on_exception_leaves_models_as_they_were():
    teacher, student = pair(5)
    student.features[2].eval()  # mixed modes must survive
    teacher.features[1].requires_grad_(False)
    t_snap, s_snap = snapshot(teacher), snapshot(student)
    t_vals, s_vals = tensors(teacher), tensors(student)
    m = Mapping(teacher, student)
    m.add("features.7", "features.7", payload=nn.MSELoss())
    with pytest.raises(KeyError, match="raised by the body"):
        with distill(teacher, student, m) as model:
            sum(c(t, s) for t, s, c in model(torch.randn(2, 3, 32, 32))).backward()
            raise KeyError("raised by the body")
    assert snapshot(teacher) == t_snap and snapshot(student) == s_snap
    assert equal(tensors(teacher), t_vals)
    after = tensors(student)
    changed = {k for k in after if not torch.equal(after[k], s_vals[k])}
    assert changed and all(
        k.rsplit(".", 1)[1] in {"running_mean", "running_var", "num_batches_tracked"} for k in changed
    )
    assert not any(k.startswith("features.2.") for k in changed)  # eval-mode BN untouched
    with pytest.raises(RuntimeError, match=r"used after its distill context exited"):
        model(torch.randn(2, 3, 32, 32))
    with distill(teacher, student, m) as again:  # the models are free again
        assert len(again(torch.randn(2, 3, 32, 32))) == 1


def test_a_forward_that_fails_changes_no_buffer():
    teacher, student = small_pair()
    s_vals = tensors(student)
    with pytest.raises(RuntimeError):
        with distill(teacher, student) as model:
            model(torch.randn(2, 5))  # wrong width: the forward raises
    assert equal(tensors(student), s_vals)


def test_using_the_model_after_exit_raises():
    teacher, student = small_pair()
    with distill(teacher, student) as model:
        pass
    with pytest.raises(RuntimeError, match=r"this distillation model was used after its distill context exited"):
        model(torch.randn(2, 3))


# ---------------------------------------------------------------- errors


def test_swapped_models_are_named_as_such():
    teacher, student = small_pair()
    m = Mapping(teacher, student)
    m.add("1", "1")
    with pytest.raises(
        ValueError,
        match=r"teacher and student are swapped: the mapping was built as Mapping\(teacher=Sequential, student=Sequential\), but distill\(\) got .* the same two models the other way round.*pass them by keyword",
    ):
        distill(student, teacher, m)


def test_mapping_teacher_given_as_student():
    teacher, student = small_pair()
    other, _ = small_pair(1)
    m = Mapping(teacher, student)
    with pytest.raises(
        ValueError, match=r"the mapping's teacher Sequential is the model passed to distill\(\) as student"
    ):
        distill(other, teacher, m)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_mapping_for_other_models_says_which(role):
    teacher, student = small_pair()
    other_teacher, other_student = small_pair(1)
    m = Mapping(teacher, student)
    m.add("", "")
    given = {"teacher": (other_teacher, student), "student": (teacher, other_student)}[role]
    with pytest.raises(
        ValueError,
        match=rf"the mapping was built for another {role} \(Sequential at 0x[0-9a-f]+\) than the {role} passed to distill\(\)",
    ):
        distill(*given, mapping=m)


def test_unknown_names_in_a_mapping_without_models():
    teacher, student = pair(0)
    m = Mapping(None, None)
    m.add("features.7", "features.77")
    with pytest.raises(
        ValueError, match=r"student TinyMobileNet has no module or node named 'features.77'. Did you mean 'features.7'"
    ):
        distill(teacher, student, m)


def test_same_model_as_teacher_and_student():
    _, student = small_pair()
    with pytest.raises(ValueError, match=r"the same model was passed as teacher and student.*copy.deepcopy"):
        distill(student, student)


def test_nested_contexts_over_the_same_model_are_refused():
    teacher, student = small_pair()
    teacher2, _ = small_pair(1)
    with distill(teacher, student) as model:
        with pytest.raises(
            RuntimeError,
            match=r"the student Sequential is already the student of an active distill context; distill contexts cannot be nested",
        ):
            with distill(teacher2, student):
                pass
        with pytest.raises(RuntimeError, match=r"the teacher Sequential is already the teacher of an active"):
            with distill(teacher, copy.deepcopy(student)):
                pass
        model(torch.randn(2, 3))  # the outer context is unaffected
    with distill(teacher2, student):  # released on exit
        pass


def test_reentering_the_same_context_is_refused():
    teacher, student = small_pair()
    context = distill(teacher, student)
    with context:
        with pytest.raises(RuntimeError, match=r"already the teacher of an active distill context"):
            with context:
                pass
        assert isinstance(context.model, nn.Module)


def test_failed_enter_releases_the_models():
    teacher, student = small_pair()
    m = Mapping(None, None)
    context = distill(teacher, student, m)  # empty mapping: refused on entering
    with pytest.raises(ValueError, match=r"the mapping is empty"):
        context.__enter__()
    with distill(teacher, student):
        pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"teacher": "resnet"}, r"distill\(teacher=\.\.\.\) must be an nn.Module, got str"),
        ({"student": None}, r"distill\(student=\.\.\.\) must be an nn.Module, got NoneType"),
        (
            {"mapping": [("1", "1")]},
            r"distill\(mapping=\.\.\.\) must be a funcdistill.compat.Mapping, a funcdistill.Mapping or None, got list",
        ),
        ({"nograd_teacher": "yes"}, r"distill\(nograd_teacher=\.\.\.\) must be a bool, got str"),
    ],
)
def test_wrong_types(kwargs, message):
    teacher, student = small_pair()
    args = {"teacher": teacher, "student": student, **kwargs}
    with pytest.raises(TypeError, match=message):
        distill(**args)


def test_model_repr_and_context_repr():
    teacher, student = small_pair()
    context = distill(teacher, student)
    assert repr(context) == "distill(teacher=Sequential, student=Sequential, nograd_teacher=True, active=False)"
    with context as model:
        assert "teacher=Sequential, pairs=1, nograd_teacher=True, closed=False" in repr(model)
        assert model.mapping.names == (("", ""),)


def test_models_of_a_context_that_never_exits_can_be_collected():
    teacher, student = small_pair()
    active = len(compat_distill._ACTIVE)
    context = distill(teacher, student)
    model = context.__enter__()  # and never __exit__
    model(torch.randn(2, 3))
    assert len(compat_distill._ACTIVE) == active + 2
    refs = [weakref.ref(obj) for obj in (teacher, student, model)]
    del teacher, student, model, context
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    assert len(compat_distill._ACTIVE) == active  # the registry entries went with them


def copy_of(model: nn.Module, how: str) -> nn.Module:
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = ["deepcopy", "pickle", "torch.save"]


@pytest.mark.parametrize("how", COPIES)
def test_a_model_copied_inside_the_context_runs_on_its_own_copies(how):
    teacher, student = small_pair()
    adapter = nn.Linear(4, 6)
    m = Mapping(teacher, student)
    m.add(teacher[0], "0", payload=adapter)
    m.add("", "", payload=teacher[3])  # shares the teacher's parameters: not one of the model's payloads
    x = torch.randn(5, 3)

    def loss_of(pairs):
        (t0, s0, a), (t, s, _) = pairs
        return nn.functional.mse_loss(a(s0), t0) + nn.functional.mse_loss(s, t)

    with distill(teacher, student, m) as model:
        clone = copy_of(model, how)
        assert clone.student is not student and clone.teacher is not teacher
        assert clone.mapping.student is clone.student and clone.mapping.teacher is clone.teacher
        assert clone.mapping.names == model.mapping.names
        assert list(clone.payloads) == [clone.mapping.payload()[0]] and clone.payloads[0] is not adapter
        assert clone.mapping.payload()[1] is clone.teacher[3]

        got, expected = clone(x), model(x)
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected):
            # exact: a copy runs the same forward on the same batch, in this process
            assert torch.equal(g.teacher, e.teacher) and torch.equal(g.student, e.student)
        assert got[0].payload is clone.payloads[0] and got[1].payload is clone.teacher[3]

        loss_of(got).backward()
        assert all(p.grad is not None for p in clone.parameters())
        assert all(p.grad is None for p in [*student.parameters(), *adapter.parameters(), *teacher.parameters()])
        assert all(p.grad is None for p in clone.teacher.parameters())  # nograd_teacher copies too

        loss_of(expected).backward()
        for p, q in zip(clone.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(RuntimeError, match=r"used after its distill context exited"):
        model(x)
    assert len(clone(x)) == 2  # the copy belongs to no context: leaving this one does not close it


@pytest.mark.parametrize("how", COPIES)
def test_a_copy_of_a_closed_model_stays_closed(how):
    teacher, student = small_pair()
    with distill(teacher, student) as model:
        pass
    clone = copy_of(model, how)
    assert "closed=True" in repr(clone)
    with pytest.raises(RuntimeError, match=r"this distillation model was used after its distill context exited"):
        clone(torch.randn(2, 3))
