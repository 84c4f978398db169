"""The deterministic figures of the benchmark suite (``benchmarks/``), on tiny models.

No timings here: bytes saved for backward, teacher FLOPs under truncation and
graph breaks of a compiled step are exact counts, so they are checked with the
same code the benchmark reports them with (:mod:`benchmarks.costs`,
:mod:`benchmarks.steps`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import funcdistill as fd
from benchmarks import costs
from benchmarks import steps as S
from benchmarks.losses import similarity_loss, step_loss
from benchmarks.models import MLP, ResNetCifar


def tiny_cnn_case() -> S.Case:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    y = torch.tensor([0, 1, 2])
    return S.Case(ResNetCifar(8, blocks=1), ResNetCifar(4, blocks=1), x, y, point="layer2")


def tiny_mlp_case() -> S.Case:
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    y = torch.tensor([0, 1, 2, 3, 4])
    return S.Case(MLP([12, 32, 32]), MLP([12, 8]), x, y, point="body")


CASES = [pytest.param(tiny_cnn_case, id="cnn-batchnorm"), pytest.param(tiny_mlp_case, id="mlp")]


def weights(case: S.Case) -> list[torch.Tensor]:
    return [t for m in (case.teacher, case.student) for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("make", CASES)
def test_teacher_adds_no_bytes_saved_for_backward(make):
    case = make()
    alone = costs.saved_bytes(S.student_alone_loss(case).loss, exclude=weights(case))
    step = costs.saved_bytes(S.funcdistill_loss(case).loss, exclude=weights(case))
    floor = costs.saved_bytes(S.floor_loss(case).loss, exclude=weights(case))
    assert alone["total"] > 0
    assert step["total"] == alone["total"] == floor["total"]


@pytest.mark.parametrize("make", CASES)
def test_a_teacher_with_grad_is_counted(make):
    """The counter sees a teacher's graph, so the equality above is not vacuous."""
    case = make()
    alone = costs.saved_bytes(S.student_alone_loss(case).loss, exclude=weights(case))["total"]
    teacher_params = sum(p.numel() * p.element_size() for p in case.teacher.parameters())
    forgotten = costs.saved_bytes(S.forgotten_nograd_loss(case).loss)["total"]
    with_grad = costs.saved_bytes(S.funcdistill_loss(case, nograd_teacher=False).loss)["total"]
    assert forgotten == with_grad
    assert forgotten > alone + teacher_params // 2


def test_truncated_step_saves_what_the_hand_written_truncated_step_saves():
    case = tiny_cnn_case()
    fd_loss = S.truncated_funcdistill_loss(case, "layer2").loss
    fd_loss()  # a first call, so that any one-off check is not counted
    got = costs.saved_bytes(fd_loss, exclude=weights(case))
    ref = costs.saved_bytes(S.truncated_floor_loss(case, "layer2").loss, exclude=weights(case))
    assert got["total"] == ref["total"]


def test_truncated_teacher_flops_match_the_prefix():
    case = tiny_cnn_case()
    t, s, x = case.teacher, case.student, case.x
    with torch.no_grad():
        full = costs.flops(lambda: t(x))
        prefix = costs.flops(lambda: t.forward_features(x, stop_after="layer2"))
        student = costs.flops(lambda: s(x))
    fn = fd.distill(t, s, S.truncated_mapping(case, "layer2"), truncate=True, mutable=False)
    first = costs.flops(lambda: fn(fd.state(t), fd.state(s), x)) - student
    later = costs.flops(lambda: fn(fd.state(t), fd.state(s), x)) - student
    assert prefix < 0.8 * full
    # an eval-mode teacher is truncated from its first call (its check is a shape-only dry run)
    assert abs(first / prefix - 1) <= 0.01
    assert abs(later / prefix - 1) <= 0.01


def test_truncation_is_off_when_the_output_is_mapped():
    case = tiny_cnn_case()
    t, s, x = case.teacher, case.student, case.x
    with torch.no_grad():
        full = costs.flops(lambda: t(x))
        student = costs.flops(lambda: s(x))
    fn = fd.distill(t, s, case.mapping(t, s), truncate=True, mutable=False)
    fn(fd.state(t), fd.state(s), x)
    assert costs.flops(lambda: fn(fd.state(t), fd.state(s), x)) - student == full


