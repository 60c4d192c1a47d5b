"""Sharded matrices: layouts (which elements a rank holds), exact statistics over them, owner moves,
and REG, Muon and MuonEq stepping FSDP2, tensor-parallel and fused parameters in place."""

from .dtensor import dtensor_layout, mark_fused
from .layout import Layout, Rect, fused_rows
from .optimizer import REG, Muon, MuonEq
from .owner import OwnerPlan
from .stats import row_col_stats, sharded_equilibrate_, sharded_frobenius_norms, sharded_racs_

__all__ = [
    "REG",
    "Muon",
    "MuonEq",
    "Layout",
    "OwnerPlan",
    "Rect",
    "dtensor_layout",
    "fused_rows",
    "mark_fused",
    "row_col_stats",
    "sharded_equilibrate_",
    "sharded_frobenius_norms",
    "sharded_racs_",
]
