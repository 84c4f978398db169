"""distill over tensor-parallel models (``parallelize_module``), alone (2 ranks) and under FSDP2 on a 2x2 mesh (4 ranks).

One process group per world size runs every check of that size (a spawn costs
seconds); each rank writes what each check raised, and one test per check
reads it. References are written differently from the code under test:
unsharded copies of the models run by hand (forward hooks, the teacher under
``no_grad``) with ``torch.autograd``, on the batch every tensor-parallel rank
shares (and, on the 2x2 mesh, on the whole batch of the data-parallel ranks).

Tolerances: tensor parallelism splits each row-wise layer's sum into one
partial sum per rank, added by an all-reduce, and FSDP2 averages gradients
over the ranks: float32 sums in another order, a few ulps apart after three
SGD steps on these small models (rtol 1e-5, atol 1e-6, as tests/test_fsdp.py).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import funcdistill as fd
from tests.conftest import free_port, init_gloo

CHECKS: dict[int, dict[str, object]] = {2: {}, 4: {}}
VOCAB, ROWS = 11, 6
TOL = {"rtol": 1e-5, "atol": 1e-6}


def check(world: int):
    def register(fn):
        CHECKS[world][fn.__name__] = fn
        return fn

    return register


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Token embedding, residual MLP blocks (column-wise up, row-wise down), a head."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, ROWS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def models() -> tuple[Net, Net]:
    torch.manual_seed(0)
    return Net(8, 3).eval(), Net(4, 2)


def parallelize(model: Net, mesh) -> Net:
    """The usual plan: embedding row-wise, MLP up column-wise and down row-wise, head column-wise (replicated)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"emb": RowwiseParallel(input_layouts=Replicate()), "out": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.blocks)):
        plan |= {f"blocks.{i}.up": ColwiseParallel(), f"blocks.{i}.down": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def shard(model: Net, mesh) -> Net:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batch(group: int, step: int = 0) -> torch.Tensor:
    """The tokens of one data-parallel group (every tensor-parallel rank of it gets the same)."""
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(10 * step + group))


PAIRS = (("blocks.1", "blocks.0"), ("", ""))


def mapping_for(teacher, student) -> fd.Mapping:
    m = fd.Mapping(teacher, student)
    for t, s in PAIRS:
        m = m.add(t, s)
    return m


def loss_of(pairs) -> torch.Tensor:
    (t1, s1, *_), (t2, s2, *_) = pairs
    return (t1[..., :4] - s1).pow(2).mean() + (t2 - s2).pow(2).mean()


def by_hand(teacher: nn.Module, student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The loss with forward hooks on plain models."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.get_submodule(name).register_forward_hook(lambda mod, i, o, key=key: seen.__setitem__(key, o))
        for m, name, key in ((teacher, PAIRS[0][0], "t"), (student, PAIRS[0][1], "s"))
    ]
    try:
        with torch.no_grad():
            t_out = teacher(ids)
        s_out = student(ids)
    finally:
        for h in handles:
            h.remove()
    return loss_of([(seen["t"], seen["s"]), (t_out, s_out)])


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sgd_steps(step_fn, params, steps: int = 3) -> list[float]:
    opt = torch.optim.SGD(params, lr=0.2)
    losses = []
    for step in range(steps):
        loss = step_fn(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_same_params(model: nn.Module, ref: nn.Module) -> None:
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(full(got[name]).detach(), full(p).detach(), **TOL, msg=name)


class Collectives(TorchDispatchMode):
    """Counts the collectives a block of code runs (c10d and functional collectives), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace and "wait" not in func.__name__ and "wrap" not in func.__name__:
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))


# --- 2 ranks: tensor parallel alone ---------------------------------------------------


@check(2)
def tp_teacher_backward(rank: int) -> None:
    """A TP teacher, a plain student, fn(...).backward() + 3 SGD steps: the unsharded run's losses and parameters."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    parallelize(teacher, tp_mesh())
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    pairs = fn(fd.state(teacher), fd.state(student), batch(0))
    assert all(type(p.teacher) is torch.Tensor for p in pairs), [type(p.teacher) for p in pairs]
    got = sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(0, k))), student.parameters())
    want = sgd_steps(lambda k: by_hand(ref_t, ref_s, batch(0, k)), ref_s.parameters())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL)
    assert_same_params(student, ref_s)
    assert_same_params(teacher, ref_t)
    assert all(p.grad is None for p in teacher.parameters())


