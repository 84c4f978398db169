"""LLM losses: the fused chunked token losses against the naive loss on full logits, Liger-Kernel and TRL.

Forward + backward of a token loss of two linear heads (gradients for the
student's hidden states and head weight), fp32, hidden size 256, at a
32,000-class vocabulary (Llama 2's) and a 128,256-class one (Llama 3's):

* generalized JSD (beta 0.5): ``naive`` (``generalized_jsd_loss(th @ Wt.T, hs @ Ws.T)``,
  both logits materialised), ``fused eager`` (:func:`funcdistill.losses.fused_linear_jsd_loss`
  with ``compiled=False``: each chunk's work as separate eager kernels, the
  behaviour before the compiled chunks), ``fused`` (the same with its default:
  each chunk's work compiled), Liger-Kernel's ``LigerFusedLinearJSDLoss``
  eager and ``compiled=True``, and TRL's ``_chunked_divergence_loss``, when
  those are installed (``pip install .[bench]``);
* top-k forward KL from the teacher's stored top 32: ``topk naive``
  (``topk_kl_loss`` on the student's full logits), ``topk fused eager`` and
  ``topk fused`` (:func:`funcdistill.losses.fused_linear_topk_kl_loss`).
  Neither Liger-Kernel nor TRL has a chunked top-k loss, so its references are
  the naive and the eager fused forms, and Liger-Kernel's compiled JSD of the
  same case (the time goal of both fused losses is set against it).

* Peak memory: each (case, style) runs alone in a fresh process started with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer mapped on its own and
  unmapped when freed), which runs one untimed step (so compiling is not
  counted), resets its peak RSS (``/proc/self/clear_refs``), runs one step and
  reports the peak (``VmHWM``) minus the RSS at the reset: what the step adds
  on top of its inputs.
* Time: one process per case runs every style once untimed (its first call,
  compile included, is reported as ``first call s``; Inductor's on-disk
  caches are disabled in that process so that this is a cold compile), then
  all styles in interleaved, shuffled rounds (:func:`benchmarks.timing.paired_rounds`);
  ratios are per round, and the median and interquartile range over rounds
  are reported.

A naive step whose expected peak (about 12.5 fp32 copies of ``tokens x V``
for the JSD, 3 for the top-k loss) does not fit in the memory available at
that moment is not run ("naive does not fit"), rather than risking the
machine; each naive step is judged alone, so the top-k one may run where the
JSD one does not.

Run one case by hand: ``python -m benchmarks.llm memory 32000 4096 fused``,
``python -m benchmarks.llm time 32000 1024 5``.

>>> [name for name in STEPS][:3]
['naive', 'fused eager', 'fused']
"""

from __future__ import annotations

import functools
import importlib.util
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import Section
from benchmarks.timing import fresh_process, paired_rounds, ratio
from funcdistill.losses import fused_linear_jsd_loss, fused_linear_topk_kl_loss, generalized_jsd_loss, topk_kl_loss

__all__ = ["STEPS", "llm_section", "make_step", "measure_memory", "measure_time"]

HIDDEN, VOCAB, TOPK, BETA = 256, 32_000, 32, 0.5
CASES = ((32_000, 1024), (32_000, 4096), (32_000, 16_384), (128_256, 1024), (128_256, 4096))
ROOT = Path(__file__).resolve().parent.parent
# each naive step's peak, in fp32 copies of tokens x V (measured at 4,096 x 32,000: 6,215 and 1,465 MiB)
NAIVE_COPIES = {"naive": 12.5, "topk naive": 3.0}


