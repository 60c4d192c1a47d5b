"""Exact row/column statistics of sharded matrices: local partial sums, packed all-reduces.

For parameters ``k = 1 … K``, each held by this rank as ``locals[k]`` described by ``layouts[k]``:

    r_k = Σ over held elements of |x|^p into its logical row   (length m_k; p = inf: max)
    c_k = the same into its logical column, per fused matrix     (B_k × n_k; B_k = 1 unless fused)

then, for each group name in sorted order, the entries of every matrix split over that group that
another rank of the group also touches (``Layout.shared``, from ``share_statistics``; all m + K·n
without it) are packed into one buffer and reduced with a single ``all_reduce`` (SUM, or MAX for
p = inf); a group with nothing to share makes no call. Every rank then knows the full row and column
statistics of every row and column it holds a piece of, and scales its own elements: RACS,
equilibration and the RMS scale are exact under any layout, never a gather. Under an FSDP row shard
the rows stay local and only the n column sums travel (each rank needs all of them); under a
row-parallel TP split only the held columns over dp and the held rows over tp; under a flat (ZeRO)
range only the rows cut at partition boundaries, beside the columns.
"""

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.equilibrate import check_equilibrate_args
from ..ops.racs import check_racs_args, scaling_
from ..layout import Layout, Runs
from ..ops import fused
from ..ops.stats import abs_powers, acc_dtype, pow_sums_to_norms_
from .agree import RIDE_ELEMENTS, Agreement
from .collectives import CommStats, all_gather_into, count, reduce_packed


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
                             nesterov: bool, commit: bool = True) -> Tensor | None:
    """The momentum ``N`` (``optim.momentum``) of local ``g``, ``buf`` into ``out`` and its ``partial_row_col``
    from the same pass (``fused.momentum_into_`` on each rectangle; ``buf`` updated with ``commit``); None,
    having written nothing, where that kernel does not apply."""
    (m, n), blocks = layout.shape, len(layout.block_shapes)
    vec = torch.zeros(m + (blocks * n if cols else 0), dtype=torch.float32, device=out.device)
    rows, columns = vec[:m], vec[m:].view(blocks if cols else 0, n)
    flat_g, flat_buf = g.reshape(-1), buf.view(-1)
    for view, r in layout.pieces(out):
        span = slice(r.start, r.start + r.h * r.w)
        if not fused.momentum_into_(flat_g[span].view(r.h, r.w), flat_buf[span].view(r.h, r.w), view, mu, nesterov,
                                    p, rows[r.row : r.row + r.h],
                                    columns[r.block, r.col : r.col + r.w] if cols else None, commit):
            return None  # the first piece: all pieces share dtypes and device
    return vec


def reduced_statistics(locals_: list[Tensor], layouts: list[Layout], p: float, stats: CommStats | None = None,
                       cols: bool = True, partials: list[Tensor | None] | None = None,
                       extend: list[Callable[[Tensor], Tensor] | None] | None = None,
                       agree: Agreement | None = None) -> list[Tensor]:
    """Every parameter's statistics vector ``cat(r, c)`` (sums of |x|^p, or maxima for p = inf), reduced
    across ranks: one packed reduction per group name (``reduce_shared``, or ``reduce_two_level`` where
    the layouts name an ``inner`` group). ``partials``: the local ``partial_row_col`` of those parameters
    that already have it (else None); ``extend[k]``, where given, maps parameter k's local vector to a
    longer one (``fold_columns``): before any reduction where its rows are whole on each rank
    (``rows_local``), else once they are summed over ``inner``. ``agree``: the non-finite agreement rides
    along, one more entry in every group's all-reduce, settled (``NonFiniteStep`` raised on every rank
    alike) before anything is returned."""
    partials = partials or [None] * len(locals_)
    extend = extend or [None] * len(locals_)
    vectors = [v if v is not None else partial_row_col(x, lay, p, cols)
               for x, lay, v in zip(locals_, layouts, partials)]
    two_level = any(lay.inner is not None for lay in layouts)
    early = [f if f is not None and (rows_local(lay) or not two_level) else None for f, lay in zip(extend, layouts)]
    vectors = [f(v) if f is not None else v for v, f in zip(vectors, early)]
    op = dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM
    carry = agree.entry(vectors[0]) if agree is not None else None
    if two_level:
        vectors = reduce_two_level(vectors, layouts, op, stats, [f if g is None else None for f, g in zip(extend, early)],
                                   carry)
    else:
        reduce_shared(vectors, layouts, op, stats, carry=carry)
    if agree is not None:
        agree.settle(carry)
    return vectors


