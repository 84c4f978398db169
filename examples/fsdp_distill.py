"""Distil a Llama into a shallower one, both sharded with FSDP2, through the pure function.

A teacher and a student are built from :class:`transformers.LlamaConfig` with
random weights (nothing is downloaded) and sharded with
``torch.distributed.fsdp.fully_shard``: each decoder layer is a unit, then the
root (embeddings, final norm, head). Each rank holds a shard of every
parameter and trains on its own batch (data parallel over the mesh).

The step is pure: ``torch.func.grad_and_value`` of a function of the
student's parameters, which are ``DTensor`` shards. funcdistill gathers each
unit's shards while the unit runs (the teacher's are freed right after it) and
gives gradients as ``DTensor`` shards averaged over the ranks, as FSDP2 does,
so a functional SGD update keeps every parameter sharded. The losses: KD on
the logits (Hinton et al. 2015, arXiv:1503.02531) and MSE between the hidden
states of teacher layer 3 and student layer 1 (FitNets, Romero et al. 2015,
arXiv:1412.6550, without an adapter: both models have the same width).

At the end every rank checks the sharded run against the same steps on
unsharded copies with the whole batch (all ranks' inputs) on one process.

Run it with::

    torchrun --nproc-per-node 2 examples/fsdp_distill.py     # gloo on CPU, NCCL on GPUs

(it needs ``transformers``, from the ``test`` extra).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import funcdistill as fd
from funcdistill.losses import kd_loss, mse_loss

__all__ = ["build_mapping", "build_models", "main", "objective", "shard", "token_batch"]

VOCAB = 128
PAIRS = (("model.layers.3", "model.layers.1"), ("", ""))


def build_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A 4-layer teacher (eval mode) and a 2-layer student of the same width, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(layers: int) -> Any:
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation="eager",
            use_cache=False,
        )

    torch.manual_seed(seed)
    return LlamaForCausalLM(config(4)).eval(), LlamaForCausalLM(config(2))


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 as its docs show: each decoder layer a unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (some transformers versions return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def build_mapping(teacher: nn.Module, student: nn.Module) -> fd.Mapping:
    mapping = fd.Mapping(teacher, student)
    for t, s in PAIRS:
        mapping = mapping.add(t, s)
    return mapping


def objective(fn: fd.DistillFn, teacher_state: dict, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """This rank's loss: hidden-state MSE plus logits KD (temperature 2)."""
    (t_hidden, s_hidden, _), (t_out, s_out, _) = fn(teacher_state, params, ids)
    return mse_loss(hidden(t_hidden), hidden(s_hidden)) + kd_loss(
        t_out.logits.flatten(0, 1), s_out.logits.flatten(0, 1), temperature=2.0
    )


def token_batch(rank: int, step: int, device: torch.device, size: int = 4, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (size, length), generator=generator).to(device)


def train(fn: fd.DistillFn, teacher: nn.Module, params: dict, batches: list, lr: float) -> tuple[dict, list[float]]:
    """Pure SGD steps: ``params - lr * grad``; returns the new parameters and the losses."""
    step = torch.func.grad_and_value(functools.partial(objective, fn, fd.state(teacher)))
    losses = []
    for ids in batches:
        grads, loss = step(params, ids)
        params = {k: v - lr * grads[k] for k, v in params.items()}
        losses.append(loss.item())
    return params, losses


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        mesh = init_device_mesh(device.type, (world,))
        teacher, student = (m.to(device) for m in build_models())
        ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
        shard(teacher, mesh), shard(student, mesh)
        fn = fd.distill(teacher, student, build_mapping(teacher, student))
        batches = [token_batch(rank, k, device) for k in range(args.steps)]
        params, losses = train(fn, teacher, fd.state(student, buffers=False), batches, args.lr)
        mean = torch.tensor(losses, device=device)
        dist.all_reduce(mean)
        mean /= world
        if rank == 0:
            print(f"rank 0: loss (mean over {world} ranks) {mean[0]:.4f} -> {mean[-1]:.4f} in {args.steps} steps")
        # the same steps on unsharded copies, with the whole batch on this process
        ref_fn = fd.distill(ref_teacher, ref_student, build_mapping(ref_teacher, ref_student))
        whole = [torch.cat([token_batch(r, k, device) for r in range(world)]) for k in range(args.steps)]
        ref_params, _ = train(ref_fn, ref_teacher, fd.state(ref_student, buffers=False), whole, args.lr)
        diff = max((params[k].full_tensor() - v).abs().max().item() for k, v in ref_params.items())
        placed = all(params[k].placements == p.placements for k, p in student.named_parameters())
        if diff > 1e-4 or not placed:
            raise SystemExit(f"rank {rank}: the sharded run differs from the unsharded one (max {diff:.2e})")
        print(f"rank {rank}: student parameters after {args.steps} steps equal to the unsharded run (max {diff:.1e})")
        dist.barrier()  # no rank tears the group down while another still runs its last collective
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
