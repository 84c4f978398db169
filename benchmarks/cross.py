"""Across tokenizers: how fast ``align`` runs, and the peak memory of the ULD loss, fused against unfused.

* Alignment throughput: :func:`funcdistill.align.align` on two real
  tokenizations of the same texts (the byte-level BPE of 2,000 and the
  Unigram of 3,000 tokens that ``examples/cross_tokenizer.py`` trains on its
  generated corpus), 8 rows of 256 to 4,096 teacher tokens. Tokens per
  second per round; median and interquartile range over interleaved rounds in
  which both fast tokenizers also encode the same texts with offsets (the
  data preparation that ``align`` adds to).
* ULD peak memory: forward + backward of ``uld_loss(th @ Wt.T, hs @ Ws.T)``
  (``unfused``: both logits, their softmaxes and sorts exist at once) against
  :func:`funcdistill.losses.fused_linear_uld_loss` (one chunk of positions at a
  time; also with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so that
  freed chunk buffers go back to the system instead of staying in the heap), fp32, hidden 256, a teacher vocabulary of 50,257 (GPT-2's) and a
  student one of 32,000 (Llama 2's). Each case runs alone in a fresh process,
  which runs one untimed step (compiling is not counted), resets its peak RSS
  and reports the rise over one step (:func:`benchmarks.llm.measure_memory`'s method); the cases run in
  interleaved rounds (each round: every size and style once, shuffled), and
  the table gives the median and interquartile range over rounds. The time
  ratio fused / unfused comes from interleaved rounds in one process.

Run one case by hand: ``python -m benchmarks.cross memory 1024 fused``.

>>> sorted(ULD_STEPS)
['fused', 'unfused']
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.llm import _available_mib, _peak, _reset_peak, make_step
from benchmarks.report import Section
from benchmarks.timing import fresh_process, paired_rounds, ratio
from funcdistill.align import align
from funcdistill.losses import fused_linear_uld_loss, uld_loss

__all__ = ["STYLES", "ULD_STEPS", "align_section", "measure_memory", "measure_time", "quartiles", "uld_section"]

HIDDEN, TEACHER_VOCAB, STUDENT_VOCAB = 256, 50_257, 32_000
ROOT = Path(__file__).resolve().parent.parent


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median and the 25th and 75th percentiles (inclusive method).

    >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (3.0, 2.0, 4.0)
    """
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def _iqr(values: list[float], fmt: str = "{:,.0f}") -> str:
    median, p25, p75 = quartiles(values)
    return f"{fmt.format(median)} ({fmt.format(p25)}-{fmt.format(p75)})"


# ---------------------------------------------------------------- alignment throughput


def _documents(rows: int, teacher_tokens: int, tokenizer: Any, lines: list[str]) -> list[str]:
    """``rows`` texts of about ``teacher_tokens`` teacher tokens each, made of consecutive corpus lines."""
    counts = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    docs, i = [], 0
    for _ in range(rows):
        taken, total = [], 0
        while total < teacher_tokens:
            taken.append(lines[i % len(lines)])
            total += counts[i % len(lines)]
            i += 1
        docs.append(" ".join(taken))
    return docs


