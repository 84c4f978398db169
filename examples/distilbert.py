"""DistilBERT-style distillation of a small BERT, with funcdistill.

A BERT-style teacher and a narrower, shallower student are built from
:class:`transformers.BertConfig` with random weights (nothing is downloaded),
and the student is distilled as DistilBERT was (Sanh et al. 2019,
arXiv:1910.01108):

* logits KD on the sequence-classification head: the mapping pairs the two
  whole models (``''``), whose outputs are ``ModelOutput`` objects; those are
  pytrees, so the pair keeps them as they are and the loss reads ``.logits``;
* a cosine loss between hidden states over a layer mapping (teacher layer
  ``2k + 1`` to student layer ``k``), mapped by qualified name
  (``'bert.encoder.layer.3'``). The student is narrower, so each layer pair
  carries a trainable linear adapter, which trains with the student.

The training step is pure: ``torch.func.grad_and_value`` of a function of
the student state (adapters included), and a functional SGD update.

Run it with ``python examples/distilbert.py`` (it needs ``transformers``,
from the ``test`` extra).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, NamedTuple

import torch
from torch import nn

import funcdistill as fd
from funcdistill.losses import CosineLoss, hint_adapter, kd_loss

__all__ = [
    "History",
    "LayerCosine",
    "Models",
    "build_mapping",
    "build_models",
    "hidden_state",
    "logits_kd",
    "main",
    "objective",
    "pair_losses",
    "random_batch",
    "train",
]


class Models(NamedTuple):
    """A teacher and a student with their sizes."""

    teacher: nn.Module
    student: nn.Module
    teacher_hidden: int
    student_hidden: int
    vocab_size: int


def build_models(
    *,
    vocab_size: int = 120,
    teacher_layers: int = 4,
    teacher_hidden: int = 64,
    student_hidden: int = 32,
    num_labels: int = 3,
    seed: int = 0,
) -> Models:
    """A randomly initialised BERT teacher and a student with half its layers.

    Dropout is off in both, so a step is deterministic. The teacher's
    classification head gets larger random weights than a fresh head has, so
    that its predictions are far from uniform, as a trained teacher's are.

    Args:
        vocab_size: vocabulary size of both models.
        teacher_layers: teacher depth (even; the student gets half).
        teacher_hidden: teacher width.
        student_hidden: student width.
        num_labels: classes of the classification head.
        seed: seed for the random weights.

    Example:
        >>> m = build_models()
        >>> m.teacher.config.num_hidden_layers, m.student.config.num_hidden_layers
        (4, 2)
    """
    from transformers import BertConfig, BertForSequenceClassification

    if teacher_layers < 2 or teacher_layers % 2:
        raise ValueError(f"teacher_layers must be even and >= 2 (the student gets half), got {teacher_layers}.")

    def config(layers: int, hidden: int) -> Any:
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 16),
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )

    torch.manual_seed(seed)
    teacher = BertForSequenceClassification(config(teacher_layers, teacher_hidden)).eval()
    with torch.no_grad():  # a trained teacher is confident; a fresh head's logits are all near 0
        nn.init.normal_(teacher.classifier.weight, std=0.5)
    student = BertForSequenceClassification(config(teacher_layers // 2, student_hidden)).train()
    return Models(teacher, student, teacher_hidden, student_hidden, vocab_size)


def hidden_state(output: Any) -> torch.Tensor:
    """The hidden states in an encoder layer's output.

    A ``BertLayer`` returns a tensor in transformers 5 and a tuple
    ``(hidden_states, ...)`` in transformers 4.
    """
    return output if isinstance(output, torch.Tensor) else output[0]


class LayerCosine(CosineLoss):
    """DistilBERT's hidden-state cosine loss on encoder-layer outputs, through an adapter."""

    def forward(self, teacher: Any, student: Any) -> torch.Tensor:
        return super().forward(hidden_state(teacher), hidden_state(student))


def logits_kd(teacher_output: Any, student_output: Any, *, temperature: float) -> torch.Tensor:
    """Hinton KD on the ``.logits`` of two ``ModelOutput`` objects."""
    return kd_loss(teacher_output.logits, student_output.logits, temperature=temperature)


