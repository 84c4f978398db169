"""The benchmark's sections: each builds its models, measures, and returns a table.

Timings are always ratios against a hand-written reference measured in the
same rounds (:mod:`benchmarks.timing`); FLOPs and bytes are exact counts
(:mod:`benchmarks.costs`). A style that is missing here (an optional package,
a capability the installed funcdistill lacks) becomes a row with a note.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import funcdistill as fd
from benchmarks import costs, features
from benchmarks import steps as S
from benchmarks.losses import similarity_loss, step_loss
from benchmarks.models import mlp_student, mlp_teacher, n_params, resnet_student, resnet_teacher
from benchmarks.report import Section
from benchmarks.timing import paired_rounds, ratio, verdict

__all__ = [
    "Config",
    "compile_section",
    "flops_section",
    "precision_section",
    "saved_bytes_section",
    "timing_section",
    "truncation_section",
    "vmap_section",
]

STOP_AFTER = "layer2"  # the truncation point: stage 2 of 4


@dataclass
class Config:
    """Sizes and repetitions of one run (``quick`` shrinks them)."""

    quick: bool = False
    device: str = "cpu"
    seed: int = 0

    @property
    def cnn_batches(self) -> tuple[int, ...]:
        return (8,) if self.quick else (8, 64)

    @property
    def big_batch(self) -> int:
        """Batch of the truncation and precision sections."""
        return 8 if self.quick else 64

    mlp_batch: int = 64
    vmap_ks: tuple[int, ...] = (4, 8, 16)

    def repeats(self, kind: str) -> tuple[int, int]:
        """``(rounds, inner calls)`` for a kind of step."""
        table = {
            "cnn8": (5, 1) if self.quick else (21, 2),
            "cnn64": (5, 1) if self.quick else (13, 1),
            "mlp": (5, 5) if self.quick else (31, 30),
            "vmap": (5, 3) if self.quick else (21, 10),
        }
        return table[kind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "device": self.device,
            "seed": self.seed,
            "cnn_batches": list(self.cnn_batches),
            "big_batch": self.big_batch,
            "mlp_batch": self.mlp_batch,
            "vmap_ks": list(self.vmap_ks),
        }


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"


def _met(value: float | None, limit: float | None) -> str:
    """``yes``/``no`` for an exact figure (a count) against ``<= limit``."""
    if value is None or limit is None:
        return ""
    return "yes" if value <= limit else "no"


def _timed_met(r: dict[str, float], limit: float | None) -> str:
    """A timed ratio against ``<= limit``: ``yes``/``no``, or within noise when its IQR straddles the goal."""
    return "" if limit is None else verdict(r, limit)


CNN32 = 32  # width of both models in the "CNN width 32" scenario


def _cnn_case(batch: int, cfg: Config, widths: tuple[int, int] | None = None) -> S.Case:
    """The CNN pair (teacher width 64, student width 16 unless ``widths``), teacher eval, student train."""
    torch.manual_seed(cfg.seed)
    dev = cfg.device
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    t, s = (
        (resnet_teacher(), resnet_student())
        if widths is None
        else (resnet_teacher(widths[0]), resnet_student(widths[1]))
    )
    return S.Case(t.to(dev), s.to(dev), x, y, point="layer2")


def _mlp_case(cfg: Config, student: torch.nn.Module | None = None) -> S.Case:
    torch.manual_seed(cfg.seed)
    dev = cfg.device
    x = torch.randn(cfg.mlp_batch, 64, device=dev)
    y = torch.randint(0, 10, (cfg.mlp_batch,), device=dev)
    return S.Case(mlp_teacher().to(dev), (student or mlp_student()).to(dev), x, y, point="body")


def _runnable(style: Any) -> Callable[[], None] | str:
    if isinstance(style, str):
        return style
    if isinstance(style, S.Style):
        return style.step
    return style


def _measure(
    sec: Section,
    scenario: str,
    styles: dict[str, Any],
    reference: str,
    cfg: Config,
    kind: str,
    targets: dict[str, float],
    extra: Callable[[dict], dict] | None = None,
) -> dict:
    """Time the runnable styles together; add a row per style to ``sec``."""
    runnable = {name: _runnable(s) for name, s in styles.items()}
    timed = {name: fn for name, fn in runnable.items() if not isinstance(fn, str)}
    rounds, inner = cfg.repeats(kind)
    times = paired_rounds(timed, rounds=rounds, inner=inner, seed=cfg.seed, device=cfg.device)
    for name, fn in runnable.items():
        if isinstance(fn, str):
            sec.add(scenario=scenario, style=name, note=f"skipped: {fn}")
            continue
        r = ratio(times, name, reference)
        row = dict(
            scenario=scenario,
            style=name,
            ratio=_fmt(r),
            median=r["median"],
            target=f"<= {targets[name]:.2f}" if name in targets else "",
            met=_timed_met(r, targets.get(name)),
            reference_ms=round(1000 * sorted(times[reference])[len(times[reference]) // 2], 3),
        )
        if extra:
            row.update(extra({"times": times, "name": name}))
        sec.add(**row)
    return times


def _check_losses(sec: Section, scenario: str, styles: dict[str, Any], reference: str) -> None:
    """Note any style whose loss differs from the reference's (they must all agree), or that warns."""
    ref = styles[reference].loss().detach()
    for name, style in styles.items():
        if isinstance(style, S.Style):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = style.loss().detach()
            if not torch.allclose(value, ref, rtol=1e-4, atol=1e-5):
                sec.notes.append(
                    f"{scenario}: {name} computes loss {float(value):.6f}, the reference {float(ref):.6f}."
                )
            for w in {str(w.message): w for w in caught}.values():
                sec.notes.append(f"{scenario}: {name} warns ({w.category.__name__}: {str(w.message)[:200]}).")