@check(2)
def tp_teacher_grad(rank: int) -> None:
    """torch.func.grad of the student through a TP teacher (run under no_grad): the unsharded gradients."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    parallelize(teacher, tp_mesh())
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    params = fd.state(student, buffers=False)
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(params, batch(0))
    by_hand(ref_t, ref_s, batch(0)).backward()
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=name)


@check(2)
def tp_points(rank: int) -> None:
    """A column-wise layer's output (a local shard in the model) and a row-wise layer's input come back full."""
    teacher, student = models()
    ref_t = copy.deepcopy(teacher)
    parallelize(teacher, tp_mesh())
    mapping = fd.Mapping().add("blocks.0.up", "blocks.0.up").add(fd.Point("blocks.0.down", io="input"), "blocks.0")
    fn = fd.distill(teacher, student, mapping)
    up, down_in = fn(fd.state(teacher), fd.state(student), batch(0))
    with torch.no_grad():
        h = ref_t.emb(batch(0))
        torch.testing.assert_close(up.teacher, ref_t.blocks[0].up(h), **TOL)
        torch.testing.assert_close(down_in.teacher, torch.tanh(ref_t.blocks[0].up(h)), **TOL)


@check(2)
def tp_truncation(rank: int) -> None:
    """Mapped at blocks.0, the TP teacher runs the collectives of emb and blocks.0 only (by hand: the same)."""
    teacher, student = models()
    parallelize(teacher, tp_mesh())
    fn = fd.distill(teacher, student, fd.Mapping().add("blocks.0", "blocks.0"))
    fn(fd.state(teacher), fd.state(student), batch(0))  # the dry run (shape only: no collective) is done
    with Collectives() as ours:
        fn(fd.state(teacher), fd.state(student), batch(0))
    with Collectives() as needed, torch.no_grad():
        teacher.blocks[0](teacher.emb(batch(0)))
    with Collectives() as whole, torch.no_grad():
        teacher(batch(0))
    assert ours.ops == needed.ops, (ours.ops, needed.ops)
    assert sum(whole.ops.values()) > sum(needed.ops.values()) + 1, whole.ops  # blocks.1, blocks.2 and the head


@check(2)
def tp_student_backward(rank: int) -> None:
    """A TP student in the loss.backward() path: 3 SGD steps on its DTensor parameters equal the unsharded run."""
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    parallelize(student, tp_mesh())
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    got = sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(0, k))), student.parameters())
    want = sgd_steps(lambda k: by_hand(ref_t, ref_s, batch(0, k)), ref_s.parameters())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL)
    assert_same_params(student, ref_s)
    assert type(student.blocks[0].up.weight).__name__ == "DTensor"


@check(2)
def tp_refused(rank: int) -> None:
    """A TP student under torch.func.grad, and a parameter placed Partial(): refused, naming them."""
    from torch.distributed.tensor import DTensor, Partial

    teacher, student = models()
    parallelize(student, tp_mesh())
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    with pytest.raises(
        RuntimeError,
        match=r"the student is tensor parallel \(its module 'emb' has a parallel style\) and is differentiated "
        r"inside a torch.func transform, .*must override the setup_context staticmethod.*loss.backward\(\)",
    ):
        torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(fd.state(student, buffers=False), batch(0))
    partial = copy.deepcopy(models()[0])
    weight = partial.out.weight.detach()
    partial.out.weight = nn.Parameter(DTensor.from_local(weight / 2, tp_mesh(), [Partial()]), requires_grad=False)
    with pytest.raises(
        ValueError,
        match=r"the teacher parameter 'out.weight' of module 'out' \(Linear\) is a DTensor placed \(Partial\(sum\),\); "
        r".*Partial\(sum\) is not supported",
    ):
        fd.distill(partial, models()[1])


@check(2)
def tp_sequence_parallel(rank: int) -> None:
    """Sequence parallel: a style's Shard(1) output comes back full; a residual sum of local shards is refused."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    teacher, student = models()
    ref_t = copy.deepcopy(teacher)
    plan = {
        "emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "out": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i in range(len(teacher.blocks)):
        plan |= {
            f"blocks.{i}.up": ColwiseParallel(input_layouts=Shard(1)),
            f"blocks.{i}.down": RowwiseParallel(output_layouts=Shard(1)),
        }
    parallelize_module(teacher, tp_mesh(), plan)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    fn = fd.distill(teacher, student, fd.Mapping().add("blocks.0.down", "blocks.0").add("", ""))
    down, out = fn(fd.state(teacher), fd.state(student), ids)
    with torch.no_grad():
        h = ref_t.emb(ids)
        torch.testing.assert_close(down.teacher, ref_t.blocks[0].down(torch.tanh(ref_t.blocks[0].up(h))), **TOL)
        torch.testing.assert_close(out.teacher, ref_t(ids), **TOL)
    fn = fd.distill(teacher, student, fd.Mapping().add("blocks.0", "blocks.0"))
    with pytest.raises(
        RuntimeError,
        match=r"the teacher's value at 'blocks.0' is a local shard of a tensor-parallel model \(shape \(2, 3, 8\); "
        r"the unsharded model's is \(2, 6, 8\)\)",
    ):
        fn(fd.state(teacher), fd.state(student), ids)


# --- 4 ranks: a 2x2 mesh, tensor parallel inside ("tp"), FSDP2 across ("dp") ---------------


def mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def whole(step: int = 0) -> torch.Tensor:
    return torch.cat([batch(g, step) for g in range(2)])


@check(4)
def mesh_teacher(rank: int) -> None:
    """TP+FSDP2 teacher, FSDP2 student over "dp": .backward() + 3 SGD steps and torch.func.grad, the unsharded run."""
    mesh = mesh_2d()
    group = mesh.get_local_rank("dp")
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(parallelize(teacher, mesh["tp"]), mesh["dp"])
    shard(student, mesh["dp"])
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    grads = torch.func.grad(lambda p, x: loss_of(fn(fd.state(teacher), p, x)))(
        fd.state(student, buffers=False), batch(group)
    )
    by_hand(ref_t, ref_s, whole()).backward()
    for name, p in ref_s.named_parameters():
        torch.testing.assert_close(grads[name].full_tensor(), p.grad, **TOL, msg=name)
    ref_s.zero_grad()
    got = sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(group, k))), student.parameters())
    want = sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k)), ref_s.parameters())
    mean = torch.tensor(got)
    dist.all_reduce(mean, group=mesh["dp"].get_group())  # this group's losses -> the mean over the groups
    torch.testing.assert_close(mean / 2, torch.tensor(want), **TOL)
    assert_same_params(student, ref_s)
    assert_same_params(teacher, ref_t)


