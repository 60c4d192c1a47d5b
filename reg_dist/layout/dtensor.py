"""Layouts of DTensor parameters: tensor parallelism (``parallelize_module``), FSDP2
(``fully_shard``) and both on a 2-D mesh, read from the DTensor's own placements.

A 2-D parameter is one m × n matrix, or the fused matrices ``mark_fused`` names; a 3-D expert stack
``(E, m, n)`` (sharded along experts only) is the E fused matrices of its ``(E·m) × n`` view.
"""

import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .rects import Layout, fused_rows
from .shape import FUSED_ATTR


def _logical(p: Tensor, shape: tuple[int, ...]):
    if len(shape) == 3:
        e, m, n = shape
        return (e * m, n), fused_rows((m,) * e)
    return (shape[0], shape[1]), getattr(p, FUSED_ATTR, None)


def dtensor_layout(t: DTensor, name: str, blockwise: tuple[str, ...] = (), transposed: bool = False) -> Layout:
    """The elements of the DTensor ``t`` this rank holds; its groups are the mesh dimensions that
    shard it. With ``blockwise`` mesh dims (``("tp",)``), the block those dims give this rank is
    the logical matrix instead (each TP block its own matrix): its layout is relative to that block.
    ``transposed``: a 2-D weight stored in × out (Conv1D) whose matrix is its transpose, as is the
    local block the layout then describes."""
    layout = _stored_layout(t, name, blockwise)
    if not transposed:
        return layout
    if t.ndim != 2 or layout.fused is not None:
        raise ValueError(f"transposed parameter {name}: only a plain 2-D weight can be stored transposed")
    return Layout(layout.shape[::-1], layout.cols, layout.rows, groups=layout.groups)


def _stored_layout(t: DTensor, name: str, blockwise: tuple[str, ...]) -> Layout:
    if t.ndim not in (2, 3):
        raise ValueError(f"sharded parameter {name} of shape {list(t.shape)}: only 2-D matrices and 3-D "
                         f"expert stacks are supported on DTensors; give it an algorithm='adamw' group")
    for placement in t.placements:
        if placement.is_partial():
            raise ValueError(f"sharded parameter {name} has a Partial placement; a parameter must be Shard or Replicate")
        if t.ndim == 3 and not (placement.is_replicate() or getattr(placement, "dim", None) == 0):
            raise ValueError(f"3-D sharded parameter {name} may be split along its expert dim 0 only, got {t.placements}")
    mesh = t.device_mesh
    names = dim_names(mesh)
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    if tuple(local_shape) != tuple(t.to_local().shape):
        raise ValueError(f"sharded parameter {name}: local shard {tuple(t.to_local().shape)} does not match "
                         f"{tuple(local_shape)}, the shard its placements {t.placements} describe")
    split = [i for i, pl in enumerate(t.placements) if not pl.is_replicate()]  # _StridedShard denies is_shard()
    shape, base = tuple(t.shape), (0,) * t.ndim
    if any(names[i] in blockwise for i in split):
        if t.ndim != 2 or hasattr(t, FUSED_ATTR):
            raise ValueError(f"blockwise Newton–Schulz supports plain 2-D matrices, not {name}")
        own = [pl if names[i] in blockwise else Replicate() for i, pl in enumerate(t.placements)]
        shape, base = compute_local_shape_and_global_offset(t.shape, mesh, own)
        split = [i for i in split if names[i] not in blockwise]
    logical, fused = _logical(t, tuple(shape))
    scale = logical[0] // shape[0] if t.ndim == 3 else 1  # rows per expert
    rows = ((offset[0] - base[0]) * scale, (offset[0] - base[0] + local_shape[0]) * scale)
    cols = (offset[-1] - base[-1], offset[-1] - base[-1] + local_shape[-1])
    groups = sorted((names[i], mesh.get_group(i)) for i in split)
    return Layout(logical, rows, cols, groups=tuple(groups), fused=fused)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    """The mesh's dimension names; an unnamed 1-D mesh (a plain ``fully_shard(module)``) is ``("dp",)``,
    an unnamed n-D one ``("mesh0", …)``."""
    if mesh.mesh_dim_names:
        return tuple(mesh.mesh_dim_names)
    return ("dp",) if mesh.ndim == 1 else tuple(f"mesh{i}" for i in range(mesh.ndim))


def mesh_group(mesh: DeviceMesh, dims: tuple[str, ...]) -> dist.ProcessGroup | None:
    """One process group over this rank's sub-mesh along ``dims`` (None for no dims)."""
    names = dim_names(mesh)
    if not dims:
        return None
    if len(dims) == 1:
        return mesh.get_group(names.index(dims[0]))
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh[tuple(dims)]._flatten().get_group()
