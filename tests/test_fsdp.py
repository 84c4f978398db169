"""distill over FSDP2-sharded (``fully_shard``) and data-parallel models: 2 processes, gloo, CPU.

One process group runs every check (a spawn costs seconds); each rank writes
what each check raised, and one test per check reads it. References are
written differently from the code under test: unsharded copies of the models
run by hand (forward hooks, the teacher under ``no_grad``) on the whole batch
(both ranks' inputs), with ``torch.autograd``; FSDP2's own forward/backward
on sharded copies; expected gathered sizes from the parameters' shapes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import funcdistill as fd
from tests.conftest import free_port, init_gloo

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent
CHECKS: dict[str, object] = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class Net(nn.Module):
    """An input layer, blocks (the FSDP units) and an output layer (held by the root unit)."""

    def __init__(self, width: int, depth: int, rows: int = 2):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.out = nn.Linear(width, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def models() -> tuple[Net, Net]:
    torch.manual_seed(0)  # odd widths: uneven shards (5 rows over 2 ranks: 3 and 2)
    return Net(7, 3, rows=1).eval(), Net(5, 2, rows=1)  # one output row: rank 1 holds empty shards


def shard(model: nn.Module, mesh=None, root_policy=None, **options) -> nn.Module:
    """FSDP2 as its docs show: each block a unit, then the root (on ``mesh``, or all ranks)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **{**options, **({"mp_policy": root_policy} if root_policy else {})})
    return model


MAPPING = (("blocks.1", "blocks.0"), ("", ""))


def batch(rank: int, step: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + rank))


def whole(step: int = 0) -> torch.Tensor:
    return torch.cat([batch(r, step) for r in range(WORLD)])


def loss_of(pairs) -> torch.Tensor:
    (t1, s1, *_), (t2, s2, *_) = pairs
    return (t1[:, :5] - s1).pow(2).mean() + (t2 - s2).pow(2).mean()


def by_hand(teacher: nn.Module, student: nn.Module, x: torch.Tensor, names=MAPPING) -> torch.Tensor:
    """The loss with forward hooks on the models themselves (unsharded or FSDP2's own forward)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o))
        for (t, s) in names[:1]
        for model, name, key in ((teacher, t, "t"), (student, s, "s"))
    ]
    try:
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x)
    finally:
        for h in handles:
            h.remove()
    return loss_of([(seen["t"], seen["s"]), (t_out, s_out)])


def mapping_for(teacher, student, prefix: str = "") -> fd.Mapping:
    m = fd.Mapping(teacher, student)
    for t, s in MAPPING:
        m = m.add(t, prefix + s if s else s)
    return m


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sgd_steps(step_fn, params, steps: int = 3) -> None:
    opt = torch.optim.SGD(params, lr=0.2)
    for step in range(steps):
        step_fn(step).backward()
        opt.step()
        opt.zero_grad()


def assert_same_params(model: nn.Module, ref: nn.Module) -> None:
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full(got[name]).detach(), full(p).detach(), rtol=1e-5, atol=1e-6, msg=name)


# --- the checks (run on every rank) -------------------------------------------------


@check
def backward_path(rank: int) -> None:
    """fn(...).backward() + SGD on the sharded student: the unsharded loop on the whole batch, and FSDP2's own."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    own_t, own_s = shard(copy.deepcopy(teacher)), shard(copy.deepcopy(student))
    shard(teacher), shard(student)
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(rank, k))), student.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k)), ref_s.parameters())
    sgd_steps(lambda k: by_hand(own_t, own_s, batch(rank, k)), own_s.parameters())
    assert_same_params(student, ref_s)
    assert_same_params(student, own_s)
    assert all(p.grad is None for p in teacher.parameters())
    assert_same_params(teacher, ref_t)


@check
def grad_path(rank: int) -> None:
    """torch.func.grad: DTensor gradients placed like the parameters, equal to the whole batch's."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(teacher), shard(student)
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    params = fd.state(student, buffers=False)
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(params, batch(rank))
    by_hand(ref_t, ref_s, whole()).backward()
    assert sorted(grads) == sorted(n for n, _ in ref_s.named_parameters())
    for name, p in ref_s.named_parameters():
        g = grads[name]
        assert type(g) is type(params[name]), (name, type(g))
        assert g.placements == params[name].placements and g.device_mesh == params[name].device_mesh, name
        assert g.to_local().shape == params[name].to_local().shape, name
        torch.testing.assert_close(g.full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # a functional update with the DTensor gradients: the same step as SGD on the whole batch
    new = {k: v - 0.2 * grads[k] for k, v in params.items()}
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(new[name].full_tensor(), p.detach() - 0.2 * p.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def counting_gathers(record: list[int]):
    """Patch torch.distributed's flat all-gathers to record the elements each one gathers."""
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original = getattr(dist, name)  # (on torch 2.13 the old name calls the new one)

    def counted(out, inp, *args, **kwargs):
        record.append(out.numel())
        return original(out, inp, *args, **kwargs)

    setattr(dist, name, counted)
    return {name: original}