def _encode(tokenizer: Any, texts: list[str]) -> Any:
    return tokenizer(texts, padding=True, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")


def align_section(cfg: Any) -> Section:
    """Tokens per second of ``align`` on real tokenizations, next to the two fast tokenizers encoding the texts."""
    from examples.cross_tokenizer import corpus, train_tokenizers

    lines = corpus()
    tok = train_tokenizers(lines)
    sec = Section(
        "Alignment across tokenizers: align throughput",
        ["rows", "teacher tokens", "student tokens", "align tokens/s", "tokenize tokens/s", "align / tokenize"],
        intro=(
            "`funcdistill.align.align(teacher_offsets, student_offsets, teacher_mask=..., student_mask=...)` on two "
            f"tokenizations of the same texts: a byte-level BPE of {len(tok.teacher):,} tokens (teacher) and a Unigram "
            f"of {len(tok.student):,} (student), trained by `examples/cross_tokenizer.py` on its generated corpus. "
            "`teacher tokens`, `student tokens`: per batch, padding excluded. `align tokens/s`: teacher + student "
            "tokens of the batch divided by the seconds of one `align` call; `tokenize tokens/s`: the same tokens "
            "divided by the seconds of both fast tokenizers encoding the batch with offsets and padding (Rust, "
            "`tokenizers`' own threads). Median over interleaved rounds, interquartile range in brackets; "
            "`align / tokenize`: median over rounds of the ratio of the two times."
        ),
    )
    rounds = 3 if cfg.quick else 7
    sizes = (256,) if cfg.quick else (256, 1024, 4096)
    for teacher_tokens in sizes:
        texts = _documents(8, teacher_tokens, tok.teacher, lines)
        t_enc, s_enc = _encode(tok.teacher, texts), _encode(tok.student, texts)
        count = int(t_enc["attention_mask"].sum() + s_enc["attention_mask"].sum())
        args = (t_enc["offset_mapping"], s_enc["offset_mapping"])
        masks = {"teacher_mask": t_enc["attention_mask"], "student_mask": s_enc["attention_mask"]}
        steps = {
            "align": lambda args=args, masks=masks: align(*args, **masks),
            "tokenize": lambda texts=texts: (_encode(tok.teacher, texts), _encode(tok.student, texts)),
        }
        times = paired_rounds(steps, rounds=rounds, warmup=1, seed=cfg.seed)
        r = ratio(times, "align", "tokenize")
        sec.add(
            rows=8,
            **{
                "teacher tokens": int(t_enc["attention_mask"].sum()),
                "student tokens": int(s_enc["attention_mask"].sum()),
                "align tokens/s": _iqr([count / t for t in times["align"]]),
                "tokenize tokens/s": _iqr([count / t for t in times["tokenize"]]),
                "align / tokenize": f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})",
            },
        )
    sec.notes.append(
        "align checks and compacts the spans with tensor operations and merges each row's two lists of spans "
        "in Python (a two-pointer merge), once per batch in data preparation: a cost linear in the tokens plus a "
        "fixed cost per call, which larger batches amortise. The timings share the machine with other work: read "
        "them with their interquartile range."
    )
    return sec


# ---------------------------------------------------------------- ULD peak memory, fused vs unfused


