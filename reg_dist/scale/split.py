"""The split Newton–Schulz plan (``reg_dist.comm.split``) of one owner group, predicted: the real
planner's choice of the matrices to split and of their runs of ranks, the elements each rank sends to
each block's owner and back (the plan's two all-to-alls), every run's all-reduces, and each rank's FLOPs.

    all-to-alls   every distinct held element to the rank holding its block, every block back to every
                  holder (in the moves' dtype); the plan always makes both calls
    collectives   per run of k ranks ("split{k}") and shape of B matrices there: an all-reduce of B
                  floats (the squared norms, fp32; fp64 for fp64), and ``ns_steps`` all-reduces of B·a²
                  and all-gathers of B·k·⌈a/k⌉·a in the Newton–Schulz dtype (``ns_method="standard"``,
                  the algorithm's default scale: no norm for the scale)
    FLOPs         per block of L rows (columns) of an m × n matrix: steps · (4a²L + 2a²·r), r the rows
                  of b·A + c·A² the rank forms (⌈a/k⌉, the last ones fewer)
    peers         as ``traffic.owner_plan`` counts them, over each owner's blocks

The plan's holders send pieces as ``traffic.owner_plan`` counts them (identical copies once, by their
lowest rank).
"""

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..comm.split import part_range, place, split_parameters
from .hops import exchange, hop_calls, route

INT = torch.int64


def part_elements(extent: Tensor, segments, block: int, wide: bool, lo: Tensor, hi: Tensor) -> Tensor:
    """(k, R) elements of fused matrix ``block`` each rank holds (``extent``: (4, R) parameter rows [r0, r1)
    and columns [c0, c1)) inside each of its k row (``wide``: column) ranges ``[lo, hi)`` ((k, 1) each)."""
    r0, r1, c0, c1 = extent
    total = torch.zeros(len(lo), len(r0), dtype=INT)
    b0 = 0
    for start, end, k in segments:
        if k != block:
            continue
        if wide:
            rows = (torch.clamp(r1, max=end) - torch.clamp(r0, min=start)).clamp_(min=0)
            cols = (torch.minimum(c1, hi) - torch.maximum(c0, lo)).clamp_(min=0)
        else:
            a, z = start + (lo - b0).clamp(min=0), start + (hi - b0).clamp(max=end - start)
            rows = (torch.minimum(r1, z) - torch.maximum(r0, a)).clamp_(min=0)
            cols = c1 - c0
        total += rows * cols
        b0 += end - start
    return total


