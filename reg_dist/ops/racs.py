"""RACS, the REG transform: row-and-column scaling (one symmetric Ruiz step, repeatable).

    repeat iters times:
        r_i = ||X[i, :]||_p,  c_j = ||X[:, j]||_p          (both from the same X)
        X   = diag(r + eps)^(-1/2) · X · diag(c + eps)^(-1/2)

x is ``(..., m, n)``; every trailing matrix is balanced on its own.
"""

import torch
from torch import Tensor

from .stats import acc_dtype, check_count, check_matrix, check_p, check_positive, row_col_norms, scale_rows_cols_


def check_racs_args(p: float, iters: int, eps: float) -> None:
    check_p(p)
    check_count("iters", iters)
    check_positive("eps", eps)


def racs_(x: Tensor, p: float = 2.0, iters: int = 1, eps: float = 1e-8) -> Tensor:
    """In-place RACS of ``x`` (``(..., m, n)``, fp32 or fp64); returns x."""
    for _ in range(iters):
        r, c = row_col_norms(x, p)
        scale_rows_cols_(x, r.add_(eps).rsqrt_(), c.add_(eps).rsqrt_())
    return x


def racs(x: Tensor, p: float = 2.0, iters: int = 1, eps: float = 1e-8) -> Tensor:
    """RACS of ``x`` (``(..., m, n)``), same shape and dtype; computed in fp32 (fp64 for fp64)."""
    check_matrix(x, "racs")
    check_racs_args(p, iters, eps)
    work = x.to(acc_dtype(x.dtype), copy=True)
    return racs_(work, p, iters, eps).to(x.dtype)
