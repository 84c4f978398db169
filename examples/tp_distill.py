"""Distil a tensor-parallel Llama into an FSDP2-sharded one through the pure function.

A teacher and a student are built from :class:`transformers.LlamaConfig` with
random weights (nothing is downloaded). The teacher is split within each layer
with ``torch.distributed.tensor.parallel.parallelize_module`` over the
``"tp"`` dimension of a ``(dp, tp)`` device mesh: attention ``q/k/v_proj``
column-wise and ``o_proj`` row-wise, MLP ``gate/up_proj`` column-wise and
``down_proj`` row-wise, the embedding row-wise and the head column-wise with
replicated logits. With more ranks than ``--tp`` the teacher is also sharded
with FSDP2 over ``"dp"`` (a 2-D mesh: tensor parallel inside a node, FSDP
across). Llama's attention reshapes its projections by ``(..., -1,
head_dim)``, so each rank runs its own heads (num_attention_heads / tp) with
no change to the config. The student is sharded with FSDP2 over every rank.

The ranks of one tensor-parallel group share a batch; each data-parallel
group has its own. funcdistill runs the teacher under ``no_grad`` with the
styles' hooks doing the redistribution, gives the mapped values as full
tensors on every rank, and gathers the student's units as FSDP2 does. The
loop is the usual one: ``loss.backward()`` and ``optimizer.step()`` on the
sharded student. The losses: KD on the logits (Hinton et al. 2015,
arXiv:1503.02531) and MSE between the hidden states of teacher layer 3 and
student layer 1 (FitNets, Romero et al. 2015, arXiv:1412.6550; same width).

At the end every rank checks its student against the same steps on unsharded
copies with the whole batch (every data-parallel group's) on one process.

Run it with::

    torchrun --nproc-per-node 2 examples/tp_distill.py     # TP over 2 ranks
    torchrun --nproc-per-node 4 examples/tp_distill.py     # 2 x 2: FSDP2 over 2 groups of TP 2

(gloo on CPU, NCCL on GPUs; it needs ``transformers``, from the ``test`` extra).
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

import torch
import torch.distributed as dist

# the models, their FSDP2 units and the mapping are the FSDP2 example's (run from examples/, as torchrun does)
from fsdp_distill import VOCAB, build_mapping, build_models, hidden, shard
from torch import nn

import funcdistill as fd
from funcdistill.losses import kd_loss, mse_loss

__all__ = ["build_mapping", "build_models", "main", "parallelize", "shard", "token_batch"]


def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
    """Tensor parallelism as torchtitan's Llama plan, without sequence parallelism."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),  # full logits on every rank
    }
    for i in range(len(model.model.layers)):
        plan |= {
            f"model.layers.{i}.self_attn.q_proj": ColwiseParallel(),  # heads split: each rank runs its own
            f"model.layers.{i}.self_attn.k_proj": ColwiseParallel(),
            f"model.layers.{i}.self_attn.v_proj": ColwiseParallel(),
            f"model.layers.{i}.self_attn.o_proj": RowwiseParallel(),
            f"model.layers.{i}.mlp.gate_proj": ColwiseParallel(),
            f"model.layers.{i}.mlp.up_proj": ColwiseParallel(),
            f"model.layers.{i}.mlp.down_proj": RowwiseParallel(),
        }
    return parallelize_module(model, mesh, plan)


def objective(fn: fd.DistillFn, teacher: nn.Module, student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """This group's loss: hidden-state MSE plus logits KD (temperature 2)."""
    (t_hidden, s_hidden, _), (t_out, s_out, _) = fn(fd.state(teacher), fd.state(student), ids)
    return mse_loss(hidden(t_hidden), hidden(s_hidden)) + kd_loss(
        t_out.logits.flatten(0, 1), s_out.logits.flatten(0, 1), temperature=2.0
    )


def token_batch(group: int, step: int, device: torch.device, size: int = 4, length: int = 16) -> torch.Tensor:
    """The tokens of data-parallel group ``group`` (its tensor-parallel ranks share them)."""
    generator = torch.Generator().manual_seed(1000 * step + group)
    return torch.randint(0, VOCAB, (size, length), generator=generator).to(device)


def train(teacher: nn.Module, student: nn.Module, batches: list, lr: float) -> list[float]:
    """SGD steps in a ``loss.backward()`` loop; returns the losses."""
    fn = fd.distill(teacher, student, build_mapping(teacher, student))
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = objective(fn, teacher, student, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (the rest: FSDP2 over them)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the {world} ranks")
    try:
        mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        group = mesh.get_local_rank("dp")  # this rank's data-parallel group: its batches
        teacher, student = (m.to(device) for m in build_models())
        ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
        parallelize(teacher, mesh["tp"])
        if mesh["dp"].size() > 1:
            shard(teacher, mesh["dp"])  # 2-D: FSDP2 across the tensor-parallel groups
        shard(student, init_device_mesh(device.type, (world,)))
        batches = [token_batch(group, k, device) for k in range(args.steps)]
        losses = train(teacher, student, batches, args.lr)
        mean = torch.tensor(losses, device=device)
        dist.all_reduce(mean)
        mean /= world
        if rank == 0:
            print(
                f"rank 0: loss (mean over {world} ranks, tp {args.tp}) {mean[0]:.4f} -> {mean[-1]:.4f} "
                f"in {args.steps} steps"
            )
        # the same steps on unsharded copies, with every group's batch on this process
        groups = world // args.tp
        whole = [torch.cat([token_batch(g, k, device) for g in range(groups)]) for k in range(args.steps)]
        train(ref_teacher, ref_student, whole, args.lr)
        got = dict(student.named_parameters())
        diff = max((got[k].full_tensor() - v).abs().max().item() for k, v in ref_student.named_parameters())
        if diff > 1e-4:
            raise SystemExit(f"rank {rank}: the parallel run differs from the unsharded one (max {diff:.2e})")
        print(f"rank {rank}: student parameters after {args.steps} steps equal to the unsharded run (max {diff:.1e})")
        dist.barrier()  # no rank tears the group down while another still runs its last collective
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