def gathered_size(*modules: nn.Module) -> int:
    """What an all-gather of these modules' own parameters moves: every shard padded to ceil(rows / world)."""
    total = 0
    for m in modules:
        for p in m._parameters.values():
            rows = -(-p.shape[0] // WORLD)
            total += WORLD * rows * (p.numel() // p.shape[0])
    return total


@check
def truncation(rank: int) -> None:
    """An eval teacher mapped at blocks.0 gathers the root's own layers and blocks.0, never blocks.1 or 2."""
    teacher, student = models()
    ref_t = copy.deepcopy(teacher)
    shard(teacher)
    fn = fd.distill(teacher, student, fd.Mapping().add("blocks.0", "blocks.0"))
    record: list[int] = []
    patched = counting_gathers(record)
    try:
        (pair,) = fn(fd.state(teacher), fd.state(student), batch(rank))
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
    assert sum(record) == gathered_size(ref_t.inp, ref_t.out, ref_t.blocks[0][0]), record  # not blocks.1 or 2
    with torch.no_grad():
        torch.testing.assert_close(pair.teacher, ref_t.blocks[0](ref_t.inp(batch(rank))))
    # the teacher's units are back to shards after the stop: a second call sees the same
    (again,) = fn(fd.state(teacher), fd.state(student), batch(rank))
    torch.testing.assert_close(again.teacher, pair.teacher)
    assert all(type(p).__name__ == "DTensor" for p in fn._teacher.run_module.parameters())


def gathers_of(step) -> list[int]:
    """The elements of each all-gather ``step()`` makes, in order."""
    record: list[int] = []
    patched = counting_gathers(record)
    try:
        step()
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
    return record


def tensor_sizes(*modules: nn.Module) -> list[int]:
    """What funcdistill's all-gathers of these modules' own parameters move: one per tensor, padded as in gathered_size."""
    return [
        WORLD * -(-p.shape[0] // WORLD) * (p.numel() // p.shape[0]) for m in modules for p in m._parameters.values()
    ]


@check
def resharded_student(rank: int) -> None:
    """Student units are freed after their forward and gathered again for their backward (reshard_after_forward).

    All-gathers per step: each teacher unit and the student's root once, each student block
    twice (as in FSDP2's own step), or once with reshard_after_forward=False; either way the
    same parameters as the unsharded loop, in .backward() and under torch.func.grad, and a
    second backward through a kept graph gathers the blocks again and adds the same gradients.
    """
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    once = tensor_sizes(ref_t.inp, ref_t.out, *(b[0] for b in ref_t.blocks), ref_s.inp, ref_s.out)
    blocks = tensor_sizes(*(b[0] for b in ref_s.blocks))
    own = shard(copy.deepcopy(student))
    by_hand(ref_t, own, batch(rank)).backward()  # FSDP2's lazy init
    own_gathers = gathers_of(lambda: by_hand(ref_t, own, batch(rank)).backward())
    assert len(own_gathers) == 1 + 2 * len(ref_s.blocks), own_gathers  # FSDP2: its root once, each block twice
    for reshard in (True, False):
        resharded_case(rank, (teacher, student, ref_t, ref_s), once, blocks, reshard)


def resharded_case(rank: int, models_: tuple, once: list[int], blocks: list[int], reshard: bool) -> None:
    teacher, student, ref_t, ref_s = models_
    t, s, ref = shard(copy.deepcopy(teacher)), shard(copy.deepcopy(student)), copy.deepcopy(ref_s)
    for block in s.blocks:
        block.set_reshard_after_forward(reshard)
    fn = fd.distill(t, s, mapping_for(t, s))
    expected = sorted(once + blocks * (2 if reshard else 1))
    got = gathers_of(lambda: loss_of(fn(fd.state(t), fd.state(s), batch(rank))).backward())
    assert sorted(got) == expected, (reshard, got)
    params = fd.state(s, buffers=False)
    got = gathers_of(lambda: torch.func.grad(lambda p: loss_of(fn(fd.state(t), p, batch(rank))))(params))
    assert sorted(got) == expected, (reshard, got)
    s.zero_grad()
    # fp32, the whole batch in one process against two halves whose gradients a reduce-scatter
    # sums: the same sums in another order, a few ulps apart (1e-5 relative is ~100 ulps)
    sgd_steps(lambda k: loss_of(fn(fd.state(t), fd.state(s), batch(rank, k))), s.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref, whole(k)), ref.parameters())
    assert_same_params(s, ref)
    grads = torch.func.grad(lambda p: loss_of(fn(fd.state(t), p, batch(rank))))(fd.state(s, buffers=False))
    by_hand(ref_t, ref, whole()).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    if reshard:  # a kept graph: each freed block is gathered again for the second backward
        loss = loss_of(fn(fd.state(t), fd.state(s), batch(rank)))
        loss.backward(retain_graph=True)
        assert sorted(gathers_of(loss.backward)) == sorted(blocks)
        by_hand(ref_t, ref, whole()).backward()  # ref.grad: twice the gradient, as s's
        for name, p in ref.named_parameters():
            torch.testing.assert_close(full(s.get_parameter(name).grad), p.grad, rtol=1e-5, atol=1e-6)


class _Branch(nn.Module):
    """A block with a side branch that only a tap reads: a gradient reaches it without passing the block's output."""

    def __init__(self, width: int):
        super().__init__()
        self.main, self.side = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.main(h))
        self.side(out)  # after the output: autograd reaches it first, from the tap
        return out


@check
def resharded_tapped_inside(rank: int) -> None:
    """A student point inside a resharded unit, off the unit's output path: the unit is gathered again for it."""
    teacher, student = models()
    torch.manual_seed(1)
    student.blocks = nn.ModuleList(_Branch(5) for _ in range(2))
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    names = (("blocks.1", "blocks.0.side"), ("", ""))
    shard(teacher), shard(student)
    fn = fd.distill(teacher, student, fd.Mapping().add(*names[0]).add(*names[1]))
    grads = torch.func.grad(lambda p: loss_of(fn(fd.state(teacher), p, batch(rank))))(fd.state(student, buffers=False))
    by_hand(ref_t, ref_s, whole(), names).backward()
    for name, p in ref_s.named_parameters():  # tolerance: as in resharded_student; blocks.1.side is unused
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(grads[name].full_tensor(), expected, rtol=1e-5, atol=1e-6, msg=name)
    ref_s.zero_grad()
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(rank, k))), student.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k), names), ref_s.parameters())
    assert_same_params(student, ref_s)


