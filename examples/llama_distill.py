"""Distil a Llama teacher into a smaller Llama student without ever holding the full logits.

Both models are :class:`transformers.LlamaForCausalLM` built from configs with
random weights (nothing is downloaded). The mapping pairs the outputs of the
final norms (``model.norm``, the hidden states the ``lm_head`` reads), so:

* the teacher is in eval mode and stops after ``model.norm`` (truncation):
  its ``lm_head`` never runs;
* the student is called with ``logits_to_keep=1``, so its own ``lm_head``
  computes one position's logits instead of all of them;
* the loss is :func:`funcdistill.losses.fused_linear_jsd_loss`, fed by both
  ``lm_head`` weights taken from the states: it applies the two heads chunk
  by chunk over the tokens, so only one chunk's logits exist at a time.

The training step is pure: ``torch.func.grad_and_value`` of a function of the
student's parameters, and a functional SGD update. Its gradients equal those
of the naive loss on both models' full logits (``tests/test_llama.py``).

Run it with ``python examples/llama_distill.py`` (it needs ``transformers``,
from the ``test`` extra).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, NamedTuple

import torch
from torch import nn

import funcdistill as fd
from funcdistill.losses import fused_linear_jsd_loss

__all__ = ["Models", "build_mapping", "build_models", "main", "objective", "random_batch", "train"]


class Models(NamedTuple):
    """A Llama teacher (eval mode) and a narrower, shallower student."""

    teacher: nn.Module
    student: nn.Module
    vocab_size: int


def build_models(
    *,
    vocab_size: int = 256,
    teacher_hidden: int = 64,
    student_hidden: int = 32,
    teacher_layers: int = 2,
    student_layers: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Models:
    """A random Llama teacher and student sharing a vocabulary (no download).

    The teacher's head gets larger weights than a fresh one, so that its
    next-token distributions are far from uniform, as a trained model's are.

    Example:
        >>> m = build_models()
        >>> m.teacher.config.hidden_size, m.student.config.hidden_size, m.teacher.training
        (64, 32, False)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(hidden: int, layers: int) -> Any:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(config(teacher_hidden, teacher_layers)).to(dtype).eval()
    with torch.no_grad():
        nn.init.normal_(teacher.lm_head.weight, std=0.5)
    student = LlamaForCausalLM(config(student_hidden, student_layers)).to(dtype).train()
    return Models(teacher, student, vocab_size)


def build_mapping(models: Models, *, beta: float = 0.5, chunk_size: int = 64) -> fd.Mapping:
    """Pair the final norms; the payload is the fused generalized JSD with its options bound.

    Example:
        >>> build_mapping(build_models()).names
        (('model.norm', 'model.norm'),)
    """
    loss = functools.partial(fused_linear_jsd_loss, beta=beta, chunk_size=chunk_size)
    return fd.Mapping(models.teacher, models.student).add("model.norm", "model.norm", payload=loss)


def objective(
    fn: fd.DistillFn,
    teacher_state: dict[str, torch.Tensor],
    student_params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The distillation loss over the tokens that ``attention_mask`` keeps.

    Both models predict the next token at every position, so the positions
    pair up as they are; padding does not count.
    """
    pairs = fn(teacher_state, student_params, input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    heads = teacher_state["lm_head.weight"], student_params["lm_head.weight"]
    return sum(loss(t, s, *heads, mask=attention_mask.bool()) for t, s, loss in pairs)


def random_batch(
    models: Models, *, batch: int = 4, length: int = 32, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask with right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, models.vocab_size, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    return input_ids * attention_mask, attention_mask


def train(models: Models, mapping: fd.Mapping, *, steps: int = 20, lr: float = 5.0) -> list[float]:
    """Distil with a pure step (``torch.func.grad_and_value`` + SGD); the loss before each step."""
    fn = fd.distill(models.teacher, models.student, mapping)
    teacher_state = fd.state(models.teacher)
    params = {k: v.detach() for k, v in fd.state(models.student, buffers=False).items()}
    input_ids, attention_mask = random_batch(models)
    step = torch.func.grad_and_value(functools.partial(objective, fn, teacher_state))
    losses = []
    for _ in range(steps):
        grads, loss = step(params, input_ids, attention_mask)
        params = {k: v - lr * grads[k] for k, v in params.items()}
        losses.append(float(loss))
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    """Distil for a few steps and print the loss before and after."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--lr", type=float, default=5.0, help="SGD learning rate (default: 5.0)")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (default: 0.5)")
    args = parser.parse_args(argv)
    models = build_models()
    losses = train(models, build_mapping(models, beta=args.beta), steps=args.steps, lr=args.lr)
    print(f"fused generalized JSD (beta={args.beta}): {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