def _inputs(tokens: int, seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = HIDDEN**-0.5
    x = {
        "teacher_hidden": torch.randn(tokens, HIDDEN, generator=g),
        "student_hidden": torch.randn(tokens, HIDDEN, generator=g).requires_grad_(),
        "teacher_weight": torch.randn(vocab, HIDDEN, generator=g) * 4 * scale,
        "student_weight": (torch.randn(vocab, HIDDEN, generator=g) * scale).requires_grad_(),
    }
    top = [(h @ x["teacher_weight"].T).log_softmax(-1).topk(TOPK) for h in x["teacher_hidden"].split(512)]
    x["topk_logprobs"], x["topk_indices"] = (torch.cat(parts) for parts in zip(*top))
    return x


def _heads(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return x["teacher_hidden"], x["student_hidden"], x["teacher_weight"], x["student_weight"]


def _naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
    teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
    return generalized_jsd_loss(teacher_logits, x["student_hidden"] @ x["student_weight"].T, beta=BETA)


def _fused(x: dict[str, torch.Tensor], compiled: bool | None = None) -> torch.Tensor:
    return fused_linear_jsd_loss(*_heads(x), beta=BETA, compiled=compiled)  # default chunk: 128 tokens


@functools.cache
def _liger(compiled: bool) -> Any:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=compiled)


def _liger_step(x: dict[str, torch.Tensor], compiled: bool) -> torch.Tensor:
    labels = torch.zeros(x["student_hidden"].shape[0], dtype=torch.long)  # no hard loss (weight 0), none ignored
    return _liger(compiled)(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels)


def _trl(x: dict[str, torch.Tensor]) -> torch.Tensor:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    th, hs, wt, ws = _heads(x)
    mask = torch.ones(1, hs.shape[0], dtype=torch.long)
    return _chunked_divergence_loss(hs[None], th[None], ws, wt, mask, beta=BETA)[0]  # the mean over tokens


def _topk_naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return topk_kl_loss(x["topk_logprobs"], x["topk_indices"], x["student_hidden"] @ x["student_weight"].T)


def _topk_fused(x: dict[str, torch.Tensor], compiled: bool | None = None) -> torch.Tensor:
    args = x["topk_logprobs"], x["topk_indices"], x["student_hidden"], x["student_weight"]
    return fused_linear_topk_kl_loss(*args, compiled=compiled)


STEPS: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
    "naive": _naive,
    "fused eager": functools.partial(_fused, compiled=False),
    "fused": _fused,
    "Liger eager": functools.partial(_liger_step, compiled=False),
    "Liger compiled": functools.partial(_liger_step, compiled=True),
    "TRL chunked": _trl,
    "topk naive": _topk_naive,
    "topk fused eager": functools.partial(_topk_fused, compiled=False),
    "topk fused": _topk_fused,
}
NEEDS = {"Liger eager": "liger_kernel", "Liger compiled": "liger_kernel", "TRL chunked": "trl"}
NAIVE = ("naive", "topk naive")


def installed(name: str) -> bool:
    """Whether the style's library is installed (the others always are)."""
    return name not in NEEDS or importlib.util.find_spec(NEEDS[name]) is not None


