"""Newton–Schulz split over a few ranks, for matrices whose transform alone would outweigh a rank's share.

A matrix X (m × n; a = min(m, n), b = max(m, n)) split over k ranks is cut along its long side into k
blocks X_p (rows ``[p·b // k, (p+1)·b // k)`` of a tall X, columns of a wide or square one), block p on
rank p of an aligned run of k ranks of the owner plan's group (ranks ``s … s+k−1``, k dividing the group's size, so
a run of k ≤ GPUs per node stays inside a node). The Newton–Schulz iteration of the wide orientation
(``ops.newton_schulz``; the tall one is its transpose) is then, per step,

    normalise   ||X||_F² = Σ_p ||X_p||_F²                    one all-reduce of B floats (fp32, fp64)
    iterate     A = Σ_p X_p X_pᵀ  (a × a; tall: Σ X_pᵀ X_p)   one all-reduce of B·a² in the NS dtype
                P = b_k·A + c_k·A²: rank p forms rows          one all-gather of B·k·⌈a/k⌉·a
                [p·⌈a/k⌉, (p+1)·⌈a/k⌉) of it
                X_p = a_k·X_p + P·X_p                         on each rank, for its block (tall: X_p·P)
    scale       "rms": ||U||_F² summed the same way           one all-reduce of B floats

(B: the matrices of one stack; ``ns_method="gram"`` reduces its Gram matrix at each restart instead of
every step and forms its a × a products on every rank). Each block is the matrix's own iteration
restricted to its rows (columns), with the same products, so the blocks together equal one process's
Newton–Schulz to the rounding of the Gram sums. A rank's FLOPs per step fall from 4a²b + 2a³ to
(4a²b + 2a³)/k.

Which matrices are split (``split_degrees``): with ``mode="auto"`` a matrix whose whole cost exceeds the
group's mean load (the busiest rank's lower bound) is split over the smallest k (a power of two up to
``most`` that divides the group) whose per-rank cost, FLOPs plus the bytes of the run's collectives
(``split_cost``), fits the mean, else the k that costs least; ``"force"`` splits every matrix over
``most`` ranks (those with a long side of at least ``most``); ``"off"`` none. ``place`` then puts the
matrices, largest per-rank cost first, on the run (or, unsplit, the rank) of least load among those
with a rank that holds some of it: with k = 1 everywhere it is ``ownership.plan_owners``.

Where an owner group has a split matrix, its ``SplitPlan`` replaces the ``OwnerPlan`` (the unsplit matrices
go whole to one owner, k = 1), so a step still makes two all-to-alls: one sends every held element to the
rank whose block holds it, the blocks of one run and full shape are stacked and transformed together,
one sends them back.
"""

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout
from .collectives import CommStats, all_gather_into, count
from .hops import TwoHop, agree_off_rank, axis_groups
from .owner import gather_holdings, newton_schulz_cost

SPLIT_MODES = ("auto", "off", "force")
SPLIT_GROUP_SIZE = 8  # default: the GPUs of a node, so the per-step all-reduces stay on NVLink
# A byte sent by a split run's collectives counts as this many FLOPs: an H100's bf16 peak (989 TFLOP/s) at
# 50 % Newton–Schulz efficiency over its NVLink bandwidth (450 GB/s) is ~1,100.
FLOPS_PER_BYTE = 1000


def check_split_args(mode: str, most: int) -> None:
    if mode not in SPLIT_MODES:
        raise ValueError(f"ns_split must be one of {SPLIT_MODES}, got {mode!r}")
    if not isinstance(most, int) or isinstance(most, bool) or most < 1:
        raise ValueError(f"split_group_size must be an integer >= 1, got {most!r}")


