"""What a call costs beyond the arithmetic: per-call overhead of a distill function, and ``state()``.

The models are :func:`benchmarks.models.tensor_stack`: about 50, 200 and 800
state tensors with tiny widths, so the forwards cost little and the per-tensor
bookkeeping shows. Overheads are *differences* against the plain forwards
measured in the same rounds (:func:`benchmarks.timing.paired_rounds`), in
microseconds per call: the median over rounds of (call time - plain time). The
goal: 25 µs, plus 0.05 µs per state tensor, plus 1 µs per tensor swapped in.

>>> goal_us(102, 0), goal_us(1600, 1600)
(30.1, 1705.0)
>>> _us({"median": 12.34, "p25": 10.0, "p75": 1234.5})
'12.3 (10.0-1234)'
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import funcdistill as fd
from benchmarks.models import tensor_stack
from benchmarks.report import Section
from benchmarks.timing import paired_rounds, summary, verdict

__all__ = ["goal_us", "overhead_section", "state_section"]

SIZES = (50, 200, 800)  # state tensors per model (about)
OVERHEAD_BASE_US = 25.0  # goal: base + per state tensor + per swapped tensor
OVERHEAD_PER_TENSOR_US = 0.05
OVERHEAD_PER_SWAP_US = 1.0
STATE_TARGET_US = 0.5  # per tensor
OVERHEAD_ROUND_S = 0.06  # seconds per candidate and round of the overhead table (see _settings)
BATCH, WIDTH = 2, 4


def goal_us(tensors: int, swapped: int) -> float:
    """The overhead goal in µs for a call on ``tensors`` state tensors that swaps ``swapped`` of them in."""
    return round(OVERHEAD_BASE_US + OVERHEAD_PER_TENSOR_US * tensors + OVERHEAD_PER_SWAP_US * swapped, 2)


def _us(r: dict[str, float], digits: int = 1) -> str:
    def f(v: float) -> str:
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"

    return f"{f(r['median'])} ({f(r['p25'])}-{f(r['p75'])})"


def _diff_us(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """Per-round ``times[name] - times[reference]`` in µs: median and quartiles."""
    return summary([1e6 * (a - b) for a, b in zip(times[name], times[reference])])


def _per_call_s(fns: list[Callable[[], Any]], calls: int = 20) -> float:
    """A rough time of one call of each ``fns`` (after a warm-up), to size ``inner``."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        for fn in fns:
            fn()
    return (time.perf_counter() - start) / (calls * len(fns))


def _settings(cfg: Any, kind: str = "overhead") -> tuple[int, float]:
    """``(rounds, seconds per candidate and round)``.

    A round of the overhead table runs each candidate for about
    :data:`OVERHEAD_ROUND_S`, so that it times calls in a loop, as training
    makes them: the first call after another candidate's finds the caches
    holding that candidate's models and state, not its own, and costs far
    more (at 800 + 800 tensors with copies, about 3 ms more, measured with
    10 ms rounds: 5,029 µs of overhead against 1,886 µs with 60 ms rounds).
    """
    if cfg.quick:
        return 7, 0.003
    return (41, OVERHEAD_ROUND_S) if kind == "overhead" else (21, 0.01)


def _inner(per_call: float, budget: float) -> int:
    return max(1, min(500, round(budget / max(per_call, 1e-7))))