def make_step(
    name: str, x: dict[str, torch.Tensor], steps: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = STEPS
) -> Callable[[], float]:
    """One forward + backward of the loss named in ``steps``; returns the loss."""

    def step() -> float:
        x["student_hidden"].grad = x["student_weight"].grad = None
        loss = steps[name](x)
        loss.backward()
        return float(loss.detach())

    return step


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Start a new peak-RSS window; the RSS now (MiB).

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` to the
    current RSS. ``ru_maxrss`` cannot be reset, and it keeps the *parent's*
    RSS across ``exec`` (the benchmark parent holds gigabytes after the other
    sections), so a child's ``ru_maxrss`` delta can read 0; it is only the
    fallback where ``/proc`` is missing.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        now = _status_mib("VmRSS")
        if now is not None:
            return now
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak() -> float:
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(tokens: int, name: str, vocab: int = VOCAB) -> dict[str, float]:
    """In this process: MiB that one step adds to the peak RSS above its inputs (run it in a fresh process).

    One untimed step first, so that compiling (and any other first-call setup) is not counted.
    """
    x = _inputs(tokens, vocab=vocab)
    step = make_step(name, x)
    step()
    before = _reset_peak()
    loss = step()
    return {"peak_mib": _peak() - before, "loss": loss}


def measure_time(tokens: int, rounds: int, names: list[str], vocab: int = VOCAB) -> dict[str, Any]:
    """In this process: each style's first call (compile included), then seconds per step in interleaved rounds."""
    x = _inputs(tokens, vocab=vocab)
    steps = {name: make_step(name, x) for name in names}
    first, losses = {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        losses[name] = step()
        first[name] = time.perf_counter() - start
    times = paired_rounds(steps, rounds=rounds, warmup=0)
    return {"times": times, "losses": losses, "first_s": first}


def _available_mib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


_run = functools.partial(fresh_process, "benchmarks.llm")
"""Run ``python -m benchmarks.llm ARGS`` in a fresh process; its JSON answer."""


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
TIME_ENV = {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # the first call is a cold compile


def _naive_fits(vocab: int, tokens: int, name: str) -> bool:
    """Whether the naive step ``name`` (``naive`` or ``topk naive``) fits in the memory available now."""
    need = NAIVE_COPIES[name] * tokens * vocab * 4 / 2**20 + 2048  # MiB, with room for the rest of the process
    return need <= _available_mib()


def _band(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"


def _goal(r: dict[str, float] | None, limit: float) -> str:
    """``yes`` when the whole interquartile range is at or under ``limit``, ``no`` when above, else it says so."""
    if r is None:
        return ""
    if r["p75"] <= limit:
        return "yes"
    return "no" if r["p25"] > limit else "IQR overlaps the goal"


COLUMNS = [
    "V",
    "tokens",
    "style",
    "peak MiB",
    "peak / naive",
    "time / naive",
    "time / Liger compiled",
    "first call s",
    "goal: time <= 1.0x Liger compiled",
    "goal: peak <= 0.15x naive",
    "note",
]
ROUNDS = 5


def measure_case(vocab: int, tokens: int, time_names: list[str], memory_names: list[str]) -> dict[str, Any]:
    """One case: each style's peak in its own process, and the timed styles' rounds in one process."""
    memory = {name: _run("memory", str(vocab), str(tokens), name, env=MEMORY_ENV) for name in memory_names}
    return {"memory": memory, "timed": _run("time", str(vocab), str(tokens), str(ROUNDS), *time_names, env=TIME_ENV)}


def add_case(sec: Section, vocab: int, tokens: int, measured: dict[str, Any], fits: dict[str, bool]) -> None:
    """The case's rows: one per style measured (in memory or in time); ``fits``: whether each naive step ran."""
    memory, timed = measured["memory"], measured["timed"]
    times, losses = timed["times"], timed["losses"]
    for name in [n for n in STEPS if n in memory or n in times]:
        group = "topk naive" if name.startswith("topk") else "naive"
        r_naive = ratio(times, name, group) if name in times and group in times and name != group else None
        r_liger = None  # the top-k rows too: Liger compiled's JSD is the time goal of both fused losses
        if name in times and "Liger compiled" in times and name != "Liger compiled":
            r_liger = ratio(times, name, "Liger compiled")
        peak = memory[name]["peak_mib"] if name in memory else None
        naive_peak = memory[group]["peak_mib"] if fits[group] and group in memory else None
        reference = losses.get(group, losses.get("fused" if group == "naive" else "topk fused"))
        notes = [] if name in times else ["not timed in this run"]
        if name in losses and reference is not None and abs(losses[name] - reference) > 1e-4 * abs(reference):
            notes.append(f"loss {losses[name]:.6g} vs {reference:.6g}")
        fused_row = name in ("fused", "topk fused")
        peak_goal = ""
        if fused_row and not fits[group]:
            peak_goal = "naive does not fit"
        elif fused_row and peak is not None and naive_peak is not None:
            peak_goal = "yes" if peak <= 0.15 * naive_peak else "no"
        sec.add(
            V=vocab,
            tokens=tokens,
            style=name,
            **{
                "peak MiB": "" if peak is None else peak,
                "peak / naive": "" if peak is None or naive_peak is None else peak / naive_peak,
                "time / naive": "" if r_naive is None else _band(r_naive),
                "time / Liger compiled": "" if r_liger is None else _band(r_liger),
                "first call s": round(timed["first_s"][name], 1) if name in times else "",
                "goal: time <= 1.0x Liger compiled": _goal(r_liger, 1.0) if fused_row else "",
                "goal: peak <= 0.15x naive": peak_goal,
            },
            note="; ".join(notes),
        )
    for name in [n for n in NAIVE if not fits[n]]:
        sec.add(V=vocab, tokens=tokens, style=name, note="naive does not fit: not run")


def llm_section(cfg: Any) -> Section:
    """Peak memory (fresh process per case and style) and time ratios (interleaved rounds) of the token losses."""
    sec = new_section()
    cases = CASES[:1] if cfg.quick else CASES
    for vocab, tokens in cases:
        fits = {name: _naive_fits(vocab, tokens, name) for name in NAIVE}
        names = [n for n in STEPS if installed(n) and fits.get(n, True)]
        add_case(sec, vocab, tokens, measure_case(vocab, tokens, names, names), fits)
    return finish(sec)


def new_section() -> Section:
    """The section's table, empty."""
    return Section(
        "LLM losses: fused chunked token losses vs the naive loss, Liger-Kernel and TRL",
        COLUMNS,
        intro=(
            f"Forward + backward, fp32, hidden {HIDDEN}; gradients for the student's hidden states and head weight. "
            f"Generalized JSD (beta {BETA}): `naive` (both logits materialised), `fused eager` "
            "(`fused_linear_jsd_loss(..., compiled=False)`, the eager chunks: the behaviour before compiled chunks), "
            "`fused` (its default: each chunk's work compiled), Liger-Kernel's `LigerFusedLinearJSDLoss` eager and "
            "`compiled=True` (its default chunk of 1,024 tokens), TRL's `_chunked_divergence_loss`. Top-k forward KL "
            f"from the teacher's top {TOPK}: `topk naive` (`topk_kl_loss` on full student logits), `topk fused eager`, "
            "`topk fused` (`fused_linear_topk_kl_loss`); neither Liger-Kernel nor TRL has a chunked top-k loss. "
            "`peak MiB`: peak RSS of one step above its inputs, each case and style alone in a fresh process, after "
            "one untimed step (compiling not counted). Times: ratios per interleaved round in one process per case "
            f"({ROUNDS} rounds), median (interquartile range); the JSD styles against `naive` and `Liger compiled`, "
            "the top-k ones against `topk naive` and against `Liger compiled` (Liger-Kernel's compiled JSD of the "
            "same case: the time goal of both fused losses). `first call s`: the first step, compile included (cold: Inductor's "
            "caches disabled). A goal is `yes` when the whole interquartile range meets it."
        ),
    )


def finish(sec: Section) -> Section:
    """The section's notes, added once its rows are in."""
    missing = sorted({NEEDS[n] for n in STEPS if not installed(n)})
    if missing:
        sec.notes.append(f"Not installed, so not compared: {', '.join(missing)} (`pip install .[bench]`).")
    sec.notes.append(
        "Peak memory is measured alone in its own process and does not depend on other work; the time ratios do: "
        "other processes on the machine slow the styles unevenly, so read them with their interquartile range."
    )
    return sec


def _main(argv: list[str]) -> None:
    kind, vocab, tokens = argv[0], int(argv[1]), int(argv[2])
    if kind == "memory":
        answer = measure_memory(tokens, argv[3], vocab)
    else:
        answer = measure_time(tokens, int(argv[3]), argv[4:], vocab)
    print(json.dumps(answer))


if __name__ == "__main__":
    _main(sys.argv[1:])