def split_cost(m: int, n: int, k: int, steps: int, itemsize: int) -> int:
    """A rank's share of the Newton–Schulz of an m × n matrix split over ``k`` ranks, in
    ``newton_schulz_cost``'s units (m·n·min(m, n) at k = 1): its FLOPs (4a²b + 2a³)/k per step, plus
    ``FLOPS_PER_BYTE`` per byte it sends in each step's all-reduce and all-gather of a² elements of
    ``itemsize`` (ring: 2(k−1)/k and (k−1)/k of them)."""
    a, b = min(m, n), max(m, n)
    if k == 1:
        return newton_schulz_cost(m, n)
    flops = (4 * a * a * b + 2 * a**3) / k
    wire = steps * a * a * itemsize * 3 * (k - 1) / k
    return round((flops + FLOPS_PER_BYTE * wire) * newton_schulz_cost(m, n) / (4 * a * a * b + 2 * a**3))


def split_degrees(shapes: list[tuple[int, int]], size: int, mode: str, most: int, steps: int,
                  itemsize: int) -> list[int]:
    """Over how many ranks of a group of ``size`` each matrix of ``shapes`` runs its Newton–Schulz (see
    the module docstring); 1: whole, on one owner."""
    check_split_args(mode, most)
    if size == 1:
        return [1] * len(shapes)
    if mode == "force":
        if size % most:
            raise ValueError(f"split_group_size={most} does not divide the {size} ranks of the owner group")
        return [most if most > 1 and max(shape) >= most else 1 for shape in shapes]
    degrees = [k for k in (2**i for i in range(1, most.bit_length())) if k <= most and size % k == 0]
    if mode == "off" or not degrees:
        return [1] * len(shapes)
    target = sum(newton_schulz_cost(m, n) for m, n in shapes) / size
    out = []
    for m, n in shapes:
        options = [k for k in (1, *degrees) if k <= max(m, n)]
        costs = {k: split_cost(m, n, k, steps, itemsize) for k in options}
        if costs[1] <= target:
            out.append(1)
            continue
        fits = [k for k in options if costs[k] <= target]
        out.append(fits[0] if fits else min(options, key=lambda k: (costs[k], k)))
    return out


def split_parameters(shapes: list[tuple[tuple[int, int], ...]], size: int, mode: str, most: int, steps: int,
                     itemsize: int) -> tuple[list[int], list[int]] | None:
    """The degree and ``split_cost`` of every fused matrix of the parameters whose matrices have ``shapes``
    (one owner group's, over ``size`` ranks), in order; None where none is split (an ``OwnerPlan`` then)."""
    flat = [s for ss in shapes for s in ss]
    degrees = split_degrees(flat, size, mode, most, steps, itemsize)
    if max(degrees, default=1) == 1:
        return None
    return degrees, [split_cost(m, n, k, steps, itemsize) for (m, n), k in zip(flat, degrees)]


def place(costs: list[int], degrees: list[int], size: int,
          candidates: list[Sequence[int]]) -> tuple[list[int], list[int]]:
    """The first rank of every matrix's run (``degrees[j]`` ranks from it, ``costs[j]`` each), largest cost
    first, on the run of least busiest-rank load (ties: the lowest) among those with a rank in its
    ``candidates`` (a ``range`` or a sorted list, not empty); and the ranks' loads."""
    load = [0] * size
    firsts = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        k, allowed = degrees[j], candidates[j]
        if isinstance(allowed, range):
            runs = range(allowed.start - allowed.start % k, allowed.stop, k)
        else:
            runs = sorted({r - r % k for r in allowed})
        first = min(runs, key=lambda s: (max(load[s:s + k]), s))
        firsts[j] = first
        for r in range(first, first + k):
            load[r] += costs[j]
    return firsts, load


def part_range(length: int, k: int, p: int) -> tuple[int, int]:
    """Block ``p`` of ``k`` of a side of ``length``: ``[p·length // k, (p+1)·length // k)``."""
    return p * length // k, (p + 1) * length // k