def step_growth(step, repeats: int = 2) -> int:
    """How far this process's resident memory rises above its level before ``step()``, at its highest.

    ``/proc/self/clear_refs`` resets the high-water mark (``VmHWM``); the ranks run with
    ``MALLOC_MMAP_THRESHOLD_`` set (see ``results``), so a freed tensor leaves the resident set.
    """

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024

    peak = 0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        step()
        peak = max(peak, status("VmHWM") - before)
    return peak


@check
def resharded_memory(rank: int) -> None:
    """A step's peak memory on a rank: about FSDP2's own step (reshard_after_forward), not the whole student.

    A student of 32 Linear(512, 512) units (32 MiB, 16 MiB per rank). FSDP2's step rises by its
    gradient shards (16 MiB) and a few gathered units (1 MiB each); holding every unit gathered
    until the backward adds the whole student (32 MiB): about 1.7x FSDP2's rise in a .backward()
    loop and 2.4x under torch.func.grad (measured). Resharding brings both to 1.0x (measured);
    1.3x leaves room for gloo's buffers and the allocator and still fails at the unit count a
    held student would need.
    """
    from torch.distributed.fsdp import fully_shard

    if not Path("/proc/self/clear_refs").exists():
        return  # Linux only
    torch.manual_seed(0)
    base, teacher = nn.Sequential(*(nn.Linear(512, 512) for _ in range(32))), nn.Linear(512, 512).eval()
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(rank))

    def sharded() -> nn.Module:
        model = copy.deepcopy(base)
        for unit in model:
            fully_shard(unit)
        return fully_shard(model)

    def loss(s_out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
        return (s_out - t_out).pow(2).mean()

    own = sharded()

    def own_step() -> None:
        with torch.no_grad():
            t_out = teacher(x)
        loss(own(x), t_out).backward()
        own.zero_grad()

    student = sharded()
    fn = fd.distill(teacher, student, fd.Mapping().add("", ""))

    def backward_step() -> None:
        (pair,) = fn(fd.state(teacher), fd.state(student), x)
        loss(pair.student, pair.teacher).backward()
        student.zero_grad()

    params = fd.state(student, buffers=False)

    def grad_step() -> None:
        torch.func.grad(lambda p: loss(*fn(fd.state(teacher), p, x)[0][:2]))(params)

    growth = {}
    for name, step in (("FSDP2", own_step), (".backward()", backward_step), ("torch.func.grad", grad_step)):
        step()  # FSDP2's lazy init, funcdistill's dry run
        growth[name] = step_growth(step)
    ratios = {k: v / growth["FSDP2"] for k, v in growth.items()}
    assert max(ratios.values()) <= 1.3, {k: f"{v / 2**20:.1f} MiB ({ratios[k]:.2f}x)" for k, v in growth.items()}


@check
def ddp_student(rank: int) -> None:
    """A sharded teacher and a DDP student through fn(...).backward(): the unsharded loop on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(teacher)
    ddp = DDP(student)
    fn = fd.distill(teacher, ddp, mapping_for(teacher, ddp, "module."))
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(ddp), batch(rank, k))), ddp.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k)), ref_s.parameters())
    assert_same_params(student, ref_s)


@check
def mixed(rank: int) -> None:
    """A replicated teacher with a sharded student; a sharded teacher with a plain (per-rank) student."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    sharded_s = shard(copy.deepcopy(student))
    fn = fd.distill(teacher, sharded_s, mapping_for(teacher, sharded_s))
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(
        fd.state(sharded_s, buffers=False), batch(rank)
    )
    by_hand(ref_t, ref_s, whole()).backward()
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(grads[name].full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    sharded_t, local_s = shard(copy.deepcopy(teacher)), copy.deepcopy(student)
    fn = fd.distill(sharded_t, local_s, mapping_for(sharded_t, local_s))
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(sharded_t), p, x)))(
        fd.state(local_s, buffers=False), batch(rank)
    )
    ref_s.zero_grad()
    by_hand(ref_t, ref_s, batch(rank)).backward()  # a plain student: this rank's gradient, not averaged
    for name, p in ref_s.named_parameters():
        assert type(grads[name]) is torch.Tensor
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # a sharded teacher run in another dtype: its shards are cast, then gathered
    fn = fd.distill(sharded_t, local_s, mapping_for(sharded_t, local_s), teacher_dtype=torch.float64)
    pairs = fn(fd.state(sharded_t), fd.state(local_s), batch(rank))
    with torch.no_grad():
        expected = ref_t.double()(batch(rank).double())
    torch.testing.assert_close(pairs[1].teacher, expected.float())


