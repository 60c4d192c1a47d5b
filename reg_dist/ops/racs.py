"""RACS, the REG transform: row-and-column scaling (one symmetric Ruiz step, repeatable).

    repeat iters times:
        r_i = ||X[i, :]||_p,  c_j = ||X[:, j]||_p          (both from the same X)
        X   = diag(r + eps)^e · X · diag(c + eps)^e       (e = ``exponent``: −1/2, ALGORITHMS.md §1,
                                                       unless given; REG's default is −1)

x is ``(..., m, n)``; every trailing matrix is balanced on its own.
"""

import math

import torch
from torch import Tensor

from .stats import acc_dtype, check_count, check_matrix, check_p, check_positive, row_col_norms, scale_rows_cols_


def check_racs_args(p: float, iters: int, eps: float, exponent: float = -0.5) -> None:
    check_p(p)
    check_count("iters", iters)
    check_positive("eps", eps)
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not -math.inf < exponent < 0:
        raise ValueError(f"exponent must be a finite number < 0 (the scaling's power), got {exponent!r}")


def scaling_(norms: Tensor, eps: float, exponent: float) -> Tensor:
    """In place ``(norms + eps)^exponent``, the row or column scaling factors (``rsqrt`` for −1/2)."""
    norms.add_(eps)
    return norms.rsqrt_() if exponent == -0.5 else norms.pow_(exponent)


def racs_(x: Tensor, p: float = 2.0, iters: int = 1, eps: float = 1e-8, exponent: float = -0.5) -> Tensor:
    """In-place RACS of ``x`` (``(..., m, n)``, fp32 or fp64); returns x."""
    for _ in range(iters):
        r, c = row_col_norms(x, p)
        scale_rows_cols_(x, scaling_(r, eps, exponent), scaling_(c, eps, exponent))
    return x


def racs(x: Tensor, p: float = 2.0, iters: int = 1, eps: float = 1e-8, exponent: float = -0.5) -> Tensor:
    """RACS of ``x`` (``(..., m, n)``), same shape and dtype; computed in fp32 (fp64 for fp64).
    ``racs(x, exponent=-1.0)`` is the transform of ``reg_dist.REG``'s default."""
    check_matrix(x, "racs")
    check_racs_args(p, iters, eps, exponent)
    work = x.to(acc_dtype(x.dtype), copy=True)
    return racs_(work, p, iters, eps, exponent).to(x.dtype)