FLOOR = "hand-written floor"
HOOKS = "plain forward hooks"
COMPAT = "funcdistill.compat shim"
FD_BACKWARD = "funcdistill fn + .backward()"


def timing_section(cfg: Config) -> Section:
    """Every style of step on the CNN (each batch) and on the MLP, as ratios to the floor."""
    sec = Section(
        "Step time, relative to the hand-written floor",
        ["scenario", "style", "ratio", "target", "met", "note"],
        intro=(
            "Median over paired rounds of (style time / floor time in the same round); "
            "in brackets the interquartile range over rounds. A step is zero_grad, "
            "forward of both models, loss (feature pair + logits KD + cross-entropy), "
            "backward; no optimizer step. The floor: the models return their features, "
            "the teacher runs under `torch.no_grad()`. Teacher in eval mode, student in "
            "training mode. `CNN batch N`: ResNet-18-like teacher (width 64), student at "
            f"width 16; `CNN width {CNN32}`: teacher and student both at width {CNN32}."
        ),
    )
    scenarios = [(f"CNN batch {b}", lambda b=b: _cnn_case(b, cfg), f"cnn{b}", 1.05, True) for b in cfg.cnn_batches]
    scenarios.insert(1, (f"CNN width {CNN32}, batch 8", lambda: _cnn_case(8, cfg, (CNN32, CNN32)), "cnn8", 1.05, False))
    scenarios.append((f"MLP batch {cfg.mlp_batch}", lambda: _mlp_case(cfg), "mlp", 1.10, True))
    if cfg.quick:
        sec.notes.append("--quick: CNN batch 64 skipped.")
    for scenario, make, kind, limit, every_style in scenarios:
        case = make()
        with case.exits:
            styles = {
                FLOOR: S.floor_loss(case),
                HOOKS: S.hooks_loss(case),
                "torchdistill ForwardHookManager": S.torchdistill_loss(case),
                COMPAT: S.compat_loss(case),
                FD_BACKWARD: S.funcdistill_loss(case),
                "funcdistill fn + torch.func.grad": S.funcdistill_grad_step(case),
                "forgotten no_grad teacher": S.forgotten_nograd_loss(case),
            }
            if not every_style:  # the target row and its closest references only
                styles = {k: v for k, v in styles.items() if k in (FLOOR, HOOKS, COMPAT, FD_BACKWARD)}
            _check_losses(sec, scenario, styles, FLOOR)
            times = _measure(sec, scenario, styles, FLOOR, cfg, kind, {FD_BACKWARD: limit})
            if COMPAT in times and HOOKS in times:
                r = ratio(times, COMPAT, HOOKS)
                for row in sec.rows:
                    if row["scenario"] == scenario and row["style"] == COMPAT:
                        row["vs_hooks"] = r["median"]
                        row["note"] = f"{_fmt(r)} x plain hooks (target <= 1.03: {_timed_met(r, 1.03)})"
    sec.notes.append(
        "funcdistill fn + .backward() is the recommended loop: fn(state(teacher), state(student), x) "
        "each step. With a BatchNorm student in training mode (the CNNs) fn is built with "
        "mutable=True, returns (pairs, buffers), and after backward "
        "student.load_state_dict(buffers.student, strict=False) keeps the running statistics, "
        "as the floor's plain train-mode forward does; that call is inside the timed step. "
        "The MLP has no buffers: plain fn. The torch.func.grad row threads the buffers through "
        "the step (mutable=True) instead."
    )
    return sec


