"""Tensor parallelism of ``launch.model.GPT`` over the mesh's ``tp`` dimension (``parallelize``) and the
TP-aware pieces of the loop (``local``, ``clip_grad_norm``)."""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from launch.model import GPT


def parallelize(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Tensor parallelism over ``tp_mesh`` for every block: attention (``qkv`` column-parallel with
    whole heads per rank, ``proj`` row-parallel) and MLP (``fc`` column-, ``proj`` row-parallel).

    The ``qkv`` rows are first permuted to the head-major order, so that each rank's contiguous
    block of rows holds the q, k and v of its own heads; the function computed does not change.
    """
    tp = tp_mesh.size()
    for block in model.blocks:
        attn = block.attn
        with torch.no_grad():
            attn.qkv.weight.copy_(attn.qkv.weight[attn.head_major_order()])
        attn.head_major, attn.heads = True, attn.heads // tp
        parallelize_module(block, tp_mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list[Tensor], max_norm: float, tp_group) -> float:
    """``nn.utils.clip_grad_norm_`` for a model whose TP tensors are DTensors: the global norm sums the
    squares of the shards over tp and counts a replicated tensor once; every grad × min(1, max/(norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if tp_group is None and not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(params, max_norm).item()
    sq = torch.zeros(2, dtype=torch.float32, device=local(grads[0]).device)  # [replicated, sharded over tp]
    for g in grads:
        sharded = isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements)
        sq[int(sharded)] += torch.linalg.vector_norm(local(g), dtype=torch.float32) ** 2
    if tp_group is not None:
        dist.all_reduce(sq[1:], group=tp_group)
    norm = sq.sum().sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return norm.item()
