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
from tests.conftest import free_port

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
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
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
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
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