def truncation_section(cfg: Config) -> Section:
    """The teacher stopped after stage 2 of 4, hand-written and with funcdistill."""
    b = cfg.big_batch
    sec = Section(
        f"Teacher truncation (CNN batch {b}, teacher stops after {STOP_AFTER!r})",
        ["style", "ratio", "vs_full_floor", "target", "met", "note"],
        intro=(
            "Loss: the feature pair at `layer2` plus the student's cross-entropy. `ratio` is "
            "relative to a hand-written truncated teacher (`forward_features(x, stop_after="
            "'layer2')`); `vs_full_floor` relative to the same loss with a full teacher forward."
        ),
    )
    case = _cnn_case(b, cfg)
    trunc = "hand-written truncated teacher"
    full = "hand-written, full teacher forward"
    styles = {
        trunc: S.truncated_floor_loss(case, STOP_AFTER),
        full: S.full_teacher_truncated_loss(case, STOP_AFTER),
        "funcdistill truncate=True": S.truncated_funcdistill_loss(case, STOP_AFTER),
        "funcdistill, same mapping, no truncation": S.truncated_funcdistill_loss(case, STOP_AFTER, truncate=False),
    }
    _check_losses(sec, "truncation", styles, trunc)

    def vs_full(ctx: dict) -> dict:
        return {"vs_full_floor": _fmt(ratio(ctx["times"], ctx["name"], full))}

    _measure(sec, "truncation", styles, trunc, cfg, f"cnn{b}", {"funcdistill truncate=True": 1.02}, vs_full)
    return sec


