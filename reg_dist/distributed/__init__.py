"""Sharded matrices: layouts (which elements a rank holds), exact statistics over them, and REG
stepping DTensor parameters (FSDP2, tensor parallelism) in place on their shards."""

from .dtensor import dtensor_layout
from .layout import Layout, Piece
from .optimizer import REG
from .stats import row_col_stats, sharded_equilibrate_, sharded_frobenius_norms, sharded_racs_

__all__ = [
    "REG",
    "Layout",
    "Piece",
    "dtensor_layout",
    "row_col_stats",
    "sharded_equilibrate_",
    "sharded_frobenius_norms",
    "sharded_racs_",
]