class Piece(NamedTuple):
    """Local elements ``[r0:r1, c0:c1]`` of the ``h × w`` rectangle stored at ``start`` of a parameter's
    local flattening; in its matrix's block they sit at ``(row, col)``."""

    start: int
    h: int
    w: int
    r0: int
    r1: int
    c0: int
    c1: int
    row: int
    col: int

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)

    def of(self, flat: Tensor) -> Tensor:
        rect = flat[self.start : self.start + self.h * self.w].view(self.h, self.w)
        return rect[self.r0 : self.r1, self.c0 : self.c1]


def _pieces(rects, wide: bool, lo: int, hi: int) -> list[Piece]:
    """The parts of ``rects`` (``layout.Rect``) inside rows (tall) or columns (wide) ``[lo, hi)`` of their matrix."""
    out = []
    for r in rects:
        if wide:
            a, z = max(lo, r.col), min(hi, r.col + r.w)
            if a < z:
                out.append(Piece(r.start, r.h, r.w, 0, r.h, a - r.col, z - r.col, r.brow, a - lo))
        else:
            a, z = max(lo, r.brow), min(hi, r.brow + r.h)
            if a < z:
                out.append(Piece(r.start, r.h, r.w, a - r.brow, z - r.brow, 0, r.w, a - lo, r.col))
    return out


StackKey = tuple[int, int, tuple[int, int]]  # (first rank of the run, k, full shape (m, n))


