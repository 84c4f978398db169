"""LLM losses: the fused chunked generalized JSD against the naive loss on full logits.

Both compute ``generalized_jsd_loss(teacher_hidden @ Wt.T, student_hidden @ Ws.T)``
and its gradients for the student's hidden states and head weight (forward +
backward), fp32, hidden size 256, vocabulary 32,000 (Llama 2's), at 1,024 /
4,096 / 8,192 tokens. The naive step materialises both logits tensors; the
fused one (:func:`funcdistill.losses.fused_linear_jsd_loss`) holds one chunk's.

* Peak memory: each (tokens, implementation) runs alone in a fresh process,
  which resets its peak RSS once the inputs exist (``/proc/self/clear_refs``)
  and reports the peak after the step (``VmHWM``) minus the RSS at the reset:
  what the step adds on top of its inputs. Reliable, since no other work
  shares the process.
* Time: one process per token count runs both steps in interleaved, shuffled
  rounds (:func:`benchmarks.timing.paired_rounds`); the ratio fused / naive is
  the median over rounds. Noisy when other work shares the machine.

A naive step whose expected peak (twice the previous size's) does not fit in
the memory available at that moment is skipped, with a note, rather than
risking the machine.

Run one case by hand: ``python -m benchmarks.llm memory 4096 fused``.

>>> [name for name in STEPS]
['naive', 'fused']
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import Section
from benchmarks.timing import paired_rounds, ratio
from funcdistill.losses import fused_linear_jsd_loss, generalized_jsd_loss

__all__ = ["STEPS", "llm_section", "make_step", "measure_memory", "measure_time"]

HIDDEN, VOCAB = 256, 32_000
ROOT = Path(__file__).resolve().parent.parent


def _inputs(tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = HIDDEN**-0.5
    return {
        "teacher_hidden": torch.randn(tokens, HIDDEN, generator=g),
        "student_hidden": torch.randn(tokens, HIDDEN, generator=g).requires_grad_(),
        "teacher_weight": torch.randn(VOCAB, HIDDEN, generator=g) * 4 * scale,
        "student_weight": (torch.randn(VOCAB, HIDDEN, generator=g) * scale).requires_grad_(),
    }


def _naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
    teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
    return generalized_jsd_loss(teacher_logits, x["student_hidden"] @ x["student_weight"].T)


def _fused(x: dict[str, torch.Tensor]) -> torch.Tensor:
    h = x["teacher_hidden"], x["student_hidden"], x["teacher_weight"], x["student_weight"]
    return fused_linear_jsd_loss(*h)  # the default chunk_size: 512 tokens at this vocabulary


STEPS: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {"naive": _naive, "fused": _fused}


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


def measure_memory(tokens: int, name: str) -> dict[str, float]:
    """In this process: MiB that one step adds to the peak RSS above its inputs (run it in a fresh process)."""
    torch.set_num_threads(torch.get_num_threads())
    x = _inputs(tokens)
    before = _reset_peak()
    loss = make_step(name, x)()
    return {"peak_mib": _peak() - before, "loss": loss}


def measure_time(tokens: int, rounds: int) -> dict[str, Any]:
    """In this process: seconds per step of both, in interleaved rounds, and the losses (which must agree)."""
    x = _inputs(tokens)
    steps = {name: make_step(name, x) for name in STEPS}
    losses = {name: step() for name, step in steps.items()}
    times = paired_rounds(steps, rounds=rounds, warmup=0)
    return {"times": times, "losses": losses}


def _available_mib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _run(*args: str) -> dict[str, Any]:
    """Run ``python -m benchmarks.llm ARGS`` in a fresh process; its JSON answer."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.llm", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.llm {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llm_section(cfg: Any) -> Section:
    """Peak memory (fresh process per case) and time ratio (interleaved rounds) of fused vs naive."""
    sec = Section(
        "LLM losses: fused chunked generalized JSD vs the naive loss on full logits",
        [
            "tokens",
            "style",
            "peak MiB",
            "peak ratio",
            "peak target",
            "met",
            "time ratio",
            "time target",
            "time met",
            "note",
        ],
        intro=(
            f"Forward + backward of the generalized JSD (beta 0.5) of two linear heads, fp32, hidden {HIDDEN}, "
            f"vocabulary {VOCAB:,}; gradients for the student's hidden states and head weight. `naive`: "
            "`generalized_jsd_loss(th @ Wt.T, hs @ Ws.T)`, both logits materialised; `fused`: "
            "`fused_linear_jsd_loss(th, hs, Wt, Ws)` (its default chunk: 512 tokens, about 2**24 logits). `peak MiB`: peak RSS during the step "
            "(VmHWM, reset once the inputs exist) minus the RSS then, each case in a fresh process. `time ratio`: median over "
            "interleaved rounds in one process of fused / naive seconds (interquartile range in brackets)."
        ),
    )
    sizes = (1024,) if cfg.quick else (1024, 4096, 8192)
    last_naive = 0.0
    for tokens in sizes:
        need = 2 * last_naive + 1024
        if last_naive and need > _available_mib():
            note = f"skipped: the naive step needs about {need:,.0f} MiB, {_available_mib():,.0f} MiB available"
            sec.add(tokens=tokens, style="naive", note=note)
            sec.add(tokens=tokens, style="fused", note="skipped with the naive step (no baseline)")
            continue
        memory = {name: _run("memory", str(tokens), name) for name in STEPS}
        last_naive = memory["naive"]["peak_mib"]
        rounds = 3 if cfg.quick or tokens >= 8192 else 5
        timed = _run("time", str(tokens), str(rounds))
        agree = abs(timed["losses"]["fused"] - timed["losses"]["naive"]) <= 1e-4 * abs(timed["losses"]["naive"])
        check = "" if agree else f"losses differ: {timed['losses']}"
        r = ratio(timed["times"], "fused", "naive")
        peak = memory["fused"]["peak_mib"] / memory["naive"]["peak_mib"]
        sec.add(tokens=tokens, style="naive", **{"peak MiB": memory["naive"]["peak_mib"], "peak ratio": 1.0})
        sec.add(
            tokens=tokens,
            style="fused",
            **{"peak MiB": memory["fused"]["peak_mib"], "peak ratio": peak},
            met=("yes" if peak <= 0.2 else "no") if tokens == 4096 else "",
            **{
                "peak target": "<= 0.20" if tokens == 4096 else "",
                "time ratio": f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})",
                "time target": "<= 1.20" if tokens == 4096 else "",
                "time met": ("yes" if r["median"] <= 1.2 else "no") if tokens == 4096 else "",
            },
            note=check,
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