def row_col_stats(locals_: list[Tensor], layouts: list[Layout], p: float, stats: CommStats | None = None,
                  cols: bool = True, partials: list[Tensor | None] | None = None,
                  agree: Agreement | None = None) -> list[tuple[Tensor, Tensor | None]]:
    """Full ``r (m,)`` and ``c (K, n)`` of every parameter (``reduced_statistics``; ``c`` None without ``cols``)."""
    vectors = reduced_statistics(locals_, layouts, p, stats, cols, partials, agree=agree)
    return [_row_col(v, lay, cols) for v, lay in zip(vectors, layouts)]


def _row_col(v: Tensor, lay: Layout, cols: bool = True) -> tuple[Tensor, Tensor | None]:
    """``r (m,)`` and ``c (K, n)`` of statistics vector ``v`` (``c`` None without ``cols``)."""
    m, n = lay.shape
    return v[:m], (v[m : lay.stat_length].view(-1, n) if cols else None)


def reduce_shared(vectors: list[Tensor], layouts: list[Layout], op: dist.ReduceOp,
                  stats: CommStats | None = None, names: tuple[str, ...] | None = None,
                  carry: Tensor | None = None, exclude: list[Tensor] | None = None) -> None:
    """In place: the entries of every statistics vector ``vectors[k]`` (its first ``len`` of m + K·n) that
    each group of ``layouts[k]`` shares, reduced over that group: one collective per group name (of
    ``names`` alone where given), none where no entry is shared and nothing is ``carry``-ed (a ``(1,)``
    entry reduced over every group, ``Agreement``). A vector longer than m + K·n (``fold_columns``: K·n
    more, mirroring its column entries) has those mirrors reduced beside them. ``exclude[k]``: entries of
    vector k (and their mirrors) left out (``reduce_two_level``'s other ranks' slices)."""
    groups = [dict(lay.groups) for lay in layouts]
    for name in sorted({g for gs in groups for g in gs if names is None or g in names}):
        picks = [pick for k, (v, lay, gs) in enumerate(zip(vectors, layouts, groups)) if name in gs
                 for pick in _picks(v, lay, name, exclude[k] if exclude is not None else None)]
        _reduce_picks(picks + ([(carry, slice(0, 1))] if carry is not None else []), op, _group(layouts, name), name,
                      stats)


def _extent(v: Tensor, lay: Layout) -> tuple[int, tuple[int, ...]]:
    """How many of ``v``'s entries are statistics (its first ``length`` of m + K·n), and the offsets at which
    they appear: 0, and ``len(v) − (m + K·n)`` more for the mirrors ``fold_columns`` appended."""
    length = min(v.numel(), lay.stat_length)
    return length, ((0, v.numel() - length) if v.numel() > length else (0,))


def _picks(v: Tensor, lay: Layout, name: str, exclude: Tensor | None) -> list[tuple[Tensor, slice | Tensor]]:
    """(vector, slice or index tensor) of the entries of ``v`` that group ``name`` shares, mirrors included,
    less ``exclude`` (and its mirrors)."""
    length, shifts = _extent(v, lay)
    runs = lay.shared_runs(name, length)
    if exclude is not None and exclude.numel():
        take = torch.zeros(v.numel(), dtype=torch.bool, device=v.device)
        for a, b in runs:
            for d in shifts:
                take[a + d : b + d] = True
        for d in shifts:
            take[exclude + d] = False
        index = take.nonzero().flatten()
        return [(v, index)] if index.numel() else []
    if len(runs) == 1:
        return [(v, slice(runs[0][0] + d, runs[0][1] + d)) for d in shifts]
    if not runs:
        return []
    index = lay.shared_index[name]
    index = index[index < length].to(v.device)
    return [(v, torch.cat([index + d for d in shifts]) if len(shifts) > 1 else index)]


def reduction_order(layouts: list[Layout]) -> list[str]:
    """The group names a statistics reduction of ``layouts`` goes over, in order: sorted, or ``inner``
    (``reduce_two_level``) first."""
    names = sorted({g for lay in layouts for g, _ in lay.groups})
    inner = next((lay.inner for lay in layouts if lay.inner is not None), None)
    return names if inner is None else [inner] + [g for g in names if g != inner]


