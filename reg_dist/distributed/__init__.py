"""Sharded matrices: layouts (which elements a rank holds) and exact statistics over them."""

from .layout import Layout, Piece
from .stats import row_col_stats, sharded_equilibrate_, sharded_frobenius_norms, sharded_racs_

__all__ = ["Layout", "Piece", "row_col_stats", "sharded_equilibrate_", "sharded_frobenius_norms", "sharded_racs_"]