@check
def one_rank_mesh(rank: int) -> None:
    """Each rank alone on its own mesh (nothing to gather): its own batch's loop, by hand."""
    from torch.distributed.device_mesh import DeviceMesh

    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    mesh = DeviceMesh.from_group(groups[rank], "cpu")
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(teacher, mesh), shard(student, mesh)
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(rank, k))), student.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref_s, batch(rank, k)), ref_s.parameters())
    assert_same_params(student, ref_s)
    assert_same_params(teacher, ref_t)


@check
def hsdp(rank: int) -> None:
    """A 2-D mesh (HSDP: replicate x shard), both ways round: the unsharded loop on the whole batch."""
    for shape in ((1, WORLD), (WORLD, 1)):
        hsdp_case(rank, shape)


def hsdp_case(rank: int, shape: tuple[int, int]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(teacher, mesh), shard(student, mesh)
    assert student.out.weight.placements[0].is_replicate(), student.out.weight.placements
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(
        fd.state(student, buffers=False), batch(rank)
    )
    by_hand(ref_t, ref_s, whole()).backward()
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(grads[name].full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=f"{shape} {name}")
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(rank, k))), student.parameters())
    ref_s.zero_grad()
    sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k)), ref_s.parameters())
    assert_same_params(student, ref_s)


@check
def tied(rank: int) -> None:
    """A weight tied under two names in one unit: gathered once, its gradient the sum of both uses."""
    from torch.distributed.fsdp import fully_shard

    from tests.models import Tied

    torch.manual_seed(0)
    teacher, student = Tied().eval(), Tied()
    ref_s = copy.deepcopy(student)
    fully_shard(student)
    fn = fd.distill(teacher, student)
    record: list[int] = []
    patched = counting_gathers(record)
    try:
        grads = torch.func.grad(lambda p, x: (fn(fd.state(teacher), p, x)[0].student ** 2).mean())(
            fd.state(student, buffers=False), batch(rank)
        )
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
    assert record == [WORLD * 2 * 3], record  # a.weight once (3 rows: 2 per rank, padded)
    (ref_s(whole()) ** 2).mean().backward()
    torch.testing.assert_close(grads["a.weight"].full_tensor(), ref_s.a.weight.grad, rtol=1e-5, atol=1e-6)


