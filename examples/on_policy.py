"""On-policy distillation (GKD): the student generates, the teacher scores, the loss is the generalized JSD.

Generalized Knowledge Distillation (Agarwal et al., 2024, arXiv:2306.13649)
trains the student on sequences it generates itself, so that it learns from
the teacher where its own mistakes take it. Each step here:

1. the student continues a batch of prompts with ``generate`` (sampling);
2. the same pure distill function as in ``examples/llama_distill.py`` runs
   both models on the prompt + continuation: the teacher stops after
   ``model.norm``, the student keeps one position's logits;
3. the loss is :func:`funcdistill.losses.fused_linear_jsd_loss` on the
   positions that predict generated tokens (a mask), with both ``lm_head``
   weights from the states; ``loss.backward()`` and an optimizer step update
   the live student, which generates the next batch.

Run it with ``python examples/on_policy.py`` (it needs ``transformers``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import funcdistill as fd
from examples.llama_distill import Models, build_mapping, build_models

__all__ = ["generated_mask", "main", "rollout", "train"]


def rollout(models: Models, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The student's sampled continuations of ``prompts``: ``(batch, prompt + new_tokens)`` token ids."""
    with torch.no_grad():
        return models.student.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            top_k=0,
            pad_token_id=0,
        )


def generated_mask(sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The positions whose next-token prediction is a generated token (position ``t`` predicts ``t + 1``).

    Example:
        >>> generated_mask(torch.zeros(1, 6, dtype=torch.long), 3).tolist()
        [[False, False, True, True, True, False]]
    """
    positions = torch.arange(sequences.shape[1])
    keep = (positions >= prompt_length - 1) & (positions < sequences.shape[1] - 1)
    return keep.expand(sequences.shape)


def train(
    models: Models, *, steps: int = 20, lr: float = 1e-2, batch: int = 8, prompt: int = 4, new_tokens: int = 8
) -> list[float]:
    """On-policy GKD steps with Adam on the live student; the loss of each step."""
    fn = fd.distill(models.teacher, models.student, build_mapping(models, beta=0.5, chunk_size=32))
    optimizer = torch.optim.Adam(models.student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        prompts = torch.randint(3, models.vocab_size, (batch, prompt), generator=g)
        sequences = rollout(models, prompts, new_tokens)
        teacher_state, student_state = fd.state(models.teacher), fd.state(models.student)
        pairs = fn(teacher_state, student_state, input_ids=sequences, logits_to_keep=1)
        heads = teacher_state["lm_head.weight"], student_state["lm_head.weight"]
        mask = generated_mask(sequences, prompt)
        loss = sum(payload(t, s, *heads, mask=mask) for t, s, payload in pairs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    """Run on-policy distillation and print the mean loss of the first and last five steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: 1e-2)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    losses = train(build_models(), steps=args.steps, lr=args.lr)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"on-policy generalized JSD, mean of 5 steps: {first:.4f} -> {last:.4f} after {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
