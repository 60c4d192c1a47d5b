"""Sharded statistics equal the single-process operators on every layout (gloo, forked ranks)."""

import math

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks
import dataclasses

from reg_dist.comm import statistics as dstats
from reg_dist.comm.statistics import (rows_local, share_statistics, sharded_equilibrate_, sharded_frobenius_norms,
                                     sharded_racs_)
from reg_dist.layout import Layout, fused_rows
from reg_dist.ops import equilibrate, racs

SHAPES = [(7, 5), (6, 9)]


def _full(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(SHAPES[k], dtype=torch.float64, generator=g)
    x[2] = 0  # a zero row
    return x


def _local(full, lay):
    block = full[lay.rows[0]:lay.rows[1], lay.cols[0]:lay.cols[1]]
    return block.flatten()[lay.flat[0]:lay.flat[1]].clone() if lay.flat else block.clone()


def _split(size, parts, i):
    """Uneven contiguous split: the first parts are one longer."""
    base, extra = divmod(size, parts)
    start = i * base + min(i, extra)
    return start, start + base + (i < extra)


def tp_rows(rank, world, shape):
    """Column-parallel linear: rows split over every rank."""
    return Layout(shape, _split(shape[0], world, rank), (0, shape[1]), groups=(("tp", dist.group.WORLD),))


def tp_cols(rank, world, shape):
    """Row-parallel linear: columns split over every rank."""
    return Layout(shape, (0, shape[0]), _split(shape[1], world, rank), groups=(("tp", dist.group.WORLD),))


def rows_with_empty_rank(rank, world, shape):
    """FSDP2-like row shards, uneven, rank 1 holding no row."""
    cuts = [0, 3, 3, shape[0] - 1, shape[0]]
    return Layout(shape, (cuts[rank], cuts[rank + 1]), (0, shape[1]), groups=(("dp", dist.group.WORLD),))


def flat_ranges(rank, world, shape):
    """ZeRO: a flat row-major range of the whole matrix, cutting rows mid-way; rank 1 holds nothing."""
    total = shape[0] * shape[1]
    cuts = [0, 3, 3, total // 2 + 1, total]  # ranks 0..3 (for world 2: 0..3 and 3..total)
    cuts = cuts if world == 4 else [0, 3, total]
    return Layout(shape, (0, shape[0]), (0, shape[1]), flat=(cuts[rank], cuts[rank + 1]),
                  groups=(("dp", dist.group.WORLD),))


def _grid(rank, world):
    """tp × dp = 2 × world/2: tp groups {0,1}, {2,3}, …; dp groups {0,2,…}, {1,3,…} (new_group is collective)."""
    dp = world // 2
    tp = [dist.new_group([2 * d, 2 * d + 1]) for d in range(dp)]
    dp = [dist.new_group(list(range(t, world, 2))) for t in range(2)]
    return tp[rank // 2], dp[rank % 2], rank % 2, rank // 2


def tp_cols_fsdp_rows(rank, world, shape, groups):
    """2-D: tensor-parallel column split, then an FSDP row shard of each TP block."""
    tp_group, dp_group, tp_rank, dp_rank = groups
    return Layout(shape, _split(shape[0], world // 2, dp_rank), _split(shape[1], 2, tp_rank),
                  groups=(("dp", dp_group), ("tp", tp_group)))


def tp_mixed_fsdp_rows(rank, world, shape, groups, cuts=None):
    """2-D as Megatron under FSDP2: the 7 × 5 matrix row-parallel (``tp_cols_fsdp_rows``), the 6 × 9 one
    column-parallel (rows over tp), each TP block's rows then sharded over dp (``cuts``: how many on each
    dp rank; else an even split)."""
    if shape == SHAPES[0]:
        return tp_cols_fsdp_rows(rank, world, shape, groups)
    tp_group, dp_group, tp_rank, dp_rank = groups
    start, end = _split(shape[0], 2, tp_rank)
    a, b = (sum(cuts[:dp_rank]), sum(cuts[:dp_rank + 1])) if cuts else _split(end - start, world // 2, dp_rank)
    return Layout(shape, (start + a, start + b), (0, shape[1]), groups=(("dp", dp_group), ("tp", tp_group)))


def tp_rows_zero_flat(rank, world, shape, groups):
    """2-D: tensor-parallel row split, then a ZeRO flat range of each TP block."""
    tp_group, dp_group, tp_rank, dp_rank = groups
    rows = _split(shape[0], 2, tp_rank)
    numel = (rows[1] - rows[0]) * shape[1]
    return Layout(shape, rows, (0, shape[1]), flat=_split(numel, 2, dp_rank), groups=(("dp", dp_group), ("tp", tp_group)))


FUSED = [fused_rows((3, 2, 2)), fused_rows((1, 1, 1), repeat=2)]  # QKV of SHAPES[0]; GQA-interleaved SHAPES[1]


def fused(fn):
    """``fn``'s layouts with each parameter's rows fused into the separate matrices of ``FUSED``."""
    def layout(rank, world, shape, *groups):
        return dataclasses.replace(fn(rank, world, shape, *groups), fused=FUSED[SHAPES.index(shape)])
    return layout


CASES = {
    "tp_rows_2": (2, tp_rows),
    "tp_cols_4": (4, tp_cols),
    "rows_4_with_empty_rank": (4, rows_with_empty_rank),
    "flat_2": (2, flat_ranges),
    "flat_4_with_empty_rank": (4, flat_ranges),
    "tp2_x_fsdp2": (4, tp_cols_fsdp_rows),
    "tp2_x_zero2": (4, tp_rows_zero_flat),
    "mixed_tp2_x_fsdp2": (4, tp_mixed_fsdp_rows),
    "mixed_tp2_x_fsdp2_with_empty_dp_rank": (4, lambda *a: tp_mixed_fsdp_rows(*a, cuts=(3, 0))),
    "mixed_tp2_x_fsdp3_with_empty_dp_rank": (6, lambda *a: tp_mixed_fsdp_rows(*a, cuts=(2, 1, 0))),
    "fused_mixed_tp2_x_fsdp2": (4, fused(tp_mixed_fsdp_rows)),
    "fused_tp_rows_2": (2, fused(tp_rows)),
    "fused_flat_4_with_empty_rank": (4, fused(flat_ranges)),
    "fused_tp2_x_zero2": (4, fused(tp_rows_zero_flat)),
}


def block_rows(case, shape):
    """The rows of each separate matrix of a parameter of ``shape``."""
    if not case.startswith("fused"):
        return [list(range(shape[0]))]
    segments = FUSED[SHAPES.index(tuple(shape))]
    return [[i for start, end, b in segments if b == k for i in range(start, end)] for k in range(3)]


def per_block(op, case):
    """``op`` applied to each fused matrix of a parameter on its own."""
    def apply(full):
        out = full.clone()
        for rows in block_rows(case, full.shape):
            out[rows] = op(full[rows])
        return out
    return apply


def _layouts(case, rank, world, shared=False):
    """The case's layouts on ``rank``; with ``shared``, only the statistics other ranks touch travel."""
    fn = CASES[case][1]
    if "x_" in case:
        groups = _grid(rank, world)
        layouts = [fn(rank, world, s, groups) for s in SHAPES]
    else:
        layouts = [fn(rank, world, s) for s in SHAPES]
    return share_statistics(layouts) if shared else layouts


def _check_all(case, op, reference, shared=False):
    world = CASES[case][0]
    reference = per_block(reference, case)

    def body(rank, world):
        layouts = _layouts(case, rank, world, shared)
        fulls = [_full(k) for k in range(len(SHAPES))]
        locals_ = [_local(f, lay) for f, lay in zip(fulls, layouts)]
        op(locals_, layouts)
        for f, lay, x in zip(fulls, layouts, locals_):
            torch.testing.assert_close(x, _local(reference(f), lay), rtol=1e-12, atol=1e-12)

    run_ranks(world, body)


@pytest.mark.parametrize("shared", [False, True], ids=["all_entries", "shared_entries"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [2.0, math.inf, 3.0])
def test_sharded_racs_equals_single_process(case, p, shared):
    _check_all(case, lambda xs, ls: sharded_racs_(xs, ls, p=p, iters=2), lambda f: racs(f, p=p, iters=2), shared)


@pytest.mark.parametrize("shared", [False, True], ids=["all_entries", "shared_entries"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["row", "col", "rowcol"])
def test_sharded_equilibrate_equals_single_process(case, mode, shared):
    _check_all(case, lambda xs, ls: sharded_equilibrate_(xs, ls, mode), lambda f: equilibrate(f, mode), shared)


ROWS_LOCAL = {"tp_rows_2", "rows_4_with_empty_rank", "fused_tp_rows_2"}  # the flat ranges cut rows on some rank
TWO_LEVEL = {"tp2_x_fsdp2", "mixed_tp2_x_fsdp2", "mixed_tp2_x_fsdp2_with_empty_dp_rank",
             "mixed_tp2_x_fsdp3_with_empty_dp_rank", "fused_mixed_tp2_x_fsdp2"}


@pytest.mark.parametrize("chunk", [dstats.FOLD_CHUNK, 4], ids=["whole_pieces", "chunks_of_rows"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_folded_rms_norms_equal_single_process_reduced_over_tp_alone_or_not_at_all(case, p, chunk):
    """``fold``: the last RACS reduction carries Σ_i r_i² x_ij² beside the column sums where every split
    matrix's rows are whole on each rank (the RMS norms then need no collective of their own) or where tp
    is reduced first (``Layout.inner``: one all-reduce over tp alone); elsewhere the norms reduce over
    every group. Each equals the single-process norm of the RACS result (each fused matrix's, on every
    rank holding part of it)."""
    world = CASES[case][0]

    def body(rank, world):
        dstats.FOLD_CHUNK = chunk  # elements squared at once: 4 cuts every piece into chunks of rows
        layouts = _layouts(case, rank, world, shared=True)
        fulls = [_full(k) for k in range(len(SHAPES))]
        locals_ = [_local(f, lay) for f, lay in zip(fulls, layouts)]
        stats = {}
        squares, _ = sharded_racs_(locals_, layouts, p=p, iters=2, stats=stats, squares=True, fold=True)
        before = {g: v["calls"] for g, v in stats.items()}
        norms = sharded_frobenius_norms(locals_, layouts, stats, squares)
        names = [tuple(g for g, _ in lay.groups) for lay in layouts]
        want = [() if case in ROWS_LOCAL else ("tp",) if case in TWO_LEVEL else n for n in names]
        assert squares.pending == want
        assert {g: v["calls"] - before.get(g, 0) for g, v in stats.items() if v["calls"] > before.get(g, 0)} == \
            {g: 1 for g in sorted({g for n in want for g in n})}
        for f, lay, got in zip(fulls, layouts, norms):
            want = per_block(lambda x: racs(x, p=p, iters=2), case)(f)
            for k, rows in enumerate(block_rows(case, f.shape)):
                if any(r.block == k and r.h * r.w for r in lay.rects):  # a matrix this rank holds part of
                    torch.testing.assert_close(got[k], want[rows].norm(), rtol=1e-12, atol=0)

    run_ranks(world, body)


def test_no_norm_is_folded_where_another_split_matrix_has_split_rows():
    """A row-parallel matrix's norm needs its own all-reduce: a column-parallel one beside it then keeps its
    norm there too (carrying its sums with the statistics would only add bytes), still exact."""
    def body(rank, world):
        layouts = share_statistics([tp_rows(rank, world, SHAPES[0]), tp_cols(rank, world, SHAPES[1])])
        fulls = [_full(k) for k in range(len(SHAPES))]
        locals_ = [_local(f, lay) for f, lay in zip(fulls, layouts)]
        stats = {}
        squares, _ = sharded_racs_(locals_, layouts, stats=stats, squares=True, fold=True)
        norms = sharded_frobenius_norms(locals_, layouts, stats, squares)
        assert [rows_local(lay) for lay in layouts] == [True, False] and squares.pending == [("tp",), ("tp",)]
        assert stats["tp"]["calls"] == 2  # the statistics, then the norms
        for f, got in zip(fulls, norms):
            torch.testing.assert_close(got[0], racs(f).norm(), rtol=1e-12, atol=0)

    run_ranks(2, body)


def test_tp_first_then_each_tp_rank_reduces_its_slice_of_the_column_parallel_column_sums_over_dp():
    """Megatron's split under FSDP2 (``mixed_tp2_x_fsdp2``): tp shares the row-parallel matrix's rows, so it
    is reduced first (``Layout.inner``); every tp rank then holds the column-parallel matrix's 9 column
    sums, and reduces over dp only its slice of them (5, then 4), gathered back over tp in one all-gather;
    the row-parallel matrix's own columns go over dp whole. The folded norms' sums ride along."""
    def body(rank, world):
        layouts = _layouts("mixed_tp2_x_fsdp2", rank, world, shared=True)
        locals_ = [_local(_full(k), lay) for k, lay in enumerate(layouts)]
        stats = {}
        sharded_racs_(locals_, layouts, stats=stats, squares=True, fold=True)
        return stats

    for rank, stats in enumerate(run_ranks(4, body)):
        tp_rank, dp_rank = rank % 2, rank // 2
        width = _split(SHAPES[0][1], 2, tp_rank)  # the row-parallel matrix's columns here
        rows = _split(SHAPES[0][0], 2, dp_rank)  # its rows (the same on both tp ranks)
        mine = 5 - tp_rank  # the column-parallel matrix's 9 columns in slices of ⌈9/2⌉
        floats = {"dp": 2 * (width[1] - width[0] + mine),  # column sums and the norms' sums, each
                  "tp": (rows[1] - rows[0]) + 2 * 9 + 2 * 5}  # rows; columns and sums; the gather of 2·5
        assert {g: (v["calls"], v["bytes"]) for g, v in stats.items()} == \
            {"dp": (1, 8 * floats["dp"]), "tp": (2, 8 * floats["tp"])}, rank


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_frobenius_norms_equal_single_process(case):
    world = CASES[case][0]

    def body(rank, world):
        layouts = _layouts(case, rank, world)
        fulls = [_full(k) for k in range(len(SHAPES))]
        norms = sharded_frobenius_norms([_local(f, lay) for f, lay in zip(fulls, layouts)], layouts)
        for f, got in zip(fulls, norms):  # a norm per fused matrix
            want = torch.stack([f[rows].norm() for rows in block_rows(case, f.shape)])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    run_ranks(world, body)


def _racs_buffers(case, shared=True, copies=1, iters=1):
    """Per rank: the buffer length of every all-reduce of ``iters`` RACS iterations on ``copies`` times the
    case's layouts (with ``shared``, only the statistics other ranks touch travel)."""
    def body(rank, world):
        calls = []
        real = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            calls.append(tensor.numel())
            return real(tensor, op=op, group=group, async_op=async_op)

        layouts = _layouts(case, rank, world, shared) * copies
        dstats.dist.all_reduce = counting
        try:
            sharded_racs_([_local(_full(k % len(SHAPES)), lay) for k, lay in enumerate(layouts)], layouts, iters=iters)
        finally:
            dstats.dist.all_reduce = real
        return calls

    return run_ranks(CASES[case][0], body)


def test_one_collective_per_group_per_racs_iteration():
    per_rank = _racs_buffers("tp2_x_fsdp2", shared=False, copies=5, iters=3)  # ten matrices, two groups each
    vector = 5 * sum(m + n for m, n in SHAPES)
    assert all(calls == [vector, vector] * 3 for calls in per_rank)


def test_row_shards_reduce_only_the_column_sums():
    # rows split over the group: each row is one rank's, every rank needs all n column sums
    assert _racs_buffers("tp_rows_2") == [[sum(n for _, n in SHAPES)]] * 2


def test_column_splits_reduce_only_the_row_sums():
    assert _racs_buffers("tp_cols_4") == [[sum(m for m, _ in SHAPES)]] * 4


def test_flat_ranges_reduce_the_rows_cut_at_partition_boundaries_and_the_columns_shared():
    # cuts at elements 3, 3 (an empty rank) and total/2 + 1 cut two rows of each matrix (0 and 3, mid-row);
    # every column is touched by at least two ranks
    assert _racs_buffers("flat_4_with_empty_rank") == [[2 * len(SHAPES) + sum(n for _, n in SHAPES)]] * 4


def test_dp_x_tp_reduces_the_held_columns_over_dp_and_the_held_rows_over_tp():
    # tp splits the columns, dp the rows of each TP block: dp ranks share their TP block's columns, tp ranks
    # their rows (uneven: the first block is one longer)
    got = _racs_buffers("tp2_x_fsdp2")
    for rank, calls in enumerate(got):
        tp_rank, dp_rank = rank % 2, rank // 2
        cols = sum(_split(n, 2, tp_rank)[1] - _split(n, 2, tp_rank)[0] for _, n in SHAPES)
        rows = sum(_split(m, 2, dp_rank)[1] - _split(m, 2, dp_rank)[0] for m, _ in SHAPES)
        assert calls == [rows, cols], rank  # "tp" first (it shares rows: ``Layout.inner``), then "dp"


@pytest.mark.parametrize("kwargs, message", [
    ({"replicated": ((7, 12),)}, "replicated statistics need an inner group"),
    ({"inner": "tp", "replicated": ((5, 3),)}, r"replicated statistics must be sorted, disjoint, non-empty runs"),
    ({"inner": "tp", "replicated": ((7, 20),)}, r"inside \[0, 12\)"),
])
def test_a_two_level_plan_that_does_not_fit_its_layout_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout((7, 5), (0, 7), (0, 5), groups=(("tp", None),), **kwargs)


def test_a_plan_over_several_groups_that_would_miss_a_rank_reduces_every_entry_its_groups_touch():
    # fused (3, 2, 2) rows of the 7 × 5 matrix, tp row split then flat dp ranges: matrix 1's columns are
    # touched by ranks 1 and 2 only, which share no group, so the dp group {0, 2} must pass rank 2's on to
    # rank 0 for the tp group {0, 1}: it reduces every entry one of its ranks touches and two ranks touch
    # in all; the 6 × 9 matrix keeps the plain plan
    def body(rank, world):
        return [(lay.shared, lay.stat_length) for lay in _layouts("fused_tp2_x_zero2", rank, world, shared=True)]

    for rank, ((first, length), (second, _)) in enumerate(run_ranks(4, body)):
        assert sum(b - a for _, runs in first for a, b in runs) < 2 * length, rank
        assert dict(first)["dp"] == (((7, 17),) if rank % 2 == 0 else ((5, 6), (12, 20)))
        assert dict(second)["dp"] == (((1, 2),) if rank % 2 == 0 else ((4, 5),))


def test_a_plan_no_chain_of_groups_reaches_reduces_every_entry_and_stays_exact():
    # a 2 × 2 × 2 grid of ranks (groups a, b, c flip one bit of the rank each); column 0 of the 2 × 4
    # matrix is held by ranks 0 and 7 alone, which differ in every coordinate: a rank between them that
    # touches nothing would have to pass the sum on, so the matrix keeps shared=None
    cells = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3), (1, 0)]  # rank r holds cells[r]

    def body(rank, world):
        groups = {name: [dist.new_group([r, r ^ bit]) for r in range(world) if r < r ^ bit]
                  for name, bit in (("a", 4), ("b", 2), ("c", 1))}
        mine = tuple((name, next(g for g in gs if rank in dist.get_process_group_ranks(g)))
                     for name, gs in groups.items())
        row, col = cells[rank]
        lay = share_statistics([Layout((2, 4), (row, row + 1), (col, col + 1), groups=mine)])[0]
        full = _full(1)[:2, :4].clone()
        x = full[row:row + 1, col:col + 1].clone()
        sharded_racs_([x], [lay])
        torch.testing.assert_close(x, racs(full)[row:row + 1, col:col + 1], rtol=1e-12, atol=1e-12)
        return lay.shared

    assert run_ranks(8, body) == [None] * 8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"shape": (4, 4), "rows": (0, 5), "cols": (0, 4)}, "does not fit the 4×4 matrix"),
        ({"shape": (4, 4), "rows": (0, 2), "cols": (0, 4), "flat": (3, 9)}, r"flat range \(3, 9\) does not fit"),
    ],
)
def test_layouts_that_do_not_add_up_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)


def test_local_tensor_must_match_its_layout():
    with pytest.raises(ValueError, match=r"local tensor of shape \(3, 4\) does not match its layout, which needs \(2, 4\)"):
        Layout((4, 4), (0, 2), (0, 4)).pieces(torch.zeros(3, 4))


@pytest.mark.parametrize("kwargs", [{}, {"squares": True, "p": math.inf}, {"squares": True, "tol": 1e-3},
                                    {"squares": True, "averages": [torch.zeros(12 + 5)]}], ids=str)
def test_fold_without_what_it_needs_is_an_error_that_leaves_the_matrix_untouched(kwargs):
    # the norm's column sums ride on a SUM of the last iteration's exact statistics, for the "rms" squares
    x = torch.randn(12, 5)
    before = x.clone()
    with pytest.raises(ValueError, match="fold needs squares, a finite p, no tol and no averages"):
        sharded_racs_([x], [Layout((12, 5), (0, 12), (0, 5))], fold=True, **kwargs)
    assert torch.equal(x, before)