def flops_section(cfg: Config) -> Section:
    """Teacher FLOPs in a step: full, truncated, and the hand-written prefix."""
    sec = Section(
        "Teacher FLOPs (CNN batch 8, forward, FlopCounterMode)",
        ["what", "flops", "x_prefix", "target", "met", "note"],
        intro=(
            "Teacher FLOPs inside a funcdistill call are the call's FLOPs minus the student "
            "forward's. `x_prefix`: relative to the hand-written teacher prefix up to "
            f"{STOP_AFTER!r}."
        ),
    )
    case = _cnn_case(8, cfg)
    t, s, x = case.teacher, case.student, case.x
    with torch.no_grad():
        full = costs.flops(lambda: t(x))
        prefix = costs.flops(lambda: t.forward_features(x, stop_after=STOP_AFTER))
        student = costs.flops(lambda: s(x))
    step_total = costs.flops(S.floor_loss(case).step)
    sec.add(what="teacher, full forward", flops=full, x_prefix=round(full / prefix, 3))
    sec.add(what=f"teacher prefix up to {STOP_AFTER!r} (hand-written)", flops=prefix, x_prefix=1.0)
    sec.add(what="student forward", flops=student)
    sec.add(
        what="floor step, forward + backward of both",
        flops=step_total,
        note=f"the teacher is {100 * full / step_total:.0f}% of it",
    )
    mapping = S.truncated_mapping(case, STOP_AFTER)
    support = features.truncate_support()
    # mutable=False: the student's training-mode BatchNorm updates are not needed here
    fn_full = fd.distill(t, s, mapping, mutable=False, **({"truncate": False} if support is True else {}))
    in_call = costs.flops(lambda: fn_full(fd.state(t), fd.state(s), x)) - student
    sec.add(what="teacher in a funcdistill call, no truncation", flops=in_call, x_prefix=round(in_call / prefix, 3))
    name = "teacher in a funcdistill call, truncate=True"
    if support is not True:
        sec.add(what=name, note=f"skipped: {support}")
    else:
        fn = fd.distill(t, s, mapping, truncate=True, mutable=False)
        for which in ("first call", "later calls"):
            trunc = costs.flops(lambda: fn(fd.state(t), fd.state(s), x)) - student
            sec.add(
                what=f"{name}, {which}",
                flops=trunc,
                x_prefix=round(trunc / prefix, 3),
                target="within 1%",
                met="yes" if abs(trunc / prefix - 1) <= 0.01 else "no",
            )
    return sec


def saved_bytes_section(cfg: Config) -> Section:
    """Bytes saved for backward by each kind of step."""
    sec = Section(
        "Bytes saved for backward (saved_tensors_hooks)",
        ["case", "what", "total", "activations", "x_student_alone", "teacher_bytes", "target", "met"],
        intro=(
            "Each storage counted once. `total` counts every saved storage; `activations` "
            "leaves out the models' own parameters and buffers. `teacher_bytes` = total "
            "minus the student-alone step's total (the student's forward and the loss, with "
            "the teacher's outputs computed beforehand)."
        ),
    )
    for label, case in (("CNN batch 8", _cnn_case(8, cfg)), (f"MLP batch {cfg.mlp_batch}", _mlp_case(cfg))):
        models = (case.teacher, case.student)
        weights = [t for m in models for t in (*m.parameters(), *m.buffers())]
        alone = costs.saved_bytes(S.student_alone_loss(case).loss, exclude=weights)
        rows: list[tuple[str, Any, str]] = [
            ("student alone + loss", None, ""),
            (FLOOR, S.floor_loss(case), ""),
            ("funcdistill step", S.funcdistill_loss(case), "0"),
            ("funcdistill step, nograd_teacher=False", S.funcdistill_loss(case, nograd_teacher=False), ""),
            ("forgotten no_grad teacher", S.forgotten_nograd_loss(case), ""),
        ]
        if case.point == "layer2":
            rows.insert(3, ("funcdistill step, truncate=True", S.truncated_funcdistill_loss(case, STOP_AFTER), "0"))
        for what, style, target in rows:
            if isinstance(style, str):
                sec.add(case=label, what=what, target=f"skipped: {style}")
                continue
            got = alone if style is None else costs.saved_bytes(style.loss, exclude=weights)
            teacher = got["total"] - alone["total"]
            if what == "funcdistill step, truncate=True":
                # its loss has no logits pair: compare with the hand-written truncated step
                ref = costs.saved_bytes(S.truncated_floor_loss(case, STOP_AFTER).loss, exclude=weights)
                teacher = got["total"] - ref["total"]
            sec.add(
                case=label,
                what=what,
                total=got["total"],
                activations=got["activations"],
                x_student_alone=round(got["total"] / alone["total"], 2),
                teacher_bytes=teacher,
                target=target and f"teacher {target}",
                met=_met(teacher, 0) if target else "",
            )
    sec.notes.append(
        "The funcdistill rows' `activations` exceed the floor's by the student's BatchNorm running "
        "statistics: in training mode they are cloned (the caller's buffers are never updated in "
        "place) and batch_norm saves the clone. `total` is the same."
    )
    sec.notes.append("The truncated row's teacher_bytes compares with the hand-written truncated step (same loss).")
    return sec