def _copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as new tensors (parameters still require grad): every one must be swapped in."""
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in fd.state(model).items()}


def _trained_buffers(model: nn.Module) -> int:
    """Buffers of modules in training mode: a call clones them, so they are swapped in."""
    return sum(1 for m in model.modules() if m.training for _ in m.buffers(recurse=False))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these ops are tiny, and on a busy machine each parallel region
    of a second thread can wait milliseconds for a core (a training-mode BatchNorm1d on 2 x 4
    inputs then costs 4 ms instead of 10 µs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _warned(call: Callable[[], Any]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})


IN_CALL = "state(t), state(s) in the call"
MADE_ONCE = "state(t), state(s) made once"
COPIES = "copies made once (swap path)"


def _overhead_group(sec: Section, size: int, cfg: Any) -> None:
    dev = cfg.device
    torch.manual_seed(cfg.seed)
    t = tensor_stack(size, width=WIDTH).to(dev).eval()
    s_eval = tensor_stack(size, width=WIDTH).to(dev).eval()
    s_train = copy.deepcopy(s_eval).train()
    x = torch.randn(BATCH, WIDTH, device=dev)
    mid = str((len(t) - 1) // 2)  # a block half-way down
    n_t, n_s = len(fd.state(t)), len(fd.state(s_eval))

    def mapping(s: nn.Module) -> fd.Mapping:
        return fd.Mapping(t, s).add(mid, mid).add("", "")

    f_eval = fd.distill(t, s_eval, mapping(s_eval))
    f_train = fd.distill(t, s_train, mapping(s_train), mutable=False)  # statistics dropped, on purpose
    f_mut = fd.distill(t, s_train, mapping(s_train), mutable=True)
    t_own, se_own, st_own = fd.state(t), fd.state(s_eval), fd.state(s_train)
    t_copy, se_copy, st_copy = _copies(t), _copies(s_eval), _copies(s_train)

    def plain(s: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                t(x)
            return s(x)

        return run

    # name -> (student mode, state passed, call, plain reference, swapped tensors)
    trained = _trained_buffers(s_train)
    rows: dict[str, tuple[str, str, Callable[[], Any], str, int]] = {
        "eval/in-call": ("eval", IN_CALL, lambda: f_eval(fd.state(t), fd.state(s_eval), x), "plain eval", 0),
        "eval/once": ("eval", MADE_ONCE, lambda: f_eval(t_own, se_own, x), "plain eval", 0),
        "eval/copies": ("eval", COPIES, lambda: f_eval(t_copy, se_copy, x), "plain eval", n_t + n_s),
        "train/in-call": (
            "train, mutable=False",
            IN_CALL,
            lambda: f_train(fd.state(t), fd.state(s_train), x),
            "plain train",
            trained,
        ),
        "train/once": ("train, mutable=False", MADE_ONCE, lambda: f_train(t_own, st_own, x), "plain train", trained),
        "train/copies": ("train, mutable=False", COPIES, lambda: f_train(t_copy, st_copy, x), "plain train", n_t + n_s),
        "train-mutable/in-call": (
            "train, mutable=True",
            IN_CALL,
            lambda: f_mut(fd.state(t), fd.state(s_train), x),
            "plain train",
            trained,
        ),
    }
    candidates: dict[str, Callable[[], Any]] = {"plain eval": plain(s_eval), "plain train": plain(s_train)}
    candidates.update({name: row[2] for name, row in rows.items()})
    notes = {name: _warned(row[2]) for name, row in rows.items()}  # none expected: a warning is timed too
    rounds, budget = _settings(cfg)
    inner = _inner(_per_call_s(list(candidates.values())), budget)
    times = paired_rounds(candidates, rounds=rounds, inner=inner, seed=cfg.seed, device=dev)
    plain_us = {k: 1e6 * statistics.median(times[k]) for k in ("plain eval", "plain train")}
    for name, (mode, passed, _, ref, swapped) in rows.items():
        d = _diff_us(times, name, ref)
        limit = goal_us(n_t + n_s, swapped)
        note = notes[name]
        sec.add(
            tensors=f"{n_t} + {n_s}",
            student=mode,
            state=passed,
            swapped=swapped,
            plain_us=round(plain_us[ref], 1),
            overhead_us=_us(d),
            overhead_median_us=round(d["median"], 2),
            target=f"<= {limit:g}",
            target_us=limit,
            met=verdict(d, limit),
            note="; ".join(note),
            teacher_tensors=n_t,
            student_tensors=n_s,
            rounds=rounds,
            inner=inner,
        )


def overhead_section(cfg: Any) -> Section:
    """Per-call overhead of a distill function against the plain forwards, by number of state tensors."""
    sec = Section(
        "Per-call overhead vs number of state tensors",
        ["tensors", "student", "state", "swapped", "plain_us", "overhead_us", "target", "met", "note"],
        intro=(
            "Teacher and student: `tensor_stack` models (tiny Linear-BatchNorm1d-ReLU blocks, width "
            f"{WIDTH}, batch {BATCH}: the arithmetic is negligible); `tensors` = len(state(teacher)) + "
            "len(state(student)). Teacher in eval mode. The call: `fn(teacher_state, student_state, x)` "
            "with `fn = distill(teacher, student, mapping)` (two pairs: a middle block and the outputs). "
            "`plain_us`: `with torch.no_grad(): teacher(x)` then `student(x)`, µs per call. "
            "`overhead_us`: median over paired rounds of (call - plain), µs per call, interquartile "
            "range in brackets. `state`: the state dicts are built by `funcdistill.state` inside the "
            "timed call (the docs' loop; their cost is part of the overhead), built once before it "
            "(the models' own tensors), or are copies made once, so that every tensor is swapped in. "
            "`swapped`: tensors that are not the models' own as they run (copies, and the buffers of "
            f"training-mode modules, which a call clones or swaps out). Target: <= {OVERHEAD_BASE_US:.0f} µs + "
            f"{OVERHEAD_PER_TENSOR_US} µs x tensors + {OVERHEAD_PER_SWAP_US:.0f} µs x swapped; `met` is `yes` "
            "only when the whole interquartile range is under it, `within noise of the goal` when the range "
            "straddles it. Each round runs each candidate for about "
            f"{1000 * OVERHEAD_ROUND_S:.0f} ms (10 calls at 800 + 800 tensors), so that a round times calls in a "
            "loop rather than the first call after another candidate's, which runs with cold caches. torch runs "
            "on one thread here."
        ),
    )
    with one_thread():
        for size in SIZES:
            _overhead_group(sec, size, cfg)
    sec.notes.append(
        "The `train` rows run the student in training mode (BatchNorm batch statistics; the plain "
        "forward updates the running statistics in place). `mutable=False` keeps no update: the call "
        "runs torch's BatchNorm without running statistics (swapped out, not cloned; the same batch "
        "statistics), and its `swapped` count still counts them; `mutable=True` clones them and returns "
        "them as (pairs, buffers) (the recommended `.backward()` loop then loads them into the "
        "student, which is not part of this timing; the step rows of the first table include it). "
        "The default, mutable=None, would warn at every such call."
    )
    if cfg.quick:
        sec.notes.append("--quick: few rounds, the overheads are rough.")
    return sec


def _bert() -> nn.Module | str:
    try:
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        return f"transformers is not installed ({exc})"
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return BertModel(config).eval()


def _hand_state(model: nn.Module) -> Callable[[], dict]:
    def run() -> dict:
        out = dict(model.named_parameters())
        out.update(model.named_buffers())
        return out

    return run


def state_section(cfg: Any) -> Section:
    """``funcdistill.state(model)`` per tensor, against the same dict built by hand."""
    sec = Section(
        "funcdistill.state(model): cost per tensor",
        ["model", "tensors", "modules", "us_per_tensor", "vs_named_tensors", "target", "met", "note"],
        intro=(
            "`us_per_tensor`: time of `funcdistill.state(model)` / len(result), µs, median over rounds "
            "(interquartile range in brackets). `vs_named_tensors`: ratio to "
            "`dict(model.named_parameters())` updated with `model.named_buffers()` (the same dict, "
            "by hand) in the same rounds. BERT: `transformers.BertModel` from a `BertConfig` "
            "(12 layers, hidden 64, 2 heads, intermediate 128, vocab 1000; no download). "
            "torch runs on one thread here."
        ),
    )
    models: list[tuple[str, nn.Module | str]] = [
        (f"tensor_stack({n})", tensor_stack(n, width=WIDTH).to(cfg.device)) for n in SIZES
    ]
    models.append(("BERT, 12 layers, hidden 64", _bert()))
    rounds, budget = _settings(cfg, "state")
    for label, model in models:
        if isinstance(model, str):
            sec.add(model=label, note=f"skipped: {model}")
            continue
        model = model.to(cfg.device)
        n = len(fd.state(model))
        candidates = {"state": lambda m=model: fd.state(m), "by hand": _hand_state(model)}
        with one_thread():
            inner = _inner(_per_call_s(list(candidates.values())), budget)
            times = paired_rounds(candidates, rounds=rounds, inner=inner, seed=cfg.seed, device=cfg.device)
        per = summary([1e6 * v / n for v in times["state"]])
        rel = summary([a / b for a, b in zip(times["state"], times["by hand"])])
        sec.add(
            model=label,
            tensors=n,
            modules=sum(1 for _ in model.modules()),
            us_per_tensor=_us(per, 2),
            us_per_tensor_median=round(per["median"], 3),
            vs_named_tensors=f"{rel['median']:.2f} ({rel['p25']:.2f}-{rel['p75']:.2f})",
            target=f"<= {STATE_TARGET_US}",
            target_us=STATE_TARGET_US,
            met=verdict(per, STATE_TARGET_US),
            rounds=rounds,
            inner=inner,
        )
    return sec