def build_mapping(models: Models, *, temperature: float = 2.0) -> fd.Mapping:
    """Pair the whole models (logits KD) and teacher layer ``2k + 1`` with student layer ``k``.

    Example:
        >>> m = build_mapping(build_models())
        >>> m.names
        (('', ''), ('bert.encoder.layer.1', 'bert.encoder.layer.0'), ('bert.encoder.layer.3', 'bert.encoder.layer.1'))
    """
    teacher, student = models.teacher, models.student
    mapping = fd.Mapping(teacher, student).add("", "", payload=functools.partial(logits_kd, temperature=temperature))
    for k in range(student.config.num_hidden_layers):
        adapter = hint_adapter(models.student_hidden, models.teacher_hidden, ndim=3)
        mapping = mapping.add(
            f"bert.encoder.layer.{2 * k + 1}",
            f"bert.encoder.layer.{k}",
            payload=LayerCosine(adapter),
        )
    return mapping


def objective(
    fn: fd.DistillFn,
    teacher_state: dict[str, torch.Tensor],
    student_state: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The distillation loss: the sum of every pair's payload loss."""
    pairs = fn(teacher_state, student_state, input_ids=input_ids, attention_mask=attention_mask)
    return sum(loss(t, s) for t, s, loss in pairs)


def random_batch(
    models: Models, *, batch: int = 8, length: int = 16, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask with some padding at the end."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, models.vocab_size, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    return input_ids * attention_mask, attention_mask


class History(NamedTuple):
    """What :func:`train` returns: the loss before each step, and the trained state."""

    losses: list[float]
    params: dict[str, torch.Tensor]


def train(models: Models, mapping: fd.Mapping, *, steps: int = 30, lr: float = 0.5) -> History:
    """Distil with a pure step (``torch.func.grad_and_value`` + SGD).

    The student state, adapters included (``'payloads.<i>.adapter.*'``), is a
    dict that each step replaces; the models and the adapters are never modified.
    """
    fn = fd.distill(models.teacher, models.student, mapping)
    teacher_state = fd.state(models.teacher)
    # parameters only (BERT has integer buffers, such as position ids, that grad cannot take)
    params = {k: v.detach() for k, v in fd.state(models.student, mapping, buffers=False).items()}
    input_ids, attention_mask = random_batch(models)
    step = torch.func.grad_and_value(functools.partial(objective, fn, teacher_state))
    losses = []
    for _ in range(steps):
        grads, loss = step(params, input_ids, attention_mask)
        params = {k: v - lr * grads[k] for k, v in params.items()}
        losses.append(float(loss))
    return History(losses, params)


def pair_losses(models: Models, mapping: fd.Mapping, params: dict[str, torch.Tensor]) -> list[float]:
    """The loss of each mapping pair for the student state ``params`` on the example batch."""
    fn = fd.distill(models.teacher, models.student, mapping)
    input_ids, attention_mask = random_batch(models)
    with torch.no_grad():
        pairs = fn(fd.state(models.teacher), params, input_ids=input_ids, attention_mask=attention_mask)
        return [float(loss(t, s)) for t, s, loss in pairs]


def main(argv: list[str] | None = None) -> History:
    """Show the pairs (a ModelOutput and layer outputs), distil, and print the losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature (default: 2.0)")
    args = parser.parse_args(argv)

    models = build_models()
    mapping = build_mapping(models, temperature=args.temperature)
    fn = fd.distill(models.teacher, models.student, mapping)
    input_ids, attention_mask = random_batch(models)
    with torch.no_grad():
        pairs = fn(
            fd.state(models.teacher),
            fd.state(models.student, mapping),
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
    whole = pairs[0].teacher
    leaves, _ = torch.utils._pytree.tree_flatten(whole)
    print(f"pair 0: '' -> {type(whole).__name__} {list(whole.keys())}, a pytree with {len(leaves)} leaf")
    for i, ((t_name, s_name), (t, s, _)) in enumerate(zip(mapping.names[1:], pairs[1:]), start=1):
        print(f"pair {i}: {t_name} {tuple(hidden_state(t).shape)} -> {s_name} {tuple(hidden_state(s).shape)}")

    before = pair_losses(models, mapping, fd.state(models.student, mapping))
    history = train(models, mapping, steps=args.steps, lr=args.lr)
    after = pair_losses(models, mapping, history.params)
    for i, (b, a) in enumerate(zip(before, after)):
        kind = "logits KD" if i == 0 else "hidden-state cosine"
        print(f"pair {i} ({kind}): {b:.4f} -> {a:.4f}")
    print(f"total: {history.losses[0]:.4f} -> {sum(after):.4f} after {len(history.losses)} steps")
    return history


if __name__ == "__main__":
    main()
