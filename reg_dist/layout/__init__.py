"""Which elements of a logical matrix a rank holds, and which process groups split it.

``rects``: ``Layout`` (rows × cols block, optional flat range, groups, fused blocks) and its local
rectangles; ``shape``: the one rule that views any parameter as matrices, and the trivial layout;
``dtensor``: layouts read from DTensor placements (FSDP2, tensor parallelism, both).
"""

from .dtensor import dim_names, dtensor_layout, local_tensor, mesh_group
from .rects import Layout, Rect, Runs, block_shapes, check_segments, fused_rows
from .shape import FUSED_ATTR, LAYOUT_ATTR, mark_fused, matrix_view, storage_shape, whole_layout

__all__ = [
    "FUSED_ATTR",
    "LAYOUT_ATTR",
    "Layout",
    "Rect",
    "Runs",
    "block_shapes",
    "check_segments",
    "dim_names",
    "dtensor_layout",
    "fused_rows",
    "local_tensor",
    "mark_fused",
    "matrix_view",
    "mesh_group",
    "storage_shape",
    "whole_layout",
]