def peers(p: int, masks: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(p,) peers of each rank in the owner moves' two all-to-alls, from each owner's masks of the ranks
    that send to it and that hold what it returns: the larger of a rank's receivers and senders."""
    count = {key: torch.zeros(p, dtype=INT) for key in ("send1", "recv1", "send2", "recv2")}
    for o, (senders, holders) in masks.items():
        senders, holders = senders.clone(), holders.clone()
        senders[o] = holders[o] = False
        count["recv1"][o] = int(senders.sum())
        count["send1"] += senders
        count["send2"][o] = int(holders.sum())
        count["recv2"] += holders
    return torch.maximum(count["send1"], count["recv1"]), torch.maximum(count["send2"], count["recv2"])


@dataclass
class SplitPlanModel:
    """One ``SplitPlan``: its matrices, degrees, runs' first ranks (group ranks), loads, what its two
    all-to-alls move (as ``traffic.OwnerPlanModel.vectors``) and its runs' reductions."""

    name: str
    ranks: Tensor  # stage ranks of the group, in group-rank order
    matrices: list[tuple[int, int, tuple[int, int]]]
    degrees: list[int]
    owners: list[int]  # first group rank of each matrix's run
    load: list[int]
    imbalance: float
    vectors: dict[str, Tensor]
    reductions: list[tuple[int, int, tuple[int, int], int]]  # (first group rank, k, (m, n), B)
    flops: Tensor  # (p,)
    owned: Tensor  # (p,) elements of the blocks this rank transforms
    hops: list | None = None  # with owner groups: ``hops.hop_calls`` of its moves in two hops (else ``vectors``)
    replicas: None = None  # as ``traffic.OwnerPlanModel.replicas``: every matrix transformed once


@functools.lru_cache(maxsize=32)
def _place(costs: tuple[int, ...], degrees: tuple[int, ...], size: int, candidates: tuple):
    return place(list(costs), list(degrees), size, [list(c) for c in candidates])


def split_plan(entries: list, ranks: Tensor, name: str, node: Tensor, settings) -> SplitPlanModel | None:
    """The split plan of ``entries`` (``(traffic.Holding, sender mask)``) over the group ``ranks``; None
    where nothing is split (an owner plan then). With ``settings.owner_group_size`` g < P its moves run
    in two hops (``SplitPlan`` with ``group_size``): ``hops`` holds them, every block routed as a matrix of
    ``traffic.grouped_plan`` (pieces from their lowest holder, results once per mid rank)."""
    p = len(ranks)
    g = settings.owner_group_size or p
    if p % g:
        raise ValueError(f"owner_group_size must be a positive integer dividing the {p} ranks of {name!r}, got {g}")
    split = split_parameters([h.param.blocks for h, _ in entries], p, settings.ns_split, settings.split_group_size,
                             settings.ns_steps, settings.ns_bytes)
    if split is None:
        return None
    degrees, costs = split
    mats, cands = [], []
    for h, _ in entries:
        mine = (h.numel[ranks] > 0).nonzero().flatten().tolist()
        cand = range(mine[0], mine[-1] + 1) if mine[-1] - mine[0] + 1 == len(mine) else tuple(mine)
        for k, shape in enumerate(h.param.blocks):
            mats.append((h.index, k, shape))
            cands.append(cand)
    owners, load = _place(tuple(costs), tuple(degrees), p, tuple(cands))
    mean = sum(load) / p
    z = lambda: torch.zeros(p, dtype=INT)  # noqa: E731
    v = {k: z() for k in ("send1", "self1", "recv1", "send1_far", "recv1_far",
                          "send2", "self2", "recv2", "send2_far", "recv2_far")}
    senders_of: dict[int, list[Tensor]] = defaultdict(list)  # per owner, the sender (holder) masks of its blocks
    holders_of: dict[int, list[Tensor]] = defaultdict(list)
    flops, owned = torch.zeros(p, dtype=torch.float64), z()
    stacks: dict[tuple[int, int, tuple[int, int]], int] = {}
    gnode = node[ranks]
    two = exchange(p, gnode, g) if g != p else None
    at = 0
    for h, sender in entries:
        s = sender[ranks]
        extent = h.extent.index_select(1, ranks)  # not [:, ranks]: that one waits on a second thread (ms on busy cores)
        for blk, (m, n) in enumerate(h.param.blocks):
            k, first = degrees[at], owners[at]
            at += 1
            wide, a = m <= n, min(m, n)
            stacks[(first, k, (m, n))] = stacks.get((first, k, (m, n)), 0) + 1
            o = torch.arange(first, first + k)
            bounds = torch.tensor([part_range(max(m, n), k, q) for q in range(k)], dtype=INT)  # (k, 2)
            lo, hi = bounds[:, :1], bounds[:, 1:]
            hk = part_elements(extent, h.param.segments, blk, wide, lo, hi)  # (k, p): block q's elements per rank
            sk = hk * s
            far = gnode[None, :] != gnode[o][:, None]
            own_s, own_h = sk[torch.arange(k), o], hk[torch.arange(k), o]
            v["send1"] += sk.sum(0)
            v["self1"][o] += own_s
            v["recv1"][o] += sk.sum(1) - own_s
            v["send1_far"] += (sk * far).sum(0)
            v["recv1_far"][o] += (sk * far).sum(1)
            v["send2"][o] += hk.sum(1)
            v["self2"][o] += own_h
            v["recv2"] += hk.sum(0)
            v["recv2"][o] -= own_h
            v["send2_far"][o] += (hk * far).sum(1)
            v["recv2_far"] += (hk * far).sum(0)
            for q in range(k):
                senders_of[first + q].append(sk[q] > 0)
                holders_of[first + q].append(hk[q] > 0)
                if two is not None:
                    route(two, first + q, g, sk[q], hk[q], torch.where(hk[q] > 0, h.piece[ranks], -1))
            length = (hi - lo).flatten()
            rows = -(-a // k)
            formed = (torch.arange(1, k + 1) * rows).clamp(max=a) - (torch.arange(k) * rows).clamp(max=a)
            flops[o] += settings.ns_steps * (4 * a * a * length + 2 * a * a * formed).to(torch.float64)
            owned[o] += a * length
    v["peers1"], v["peers2"] = peers(p, {o: (torch.stack(senders_of[o]).any(0), torch.stack(holders_of[o]).any(0))
                                         for o in senders_of})
    reductions = [(first, k, shape, b) for (first, k, shape), b in sorted(stacks.items()) if k > 1]
    return SplitPlanModel(name, ranks, mats, degrees, list(owners), list(load), max(load) / mean - 1.0 if mean else 0.0,
                          v, reductions, flops, owned, hop_calls(name, p, g, two) if two is not None else None)