def _inputs(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = HIDDEN**-0.5
    return {
        "teacher_hidden": torch.randn(tokens, HIDDEN, generator=g),
        "student_hidden": torch.randn(tokens, HIDDEN, generator=g).requires_grad_(),
        "teacher_weight": torch.randn(TEACHER_VOCAB, HIDDEN, generator=g) * 4 * scale,
        "student_weight": (torch.randn(STUDENT_VOCAB, HIDDEN, generator=g) * scale).requires_grad_(),
    }


def _unfused(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return uld_loss(x["teacher_hidden"] @ x["teacher_weight"].T, x["student_hidden"] @ x["student_weight"].T)


def _fused(x: dict[str, torch.Tensor]) -> torch.Tensor:
    h = x["teacher_hidden"], x["student_hidden"], x["teacher_weight"], x["student_weight"]
    return fused_linear_uld_loss(*h)  # the default chunk_size: 128 positions


ULD_STEPS: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {"unfused": _unfused, "fused": _fused}


def _make_step(name: str, x: dict[str, torch.Tensor]) -> Callable[[], float]:
    """One forward + backward of the named ULD style (the LLM section's step over these styles)."""
    return make_step(name, x, ULD_STEPS)


def measure_memory(tokens: int, name: str) -> dict[str, float]:
    """In this process: MiB that one step adds to the peak RSS above its inputs (run it in a fresh process).

    One untimed step runs first, as in the LLM section (:func:`benchmarks.llm.measure_memory`), so that
    compiling the fused loss's chunks is not counted: the peak is a training step's.
    """
    x = _inputs(tokens)
    step = _make_step(name, x)
    step()
    before = _reset_peak()
    start = time.perf_counter()
    loss = step()
    return {"peak_mib": _peak() - before, "loss": loss, "seconds": time.perf_counter() - start}


def measure_time(tokens: int, rounds: int) -> dict[str, Any]:
    """In this process: seconds per step of both styles in interleaved rounds, and their losses (which must agree)."""
    x = _inputs(tokens)
    steps = {name: _make_step(name, x) for name in ULD_STEPS}
    losses = {name: step() for name, step in steps.items()}
    return {"times": paired_rounds(steps, rounds=rounds, warmup=0), "losses": losses}


MMAP_1MB = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""glibc's malloc with a fixed 1 MiB mmap threshold: every chunk-sized buffer is mapped and unmapped on free."""

STYLES: dict[str, tuple[str, dict[str, str]]] = {
    "unfused": ("unfused", {}),
    "fused": ("fused", {}),
    "fused, MALLOC_MMAP_THRESHOLD_=1MiB": ("fused", MMAP_1MB),
}


_run = functools.partial(fresh_process, "benchmarks.cross")
"""Run ``python -m benchmarks.cross ARGS`` in a fresh process; its JSON answer."""


def _memory_rounds(sizes: tuple[int, ...], rounds: int, seed: int) -> dict[tuple[int, str], list[float]]:
    """Peak MiB of every (tokens, style), one fresh process per case, in shuffled interleaved rounds."""
    cases = [(tokens, style) for tokens in sizes for style in STYLES]
    peaks: dict[tuple[int, str], list[float]] = {case: [] for case in cases}
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(cases)
        for tokens, style in cases:
            name, env = STYLES[style]
            peaks[tokens, style].append(_run("memory", str(tokens), name, env=env)["peak_mib"])
    return peaks


def uld_section(cfg: Any) -> Section:
    """Peak memory (fresh process per case, interleaved rounds) and time ratio of the fused ULD vs the unfused one."""
    sec = Section(
        "Across tokenizers: ULD loss, fused vs unfused",
        ["tokens", "style", "peak MiB", "peak ratio", "time ratio", "note"],
        intro=(
            f"Forward + backward of the ULD loss of two linear heads, fp32, hidden {HIDDEN}, teacher vocabulary "
            f"{TEACHER_VOCAB:,}, student vocabulary {STUDENT_VOCAB:,}; gradients for the student's hidden states and "
            "head weight. `unfused`: `uld_loss(th @ Wt.T, hs @ Ws.T)`, both logits, softmaxes and sorts "
            "materialised; `fused`: `fused_linear_uld_loss(th, hs, Wt, Ws)` (its default chunk: 128 positions). "
            "`peak MiB`: peak RSS during the step (VmHWM, reset once "
            "the inputs exist and one untimed step has run, so compiling is not counted) minus the RSS then, each "
            "case alone in a fresh process; median over interleaved "
            "rounds (interquartile range in brackets). `peak ratio`: fused / unfused medians. `time ratio`: median "
            "over interleaved rounds in one process of fused / unfused seconds (interquartile range in brackets). "
            "`MALLOC_MMAP_THRESHOLD_=1MiB`: the fused case run with that environment variable (glibc's malloc then "
            "maps every buffer of 1 MiB or more and unmaps it when freed)."
        ),
    )
    sizes: tuple[int, ...] = (1024,) if cfg.quick else (1024, 2048, 4096)
    rounds = 3 if cfg.quick else 5
    probe = _run("memory", str(sizes[0]), "unfused")["peak_mib"]  # the unfused peak grows with the tokens
    need = probe * sizes[-1] / sizes[0] + 1024
    if need > _available_mib():
        sizes = tuple(n for n in sizes if probe * n / sizes[0] + 1024 <= _available_mib())
        sec.notes.append(f"larger sizes skipped: the unfused step would need about {need:,.0f} MiB")
    peaks = _memory_rounds(sizes, rounds, cfg.seed)
    for tokens in sizes:
        timed = _run("time", str(tokens), str(rounds))
        agree = abs(timed["losses"]["fused"] - timed["losses"]["unfused"]) <= 1e-4 * abs(timed["losses"]["unfused"])
        r = ratio(timed["times"], "fused", "unfused")
        base = quartiles(peaks[tokens, "unfused"])[0]
        sec.add(tokens=tokens, style="unfused", **{"peak MiB": _iqr(peaks[tokens, "unfused"]), "peak ratio": 1.0})
        for style in list(STYLES)[1:]:
            timing = {"time ratio": f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"} if style == "fused" else {}
            sec.add(
                tokens=tokens,
                style=style,
                **{"peak MiB": _iqr(peaks[tokens, style]), "peak ratio": quartiles(peaks[tokens, style])[0] / base},
                **timing,
                note="" if agree or style != "fused" else f"losses differ: {timed['losses']}",
            )
    sec.notes.append(
        "Peak memory is measured alone in its own process and does not depend on other work; the time ratios do: "
        "other processes on the machine slow the two steps unevenly, so read them with their interquartile range."
    )
    return sec


def _main(argv: list[str]) -> None:
    kind, tokens = argv[0], int(argv[1])
    answer = measure_memory(tokens, argv[2]) if kind == "memory" else measure_time(tokens, int(argv[2]))
    print(json.dumps(answer))


if __name__ == "__main__":
    _main(sys.argv[1:])