def _vmap_group(
    sec: Section,
    label: str,
    k: int,
    case: S.Case,
    students: list,
    cfg: Config,
    kind: str,
    limit: float | None,
    *,
    compiled: bool = False,
) -> None:
    """Rows for K students of ``case`` trained in one step: two loops and one vmap (``compiled``: and the
    same vmap step under ``torch.compile(fullgraph=True)``)."""
    t, x, y = case.teacher, case.x, case.y
    fn = fd.distill(t, students[0], case.mapping(t, students[0]), mutable=True)
    t_state = fd.state(t)

    def loss(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor):
        pairs, new = fn(t_state, {**params, **buffers}, x)
        return step_loss(pairs, pairs[-1].student, y), new.student

    grad = torch.func.grad(loss, has_aux=True)
    params, buffers = torch.func.stack_module_state(students)
    stacked = [{n: v.detach() for n, v in params.items()}, {n: v.clone() for n, v in buffers.items()}]
    each = [
        [{n: v.detach() for n, v in st.named_parameters()}, {n: v.clone() for n, v in st.named_buffers()}]
        for st in students
    ]
    vgrad = torch.func.vmap(grad, in_dims=(0, 0, None, None))

    def hand_loop() -> None:
        with torch.no_grad():
            tf = t.forward_features(x)
        for st in students:
            st.zero_grad(set_to_none=True)
            sf = st.forward_features(x)
            step_loss(case.pairs(tf, sf), sf[""], y).backward()

    def fd_loop() -> None:
        for state in each:
            _, new = grad(state[0], state[1], x, y)
            state[1] = {**state[1], **new}

    def fd_vmap() -> None:
        _, new = vgrad(stacked[0], stacked[1], x, y)
        stacked[1] = {**stacked[1], **new}

    plain_vmap, plain_run = S.torch_func_vmap_step(case, students[0], stacked)
    g_v, _ = vgrad(stacked[0], stacked[1], x, y)
    g_l, _ = grad(each[-1][0], each[-1][1], x, y)
    diff = max(float((g_v[n][-1] - g_l[n]).abs().max()) for n in g_l)
    g_p, _ = plain_run()
    diff_plain = max(float((g_p[n] - g_v[n]).abs().max()) for n in g_v)
    styles = {
        "hand-written loop": hand_loop,
        "funcdistill loop": fd_loop,
        "torch.func vmap, no funcdistill": plain_vmap,
        "funcdistill vmap": fd_vmap,
    }
    compiled_note = ""
    if compiled:
        step, compiled_note = _compiled_vmap(vgrad, stacked, x, y, g_v)
        if step is None:
            sec.add(students=label, K=k, style="funcdistill vmap, compiled", note=compiled_note)
        else:
            styles["funcdistill vmap, compiled"] = step
    rounds, inner = cfg.repeats(kind)
    times = paired_rounds(styles, rounds=rounds, inner=inner, seed=cfg.seed, device=cfg.device)
    for name in styles:
        a = ratio(times, name, "hand-written loop")
        b = ratio(times, name, "funcdistill loop")
        row = dict(students=label, K=k, style=name, vs_handwritten_loop=_fmt(a), vs_funcdistill_loop=_fmt(b))
        if name == "funcdistill vmap":
            floor = ratio(times, name, "torch.func vmap, no funcdistill")
            row.update(
                target=f"<= {limit:.2f} x hand-written loop" if limit else "",
                met=_timed_met(a, limit),
                note=f"max |grad(vmap) - grad(loop)| = {diff:.1e}; {_fmt(floor)} x torch.func vmap's time",
            )
        elif name == "torch.func vmap, no funcdistill":
            row.update(note=f"max |grad - grad(funcdistill vmap)| = {diff_plain:.1e}")
        elif name == "funcdistill vmap, compiled":
            row.update(
                target=f"<= {limit:.2f} x hand-written loop" if limit else "",
                met=_timed_met(a, limit),
                note=compiled_note,
            )
        sec.add(**row)


