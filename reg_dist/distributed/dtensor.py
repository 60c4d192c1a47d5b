"""Layouts of DTensor parameters: tensor parallelism (``parallelize_module``), FSDP2
(``fully_shard``) and both on a 2-D mesh, read from the DTensor's own placements."""

from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .layout import Layout


def dtensor_layout(t: DTensor, name: str) -> Layout:
    """The block of the 2-D DTensor ``t`` this rank holds; its groups are the mesh dimensions that shard it."""
    if t.ndim != 2:
        raise ValueError(f"sharded parameter {name} of shape {list(t.shape)}: only 2-D DTensor matrices are "
                         f"supported by the statistics path; give it an algorithm='adamw' group")
    for placement in t.placements:
        if placement.is_partial():
            raise ValueError(f"sharded parameter {name} has a Partial placement; a parameter must be Shard or Replicate")
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local_shape) != tuple(t.to_local().shape):
        raise ValueError(f"sharded parameter {name}: local shard {tuple(t.to_local().shape)} does not match "
                         f"{tuple(local_shape)}, the shard its placements {t.placements} describe")
    mesh = t.device_mesh
    names = mesh.mesh_dim_names or tuple(f"mesh{i}" for i in range(mesh.ndim))
    # every placement but Replicate splits the matrix (Shard, and FSDP2+TP's _StridedShard, which is_shard() denies)
    groups = sorted((names[i], mesh.get_group(i)) for i, pl in enumerate(t.placements) if not pl.is_replicate())
    rows = (offset[0], offset[0] + local_shape[0])
    cols = (offset[1], offset[1] + local_shape[1])
    return Layout(tuple(t.shape), rows, cols, groups=tuple(groups))

