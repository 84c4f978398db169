"""Offline distillation: a training epoch from a teacher cache, its build, and its bytes per sample.

Epoch times are ratios, in paired rounds over the same batches, against
student-only training: the distillation loss with the teacher outputs
precomputed by hand into tensors in RAM, so only the student runs (what a
cache cannot beat). The other rows: the student alone on its labels (no
distillation loss), and online distillation (the teacher runs every batch).
Bytes are exact: the shard files on disk.

>>> import tempfile
>>> from benchmarks.models import mlp_student, mlp_teacher
>>> setup = Setup(mlp_teacher().eval(), mlp_student(), torch.randn(16, 64), torch.randint(0, 10, (16,)), 8, "body")
>>> cache = setup.build(tempfile.mkdtemp())
>>> sorted(setup.epochs(cache))
['distill fn, teacher outputs in RAM', 'online distillation', 'student alone (labels only)', 'student only (teacher outputs in RAM)', 'teacher cache']
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import funcdistill as fd
from benchmarks.losses import kd_loss, similarity_loss, step_loss
from benchmarks.models import mlp_student, mlp_teacher, resnet_student, resnet_teacher
from benchmarks.report import Section
from benchmarks.timing import MIN_ROUNDS, paired_rounds, ratio, summary, verdict
from funcdistill.cache import TeacherOutputs

__all__ = ["Setup", "cache_section"]

ALONE, RAM = "student alone (labels only)", "student only (teacher outputs in RAM)"
FN_RAM = "distill fn, teacher outputs in RAM"
CACHED, ONLINE = "teacher cache", "online distillation"
GOAL = 1.10


class Setup:
    """A teacher/student pair, a data set of ``len(x)`` samples and the epoch styles over it."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, point: str
    ):
        self.teacher, self.student, self.x, self.y, self.batch = teacher.eval(), student.train(), x, y, batch
        self.point = point
        self.mapping = fd.Mapping(teacher, student).add(point, point, similarity_loss).add("", "", kd_loss)
        self.fn = fd.distill(teacher, student, self.mapping, mutable=False)
        self.order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(batch)

    def build(self, folder: str, **options: Any) -> fd.TeacherCache:
        """The cache of the teacher's mapped outputs over the data set."""
        return _builder(self.fn, self.teacher, self.x, self.batch)(folder, **options)

    def epochs(self, cache: fd.TeacherCache) -> dict[str, Callable[[], None]]:
        """One epoch of each style: zero_grad, loss, backward per batch (no optimizer step)."""
        s, fn, x, y, point = self.student, self.fn, self.x, self.y, self.point
        with torch.no_grad():
            parts = [self.teacher.forward_features(x[i : i + self.batch]) for i in range(0, len(x), self.batch)]
        ram = {k: torch.cat([p[k] for p in parts]) for k in (point, "")}

        def run(loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
            def epoch() -> None:
                for idx in self.order:
                    s.zero_grad(set_to_none=True)
                    loss(idx).backward()

            return epoch

        def alone(idx: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(s(x.index_select(0, idx)), y.index_select(0, idx))

        def precomputed(idx: torch.Tensor) -> torch.Tensor:
            sf = s.forward_features(x.index_select(0, idx))
            t_feat, t_logits = ram[point].index_select(0, idx), ram[""].index_select(0, idx)  # faster than [idx]
            pairs = ((t_feat, sf[point], similarity_loss), (t_logits, sf[""], kd_loss))
            return step_loss(pairs, sf[""], y.index_select(0, idx))

        def through_fn(idx: torch.Tensor) -> torch.Tensor:
            outputs = TeacherOutputs((ram[point].index_select(0, idx), ram[""].index_select(0, idx)), cache.built_for)
            pairs = fn(outputs, fd.state(s), x.index_select(0, idx))
            return step_loss(pairs, pairs[-1].student, y.index_select(0, idx))

        def cached(idx: torch.Tensor) -> torch.Tensor:
            pairs = fn(cache[idx], fd.state(s), x.index_select(0, idx))
            return step_loss(pairs, pairs[-1].student, y.index_select(0, idx))

        def online(idx: torch.Tensor) -> torch.Tensor:
            pairs = fn(fd.state(self.teacher), fd.state(s), x.index_select(0, idx))
            return step_loss(pairs, pairs[-1].student, y.index_select(0, idx))

        return {
            ALONE: run(alone),
            RAM: run(precomputed),
            FN_RAM: run(through_fn),
            CACHED: run(cached),
            ONLINE: run(online),
        }


def _builder(fn: Any, teacher: nn.Module, x: torch.Tensor, batch: int) -> Callable[..., fd.TeacherCache]:
    def build(folder: str, **options: Any) -> fd.TeacherCache:
        return fd.TeacherCache.build(fn, fd.state(teacher), x, folder, batch_size=batch, progress=False, **options)

    return build


def _cnn(cfg: Any, n: int) -> Setup:
    torch.manual_seed(cfg.seed)
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    return Setup(resnet_teacher(), resnet_student(), x, y, 64, "layer2")


def _mlp(cfg: Any, n: int) -> Setup:
    torch.manual_seed(cfg.seed)
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    return Setup(mlp_teacher(), mlp_student(), x, y, cfg.mlp_batch, "body")


def _build_times(setup: Setup, folder: str) -> tuple[fd.TeacherCache, list[float]]:
    """The cache, built :data:`~benchmarks.timing.MIN_ROUNDS` times into fresh folders; seconds per build."""
    seconds = []
    for i in range(MIN_ROUNDS):
        started = time.perf_counter()
        cache = setup.build(f"{folder}/{i}")
        seconds.append(time.perf_counter() - started)
    return cache, seconds


def _epoch_rows(sec: Section, scenario: str, setup: Setup, rounds: int, folder: str) -> None:
    cache, builds = _build_times(setup, folder)
    build = summary(builds)
    times = paired_rounds(setup.epochs(cache), rounds=rounds, inner=1, warmup=1)
    for name in (RAM, FN_RAM, CACHED, ONLINE, ALONE):
        goal = name == CACHED
        r = ratio(times, name, RAM)
        sec.add(
            scenario=scenario,
            measure=f"epoch: {name}",
            value=_fmt(r),
            target=f"<= {GOAL:.2f}" if goal else "",
            met=verdict(r, GOAL) if goal else "",
            note=f"{_ms(times[name])} ms per epoch; {_fmt(ratio(times, name, ALONE))} x labels only",
        )
    sec.add(
        scenario=scenario,
        measure="epoch: teacher cache / online distillation",
        value=_fmt(ratio(times, CACHED, ONLINE)),
    )
    online_s = _ms(times[ONLINE]) / 1000
    sec.add(
        scenario=scenario,
        measure=f"build (once; {build['rounds']} builds)",
        value=f"{build['median']:.2f} s ({build['p25']:.2f}-{build['p75']:.2f})",
        note=f"{build['median'] / online_s:.2f}x an online epoch; {len(cache)} samples, {cache.nbytes:,} bytes",
    )


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"


def _ms(times: list[float]) -> float:
    return round(1000 * sorted(times)[len(times) // 2])


def _bytes_rows(sec: Section, scenario: str, unit: str, per: int, builds: dict[str, Callable[[str], Any]]) -> None:
    full = None
    for label, build in builds.items():
        with tempfile.TemporaryDirectory() as folder:
            cache = build(folder)
            value = cache.nbytes / (len(cache) * per)
        full = full or value
        sec.add(
            scenario=scenario,
            measure=f"bytes per {unit}: {label}",
            value=f"{value:,.0f}",
            note="" if value == full else f"{value / full:.3f}x full",
        )


class _LMHead(nn.Module):
    """An embedding and an output projection over a vocabulary: logits per token."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def cache_section(cfg: Any) -> Section:
    """Cached epochs against the student alone and online distillation; build time; bytes per sample."""
    sec = Section(
        "Teacher cache (offline distillation)",
        ["scenario", "measure", "value", "target", "met", "note"],
        intro=(
            "An epoch is one pass over the data set in batches (zero_grad, loss, backward; no optimizer "
            f"step). `{RAM}` (the reference, 1.00): the distillation loss (feature pair + logits KD + "
            "cross-entropy) with the teacher outputs precomputed by hand into tensors in RAM, so only the "
            f"student runs, written by hand (the student's `forward_features`). `{FN_RAM}`: the same through "
            "the distill function, given the RAM tensors as `TeacherOutputs` (the function's own per-call cost, "
            f"without reading the cache). `{CACHED}`: the same loss with `fn(cache[idx], student_state, x)`, the outputs "
            f"gathered from the memory-mapped safetensors shards. `{ONLINE}`: the same loss with the teacher "
            f"running every batch. `{ALONE}`: cross-entropy only, no distillation loss (the note gives every "
            "epoch against it too). Ratios are medians over paired rounds (interquartile range in "
            "brackets). Bytes are the shard files on disk. Measured with one intra-op thread "
            "(`torch.set_num_threads(1)`): on two cores shared with other processes, two threads spend "
            "most of their time waiting for each other (a 64-row MLP forward took 25 ms with two threads "
            "and 0.8 ms with one), which would swamp the ratios."
        ),
    )
    quick = cfg.quick
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the intro: two threads on two shared cores wait on each other
    try:
        _all_rows(sec, cfg, quick)
    finally:
        torch.set_num_threads(threads)
    sec.notes.append(
        "Time ratios depend on what else runs on the machine (other agents share these 2 cores; see the "
        "load figures in the machine line and the interquartile ranges); the bytes are exact."
    )
    return sec


def _all_rows(sec: Section, cfg: Any, quick: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        cnn_n = 64 if quick else 128
        _epoch_rows(sec, f"CNN, {cnn_n} samples, batch 64", _cnn(cfg, cnn_n), 5 if quick else 9, f"{root}/cnn")
        mlp_n = 1024 if quick else 4096
        _epoch_rows(
            sec, f"MLP, {mlp_n} samples, batch {cfg.mlp_batch}", _mlp(cfg, mlp_n), 5 if quick else 11, f"{root}/mlp"
        )
    cnn = _cnn(cfg, 64)
    _bytes_rows(
        sec,
        "CNN (layer2 features + logits)",
        "sample",
        1,
        {
            "full (float32)": cnn.build,
            "float16": lambda f: cnn.build(f, dtype=torch.float16),
            "bfloat16": lambda f: cnn.build(f, dtype=torch.bfloat16),
        },
    )
    logits = _builder(fd.distill(cnn.teacher, cnn.student), cnn.teacher, cnn.x, 64)
    _bytes_rows(
        sec,
        "CNN logits (10 classes)",
        "sample",
        1,
        {
            "full (float32)": logits,
            "top-5, float16": lambda f: logits(f, topk=5, dtype=torch.float16),
        },
    )
    _lm_rows(sec, cfg)


def _lm_rows(sec: Section, cfg: Any) -> None:
    vocab, seq, n = 32_000, 64, 4
    torch.manual_seed(cfg.seed)
    teacher, student = _LMHead(vocab, 64).eval(), _LMHead(vocab, 16)
    build = _builder(fd.distill(teacher, student), teacher, torch.randint(0, vocab, (n, seq)), 2)

    _bytes_rows(
        sec,
        f"LM logits ({vocab:,} vocabulary, {seq} tokens per sample)",
        "token",
        seq,
        {
            "full (float32)": build,
            "float16": lambda f: build(f, dtype=torch.float16),
            "top-128, float16": lambda f: build(f, topk=128, dtype=torch.float16),
        },
    )