def carries_agreement(layouts: list[Layout], group: dist.ProcessGroup | None) -> bool:
    """Whether the non-finite agreement should ride on a statistics reduction of ``layouts``
    (``Agreement``): an entry added to each of its all-reduces reaches every rank of ``group`` (None: the
    world) from every other (a one-hot vector of its ranks reduced over the layouts' groups in
    ``reduction_order``; there is a reduction: the layouts name a group), and no rank holds more than
    ``RIDE_ELEMENTS`` of their elements (``agree.RIDE_ELEMENTS``); the verdict agreed (MIN) over
    ``group``. Collective."""
    hot = torch.zeros(dist.get_world_size(group), dtype=torch.float64)
    hot[dist.get_rank(group)] = 1.0
    names = reduction_order(layouts)
    for name in names:
        dist.all_reduce(hot, group=_group(layouts, name))
    small = sum(lay.numel for lay in layouts) <= RIDE_ELEMENTS
    ok = torch.tensor([float(bool(names) and small and bool((hot > 0).all()))], dtype=torch.float64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


def _group(layouts: list[Layout], name: str) -> dist.ProcessGroup:
    """The process group ``name`` of ``layouts`` (the same one on every layout that names it)."""
    found = {id(g): g for lay in layouts for n, g in lay.groups if n == name}
    if len(found) != 1:
        raise ValueError(f"layouts on this rank name different process groups {name!r}")
    return next(iter(found.values()))


def _reduce_picks(picks: list[tuple[Tensor, slice | Tensor]], op: dist.ReduceOp, group: dist.ProcessGroup,
                  name: str, stats: CommStats | None) -> None:
    """The entries ``picks`` (vector, slice or index) packed into one all-reduce over ``group``, in place."""
    if not picks:
        return
    buf = torch.cat([v[at] if isinstance(at, slice) else v.index_select(0, at) for v, at in picks])
    dist.all_reduce(buf, op=op, group=group)
    chunks = buf.split([(at.stop - at.start) if isinstance(at, slice) else at.numel() for _, at in picks])
    for (v, at), chunk in zip(picks, chunks):
        if isinstance(at, slice):
            v[at].copy_(chunk)
        else:
            v.index_copy_(0, at, chunk)
    count(stats, name, buf, "all_reduce", group)


def _index(runs: Runs, length: int) -> Tensor:
    """The entries of ``runs`` below ``length``, as int64 indices."""
    parts = [torch.arange(a, min(b, length)) for a, b in runs if a < length]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def reduce_two_level(vectors: list[Tensor], layouts: list[Layout], op: dist.ReduceOp, stats: CommStats | None,
                     late: list[Callable[[Tensor], Tensor] | None], carry: Tensor | None = None) -> list[Tensor]:
    """``reduce_shared`` over ``inner`` (``Layout.inner``, the one group sharing row entries, from
    ``share_statistics``) first, then ``late[k]`` applied where given, then over the other group, where
    the ``replicated`` entries (column sums equal on every rank of ``inner`` by then) are cut into
    ``size(inner)`` consecutive slices over all the vectors, in order, and each rank reduces its own slice
    alone; one all-gather over ``inner`` then hands every rank the others' (``(size · ⌈L/size⌉,)`` floats,
    L the replicated entries). The outer group's bytes of those entries shrink ``size(inner)``-fold.

    A mirror entry (``fold_columns``' t) of a replicated column is reduced with its column and not
    gathered: it is complete only on the rank whose slice holds it and zeroed elsewhere, so that each
    rank's Σ_j c_j² t_j summed over ``inner`` counts every column once. ``carry`` (``reduce_shared``) rides
    on both all-reduces."""
    inner, *outer = reduction_order(layouts)
    reduce_shared(vectors, layouts, op, stats, names=(inner,), carry=carry)
    vectors = [f(v) if f is not None else v for v, f in zip(vectors, late)]
    group = _group(layouts, inner)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    reps = [_index(lay.replicated, _extent(v, lay)[0]).to(v.device) for v, lay in zip(vectors, layouts)]
    total = sum(len(r) for r in reps)
    chunk = -(-total // size)
    lo, hi, start = min(me * chunk, total), min((me + 1) * chunk, total), 0
    mine, others = [], []
    for r in reps:
        a, b = min(max(lo - start, 0), len(r)), min(max(hi - start, 0), len(r))
        mine.append(r[a:b])
        others.append(torch.cat((r[:a], r[b:])))
        start += len(r)
    reduce_shared(vectors, layouts, op, stats, names=tuple(outer), carry=carry, exclude=others)
    for v, lay, other in zip(vectors, layouts, others):
        for d in _extent(v, lay)[1][1:]:  # the mirrors: only this rank's slice is complete
            v[other + d] = 0
    if total:
        send = torch.zeros(chunk, dtype=vectors[0].dtype, device=vectors[0].device)
        flat = torch.cat([v[i] for v, i in zip(vectors, mine)])
        send[: flat.numel()] = flat
        out = torch.empty(size * chunk, dtype=send.dtype, device=send.device)
        all_gather_into(out, send, group=group)
        count(stats, inner, out, "all_gather", group)
        start = 0  # rank j's slice sits at j·chunk of ``out``, as it does in the list of replicated entries
        for v, r in zip(vectors, reps):
            v[r] = out[start : start + len(r)]
            start += len(r)
    return vectors


def _touched(lay: Layout) -> list[tuple[int, int]]:
    """The entries ``[a, b)`` of ``lay``'s statistics vector its elements add to: the rows of its
    rectangles, and their columns of each fused matrix."""
    m, n = lay.shape
    spans = sorted({(r.row, r.row + r.h) for r in lay.rects} | {(m + r.block * n + r.col, m + r.block * n + r.col + r.w)
                                                                for r in lay.rects})
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _runs(mask: Tensor) -> tuple[tuple[int, int], ...]:
    """The runs ``[a, b)`` where bool ``mask`` is True."""
    edges = torch.diff(mask.to(torch.int8), prepend=mask.new_zeros(1, dtype=torch.int8),
                       append=mask.new_zeros(1, dtype=torch.int8)).nonzero().flatten().tolist()
    return tuple(zip(edges[::2], edges[1::2]))


def _describe(lay: Layout) -> list[int]:
    s, e = lay.flat if lay.flat is not None else (-1, -1)
    return [*lay.rows, *lay.cols, s, e]


def _touched_by(lay: Layout, blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Starts and ends of the entries of ``lay``'s statistics vector that each of the ranks described by
    ``blocks`` (``(ranks, 6)``, ``_describe``) touches, one run per rank, row range and fused matrix."""
    (m, n), starts, ends = lay.shape, [], []
    r0, r1, c0, c1, s, _ = blocks.T.contiguous()
    held = (s < 0) & (r1 > r0) & (c1 > c0)  # whole blocks, vectorised; flat ranges one by one below
    starts.append(r0.masked_select(held))
    ends.append(r1.masked_select(held))
    for k in range(len(lay.block_shapes)):
        hit = torch.zeros_like(held)
        for start, end, b in lay.segments:
            if b == k:
                hit |= torch.maximum(r0, torch.full_like(r0, start)) < torch.minimum(r1, torch.full_like(r1, end))
        hit &= held
        starts.append(m + k * n + c0.masked_select(hit))
        ends.append(m + k * n + c1.masked_select(hit))
    for r0_, r1_, c0_, c1_, s_, e_ in blocks[s >= 0].tolist():
        other = Layout(lay.shape, (r0_, r1_), (c0_, c1_), (s_, e_), fused=lay.fused)
        runs = torch.tensor(_touched(other), dtype=torch.int64).view(-1, 2)
        starts.append(runs[:, 0])
        ends.append(runs[:, 1])
    return torch.cat(starts), torch.cat(ends)


def share_statistics(layouts: list[Layout]) -> list[Layout]:
    """``layouts`` with ``shared`` filled in: per group name, the statistics entries that at least two
    ranks of the group touch (collective over each group: one all-gather of every member's block and
    flat range, in the order of the group names, as the reductions run).

    With one group a reduction over it is the whole sum, so reducing only the shared entries is exact.
    Over several groups (summed one after another) a rank's partial reaches another only through a
    chain of groups, and a group with one rank touching an entry may have to pass it on: each plan is
    checked once, against the full reduction, on the count of ranks touching each entry this rank
    touches. A matrix that fails it instead reduces, over each group, every entry some rank of the
    group touches and at least two ranks touch in all (exact when the groups form a grid: every
    partial reaches the whole grid); checked again, a matrix that fails that too keeps
    ``shared=None`` (every entry over every group).
    """
    groups = [dict(lay.groups) for lay in layouts]
    counts: list[dict[str, Tensor]] = [{} for _ in layouts]  # ranks of the group touching each entry
    for name in sorted({g for gs in groups for g in gs}):
        members = [k for k, gs in enumerate(groups) if name in gs]
        group = groups[members[0]][name]
        mine = torch.tensor([_describe(layouts[k]) for k in members], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        everyone = torch.stack(everyone)  # (ranks, matrices, 6)
        for j, k in enumerate(members):
            starts, ends = _touched_by(layouts[k], everyone[:, j])
            deltas = torch.zeros(layouts[k].stat_length + 1, dtype=torch.int64)
            deltas.index_add_(0, starts, torch.ones_like(starts))
            deltas.index_add_(0, ends, -torch.ones_like(ends))
            counts[k][name] = deltas.cumsum(0)[:-1]

    def plan(k: int, rule) -> Layout:
        return dataclasses.replace(layouts[k], shared=tuple((g, _runs(rule(c))) for g, c in sorted(counts[k].items())))

    out = [plan(k, lambda c: c >= 2) if lay.groups else lay for k, lay in enumerate(layouts)]
    several = [k for k, lay in enumerate(layouts) if len(lay.groups) > 1]
    checks = None  # (layouts, touched, totals) of the matrices split over several groups
    first_plan = True  # every matrix of this rank takes the plain plan
    if several:
        touched = [_touch_mask(layouts[k]) for k in several]
        totals = [t.to(torch.float64) for t in touched]  # ranks touching each entry, over every group
        reduce_packed(totals, [layouts[k] for k in several], dist.ReduceOp.SUM)
        failed = [i for i, ok in enumerate(_reaches([out[k] for k in several], [layouts[k] for k in several],
                                                   touched, totals)) if not ok]
        if failed:
            wider = [plan(several[i], lambda c, t=totals[i]: (c >= 1) & (t >= 2)) for i in failed]
            ok = _reaches(wider, [layouts[several[i]] for i in failed], [touched[i] for i in failed],
                          [totals[i] for i in failed])
            for i, lay, good in zip(failed, wider, ok):
                out[several[i]] = lay if good else layouts[several[i]]
        checks, first_plan = ([layouts[k] for k in several], touched, totals), not failed
    return _mark_two_level(_mark_whole_rows(out), counts, first_plan, several, checks)


def _rows_shared(lay: Layout, name: str) -> bool:
    """Whether group ``name`` shares a row entry of ``lay``'s statistics (all of them without a plan)."""
    return lay.shared is None or any(a < lay.shape[0] for a, _ in dict(lay.shared).get(name, ()))


def _mark_whole_rows(layouts: list[Layout]) -> list[Layout]:
    """``layouts`` with ``rows_whole`` set where no group of the matrix's ranks shares a row entry of its
    statistics, on any of them (collective: one MIN all-reduce per group name, as ``_reaches`` spreads
    its verdict), so that every rank holding the matrix decides alike (``fold_columns``)."""
    split = [k for k, lay in enumerate(layouts) if lay.groups]
    whole = [torch.tensor([float(not any(_rows_shared(layouts[k], name) for name, _ in layouts[k].groups))],
                          dtype=torch.float64) for k in split]
    reduce_packed(whole, [layouts[k] for k in split], dist.ReduceOp.MIN)
    out = list(layouts)
    for k, flag in zip(split, whole):
        out[k] = dataclasses.replace(layouts[k], rows_whole=bool(flag.item()))
    return out


def _mark_two_level(layouts: list[Layout], counts: list[dict[str, Tensor]], first_plan: bool, several: list[int],
                    checks: tuple[list[Layout], list[Tensor], list[Tensor]] | None) -> list[Layout]:
    """``layouts`` with ``inner`` and ``replicated`` set (``reduce_two_level``) where the split matrices name
    two groups, exactly one of which (``inner``: tensor parallelism's) shares a row entry of any of them,
    every matrix takes the plain plan, a matrix whose rows ``inner`` shares shares none of its columns
    there, every column of another matrix split over ``inner`` is touched by none or all of the ranks of
    each instance of ``inner`` (so that its column sums, ``replicated``, are equal on all of them once
    reduced there: all of its column entries, on every rank alike, so that the slices line up over both
    groups), and reducing ``inner`` first reaches every rank touching an entry (checked as
    ``_reaches``); else unchanged. Collective over both groups, in order: every rank decides alike."""
    split = [k for k, lay in enumerate(layouts) if lay.groups]
    groups: dict[str, dist.ProcessGroup] = {name: g for k in split for name, g in layouts[k].groups}
    if len(groups) != 2:
        return layouts
    names = sorted(groups)

    sharing = torch.tensor([float(any(name in dict(layouts[k].groups) and _rows_shared(layouts[k], name)
                                      for k in split)) for name in names], dtype=torch.float64)
    for name in names:
        dist.all_reduce(sharing, op=dist.ReduceOp.MAX, group=groups[name])
    if sharing.sum().item() != 1:
        return layouts
    inner = names[int(sharing.argmax().item())]
    size = dist.get_world_size(groups[inner])
    ok, replicated = first_plan and all(layouts[k].shared is not None for k in split), {}
    for k in split:
        lay = layouts[k]
        if not ok or inner not in dict(lay.groups):
            continue
        m = lay.shape[0]
        columns = tuple((max(a, m), b) for a, b in dict(lay.shared)[inner] if b > m)
        if _rows_shared(lay, inner):
            ok = not columns
        else:
            touching = counts[k][inner][m:]  # every column: on none of inner's ranks or on all
            ok = bool(((touching == 0) | (touching == size)).all())
            replicated[k] = ((m, lay.stat_length),)  # the same entries on every rank (the slices line up)
    if not _everywhere(ok, groups):
        return layouts
    out = [dataclasses.replace(lay, inner=inner, replicated=replicated.get(k, ())) if lay.groups else lay
           for k, lay in enumerate(layouts)]
    if checks is not None:  # the order inner-first must reach every holder of each entry too
        full, touched, totals = checks
        if not _everywhere(all(_reaches([out[k] for k in several], full, touched, totals, two_level=True)), groups):
            return layouts
    return out


def _everywhere(ok: bool, groups: dict[str, dist.ProcessGroup]) -> bool:
    """Whether ``ok`` holds on every rank the ``groups`` connect: a MIN all-reduce over each, in name order."""
    flag = torch.tensor([float(ok)], dtype=torch.float64)
    for name in sorted(groups):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=groups[name])
    return bool(flag.item())


def _touch_mask(lay: Layout) -> Tensor:
    """Bool ``(m + K·n,)``: the entries of ``lay``'s statistics vector its elements add to."""
    mask = torch.zeros(lay.stat_length, dtype=torch.bool)
    for a, b in _touched(lay):
        mask[a:b] = True
    return mask


def _reaches(planned: list[Layout], full: list[Layout], touched: list[Tensor], totals: list[Tensor],
             two_level: bool = False) -> list[bool]:
    """Whether reducing only the ``planned`` shared entries, group after group (``two_level``: by
    ``reduce_two_level``), counts every rank that touches each entry this rank touches (``totals``, from
    the full reduction), on every rank holding each matrix (collective over the groups of ``full``)."""
    got = [t.to(torch.float64) for t in touched]
    if two_level:
        reduce_two_level(got, planned, dist.ReduceOp.SUM, None, [None] * len(got))
    else:
        reduce_shared(got, planned, dist.ReduceOp.SUM)
    bad = [torch.tensor([float(not torch.equal(w[m], g[m]))], dtype=torch.float64)
           for w, g, m in zip(totals, got, touched)]
    reduce_packed(bad, full, dist.ReduceOp.MAX)
    return [not bool(b.item()) for b in bad]


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


FOLD_CHUNK = 1 << 20  # elements squared at once by ``fold_columns``


@dataclasses.dataclass
class Squares:
    """Each parameter's ``(K,)`` sums of U² of its fused matrices from a stage's last pass, and the group
    names (``pending[k]``) over which they are still to be summed: all of its layout's for this rank's
    partial sums, none where they are already the whole matrix's."""
    values: list[Tensor]
    pending: list[tuple[str, ...]]


def rows_local(lay: Layout) -> bool:
    """Whether ``lay`` is split over ranks that all hold whole rows of the matrix (``Layout.rows_whole``,
    from ``share_statistics``: FSDP2 row shards, column-parallel TP; not a row-parallel split, nor a flat
    range that cuts a row on any rank)."""
    return bool(lay.groups) and lay.rows_whole


def fold_columns(local: Tensor, lay: Layout, vec: Tensor, p: float, eps: float, exponent: float) -> Tensor:
    """``cat(vec, t)``: ``vec`` the rank's partial ``(m + K·n,)`` sums of |x|^p and ``t (K·n,)`` the partial
    ``t_kj = Σ_i f_i² x_ij²`` over its rows i of fused matrix k, ``f_i = (||x_i||_p + eps)^exponent`` the
    row factors (their sums complete in ``vec``: ``rows_local``, or once reduced over ``Layout.inner``).
    Reduced like the column sums, the RMS norm needs no collective of its own, or one over ``inner``
    alone: ``||f_i x_ij g_kj||_F² = Σ_j g_kj² t_kj``."""
    m, n = lay.shape
    f = scaling_(pow_sums_to_norms_(vec[:m].clone(), p), eps, exponent).square_()
    t = torch.zeros(len(lay.block_shapes), n, dtype=vec.dtype, device=vec.device)
    for view, r in lay.pieces(local):
        rows = max(1, FOLD_CHUNK // max(r.w, 1))  # x² a chunk of rows at a time: its scratch stays small
        for a in range(0, r.h, rows):
            t[r.block, r.col : r.col + r.w].addmv_(view[a : a + rows].to(t.dtype).square().mT,
                                                   f[r.row + a : r.row + min(a + rows, r.h)])
    return torch.cat((vec, t.view(-1)))


def sharded_racs_(locals_: list[Tensor], layouts: list[Layout], p: float = 2.0, iters: int = 1,
                  eps: float = 1e-8, stats: CommStats | None = None, squares: bool = False,
                  partials: list[Tensor | None] | None = None, exponent: float = -0.5, tol: float = 0.0,
                  averages: list[Tensor] | None = None, beta: float = 0.0,
                  fold: bool = False, agree: Agreement | None = None) -> tuple[Squares | None, list[Tensor]]:
    """RACS (ops.racs) of every sharded matrix, in place on the local elements: ``iters`` times
    ``x_ij ← (r_i + eps)^exponent · x_ij · (c_j + eps)^exponent``. Returns, with ``squares``, the ``(K,)``
    sums of squares of each result's fused matrices (``sharded_frobenius_norms``' input; else None),
    and the ``(K,)`` balancing steps each fused matrix took. ``fold`` (with ``squares``, finite p, no
    ``tol``, no ``averages``), where every matrix split over ranks has whole rows on each of them
    (``rows_local``) or the layouts reduce over an ``inner`` group first (``reduce_two_level``): the last
    reduction also carries their ``fold_columns`` sums, and their squares are returned already reduced,
    so the norms need no collective, or (a matrix split over ``inner``) one over ``inner`` alone (where
    a matrix has split rows and there is no ``inner``, its norm needs a reduction over every group anyway,
    and the others' sums would only add bytes to the statistics).

    ``partials``: the first iteration's local sums where they are known (``row_col_stats``; the engine
    gives the raw gradient's for ``stats="gradient"``). ``averages``: each parameter's ``(m + K·n,)``
    running average of the first iteration's reduced sums, ``a ← beta·a + (1 − beta)·s``, whose value is
    used in their place. ``tol > 0``: a fused matrix whose row and column norms agree within ``tol``
    (``imbalance``) is left as it is from then on; the reductions still run ``iters`` times where a
    layout is split over ranks (every rank of a group reduces the same vectors), and stop early where
    none is. ``agree`` rides on the first reduction (``reduced_statistics``)."""
    check_racs_args(p, iters, eps, exponent)
    steps = [torch.zeros(len(lay.block_shapes), dtype=torch.long) for lay in layouts]
    rows = [block_rows(lay) for lay in layouts] if tol > 0 else []
    split = any(lay.groups for lay in layouts)
    out = None
    if fold and (not squares or p == math.inf or tol > 0 or averages is not None):
        raise ValueError("fold needs squares, a finite p, no tol and no averages")
    two_level = any(lay.inner is not None for lay in layouts)
    split_rows_whole = two_level or all(rows_local(lay) for lay in layouts if lay.groups)  # else norms reduce anyway
    folded = [fold and split_rows_whole and bool(lay.groups) for lay in layouts]
    for it in range(iters):
        last = squares and it == iters - 1
        fold_now = [last and f for f in folded]
        vectors = reduced_statistics(locals_, layouts, p, stats, partials=partials if it == 0 else None,
                                     extend=[partial(fold_columns, x, lay, p=p, eps=eps, exponent=exponent) if f else None
                                             for x, lay, f in zip(locals_, layouts, fold_now)],
                                     agree=agree if it == 0 else None)
        sums = [_row_col(v, lay) for v, lay in zip(vectors, layouts)]
        weighted = [v[lay.stat_length :].view(-1, lay.shape[1]) if f else None  # ``fold_columns``' t, reduced
                    for v, lay, f in zip(vectors, layouts, fold_now)]
        if it == 0 and averages is not None:
            sums = [(a.lerp_(torch.cat((r, c.reshape(-1))), 1.0 - beta)[: r.shape[0]].clone(),
                     a[r.shape[0] :].view_as(c).clone()) for a, (r, c) in zip(averages, sums)]
        norms = [(pow_sums_to_norms_(r, p), pow_sums_to_norms_(c, p)) for r, c in sums]
        active = [torch.ones(len(lay.block_shapes), dtype=torch.bool) for lay in layouts]
        if tol > 0:
            active = [imbalance(r, c, rw) > tol for (r, c), rw in zip(norms, rows)]
            if not split and not any(a.any() for a in active):
                return (Squares([scale_local_(x, lay, None, None, squares=True) for x, lay in zip(locals_, layouts)],
                                [_names(lay) for lay in layouts]) if squares else None), steps
        out = []
        for x, lay, (r, c), on, rw, n, t in zip(locals_, layouts, norms, active, rows or [None] * len(norms), steps,
                                                weighted):
            r, c = scaling_(r, eps, exponent), scaling_(c, eps, exponent)
            if not on.all():
                r[~on[rw.to(on.device)]], c[~on] = 1.0, 1.0
            n += on.cpu()
            sq = scale_local_(x, lay, r, c, squares=last and t is None)
            out.append(c.square().mul_(t).sum(-1) if t is not None else sq)  # Σ_j c_j² t_j: the whole matrix's
    pending = [tuple(g for g in _names(lay) if g == lay.inner) if f else _names(lay) for lay, f in zip(layouts, folded)]
    return (Squares(out, pending) if squares else None), steps


def _names(lay: Layout) -> tuple[str, ...]:
    return tuple(name for name, _ in lay.groups)


def sharded_equilibrate_(locals_: list[Tensor], layouts: list[Layout], mode: str = "row",
                         exponent: float = -0.5, eps: float = 1e-8, stats: CommStats | None = None,
                         partials: list[Tensor | None] | None = None, agree: Agreement | None = None) -> None:
    """Equilibration (ops.equilibrate) of every sharded matrix, in place on the local elements
    (``partials``: the local sums where they are known, ``agree`` riding along, as ``row_col_stats``)."""
    check_equilibrate_args(mode, exponent, eps)
    for x, lay, (r, c) in zip(locals_, layouts, row_col_stats(locals_, layouts, 2.0, stats, partials=partials,
                                                             agree=agree)):
        scale_local_(x, lay, r.add_(eps).pow_(exponent) if mode != "col" else None,
                     c.add_(eps).pow_(exponent) if mode != "row" else None)


def sharded_frobenius_norms(locals_: list[Tensor], layouts: list[Layout], stats: CommStats | None = None,
                            squares: Squares | None = None) -> list[Tensor]:
    """``(K,)`` Frobenius norms of the fused matrices of every sharded parameter (the "rms" scale), one
    packed reduction per group name of the sums still pending there; ``squares``: the sums of squares
    where a stage already has them."""
    if squares is None:
        values = []
        for x, lay in zip(locals_, layouts):
            out = torch.zeros(len(lay.block_shapes), dtype=acc_dtype(x.dtype), device=x.device)
            for view, r in lay.pieces(x):
                out[r.block] += torch.linalg.vector_norm(view, dtype=out.dtype).square()
            values.append(out)
        squares = Squares(values, [_names(lay) for lay in layouts])
    reduce_packed(squares.values, layouts, dist.ReduceOp.SUM, stats, over=squares.pending)
    return [v.sqrt_() for v in squares.values]
