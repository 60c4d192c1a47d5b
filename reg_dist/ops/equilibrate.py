"""Equilibration before Newton–Schulz (the MuonEq transform's first half).

    r_i = Σ_j X_ij²,  c_j = Σ_i X_ij²                    (squared norms, from the same X)
    "row":    X = diag((r + eps)^e) · X
    "col":    X = X · diag((c + eps)^e)
    "rowcol": X = diag((r + eps)^e) · X · diag((c + eps)^e)

x is ``(..., m, n)``; e is ``exponent`` (-1/2 by default).
"""

import math

from torch import Tensor

from .stats import acc_dtype, check_matrix, check_positive, row_col_pow_sums, scale_rows_cols_

MODES = ("row", "col", "rowcol")


def check_equilibrate_args(mode: str, exponent: float, eps: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or not math.isfinite(exponent):
        raise ValueError(f"exponent must be a finite number, got {exponent!r}")
    check_positive("eps", eps)


def equilibrate_(x: Tensor, mode: str = "row", exponent: float = -0.5, eps: float = 1e-8) -> Tensor:
    """In-place equilibration of ``x`` (``(..., m, n)``, fp32 or fp64); returns x."""
    r, c = row_col_pow_sums(x, 2.0, rows=mode != "col", cols=mode != "row")
    return scale_rows_cols_(x, None if r is None else r.add_(eps).pow_(exponent),
                            None if c is None else c.add_(eps).pow_(exponent))


def equilibrate(x: Tensor, mode: str = "row", exponent: float = -0.5, eps: float = 1e-8) -> Tensor:
    """Equilibrated ``x`` (``(..., m, n)``), same shape and dtype; computed in fp32 (fp64 for fp64)."""
    check_matrix(x, "equilibrate")
    check_equilibrate_args(mode, exponent, eps)
    work = x.to(acc_dtype(x.dtype), copy=True)
    return equilibrate_(work, mode, exponent, eps).to(x.dtype)
