"""Row and column statistics of a batch of matrices, accumulated in fp32 (fp64 for fp64 input).

Shapes: ``x`` is ``(..., m, n)``; row statistics are ``(..., m)``, column statistics ``(..., n)``.
Sums of ``|x|^p`` (max of ``|x|`` for ``p = inf``) are what a sharded matrix reduces across ranks;
``pow_sums_to_norms`` turns the reduced sums into norms.
"""

import math

import torch
from torch import Tensor

from . import fused


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for statistics of a tensor of ``dtype``: fp64 stays fp64, the rest fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(x: Tensor, op: str) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a floating-point tensor of shape (..., m, n), got {got}")


def abs_powers(x: Tensor, p: float) -> Tensor:
    """``|x|^p`` in the accumulation dtype (``|x|`` for p = inf, whose statistics are maxima)."""
    a = x.to(acc_dtype(x.dtype))
    if p == 2:
        return a * a  # measured 3× faster than a.square() on the CPU (2.3 vs 0.69 ms for 3072 × 768, 1 thread)
    return a.abs() if p in (1, math.inf) else a.abs().pow_(p)


def row_col_pow_sums(x: Tensor, p: float = 2.0, rows: bool = True, cols: bool = True) -> tuple[Tensor | None, ...]:
    """``(r, c)``: ``r_i = Σ_j |x_ij|^p``, ``c_j = Σ_i |x_ij|^p`` (p = inf: max); None where not asked.

    Each matrix is read once for both (``fused.add_pow_sums_``), or, where that kernel does not apply,
    its powers are formed once (one m × n temporary at a time) and both sums read from them.
    """
    d = acc_dtype(x.dtype)
    flat = x.reshape(-1, *x.shape[-2:])
    r = torch.zeros(flat.shape[:-1], dtype=d, device=x.device) if rows else None
    c = torch.zeros((flat.shape[0], flat.shape[-1]), dtype=d, device=x.device) if cols else None
    for b in range(flat.shape[0]):
        if fused.add_pow_sums_(flat[b], p, None if r is None else r[b], None if c is None else c[b]):
            continue
        q = abs_powers(flat[b], p)
        for out, dim in ((r, -1), (c, -2)):
            if out is None:
                continue
            if p == math.inf:
                torch.amax(q, dim, out=out[b])
            else:
                torch.sum(q, dim, out=out[b])
    return (
        None if r is None else r.view(*x.shape[:-1]),
        None if c is None else c.view(*x.shape[:-2], x.shape[-1]),
    )


def pow_sums_to_norms_(s: Tensor, p: float) -> Tensor:
    """In place ``s ← s^(1/p)`` (identity for p = inf, where s already holds maxima)."""
    if p == math.inf or p == 1:
        return s
    return s.sqrt_() if p == 2 else s.pow_(1.0 / p)


def row_col_norms(x: Tensor, p: float = 2.0) -> tuple[Tensor, Tensor]:
    """``r_i = ||x[i, :]||_p`` and ``c_j = ||x[:, j]||_p`` (``p = inf``: max |x|), both from the same x."""
    r, c = row_col_pow_sums(x, p)
    return pow_sums_to_norms_(r, p), pow_sums_to_norms_(c, p)


def scale_rows_cols_(x: Tensor, row: Tensor | None, col: Tensor | None) -> Tensor:
    """In place ``x ← diag(row) · x · diag(col)``; ``row`` is ``(..., m)``, ``col`` ``(..., n)``, None skips."""
    if x.ndim == 2 and fused.scale_(x, row, col) is not None:
        return x
    if row is not None:
        x.mul_(row.unsqueeze(-1))
    if col is not None:
        x.mul_(col.unsqueeze(-2))
    return x


def check_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (p >= 1 or p == math.inf):
        raise ValueError(f"p must be a number >= 1 or math.inf (the row/column p-norm), got {p!r}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