@check
def mixed_precision(rank: int) -> None:
    """MixedPrecisionPolicy (bf16 compute, fp32 reduction, fp32 outputs): as FSDP2's own forward/backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bf16 = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)}
    fp32_out = MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.float32)  # the teacher's root
    teacher, student = models()
    own_t, own_s = (
        shard(copy.deepcopy(teacher), root_policy=fp32_out, **bf16),
        shard(copy.deepcopy(student), mp_policy=policy),
    )
    shard(teacher, root_policy=fp32_out, **bf16), shard(student, mp_policy=policy)
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    params = fd.state(student, buffers=False)
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(params, batch(rank))
    by_hand(own_t, own_s, batch(rank)).backward()
    for name, p in own_s.named_parameters():
        assert grads[name].dtype == torch.float32 and grads[name].placements == p.placements, name
        torch.testing.assert_close(grads[name].full_tensor(), p.grad.full_tensor(), rtol=1e-6, atol=1e-7, msg=name)
    own_s.zero_grad()
    (_, pair) = fn(fd.state(teacher), fd.state(student), batch(rank))  # the final outputs
    assert pair.teacher.dtype == torch.float32 and pair.student.dtype == torch.bfloat16
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(rank, k))), student.parameters())
    sgd_steps(lambda k: by_hand(own_t, own_s, batch(rank, k)), own_s.parameters())
    assert_same_params(student, own_s)


class _Outside(Net):
    """Uses a sharded block's weight in the root's own forward, outside the block's unit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.blocks[0][0].weight.sum()


@check
def errors(rank: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    teacher, student = models()

    class Fsdp1(FullyShardedDataParallel):  # an FSDP1 wrapper (the real one cannot be built on CPU)
        __getattr__ = nn.Module.__getattr__

        def __init__(self, module: nn.Module):
            nn.Module.__init__(self)
            self.inner = module

    fsdp1 = Fsdp1(copy.deepcopy(teacher))
    with pytest.raises(
        TypeError, match=r"the teacher is wrapped in FullyShardedDataParallel \(\w+\), FSDP1.*fully_shard"
    ):
        fd.distill(fsdp1, student)
    evaluated = shard(copy.deepcopy(student))  # FSDP2 leaves the root unsharded after a no_grad forward
    fn = fd.distill(teacher, evaluated)
    with torch.no_grad():
        evaluated(batch(rank))
    with pytest.raises(
        ValueError,
        match=r"the FSDP unit '' of the Net got plain tensors, not DTensor shards, for 'inp.weight'.*reshard\(\)",
    ):
        fn(fd.state(teacher), fd.state(evaluated), batch(rank))
    evaluated.reshard()
    fn(fd.state(teacher), fd.state(evaluated), batch(rank))
    stacked = {k: torch.stack([v, v]) for k, v in fd.state(evaluated, buffers=False).items()}
    with pytest.raises(RuntimeError, match=r"cannot run an FSDP-sharded model under torch.func.vmap"):
        x = batch(rank)
        torch.func.vmap(lambda p: fn(fd.state(teacher), p, x)[0].student)(stacked)
    torch.manual_seed(0)
    outside = shard(_Outside(5, 2))
    fn = fd.distill(teacher, outside)
    with pytest.raises(RuntimeError, match=r"the student used a parameter of an FSDP unit outside that unit's forward"):
        fn(fd.state(teacher), fd.state(outside), batch(rank))


def worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, port, WORLD)
    results = {}
    try:
        for name, fn in CHECKS.items():
            try:
                fn(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported by the test of this check
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("fsdp")
    # glibc maps every allocation of 64 KiB or more on its own and unmaps it when freed, so a
    # rank's resident memory follows its tensors (resharded_memory); read when a rank starts
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)]


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(results, name):
    for rank, res in enumerate(results):
        assert res.get(name) == "ok", f"rank {rank}:\n{res.get(name)}"


def test_example_under_torchrun():
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/fsdp_distill.py"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rank 0: loss" in done.stdout and "equal to the unsharded run" in done.stdout, done.stdout