@check(4)
def mesh_student(rank: int) -> None:
    """A TP+FSDP2 student in the loss.backward() path: 3 SGD steps equal the unsharded run on the whole batch."""
    mesh = mesh_2d()
    group = mesh.get_local_rank("dp")
    teacher, student = models()
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    shard(parallelize(teacher, mesh["tp"]), mesh["dp"])
    shard(parallelize(student, mesh["tp"]), mesh["dp"])
    fn = fd.distill(teacher, student, mapping_for(teacher, student))
    sgd_steps(lambda k: loss_of(fn(fd.state(teacher), fd.state(student), batch(group, k))), student.parameters())
    sgd_steps(lambda k: by_hand(ref_t, ref_s, whole(k)), ref_s.parameters())
    assert_same_params(student, ref_s)


@check(4)
def mesh_truncation(rank: int) -> None:
    """Mapped at blocks.0: the root's and blocks.0's all-gathers and all-reduces, none of blocks.1, 2 or the head's."""
    mesh = mesh_2d()
    teacher, student = models()
    ref_t = copy.deepcopy(teacher)
    shard(parallelize(teacher, mesh["tp"]), mesh["dp"])
    fn = fd.distill(teacher, student, fd.Mapping().add("blocks.0", "blocks.0"))
    (pair,) = fn(fd.state(teacher), fd.state(student), batch(0))
    with Collectives() as ours:
        fn(fd.state(teacher), fd.state(student), batch(0))
    gathered = [*teacher.emb.parameters(), *teacher.out.parameters(), *teacher.blocks[0].parameters()]
    gathers = {k: v for k, v in ours.ops.items() if "gather" in k}
    assert sum(gathers.values()) == len(gathered), ours.ops  # one all-gather per tensor of the root and blocks.0
    reduces = {k: v for k, v in ours.ops.items() if "reduce" in k}
    assert sum(reduces.values()) == 2, ours.ops  # emb's and blocks.0.down's row-wise sums; no head all-gather
    with torch.no_grad():
        torch.testing.assert_close(pair.teacher, ref_t.blocks[0](ref_t.emb(batch(0))), **TOL)


def worker(rank: int, world: int, port: int, out: str) -> None:
    init_gloo(rank, port, world)
    results = {}
    try:
        for name, fn in CHECKS[world].items():
            try:
                fn(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported by the test of this check
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _spawn(tmp_path_factory, world: int) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp(f"tp{world}")
    mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict[str, str]]:
    return _spawn(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> list[dict[str, str]]:
    return _spawn(tmp_path_factory, 4)


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _assert_ok(results: list[dict[str, str]], name: str) -> None:
    for rank, res in enumerate(results):
        assert res.get(name) == "ok", f"rank {rank}:\n{res.get(name)}"


@pytest.mark.parametrize("name", list(CHECKS[2]))
def test_two_ranks(two, name):
    _assert_ok(two, name)


@pytest.mark.parametrize("name", list(CHECKS[4]))
def test_two_by_two_mesh(four, name):
    _assert_ok(four, name)


@pytest.mark.parametrize("ranks", [2, 4])
def test_example_under_torchrun(ranks):
    """examples/tp_distill.py on 2 ranks (tensor parallel 2) and 4 (a 2 x 2 mesh, FSDP2 over tensor parallel)
    checks itself against the unsharded run."""
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "examples/tp_distill.py"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("equal to the unsharded run") == ranks, done.stdout
    assert "rank 0: loss" in done.stdout and "equal to the unsharded run" in done.stdout, done.stdout