def _compiled_vmap(
    vgrad: Callable, stacked: list, x: torch.Tensor, y: torch.Tensor, reference: dict
) -> tuple[Callable[[], None] | None, str]:
    """The vmapped step under ``torch.compile(fullgraph=True)``, compiled cold now, and a note on it.

    Returns ``(None, why)`` where it does not compile. ``reference``: the eager
    step's gradients, which the note compares with the compiled step's.
    """
    import torch._inductor.config as inductor_config

    cgrad = torch.compile(vgrad, fullgraph=True)
    start = time.perf_counter()
    try:
        with inductor_config.patch(force_disable_caches=True):  # a cold compile, not a cache hit
            grads, _ = cgrad(stacked[0], stacked[1], x, y)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    first = time.perf_counter() - start
    diff = max(float((grads[n] - reference[n]).abs().max()) for n in reference)

    def step() -> None:
        _, new = cgrad(stacked[0], stacked[1], x, y)
        stacked[1] = {**stacked[1], **new}

    return (
        step,
        f"max |grad - grad(funcdistill vmap)| = {diff:.1e}; first call {first:.1f} s (compiling, caches disabled)",
    )


def vmap_section(cfg: Config) -> Section:
    """K students distilled from one teacher in one vmapped step, against Python loops."""
    sec = Section(
        "vmap over K stacked students",
        ["students", "K", "style", "vs_handwritten_loop", "vs_funcdistill_loop", "target", "met", "note"],
        intro=(
            "One step trains K students. Hand-written loop: the teacher runs once under no_grad, "
            "then K student forward+backward. funcdistill loop: K `torch.func.grad` calls of the "
            "distill step (BatchNorm buffers threaded with `mutable=True`). vmap: "
            "`vmap(grad(loss), in_dims=(0, 0, None, None))` over `stack_module_state` students; "
            "the teacher's state and the batch are not batched, so the teacher runs once. torch.func "
            "vmap, no funcdistill: the same step with `torch.func.functional_call` on the student and "
            "the teacher's `forward_features` under `no_grad` inside the vmapped loss, the floor of "
            "vmap itself. funcdistill vmap, compiled (MLP groups, not with --quick): the same vmapped "
            "step under `torch.compile(fullgraph=True)`, compiled before the rounds (its first call in "
            "the note); the loops stay eager."
        ),
    )
    limits = {8: 0.5, 16: 1 / 3}
    for k in cfg.vmap_ks:
        torch.manual_seed(cfg.seed)
        students = [mlp_student().to(cfg.device) for _ in range(k)]
        case = _mlp_case(cfg, student=students[0])
        label = f"MLP, batch {cfg.mlp_batch}"
        _vmap_group(sec, label, k, case, students, cfg, "vmap", limits.get(k), compiled=not cfg.quick)
    if cfg.quick:
        sec.notes.append("--quick: the CNN group is skipped.")
    else:
        case = _cnn_case(8, cfg)
        torch.manual_seed(cfg.seed)
        students = [case.student] + [resnet_student().to(cfg.device).train() for _ in range(3)]
        _vmap_group(sec, "CNN with BatchNorm, batch 8", 4, case, students, cfg, "cnn8", None)
    sec.notes.append(
        "`met` compares the vmap step, eager and compiled, with the hand-written `.backward()` loop "
        "over the K students (the goal: 2x faster at K = 8, 3x at K = 16). The eager vmap step is "
        "bounded by torch.func's own vmap (the `no funcdistill` row): funcdistill adds nothing "
        "measurable to it."
    )
    return sec


