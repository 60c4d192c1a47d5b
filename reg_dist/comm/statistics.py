"""Exact row/column statistics of sharded matrices: local partial sums, packed all-reduces.

For parameters ``k = 1 … K``, each held by this rank as ``locals[k]`` described by ``layouts[k]``:

    r_k = Σ over held elements of |x|^p into its logical row   (length m_k; p = inf: max)
    c_k = the same into its logical column, per fused matrix     (B_k × n_k; B_k = 1 unless fused)

then, for each group name in sorted order, the vectors of every matrix split over that group are
packed into one buffer and reduced with a single ``all_reduce`` (SUM, or MAX for p = inf). Every
rank then knows the full row and column statistics of every matrix it holds a piece of, and
scales its own elements: RACS, equilibration and the RMS scale are exact under any layout, with
O(m + n) traffic per matrix and one collective per group, never a gather.
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.equilibrate import check_equilibrate_args
from ..ops.racs import check_racs_args
from ..layout import Layout
from ..ops import fused
from ..ops.stats import abs_powers, acc_dtype, pow_sums_to_norms_
from .collectives import CommStats, reduce_packed


def partial_row_col(local: Tensor, layout: Layout, p: float, cols: bool = True) -> Tensor:
    """``cat(r, c)`` ``(m + K·n,)`` of this rank's elements: sums of |x|^p (max for p = inf) into each
    logical row of the parameter and each column of each of its K fused matrices (``r`` alone,
    ``(m,)``, without ``cols``)."""
    (m, n), blocks = layout.shape, len(layout.block_shapes)
    out = torch.zeros(m + (blocks * n if cols else 0), dtype=acc_dtype(local.dtype), device=local.device)
    rows, columns = out[:m], out[m:].view(blocks if cols else 0, n)
    for view, r in layout.pieces(local):
        row = rows[r.row : r.row + r.h]
        if fused.add_pow_sums_(view, p, row, columns[r.block, r.col : r.col + r.w] if cols else None):
            continue
        q = abs_powers(view, p)
        if p == math.inf:
            torch.maximum(row, q.amax(-1), out=row)
        else:
            row += q.sum(-1)
        if cols:
            col = columns[r.block, r.col : r.col + r.w]
            if p == math.inf:
                torch.maximum(col, q.amax(-2), out=col)
            else:
                col += q.sum(-2)
    return out


def momentum_partial_row_col(g: Tensor, buf: Tensor, out: Tensor, layout: Layout, p: float, cols: bool, mu: float,
                             nesterov: bool) -> Tensor | None:
    """The momentum ``N`` (``optim.momentum``) of local ``g``, ``buf`` into ``out`` and its ``partial_row_col``
    from the same pass (``fused.momentum_into_`` on each rectangle); None, having written nothing, where
    that kernel does not apply."""
    (m, n), blocks = layout.shape, len(layout.block_shapes)
    vec = torch.zeros(m + (blocks * n if cols else 0), dtype=torch.float32, device=out.device)
    rows, columns = vec[:m], vec[m:].view(blocks if cols else 0, n)
    flat_g, flat_buf = g.reshape(-1), buf.view(-1)
    for view, r in layout.pieces(out):
        span = slice(r.start, r.start + r.h * r.w)
        if not fused.momentum_into_(flat_g[span].view(r.h, r.w), flat_buf[span].view(r.h, r.w), view, mu, nesterov,
                                    p, rows[r.row : r.row + r.h],
                                    columns[r.block, r.col : r.col + r.w] if cols else None):
            return None  # the first piece: all pieces share dtypes and device
    return vec


def row_col_stats(locals_: list[Tensor], layouts: list[Layout], p: float, stats: CommStats | None = None,
                  cols: bool = True, partials: list[Tensor | None] | None = None) -> list[tuple[Tensor, Tensor | None]]:
    """Full ``r (m,)`` and ``c (K, n)`` of every parameter (sums of |x|^p, or maxima for p = inf),
    reduced across ranks: one packed reduction per group name (``c`` None without ``cols``).
    ``partials``: the local ``partial_row_col`` of those parameters that already have it (else None)."""
    partials = partials or [None] * len(locals_)
    vectors = [v if v is not None else partial_row_col(x, lay, p, cols)
               for x, lay, v in zip(locals_, layouts, partials)]
    reduce_packed(vectors, layouts, dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM, stats)
    return [(v[: lay.shape[0]], v[lay.shape[0] :].view(-1, lay.shape[1]) if cols else None)
            for v, lay in zip(vectors, layouts)]


def scale_local_(local: Tensor, layout: Layout, row: Tensor | None, col: Tensor | None,
                 squares: bool = False) -> Tensor | None:
    """In place ``x_ij ← row_i · x_ij · col_kj`` on this rank's elements (logical row i, column j of
    fused matrix k); ``row (m,)``, ``col (K, n)``. With ``squares``, returns ``(K,)`` the local sums of
    the scaled x² of each fused matrix (from the same pass where the fused kernel applies)."""
    sq = torch.zeros(len(layout.block_shapes), dtype=acc_dtype(local.dtype), device=local.device) if squares else None
    for view, r in layout.pieces(local):
        rs = None if row is None else row[r.row : r.row + r.h]
        cs = None if col is None else col[r.block, r.col : r.col + r.w]
        done = fused.scale_(view, rs, cs)
        if done is None:
            if rs is not None:
                view.mul_(rs.unsqueeze(-1))
            if cs is not None:
                view.mul_(cs.unsqueeze(-2))
        if sq is not None:
            sq[r.block] += done if done is not None else torch.linalg.vector_norm(view, dtype=sq.dtype).square()
    return sq


def block_rows(layout: Layout) -> Tensor:
    """``(m,)`` the fused matrix each logical row of the parameter belongs to."""
    index = torch.empty(layout.shape[0], dtype=torch.long)
    for start, end, k in layout.segments:
        index[start:end] = k
    return index


def imbalance(r: Tensor, c: Tensor, rows: Tensor) -> Tensor:
    """``(K,)`` how far each fused matrix is from balanced: the largest of max/min − 1 over its non-zero
    row norms ``r (m,)`` (``rows``: each row's matrix) and over its non-zero column norms ``c (K, n)``;
    0 for a matrix whose norms are all equal (or all zero)."""
    def spread(v: Tensor, dim: int, mask: Tensor) -> Tensor:
        high = torch.where(mask, v, 0).amax(dim)
        low = torch.where(mask, v, math.inf).amin(dim)
        return torch.where(mask.any(dim), high / low - 1, 0)

    k, index = c.shape[0], torch.arange(r.shape[0], device=r.device)
    rows = rows.to(r.device)
    per_row = torch.zeros(k, r.shape[0], dtype=r.dtype, device=r.device)
    per_row[rows, index] = r
    owned = torch.zeros_like(per_row, dtype=torch.bool)
    owned[rows, index] = True
    return torch.maximum(spread(per_row, 1, owned & (per_row > 0)), spread(c, 1, c > 0))


def sharded_racs_(locals_: list[Tensor], layouts: list[Layout], p: float = 2.0, iters: int = 1,
                  eps: float = 1e-8, stats: CommStats | None = None, squares: bool = False,
                  partials: list[Tensor | None] | None = None, exponent: float = -0.5, tol: float = 0.0,
                  averages: list[Tensor] | None = None, beta: float = 0.0) -> tuple[list[Tensor] | None, list[Tensor]]:
    """RACS (ops.racs) of every sharded matrix, in place on the local elements: ``iters`` times
    ``x_ij ← (r_i + eps)^exponent · x_ij · (c_j + eps)^exponent``. Returns, with ``squares``, the ``(K,)``
    local sums of squares of each result's fused matrices (``sharded_frobenius_norms``' input; else None),
    and the ``(K,)`` balancing steps each fused matrix took.

    ``partials``: the first iteration's local sums where they are known (``row_col_stats``; the engine
    gives the raw gradient's for ``stats="gradient"``). ``averages``: each parameter's ``(m + K·n,)``
    running average of the first iteration's reduced sums, ``a ← beta·a + (1 − beta)·s``, whose value is
    used in their place. ``tol > 0``: a fused matrix whose row and column norms agree within ``tol``
    (``imbalance``) is left as it is from then on; the reductions still run ``iters`` times where a
    layout is split over ranks (every rank of a group reduces the same vectors), and stop early where
    none is."""
    check_racs_args(p, iters, eps)
    steps = [torch.zeros(len(lay.block_shapes), dtype=torch.long) for lay in layouts]
    rows = [block_rows(lay) for lay in layouts] if tol > 0 else []
    split = any(lay.groups for lay in layouts)
    out = None
    for it in range(iters):
        last = squares and it == iters - 1
        sums = row_col_stats(locals_, layouts, p, stats, partials=partials if it == 0 else None)
        if it == 0 and averages is not None:
            sums = [(a.lerp_(torch.cat((r, c.reshape(-1))), 1.0 - beta)[: r.shape[0]].clone(),
                     a[r.shape[0] :].view_as(c).clone()) for a, (r, c) in zip(averages, sums)]
        norms = [(pow_sums_to_norms_(r, p), pow_sums_to_norms_(c, p)) for r, c in sums]
        active = [torch.ones(len(lay.block_shapes), dtype=torch.bool) for lay in layouts]
        if tol > 0:
            active = [imbalance(r, c, rw) > tol for (r, c), rw in zip(norms, rows)]
            if not split and not any(a.any() for a in active):
                return ([scale_local_(x, lay, None, None, squares=True) for x, lay in zip(locals_, layouts)]
                        if squares else None), steps
        out = []
        for x, lay, (r, c), on, rw, n in zip(locals_, layouts, norms, active, rows or [None] * len(norms), steps):
            r, c = r.add_(eps), c.add_(eps)
            r, c = (r.rsqrt_(), c.rsqrt_()) if exponent == -0.5 else (r.pow_(exponent), c.pow_(exponent))
            if not on.all():
                r[~on[rw.to(on.device)]], c[~on] = 1.0, 1.0
            n += on.cpu()
            out.append(scale_local_(x, lay, r, c, squares=last))
    return (out if squares else None), steps


def sharded_equilibrate_(locals_: list[Tensor], layouts: list[Layout], mode: str = "row",
                         exponent: float = -0.5, eps: float = 1e-8, stats: CommStats | None = None,
                         partials: list[Tensor | None] | None = None) -> None:
    """Equilibration (ops.equilibrate) of every sharded matrix, in place on the local elements
    (``partials``: the local sums where they are known, as ``row_col_stats``)."""
    check_equilibrate_args(mode, exponent, eps)
    for x, lay, (r, c) in zip(locals_, layouts, row_col_stats(locals_, layouts, 2.0, stats, partials=partials)):
        scale_local_(x, lay, r.add_(eps).pow_(exponent) if mode != "col" else None,
                     c.add_(eps).pow_(exponent) if mode != "row" else None)


def sharded_frobenius_norms(locals_: list[Tensor], layouts: list[Layout], stats: CommStats | None = None,
                            squares: list[Tensor] | None = None) -> list[Tensor]:
    """``(K,)`` Frobenius norms of the fused matrices of every sharded parameter (the "rms" scale),
    one packed reduction; ``squares``: the local sums of squares where a stage already has them."""
    if squares is None:
        squares = []
        for x, lay in zip(locals_, layouts):
            out = torch.zeros(len(lay.block_shapes), dtype=acc_dtype(x.dtype), device=x.device)
            for view, r in lay.pieces(x):
                out[r.block] += torch.linalg.vector_norm(view, dtype=out.dtype).square()
            squares.append(out)
    reduce_packed(squares, layouts, dist.ReduceOp.SUM, stats)
    return [v.sqrt_() for v in squares]
