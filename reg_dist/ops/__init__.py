"""Pure tensor math on batches of matrices ``(..., m, n)``: no state, no torch.distributed."""

from .equilibrate import equilibrate, equilibrate_
from .newton_schulz import COEFFICIENTS, newton_schulz
from .racs import racs, racs_
from .stats import row_col_norms, row_col_pow_sums

__all__ = [
    "COEFFICIENTS",
    "equilibrate",
    "equilibrate_",
    "newton_schulz",
    "racs",
    "racs_",
    "row_col_norms",
    "row_col_pow_sums",
]