def compile_section(cfg: Config) -> Section:
    """A whole functional MLP step under torch.compile(fullgraph=True)."""
    sec = Section(
        f"torch.compile of a whole step (MLP batch {cfg.mlp_batch}, fullgraph=True)",
        ["what", "value", "target", "met", "note"],
        intro=(
            "The step: `torch.func.grad_and_value` of (distill fn + loss) with respect to the "
            "student's parameters. Graph breaks from `torch._dynamo.explain`; compile time is the "
            "first call of the compiled step; ratios are against the eager hand-written floor "
            "(`.backward()`), in paired rounds."
        ),
    )
    if cfg.quick:
        sec.add(what="compile", note="skipped under --quick")
        return sec
    case = _mlp_case(cfg)
    t, s, x, y = case.teacher, case.student, case.x, case.y
    fn = fd.distill(t, s, case.mapping(t, s))

    def loss(params: dict, t_state: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pairs = fn(t_state, params, x)
        return step_loss(pairs, pairs[-1].student, y)

    def step(params: dict, t_state: dict, x: torch.Tensor, y: torch.Tensor):
        return torch.func.grad_and_value(loss)(params, t_state, x, y)

    params = {n: v.detach() for n, v in s.named_parameters()}
    t_state = {n: v.detach() for n, v in fd.state(t).items()}
    explained = costs.graph_breaks(step, params, t_state, x, y)
    sec.add(what="graphs", value=explained["graphs"], target="1", met="yes" if explained["graphs"] == 1 else "no")
    sec.add(
        what="graph breaks",
        value=explained["graph_breaks"],
        target="0",
        met="yes" if explained["graph_breaks"] == 0 else "no",
        note="; ".join(explained["reasons"])[:300],
    )
    truncated = _truncated_step_breaks(case)
    sec.add(
        what="graph breaks, truncated teacher (compiled before any eager call)",
        value=truncated["graph_breaks"],
        target="0",
        met="yes" if truncated["graph_breaks"] == 0 else "no",
        note="; ".join(truncated["reasons"])[:300],
    )
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    import torch._inductor.config as inductor_config

    start = time.perf_counter()
    try:
        with inductor_config.patch(force_disable_caches=True):  # a cold compile, not a cache hit
            g_c, v_c = compiled(params, t_state, x, y)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        sec.add(what="compile", note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
        return sec
    sec.add(
        what="compile time (s)", value=round(time.perf_counter() - start, 1), note="first call, compile caches disabled"
    )
    g_e, v_e = step(params, t_state, x, y)
    diff = max(float((g_c[n] - g_e[n]).abs().max()) for n in g_e)
    sec.add(
        what="max |grad compiled - grad eager|", value=f"{diff:.1e}", note=f"loss {float(v_c):.6f} vs {float(v_e):.6f}"
    )
    styles = {
        FLOOR: S.floor_loss(case).step,
        "funcdistill grad step, eager": lambda: step(params, t_state, x, y),
        "funcdistill grad step, compiled": lambda: compiled(params, t_state, x, y),
    }
    rounds, inner = cfg.repeats("mlp")
    times = paired_rounds(styles, rounds=rounds, inner=inner, seed=cfg.seed, device=cfg.device)
    for name in list(styles)[1:]:
        r = ratio(times, name, FLOOR)
        lim = 1.0 if name.endswith("compiled") else None
        sec.add(what=f"{name} / eager floor", value=_fmt(r), target="<= 1.00" if lim else "", met=_timed_met(r, lim))
    torch._dynamo.reset()
    return sec


def _truncated_step_breaks(case: S.Case) -> dict:
    """``explain`` of a step whose mapping stops the teacher after ``body``."""
    t, s, x, y = case.teacher, case.student, case.x, case.y
    mapping = fd.Mapping(t, s).add("body", "body", similarity_loss).add("body", "", None)
    fn = fd.distill(t, s, mapping)

    def loss(params: dict, t_state: dict) -> torch.Tensor:
        pairs = fn(t_state, params, x)
        return step_loss(pairs, pairs[-1].student, y)

    def step(params: dict, t_state: dict):
        return torch.func.grad_and_value(loss)(params, t_state)

    params = {n: v.detach() for n, v in s.named_parameters()}
    t_state = {n: v.detach() for n, v in fd.state(t).items()}
    return costs.graph_breaks(step, params, t_state)  # no eager call first: truncated from the first trace


def _teacher_bytes(model: torch.nn.Module, x: torch.Tensor, *, autocast: bool = False) -> int:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return costs.allocated_bytes(lambda: model(x))


def precision_section(cfg: Config) -> Section:
    """The teacher in bfloat16 while the student trains in float32."""
    b = cfg.big_batch
    sec = Section(
        f"Teacher precision (CNN batch {b})",
        ["style", "ratio", "teacher_weight_bytes", "teacher_forward_bytes", "note"],
        intro=(
            "`ratio`: step time relative to the float32 hand-written floor, paired rounds. "
            "`teacher_forward_bytes`: bytes of the new tensors the teacher's forward produces "
            "(a measure of its memory traffic). Pairs reach the loss in float32."
        ),
    )
    case = _cnn_case(b, cfg)
    t, s, x, y = case.teacher, case.student, case.x, case.y
    t16 = copy.deepcopy(t).to(torch.bfloat16)
    weight32 = sum(p.numel() * p.element_size() for p in (*t.parameters(), *t.buffers()))
    weight16 = sum(p.numel() * p.element_size() for p in (*t16.parameters(), *t16.buffers()))

    def floor_with(teacher_features: Callable[[], dict]) -> S.Style:
        def loss() -> torch.Tensor:
            with torch.no_grad():
                tf = {k: v.float() for k, v in teacher_features().items()}
            sf = s.forward_features(x)
            return step_loss(case.pairs(tf, sf), sf[""], y)

        return S.Style(loss, (s,))

    def autocast_features() -> dict:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return t.forward_features(x)

    styles: dict[str, Any] = {
        "float32 floor": S.floor_loss(case),
        "hand-written, bf16 teacher weights": floor_with(lambda: t16.forward_features(x.to(torch.bfloat16))),
        "hand-written, teacher under bf16 autocast": floor_with(autocast_features),
    }
    keyword = features.precision_keyword()
    fd_cast = "funcdistill teacher_dtype=bf16, float32 teacher state"
    fd_once = "funcdistill teacher_dtype=bf16, teacher state cast once"
    if keyword is None:
        styles[fd_cast] = styles[fd_once] = "funcdistill.distill has no teacher-precision keyword in this version"
    else:
        t_state16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fd.state(t).items()}
        for name, t_state in ((fd_cast, None), (fd_once, t_state16)):
            try:
                styles[name] = S.funcdistill_loss(case, teacher_state=t_state, **{keyword: torch.bfloat16})
                styles[name].loss()
            except (TypeError, ValueError, RuntimeError) as exc:
                styles[name] = f"distill({keyword}=torch.bfloat16) failed: {type(exc).__name__}: {exc}"
    _measure(sec, "precision", styles, "float32 floor", cfg, f"cnn{b}", {})
    for row in sec.rows:
        name = row["style"]
        if name == "float32 floor":
            row.update(teacher_weight_bytes=weight32, teacher_forward_bytes=_teacher_bytes(t, x))
        elif name == "hand-written, bf16 teacher weights":
            row.update(teacher_weight_bytes=weight16, teacher_forward_bytes=_teacher_bytes(t16, x.to(torch.bfloat16)))
        elif name == "hand-written, teacher under bf16 autocast":
            row.update(teacher_weight_bytes=weight32, teacher_forward_bytes=_teacher_bytes(t, x, autocast=True))
        elif name == fd_once and "note" not in row:
            row.update(teacher_weight_bytes=weight16)
        elif name == fd_cast and "note" not in row:
            row.update(teacher_weight_bytes=weight32, note="the float32 state is cast to bf16 at every call")
        row.pop("scenario", None)
    sec.notes.append(
        "teacher_forward_bytes is measured for the hand-written teachers (the same layers run inside "
        "funcdistill). "
        f"bf16 losses differ from float32 by rounding; the student has {n_params(s):,} parameters, "
        f"the teacher {n_params(t):,}."
    )
    return sec
