"""Megatron-core tensor parallelism as reg_dist layouts.

Megatron splits a 2-D weight of logical shape ``(m, n)`` evenly over its TP group of size ``T`` and
marks it with ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``. TP rank ``t``
holding a local ``(a, b)`` shard holds, of the logical matrix:

    partition_dim 0 (ColumnParallelLinear)   m = T·a   rows [t·a, (t+1)·a) × all n = b columns
    partition_dim 1 (RowParallelLinear)      n = T·b   all m = a rows × cols [t·b, (t+1)·b)
    tensor_model_parallel False (replicated) the whole (a, b) matrix, no group

with ``groups=(("tp", tp_group),)``: REG reduces its row/column statistics over the TP group and
Muon/MuonEq assemble each matrix on one TP rank. The TP group is the one the layer used: its
``tp_group``, else megatron's (expert) tensor-parallel group from ``parallel_state``. A QKV weight
Megatron marked ``is_qkv`` with ``qkv_split_shapes`` ``(q, k, v)`` per query group is the fused
matrices ``fused_rows((q, k, v), m // (q + k + v))`` (see ``reg_dist.layout``).

``attach_layouts(model)`` stores these as ``p.reg_layout``, which ``reg_dist.REG``, ``Muon`` and
``MuonEq`` then use. Strided partitions (``partition_stride != 1``) and GTP weight rematerialisation
are not supported.
"""

import torch.distributed as dist
from torch import Tensor, nn

from ...layout import LAYOUT_ATTR, Layout, fused_rows

GROUPED_EXPERTS = ("grouped-GEMM experts (megatron-core 0.19.2's TEGroupedMLP, which needs Transformer Engine) are "
                   "not supported: reg_dist's layouts do not describe their weights (each a matrix per expert, or all "
                   "experts in one grouped tensor), and Transformer Engine is not importable where reg_dist is tested")


def _default_tp_group(param: Tensor) -> dist.ProcessGroup:
    """Megatron's TP group for ``param``: the expert one for expert parameters (``expert_tp``, or
    ``allreduce=False``, which Megatron's layers set on weights that use the expert groups)."""
    from megatron.core import parallel_state

    if getattr(param, "expert_tp", False) or getattr(param, "allreduce", True) is False:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _qkv_fused(param: Tensor, name: str, m: int, local_rows: int, split_qkv: bool = True):
    """The fused q/k/v segments of a weight Megatron marked ``is_qkv`` (None otherwise, or with
    ``split_qkv=False``: the weight is then one matrix)."""
    if not split_qkv or not getattr(param, "is_qkv", False):
        return None
    split = tuple(int(s) for s in param.qkv_split_shapes)
    per_group = sum(split)
    if m % per_group or local_rows % per_group:
        raise ValueError(f"QKV parameter {name}: its {m} logical rows ({local_rows} here) are not whole query "
                         f"groups of qkv_split_shapes {list(split)}")
    return fused_rows(split, m // per_group)


def megatron_layout(param: Tensor, name: str, group: dist.ProcessGroup | None = None,
                    split_qkv: bool = True, blockwise: bool = False) -> Layout:
    """The Layout of this rank's local shard ``param`` of a Megatron weight in its logical matrix,
    read from Megatron's TP attributes; ``group`` is the TP group that split it (default: Megatron's).
    ``split_qkv=False`` keeps an ``is_qkv`` weight one matrix instead of its q, k and v blocks;
    ``blockwise=True`` makes the local TP block the matrix (``--reg-tp-mode blockwise``: no TP traffic,
    the update then depends on the TP degree)."""
    if param.ndim != 2:
        raise ValueError(f"Megatron parameter {name} of shape {list(param.shape)}: only 2-D weights have a layout")
    a, b = param.shape
    if not getattr(param, "tensor_model_parallel", False) or blockwise:
        return Layout((a, b), (0, a), (0, b), fused=_qkv_fused(param, name, a, a, split_qkv))
    dim, stride = getattr(param, "partition_dim", -1), getattr(param, "partition_stride", 1)
    if stride != 1:
        raise ValueError(f"Megatron parameter {name} has partition_stride={stride}: strided tensor-parallel "
                         f"partitions (rank t holds every T-th chunk) are not supported, only stride 1")
    if dim not in (0, 1):
        raise ValueError(f"Megatron parameter {name} is tensor-parallel with partition_dim={dim}; a 2-D weight "
                         f"must be split along dim 0 (ColumnParallelLinear) or 1 (RowParallelLinear)")
    if getattr(param, "is_gtp_weight_remat", False):
        raise ValueError(f"Megatron parameter {name} is also sharded by GTP weight rematerialisation, "
                         f"which reg_dist layouts do not describe")
    if a == 0 or b == 0:
        raise ValueError(f"Megatron parameter {name} has an empty local shard {list(param.shape)}")
    group = _default_tp_group(param) if group is None else group
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"Megatron parameter {name}: this rank is not in the TP group given for it")
    if dim == 0:
        m, n, rows, cols = size * a, b, (rank * a, (rank + 1) * a), (0, b)
    else:
        m, n, rows, cols = a, size * b, (0, a), (rank * b, (rank + 1) * b)
    fused = _qkv_fused(param, name, m, a, split_qkv)
    if fused is not None and dim != 0:
        raise ValueError(f"QKV parameter {name} is split along columns; Megatron splits QKV rows (dim 0)")
    groups = (("tp", group),) if size > 1 else ()
    return Layout((m, n), rows, cols, groups=groups, fused=fused)


def attach_layouts(module: nn.Module, split_qkv: bool = True, blockwise: bool = False) -> int:
    """Set ``p.reg_layout`` on every tensor-parallel parameter of 2 or more dims of a Megatron
    ``module`` (with the ``tp_group`` of the layer owning it, where it names one); return how many.
    Where the layer records its logical ``output_size`` × ``input_size``, the weight's layout must
    have that shape (its TP block, with ``blockwise``). ``split_qkv=False``: ``is_qkv`` weights stay
    one matrix each. Grouped-GEMM experts (``TEGroupedMLP``) are refused."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    attached, seen = 0, set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, TEGroupedMLP):
            raise ValueError(f"Megatron module {mod_name}: {GROUPED_EXPERTS}; build SequentialMLP experts "
                             f"(without --moe-grouped-gemm)")
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or p.ndim < 2 or not getattr(p, "tensor_model_parallel", False):
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            tp_group = getattr(mod, "tp_group", None)
            layout = megatron_layout(p, name, tp_group if isinstance(tp_group, dist.ProcessGroup) else None,
                                     split_qkv, blockwise)
            sizes = (getattr(mod, "output_size", None), getattr(mod, "input_size", None))
            if p_name == "weight" and all(isinstance(s, int) for s in sizes) and not blockwise and layout.shape != sizes:
                raise ValueError(f"Megatron parameter {name}: local shard {list(p.shape)} over its TP group "
                                 f"makes a {list(layout.shape)} matrix, but its layer is {list(sizes)}")
            setattr(p, LAYOUT_ATTR, layout)
            attached += 1
    return attached
