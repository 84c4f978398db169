"""FSDP2-sharded teacher and student on 1, 2 and 4 CPU processes (gloo): memory and step time.

Each world size runs in its own process group (``torch.multiprocessing.spawn``).
Both models are MLP stacks sharded as FSDP2's docs show (each block a unit,
then the root). Two styles, with the same sharding and the same loss:

* **funcdistill**: ``loss(fn(state(teacher), state(student), x)).backward()``
  and an SGD step on the sharded student;
* **FSDP2 by hand**: forward hooks on the mapped blocks, ``teacher(x)`` under
  ``no_grad``, ``student(x)``, the same loss, ``.backward()``, SGD.

Memory: the teacher parameter bytes a rank holds during a step, as its shards
(exact) plus how far the process's resident memory rises above its level
before the step (Linux ``VmHWM`` after ``/proc/self/clear_refs``, with large
allocations unmapped as soon as they are freed), in a step whose student is
one small unsharded layer and whose batch is 2 rows, so that the gathered
teacher parameters are nearly all of it. Bytes an
FSDP2 teacher keeps unsharded between steps (FSDP2 does not reshard its root
after a forward outside backward) are counted as held at the start.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import funcdistill as fd
from benchmarks.report import Section
from benchmarks.timing import paired_rounds, ratio

__all__ = ["distributed_section", "tensor_parallel_section"]

WORLDS = (1, 2, 4)
IN, OUT = 64, 32
TEACHER = (1024, 8)  # width, blocks
STUDENT = (512, 4)
STEP_TARGET = 1.10


class Stack(nn.Module):
    """An input layer, ``depth`` blocks (the FSDP units) and an output layer (the root unit's own)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(IN, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.out = nn.Linear(width, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _peak_growth(step, repeats: int = 3) -> int:
    """How far the process's resident memory rose above its level before ``step()``, at its highest.

    The largest of ``repeats`` steps (gloo's collectives do not allocate the same on every call).

    Linux only: ``/proc/self/clear_refs`` resets the high-water mark. Allocations of 64 KiB or
    more are mapped and unmapped one by one (see :func:`_exact_malloc`), so a freed tensor
    leaves the resident set at once.
    """
    peak = 0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        step()
        peak = max(peak, _status("VmHWM") - before)
    return peak


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _exact_malloc() -> None:
    """A fixed mmap threshold (64 KiB) for glibc: large blocks go back to the system when freed."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _loss(t_mid, s_mid, t_out, s_out) -> torch.Tensor:
    return (t_mid[..., : s_mid.shape[-1]] - s_mid).pow(2).mean() + (t_out - s_out).pow(2).mean()


class _ByHand:
    """FSDP2's own forward/backward: hooks on the live sharded models."""

    def __init__(self, teacher: nn.Module, student: nn.Module, t_point: str, s_point: str | None):
        self.teacher, self.student, self.seen = teacher, student, {}
        teacher.get_submodule(t_point).register_forward_hook(lambda m, i, o: self.seen.__setitem__("t", o))
        if s_point is not None:
            student.get_submodule(s_point).register_forward_hook(lambda m, i, o: self.seen.__setitem__("s", o))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_out = self.teacher(x)
        s_out = self.student(x)
        return _loss(self.seen["t"], self.seen.get("s", s_out), t_out, s_out)


def _funcdistill(teacher: nn.Module, student: nn.Module, t_point: str, s_point: str | None):
    mapping = fd.Mapping().add(t_point, s_point if s_point is not None else "").add("", "")
    fn = fd.distill(teacher, student, mapping)

    def loss(x: torch.Tensor) -> torch.Tensor:
        (t_mid, s_mid, _), (t_out, s_out, _) = fn(fd.state(teacher), fd.state(student), x)
        return _loss(t_mid, s_mid, t_out, s_out)

    return loss


def _stepper(loss_fn, student: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def step() -> float:
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return step


def _memory(rank: int, world: int) -> dict[str, Any]:
    """Teacher bytes per rank in a step dominated by the teacher (tiny student, batch 2)."""
    torch.manual_seed(0)
    base = Stack(*TEACHER).eval()
    unit = max(_bytes(b.parameters()) for b in base.blocks)
    root = _bytes([*base.inp.parameters(), *base.out.parameters()])
    whole = _bytes(base.parameters())
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(rank))
    out = {"teacher_bytes": whole, "unit_bytes": max(unit, root), "goal": whole // world + max(unit, root)}
    point = f"blocks.{TEACHER[1] - 1}.0"
    for style in ("funcdistill", "FSDP2 by hand"):
        teacher, student = _shard(copy.deepcopy(base)), nn.Linear(IN, OUT)
        if style == "funcdistill":
            loss_fn = _funcdistill(teacher, student, point, None)
        else:
            loss_fn = _ByHand(teacher, student, point, None).loss
        step = _stepper(loss_fn, student, x)
        step()  # FSDP2's lazy init; funcdistill's dry run
        held = _bytes(teacher.parameters())  # shards, and FSDP2's root left unsharded by the last forward
        dist.barrier()
        out[style] = {"held": held, "growth": _max_over_ranks(_peak_growth(step))}
    biggest = max(base.blocks, key=lambda b: _bytes(b.parameters()))[0].weight
    out["gather alone"] = _max_over_ranks(_gather_alone(biggest, world))
    return out


def _gather_alone(weight: torch.Tensor, world: int) -> int:
    """The same measure for one all-gather of a unit's weight by itself (the collective's own cost)."""
    rows = -(-weight.shape[0] // world)
    part = weight.detach()[:rows].contiguous()

    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # as funcdistill calls it

    def gather() -> None:
        out = part.new_empty((world * rows, *part.shape[1:]))
        collective(out, part)

    gather()
    return _peak_growth(gather)


def _max_over_ranks(n: int) -> int:
    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _timing(rank: int, world: int, rounds: int, inner: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base_t, base_s = Stack(*TEACHER).eval(), Stack(*STUDENT)
    x = torch.randn(16, IN, generator=torch.Generator().manual_seed(rank))
    t_point, s_point = f"blocks.{TEACHER[1] // 2 - 1}", f"blocks.{STUDENT[1] // 2 - 1}"
    steps, losses = {}, {}
    for style in ("funcdistill", "FSDP2 by hand"):
        teacher, student = _shard(copy.deepcopy(base_t)), _shard(copy.deepcopy(base_s))
        if style == "funcdistill":
            loss_fn = _funcdistill(teacher, student, t_point, s_point)
        else:
            loss_fn = _ByHand(teacher, student, t_point, s_point).loss
        steps[style] = _stepper(loss_fn, student, x)
        losses[style] = steps[style]()
    times = paired_rounds(steps, rounds=rounds, inner=inner, warmup=1)
    return {
        "ratio": ratio(times, "funcdistill", "FSDP2 by hand"),
        "ms": {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()},
        "loss_diff": abs(losses["funcdistill"] - losses["FSDP2 by hand"]),
    }


def _worker(rank: int, world: int, port: int, out: str, rounds: int, inner: int) -> None:
    torch.set_num_threads(1)
    _exact_malloc()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {"memory": _memory(rank, world), "timing": _timing(rank, world, rounds, inner)}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, rounds: int, inner: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.spawn(_worker, args=(world, _free_port(), out, rounds, inner), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _note(world: int, growth: int, alone: int, loss_diff: float) -> str:
    above = f"{_mb(growth - alone)} MiB above one all-gather alone; " if world > 1 else "no collective on one rank; "
    return above + f"first-step loss differs by {loss_diff:.1e}"


def distributed_section(cfg: Any) -> Section:
    """Rows per world size: teacher bytes per rank and step time, funcdistill vs FSDP2 by hand."""
    rounds, inner = (3, 1) if cfg.quick else (15, 3)
    sec = Section(
        f"FSDP2 on CPU, gloo (teacher MLP width {TEACHER[0]} x {TEACHER[1]} blocks, student "
        f"{STUDENT[0]} x {STUDENT[1]}, batch 16 per rank)",
        [
            "world",
            "style",
            "teacher_MiB_held",
            "peak_growth_MiB",
            "resident_MiB",
            "goal_MiB",
            "met",
            "step_ms",
            "ratio",
            "target",
            "note",
        ],
        intro=(
            "`teacher_MiB_held`: the teacher parameter bytes a rank holds between steps (its shards; for "
            "FSDP2 by hand also the root it leaves unsharded). `peak_growth_MiB`: how far the resident "
            "memory rises during a step above its level before it (Linux VmHWM), in a step with a "
            "one-layer student and batch 2: gathered parameters and gather buffers, a few KiB of "
            "activations, and about 1 MiB of other allocations. `resident_MiB` is their sum; `goal_MiB`: "
            "the teacher / world size plus its largest unit. `ratio`: funcdistill step time / FSDP2 by "
            "hand with the same sharding (median of paired rounds, quartiles in brackets), on rank 0."
        ),
    )
    for world in WORLDS:
        res = _run(world, rounds, inner)
        mem, tim = res["memory"], res["timing"]
        r = tim["ratio"]
        for style in ("FSDP2 by hand", "funcdistill"):
            m = mem[style]
            resident = m["held"] + m["growth"]
            ours = style == "funcdistill"
            sec.add(
                world=world,
                style=style,
                teacher_MiB_held=_mb(m["held"]),
                peak_growth_MiB=_mb(m["growth"]),
                resident_MiB=_mb(resident),
                goal_MiB=_mb(mem["goal"]),
                met=("yes" if resident <= mem["goal"] else "no") if ours else "",
                step_ms=f"{tim['ms'][style]:.1f}",
                ratio=f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})" if ours else "1.00",
                target=f"<= {STEP_TARGET:.2f}" if ours else "",
                note=_note(world, m["growth"], mem["gather alone"], tim["loss_diff"]) if ours else "",
            )
        if world > 1:  # on one rank funcdistill makes no collective
            sec.add(
                world=world,
                style="one all-gather of the largest unit's weight, alone",
                peak_growth_MiB=_mb(mem["gather alone"]),
                note="the collective's own footprint (gloo)",
            )
    sec.notes.append(
        f"The whole teacher is {_mb(mem['teacher_bytes'])} MiB, its largest unit {_mb(mem['unit_bytes'])} MiB. "
        "Memory figures are the largest over the ranks. funcdistill gathers each tensor straight into its "
        "own buffer; FSDP2 all-gathers a unit into one buffer and copies the parameters out of it. gloo's "
        "all-gather may hold a second copy of its output on some ranks (the `alone` rows)."
    )
    sec.notes.append(
        "4 ranks oversubscribe 2 CPU cores (each rank uses one thread), so the 4-rank time ratios are noisier "
        "than the 2-rank ones; the machine's load during the run is given under the table."
    )
    return sec


# --- tensor-parallel teachers (parallelize_module), alone and under FSDP2 on a 2-D mesh ----------------

TP_WORLDS = (2, 4)  # 2: tensor parallel over both ranks; 4: a (dp 2, tp 2) mesh, FSDP2 across the TP groups
TP_TEACHER = (1024, 8)  # width, blocks (each: up column-wise to 2 x width, down row-wise)
TP_STUDENT = (256, 2)


class _TPBlock(nn.Module):
    """``x + down(gelu(up(x)))``: up column-wise, down row-wise."""

    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _TPStack(nn.Module):
    """An input layer, residual MLP blocks (up column-wise, down row-wise), a column-wise head."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(IN, width)
        self.blocks = nn.ModuleList(_TPBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _tp_teacher(world: int) -> nn.Module:
    """The teacher, tensor parallel over 2 ranks (with FSDP2 over the data-parallel dimension on 4)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    teacher = _TPStack(*TP_TEACHER).eval()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    plan = {"out": ColwiseParallel(output_layouts=Replicate())}
    for i in range(TP_TEACHER[1]):
        plan |= {f"blocks.{i}.up": ColwiseParallel(), f"blocks.{i}.down": RowwiseParallel()}
    parallelize_module(teacher, mesh["tp"], plan)
    if world > 2:
        for block in teacher.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(teacher, mesh=mesh["dp"])
    return teacher


def _tp_styles(world: int, student: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """The two steps, each with its own teacher and copy of the student: funcdistill, and by hand."""
    t_point, s_point = f"blocks.{TP_TEACHER[1] // 2 - 1}", f"blocks.{TP_STUDENT[1] // 2 - 1}"
    teachers = {"funcdistill": _tp_teacher(world), "TP by hand": _tp_teacher(world)}
    ours, theirs = copy.deepcopy(student), copy.deepcopy(student)
    steps = {
        "funcdistill": _stepper(_funcdistill(teachers["funcdistill"], ours, t_point, s_point), ours, x),
        "TP by hand": _stepper(_ByHand(teachers["TP by hand"], theirs, t_point, s_point).loss, theirs, x),
    }
    return steps, teachers


def _tp_worker(rank: int, world: int, port: int, out: str, rounds: int, inner: int) -> None:
    torch.set_num_threads(1)
    _exact_malloc()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        student = _TPStack(*TP_STUDENT)  # replicated: every rank of a TP group has the same batch
        group = rank // 2  # the data-parallel group (its TP ranks share the batch)
        x = torch.randn(16, IN, generator=torch.Generator().manual_seed(group))
        steps, teachers = _tp_styles(world, student, x)
        losses = {name: step() for name, step in steps.items()}  # FSDP2's lazy init; the dry runs
        held = {name: _max_over_ranks(_bytes(t.parameters())) for name, t in teachers.items()}  # local shards
        memory = {}
        for name, step in steps.items():
            dist.barrier()
            memory[name] = _max_over_ranks(_peak_growth(step))
        times = paired_rounds(steps, rounds=rounds, inner=inner, warmup=1)
        result = {
            "held": held,
            "teacher_bytes": _bytes(_TPStack(*TP_TEACHER).parameters()),
            "growth": memory,
            "ratio": ratio(times, "funcdistill", "TP by hand"),
            "ms": {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()},
            "loss_diff": abs(losses["funcdistill"] - losses["TP by hand"]),
        }
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _tp_run(world: int, rounds: int, inner: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.spawn(_tp_worker, args=(world, _free_port(), out, rounds, inner), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def tensor_parallel_section(cfg: Any) -> Section:
    """Rows per world size: a tensor-parallel teacher's bytes per rank and step time, funcdistill vs by hand."""
    rounds, inner = (5, 1) if cfg.quick else (15, 2)
    sec = Section(
        f"Tensor-parallel teacher on CPU, gloo (MLP width {TP_TEACHER[0]} x {TP_TEACHER[1]} blocks, up "
        f"column-wise, down row-wise; student {TP_STUDENT[0]} x {TP_STUDENT[1]} replicated, batch 16 per TP group)",
        ["world", "mesh", "style", "teacher_MiB_held", "peak_growth_MiB", "step_ms", "ratio", "note"],
        intro=(
            "2 ranks: tensor parallel over both; 4 ranks: a (dp 2, tp 2) mesh, tensor parallel inside a "
            "group and FSDP2 across (each block a unit, then the root). `TP by hand`: the same parallelized "
            "teacher called as a module under `no_grad` with forward hooks, the same loss and SGD step. "
            "`teacher_MiB_held`: the teacher parameter bytes a rank holds (its local shards; by hand on 4 "
            "ranks also FSDP2's root left unsharded). `peak_growth_MiB`: how far the resident memory rises "
            "during a step above its level before it (VmHWM, largest over 3 steps and over the ranks); "
            "`ratio`: funcdistill step time / by hand (median of interleaved rounds, quartiles in brackets), "
            "on rank 0."
        ),
    )
    for world in TP_WORLDS:
        res = _tp_run(world, rounds, inner)
        r = res["ratio"]
        for style in ("TP by hand", "funcdistill"):
            ours = style == "funcdistill"
            sec.add(
                world=world,
                mesh="tp 2" if world == 2 else "dp 2 x tp 2",
                style=style,
                teacher_MiB_held=_mb(res["held"][style]),
                peak_growth_MiB=_mb(res["growth"][style]),
                step_ms=f"{res['ms'][style]:.1f}",
                ratio=f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f}), {r['rounds']} rounds" if ours else "1.00",
                note=f"first-step loss differs by {res['loss_diff']:.1e}" if ours else "",
            )
    sec.notes.append(
        f"The whole teacher is {_mb(res['teacher_bytes'])} MiB. The funcdistill teacher runs the same "
        "parallel styles' collectives as the module itself (one all-reduce per row-wise layer, one all-gather "
        "for the head) and gathers the mapped values into full tensors on every rank."
    )
    sec.notes.append(
        "4 ranks oversubscribe 2 CPU cores (each rank uses one thread), so the 4-rank time ratios are noisier "
        "than the 2-rank ones; the machine's load during the run is given under the table."
    )
    return sec


# --- a resharded student: peak memory and step time against FSDP2's own step ------------------

RESHARD_WORLDS = (2, 4)
RESHARD_STUDENT = (1024, 32)  # Linear(width, width) units, each its own FSDP unit: 128 MiB in all
RESHARD_STYLES = (
    "FSDP2 by hand",
    "funcdistill",
    "funcdistill, torch.func.grad",
    "funcdistill, reshard_after_forward=False",
)


def _student_step(style: str, rank: int, width: int, units: int):
    """One training step of ``style`` on a sharded stack of ``units`` Linear(width, width) (a small plain teacher)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    teacher, student = nn.Linear(width, width).eval(), nn.Sequential(*(nn.Linear(width, width) for _ in range(units)))
    for unit in student:
        fully_shard(unit, reshard_after_forward=not style.endswith("=False"))
    fully_shard(student)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    if style == "FSDP2 by hand":
        loss_fn = _ByHandStudent(teacher, student).loss
    else:
        fn = fd.distill(teacher, student, fd.Mapping().add("", ""))

        def loss_fn(x: torch.Tensor, params: Any = None) -> torch.Tensor:
            (pair,) = fn(fd.state(teacher), fd.state(student) if params is None else params, x)
            return (pair.student - pair.teacher).pow(2).mean()

    if style == "funcdistill, torch.func.grad":
        params = fd.state(student, buffers=False)

        def step() -> None:
            grads = torch.func.grad(lambda p: loss_fn(x, p))(params)
            with torch.no_grad():
                for name, g in grads.items():
                    params[name].add_(g, alpha=-1e-3)  # SGD in place, as optimizer.step()

        return step
    return _stepper(loss_fn, student, x)


class _ByHandStudent:
    """FSDP2's own step: the teacher under no_grad, the sharded student with FSDP2's hooks."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        self.teacher, self.student = teacher, student

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_out = self.teacher(x)
        return (self.student(x) - t_out).pow(2).mean()


def _count_gathers(step) -> int:
    """How many all-gathers ``step()`` makes (funcdistill's and FSDP2's both go through this name)."""
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original, count = getattr(dist, name), [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)
    try:
        step()
    finally:
        setattr(dist, name, original)
    return count[0]


def _student_memory_worker(rank: int, world: int, port: int, out: str, style: str, size: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    _exact_malloc()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = _student_step(style, rank, *size)
        step()  # FSDP2's lazy init; funcdistill's dry run
        gathers = _count_gathers(step)
        dist.barrier()
        result = {"growth": _max_over_ranks(_peak_growth(step)), "gathers": gathers}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _student_timing_worker(rank: int, world: int, port: int, out: str, rounds: int, size: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        steps = {style: _student_step(style, rank, *size) for style in RESHARD_STYLES}
        times = paired_rounds(steps, rounds=rounds, inner=1, warmup=1)
        result = {
            "ratio": {s: ratio(times, s, "FSDP2 by hand") for s in RESHARD_STYLES},
            "ms": {s: 1000 * sorted(v)[len(v) // 2] for s, v in times.items()},
        }
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(worker, world: int, *args: Any) -> dict[str, Any]:
    """Run ``worker(rank, world, port, out, *args)`` on ``world`` fresh processes; rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.spawn(_then_exit, args=(worker, world, _free_port(), out, *args), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _then_exit(rank: int, worker, *args: Any) -> None:
    """Run ``worker(rank, *args)``, then end the process without the interpreter's teardown.

    With the 128 MiB FSDP2 student, a worker that had written its result and
    destroyed its process group aborted at exit in about a third of the runs
    ("terminate called without an active exception", from one of torch's
    C++ threads; seen with FSDP2's own step, 2026-12-08), which made
    ``mp.spawn`` discard a finished measurement. An error in the worker
    still ends the process with it.
    """
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def resharded_student_section(cfg: Any) -> Section:
    """Rows per world size: a step's peak memory and time for a resharded student, against FSDP2's own step."""
    size = (256, 8) if cfg.quick else RESHARD_STUDENT
    rounds = 5
    width, units = size
    student_mib = units * (width * width + width) * 4 / 2**20
    sec = Section(
        f"A resharded FSDP2 student on CPU, gloo ({units} Linear({width}, {width}) units, "
        f"{student_mib:.0f} MiB; batch 8 per rank)",
        [
            "world",
            "style",
            "peak_growth_MiB",
            "memory_ratio",
            "all_gathers",
            "step_ms",
            "time_ratio",
        ],
        intro=(
            "One training step (forward, `.backward()` or `torch.func.grad`, SGD) of a student whose every "
            "layer is an FSDP unit, distilled from a small plain teacher. `peak_growth_MiB`: how far a "
            "rank's resident memory rises during a step above its level before it (Linux VmHWM, large "
            "allocations unmapped when freed; the largest over the ranks and over 3 steps), each style "
            "in its own process group. `memory_ratio`: that rise over FSDP2's own step with "
            "`reshard_after_forward=True`. `all_gathers`: per step and rank. `time_ratio`: step time over "
            "FSDP2's, in interleaved rounds in one process group (median, quartiles in brackets), on rank 0."
        ),
    )
    for world in RESHARD_WORLDS:
        memory = {s: _spawn(_student_memory_worker, world, s, size) for s in RESHARD_STYLES}
        timing = _spawn(_student_timing_worker, world, rounds, size)
        base = memory["FSDP2 by hand"]["growth"]
        for style in RESHARD_STYLES:
            r = timing["ratio"][style]
            sec.add(
                world=world,
                style=style,
                peak_growth_MiB=_mb(memory[style]["growth"]),
                memory_ratio=f"{memory[style]['growth'] / base:.2f}",
                all_gathers=memory[style]["gathers"],
                step_ms=f"{timing['ms'][style]:.1f}",
                time_ratio=f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})",
            )
    sec.notes.append(
        "funcdistill makes one all-gather per tensor (a weight and a bias per unit) where FSDP2 makes one "
        "per unit; resharded, each student unit is gathered twice per step (for its forward and again "
        "for its backward), as FSDP2 does. `reshard_after_forward=False` is the behaviour before "
        "resharding: every unit stays gathered from its forward to its backward."
    )
    sec.notes.append(
        "4 ranks oversubscribe 2 CPU cores (each rank uses one thread), so the 4-rank time ratios are noisier "
        "than the 2-rank ones; the machine's load during the run is given under the table."
    )
    return sec