@pytest.mark.compile
def test_whole_functional_step_traces_without_graph_breaks():
    case = tiny_mlp_case()
    t, s, x, y = case.teacher, case.student, case.x, case.y
    mapping = fd.Mapping(t, s).add("body", "body", similarity_loss).add("body", "", None)
    fn = fd.distill(t, s, mapping, truncate=True)

    def loss(params, t_state, x, y):
        pairs = fn(t_state, params, x)
        return step_loss(pairs, pairs[-1].student, y)

    def step(params, t_state, x, y):
        return torch.func.grad_and_value(loss)(params, t_state, x, y)

    params = {n: v.detach() for n, v in s.named_parameters()}
    t_state = {n: v.detach() for n, v in fd.state(t).items()}
    found = costs.graph_breaks(step, params, t_state, x, y)  # no eager call first
    assert (found["graphs"], found["graph_breaks"], found["reasons"]) == (1, 0, [])


@pytest.mark.compile
def test_graph_break_counter_sees_a_break():
    def step(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    found = costs.graph_breaks(step, torch.randn(2))
    assert found["graph_breaks"] == 1 and found["graphs"] == 2


@pytest.mark.parametrize("make", CASES)
def test_the_vmap_sections_torch_func_floor_does_the_work_of_funcdistills_vmap_step(make):
    """A fair floor: the same FLOPs, gradients and BatchNorm updates as the funcdistill vmap step."""
    case = make()
    t, x, y = case.teacher, case.x, case.y
    students = [case.student] + [copy.deepcopy(case.student) for _ in range(2)]
    for i, st in enumerate(students[1:]):
        torch.manual_seed(i)
        for p in st.parameters():
            p.data.normal_()
    fn = fd.distill(t, students[0], case.mapping(t, students[0]), mutable=True)

    def loss(params, buffers, x, y):
        pairs, new = fn(fd.state(t), {**params, **buffers}, x)
        return step_loss(pairs, pairs[-1].student, y), new.student

    params, buffers = torch.func.stack_module_state(students)
    stacked = [{n: v.detach() for n, v in params.items()}, {n: v.clone() for n, v in buffers.items()}]
    vgrad = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(0, 0, None, None))
    step, run = S.torch_func_vmap_step(case, students[0], stacked)
    (want, want_buffers), (got, got_buffers) = vgrad(*stacked, x, y), run()
    # the same kernels on the same batched shapes: equal, not merely close
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert got_buffers.keys() == want_buffers.keys() == (buffers.keys() if buffers else set())
    assert all(torch.equal(got_buffers[n], want_buffers[n]) for n in want_buffers)
    assert costs.flops(step) == costs.flops(lambda: vgrad(*stacked, x, y)) > 0


@pytest.mark.parametrize(
    "module", ["calls", "costs", "cross", "features", "losses", "models", "report", "served", "steps", "timing"]
)
def test_benchmark_module_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"benchmarks.{module}"))
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- a call's Python work, by model size


def funcdistill_frames(call) -> int:
    """How many Python functions of funcdistill ``call()`` enters (frames, generators included; C calls not)."""
    root = str(Path(fd.__file__).parent)
    entered = 0

    def profile(frame, event, arg):
        nonlocal entered
        if event == "call" and frame.f_code.co_filename.startswith(root):
            entered += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered


def frames_per_call(tensors: int, passed: str, mode: str) -> int:
    """funcdistill frames of one call on the overhead table's models of about ``tensors`` state tensors each."""
    from benchmarks.models import tensor_stack

    torch.manual_seed(0)
    t, s = tensor_stack(tensors).eval(), tensor_stack(tensors).train(mode == "train")
    fn = fd.distill(t, s, fd.Mapping(t, s).add("0", "0").add("", ""), mutable=False)
    x = torch.randn(2, 4)
    if passed == "in the call":

        def call():
            return fn(fd.state(t), fd.state(s), x)

    else:
        ts, ss = fd.state(t), fd.state(s)
        if passed == "copies":  # as a functional loop passes them (parameters still require grad)
            ts, ss = ({n: v.detach().clone().requires_grad_(v.requires_grad) for n, v in d.items()} for d in (ts, ss))

        def call():
            return fn(ts, ss, x)

    call()  # the first call checks the state in full (and makes the state readers)
    return funcdistill_frames(call)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("passed", ["made once", "copies", "in the call"])
def test_a_calls_python_work_does_not_grow_with_the_model(passed, mode):
    """The overhead table's models at two sizes: the same funcdistill frames per call, whatever the size.

    What grows with the model (training flags, the state check, swapping tensors in) runs in C-level
    ``map``s, so the count of Python frames is a constant; a per-module or per-tensor Python loop on
    the fast path would make it grow. (Copies that do not require grad, passed in grad mode, are
    checked entry by entry for detached views of the parameters: 128 frames at 30 tensors, 947 at
    300; its cost per tensor is in its tensor attribute reads, about the same in C-level maps.)
    """
    small, large = frames_per_call(30, passed, mode), frames_per_call(300, passed, mode)
    assert small == large, f"funcdistill frames per call: {small} at 30 tensors, {large} at 300"
    assert small <= 45, small  # 43 with state() twice in the call
