"""A transformers Llama pair distilled through the final norms with the fused loss (examples/llama_distill.py).

Models built from ``LlamaConfig`` with random weights; nothing is downloaded.
The reference everywhere is the naive loss: both models run whole, and
:func:`funcdistill.losses.generalized_jsd_loss` compares their full logits.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")

import funcdistill as fd
from examples import llama_distill as ex
from funcdistill.losses import generalized_jsd_loss

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return ex.build_models(dtype=torch.float64)


@pytest.fixture(scope="module")
def batch(models):
    return ex.random_batch(models, batch=2, length=12)


def naive_loss(models, params, input_ids, attention_mask):
    """Both models whole (the teacher under no_grad), the generalized JSD of their full logits."""
    with torch.no_grad():
        teacher_logits = models.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    student_logits = torch.func.functional_call(models.student, params, (), kwargs).logits
    return generalized_jsd_loss(teacher_logits, student_logits, mask=attention_mask.bool())


def params_of(models):
    return {k: v.detach() for k, v in fd.state(models.student, buffers=False).items()}


def test_gradients_equal_the_naive_full_logits_loss(models, batch):
    fn = fd.distill(models.teacher, models.student, ex.build_mapping(models, chunk_size=5))  # 24 tokens: uneven
    objective = functools.partial(ex.objective, fn, fd.state(models.teacher))
    grads, value = torch.func.grad_and_value(objective)(params_of(models), *batch)
    ref_grads, ref_value = torch.func.grad_and_value(functools.partial(naive_loss, models))(params_of(models), *batch)
    torch.testing.assert_close(value, ref_value)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert grads["lm_head.weight"].abs().sum() > 0 and grads["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0


def flops(fn, *args, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


def test_the_teacher_head_never_runs(models, batch):
    input_ids, attention_mask = batch
    fn = fd.distill(models.teacher, models.student, ex.build_mapping(models))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    call = flops(fn, fd.state(models.teacher), fd.state(models.student), logits_to_keep=1, **kwargs)
    backbone = flops(models.teacher.model, **kwargs)  # the teacher without its lm_head
    student = flops(models.student, logits_to_keep=1, **kwargs)
    assert call == backbone + student
    teacher_head = 2 * input_ids.numel() * models.teacher.config.hidden_size * models.vocab_size
    assert flops(models.teacher, **kwargs) == backbone + teacher_head  # what truncation saves
    full = fd.distill(models.teacher, models.student, ex.build_mapping(models), truncate=False)
    untruncated = flops(full, fd.state(models.teacher), fd.state(models.student), **kwargs)
    assert untruncated - call == teacher_head + flops(models.student, **kwargs) - student


@pytest.mark.compile
def test_compiled_step_equals_eager():
    models = ex.build_models(teacher_layers=1)
    input_ids, attention_mask = ex.random_batch(models, batch=2, length=8)
    fn = fd.distill(models.teacher, models.student, ex.build_mapping(models, chunk_size=6))
    step = torch.func.grad_and_value(functools.partial(ex.objective, fn, fd.state(models.teacher)))
    params = params_of(models)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    (grads, value), (ref_grads, ref_value) = (
        compiled(params, input_ids, attention_mask),
        step(params, input_ids, attention_mask),
    )
    torch.testing.assert_close(value, ref_value)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def run_example(name: str) -> tuple[float, float]:
    """Run an example as a script; the two numbers of its ``a -> b`` line."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"(\d+\.\d+) -> (\d+\.\d+) after \d+ steps", result.stdout)
    assert found, result.stdout
    return float(found[1]), float(found[2])


@pytest.mark.parametrize("name", ["llama_distill.py", "on_policy.py", "offline_topk.py"])
def test_example_loss_falls(name):
    before, after = run_example(name)
    assert after < before


def test_generated_mask_selects_the_predictions_of_generated_tokens():
    from examples import on_policy

    sequences = torch.arange(14).reshape(2, 7)
    mask = on_policy.generated_mask(sequences, prompt_length=3)
    # positions 2..5 predict tokens 3..6, the generated ones
    assert mask.tolist() == [[False, False, True, True, True, True, False]] * 2