class Run:
    """The collectives of a run of ``k`` ranks over ``group`` (this rank its ``p``-th), counted as ``name``."""

    def __init__(self, group: dist.ProcessGroup, k: int, p: int, stats: CommStats | None) -> None:
        self.group, self.k, self.p, self.stats, self.name = group, k, p, stats, f"split{k}"

    def reduce(self, x: Tensor) -> None:
        """``x`` summed in place over the run."""
        dist.all_reduce(x, group=self.group)
        count(self.stats, self.name, x, "all_reduce", self.group)

    def polynomial(self, A: Tensor, b: float, c: float) -> Tensor:
        """b·A + c·A² of the Gram matrices ``A`` ``(B, a, a)`` (the same on every rank of the run): each rank
        forms its ⌈a/k⌉ rows (the last ones fewer or none), one all-gather joins them."""
        batch, a = A.shape[0], A.shape[-1]
        rows = -(-a // self.k)
        lo, hi = min(self.p * rows, a), min((self.p + 1) * rows, a)
        mine = A.new_zeros(batch, rows, a)
        mine[:, : hi - lo] = torch.baddbmm(A[:, lo:hi], A[:, lo:hi], A, beta=b, alpha=c)
        out = A.new_empty(self.k * batch, rows, a)
        all_gather_into(out, mine, group=self.group)
        count(self.stats, self.name, out, "all_gather", self.group)
        return out.view(self.k, batch, rows, a).transpose(0, 1).reshape(batch, self.k * rows, a)[:, :a]


SplitFn = Callable[[Tensor, bool, Run, tuple[int, int]], Tensor]


class SplitPlan:
    """The static moves and runs of one optimizer group's matrices over ``group``, some of them split.

    ``degrees`` and ``costs`` give each fused matrix of ``layouts`` (in order) its k and per-rank cost
    (``split_parameters``). Collective: every rank of ``group`` builds it with the same arguments.
    """

    def __init__(self, layouts: list[Layout | None], names: list[str], group: dist.ProcessGroup, group_name: str,
                 degrees: list[int], costs: list[int], group_size: int | None = None) -> None:
        self.group, self.group_name = group, group_name
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        g = self.size if group_size is None else group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or self.size % g:
            raise ValueError(f"owner_group_size must be a positive integer dividing the {self.size} ranks of "
                             f"{group_name!r}, got {group_size!r}")
        self.group_size = g
        everyone, holders, senders = gather_holdings(layouts, names, group, group_name)
        self.matrices: list[tuple[int, int, tuple[int, int]]] = []
        candidates = []
        for i, ranks in enumerate(holders):
            allowed = range(ranks[0], ranks[-1] + 1) if ranks[-1] - ranks[0] + 1 == len(ranks) else ranks
            self.matrices += [(i, k, shape) for k, shape in enumerate(everyone[ranks[0]][i].block_shapes)]
            candidates += [allowed] * len(everyone[ranks[0]][i].block_shapes)
        self.degrees, self.costs = degrees, costs
        self.owners, self.load = place(costs, degrees, self.size, candidates)  # each run's first rank
        mean = sum(self.load) / self.size
        self.imbalance = max(self.load) / mean - 1.0 if mean else 0.0
        self.replicas = None  # as ``OwnerPlan.replicas``: every matrix transformed once, whatever the groups

        # this rank's blocks, stacked by (run, k, full shape): slot (key, index in the stack)
        self.stacks: dict[StackKey, list[int]] = defaultdict(list)
        slot: dict[int, tuple[StackKey, int]] = {}
        for j, ((_, _, shape), k, first) in enumerate(zip(self.matrices, degrees, self.owners)):
            if first <= self.rank < first + k:
                key = (first, k, shape)
                slot[j] = (key, len(self.stacks[key]))
                self.stacks[key].append(j)
        send = [[] for _ in range(self.size)]  # (param, piece) this rank sends to each rank
        recv = [[] for _ in range(self.size)]  # (slot, piece) it receives from each
        back_send = [[] for _ in range(self.size)]
        back_recv = [[] for _ in range(self.size)]
        hops = g != self.size  # two-hop moves: every rank routes others' pieces, so it knows every (src, dst) run
        fwd: dict[tuple[int, int], list[tuple[tuple, int]]] = defaultdict(list)  # (src, dst) -> (key, elements)
        bwd: dict[tuple[int, int], list[tuple[tuple, int]]] = defaultdict(list)
        for j, ((i, blk, (m, n)), k, first) in enumerate(zip(self.matrices, degrees, self.owners)):
            wide = m <= n  # as ops.newton_schulz orients a square matrix
            for p in range(k):
                owner = first + p
                lo, hi = part_range(n if wide else m, k, p)
                for r in range(self.size) if hops or owner == self.rank else (self.rank,):
                    if everyone[r][i] is None:
                        continue
                    pieces = _pieces([x for x in everyone[r][i].rects if x.block == blk], wide, lo, hi)
                    for pc in pieces:
                        if hops:  # one key per piece of a block: copies held by several ranks share it
                            key = (j, p, pc.row, pc.col, pc.r1 - pc.r0, pc.c1 - pc.c0)
                            bwd[(owner, r)].append((key, pc.numel))
                            if r in senders[i]:
                                fwd[(r, owner)].append((key, pc.numel))
                        if r == self.rank:
                            back_recv[owner].append((i, pc))
                            if r in senders[i]:
                                send[owner].append((i, pc))
                        if owner == self.rank:
                            back_send[r].append((slot[j], pc))
                            if r in senders[i]:
                                recv[r].append((slot[j], pc))
        self.send, self.recv, self.back_send, self.back_recv = send, recv, back_send, back_recv
        sizes = lambda moves: [sum(pc.numel for _, pc in per) for per in moves]  # noqa: E731
        self.send_sizes, self.recv_sizes = sizes(send), sizes(recv)
        self.back_send_sizes, self.back_recv_sizes = sizes(back_send), sizes(back_recv)
        self.there = self.back = None  # with owner groups: the moves in two hops (``hops.TwoHop``), as OwnerPlan's
        if hops:
            groups_pg, names = axis_groups(group, group_name, self.size, self.rank, g)
            self.there = TwoHop(fwd, self.size, g, self.rank, "outer", groups_pg, names)
            self.back = TwoHop(bwd, self.size, g, self.rank, "inner", groups_pg, names)
            agree_off_rank([self.there, self.back], group)
        # one process group per run of k > 1 this rank is in, made by its members only, in one global order
        ranks = dist.get_process_group_ranks(group)
        self.subgroups: dict[tuple[int, int], dist.ProcessGroup] = {}
        for first, k in sorted({(key[0], key[1]) for key in self.stacks if key[1] > 1}):
            self.subgroups[(first, k)] = dist.new_group(ranks[first:first + k], use_local_synchronization=True)

    @property
    def owned(self) -> int:
        """How many matrices this rank transforms per step: a split matrix counts on its run's first rank."""
        return sum(len(js) for (first, _, _), js in self.stacks.items() if first == self.rank)

    def _exchange(self, send: Tensor, send_sizes: list[int], recv_sizes: list[int], two: TwoHop | None,
                  stats: CommStats | None) -> tuple[Tensor, list[int]]:
        """One move: ``send`` (its pieces for each rank in rank order) exchanged, in one all-to-all or, with
        owner groups, in ``two``'s two hops; the output and where each source's pieces start in it."""
        if two is not None:
            recv = two.start(send, stats).wait()
            return recv, [two.offsets.get(src, 0) for src in range(self.size)]
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        count(stats, self.group_name, send, "all_to_all",
              sent=(send.numel() - send_sizes[self.rank]) * send.element_size())
        return recv, [sum(recv_sizes[:src]) for src in range(self.size)]

    def run(self, locals_: dict[int, Tensor], fn: Callable[[Tensor], Tensor], move_dtype: torch.dtype,
            work_dtype: torch.dtype, stats: CommStats | None = None, split: SplitFn | None = None) -> dict[int, Tensor]:
        """As ``OwnerPlan.run``: ``fn`` on the whole (k = 1) matrices, ``split(x, wide, run, (m, n))`` on
        the blocks ``x`` ``(B, ·, ·)`` of a run's stack of m × n matrices (``run``: its collectives)."""
        device = next(iter(locals_.values())).device if locals_ else torch.device("cpu")
        flats = {i: x.reshape(-1) for i, x in locals_.items()}
        empty = torch.empty(0, dtype=move_dtype, device=device)
        parts = [pc.of(flats[i]).reshape(-1) for moves in self.send for i, pc in moves]
        recv, starts = self._exchange(torch.cat(parts).to(move_dtype) if parts else empty, self.send_sizes,
                                      self.recv_sizes, self.there, stats)
        mats = {}
        for (first, k, (m, n)), js in self.stacks.items():
            lo, hi = part_range(max(m, n), k, self.rank - first)
            h, w = (m, hi - lo) if m <= n else (hi - lo, n)
            mats[(first, k, (m, n))] = torch.zeros(len(js), h, w, dtype=work_dtype, device=device)
        for moves, at in zip(self.recv, starts):
            for (key, b), pc in moves:
                rows, cols = pc.r1 - pc.r0, pc.c1 - pc.c0
                mats[key][b, pc.row : pc.row + rows, pc.col : pc.col + cols] = recv[at : at + pc.numel].view(rows, cols)
                at += pc.numel
        done = {}
        for key in sorted(mats):  # the same order on every rank of a run: its all-reduces match
            first, k, shape = key
            if k == 1:
                done[key] = fn(mats[key])
            elif split is None:
                raise RuntimeError("a split Newton–Schulz plan needs the stage's split transform")
            else:
                done[key] = split(mats[key], shape[0] <= shape[1], Run(self.subgroups[(first, k)], k,
                                                                       self.rank - first, stats), shape)
        parts = [done[key][b, pc.row : pc.row + pc.r1 - pc.r0, pc.col : pc.col + pc.c1 - pc.c0].reshape(-1)
                 for moves in self.back_send for (key, b), pc in moves]
        back, starts = self._exchange(torch.cat(parts).to(move_dtype) if parts else empty, self.back_send_sizes,
                                      self.back_recv_sizes, self.back, stats)
        out = {i: torch.empty(x.numel(), dtype=move_dtype, device=device) for i, x in locals_.items()}
        for moves, at in zip(self.back_recv, starts):
            for i, pc in moves:
                pc.of(out[i])[:] = back[at : at + pc.numel].view(pc.r1 - pc.r0, pc.c1 - pc.c0)
                at += pc.numel
        return {i: out[i].view(locals_[i].shape) for i in out}
