"""Owner moves: every matrix transformed whole, exactly once, on one rank of a process group.

For the parameters of one optimizer group, each held in pieces by the ranks of ``group`` (every
rank's ``Layout``, exchanged once at construction), every fused matrix j gets one owner among the
ranks that hold some of it (``plan_owners``, longest-processing-time first on the Newton–Schulz cost
m·n·min(m, n)). A step then runs

    send       one all-to-all: every element travels from one rank holding it to owner(j)
               (a replicated piece is sent once, by its lowest rank), in ``move_dtype``
    transform  the owner stacks same-shape matrices ``(B, m, n)`` and calls ``fn`` once per stack
    return     one all-to-all: every rank holding elements of j receives them from owner(j)

Split sizes are fixed by the layouts, so uneven and empty pieces need no padding and every rank
calls both collectives (possibly with nothing to send) in the same order: nothing can hang. A plan
whose moves all stay on their rank (each matrix whole on its only holder) makes no collective.
"""

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout, Rect
from .collectives import CommStats, count
from .ownership import imbalance, plan_owners


def newton_schulz_cost(m: int, n: int) -> int:
    """FLOPs of one Newton–Schulz iteration up to a constant: m·n·min(m, n)."""
    return m * n * min(m, n)


Move = tuple[int, tuple[Rect, ...]]  # (parameter index, its rects of one matrix) on a holder
Slot = tuple[tuple[tuple[int, int], int], tuple[Rect, ...]]  # ((shape, index in its stack), rects) on an owner


def _geometry(layout: Layout | None) -> Layout | None:
    """The layout without its process groups (picklable), None where the rank holds nothing."""
    if layout is None or layout.numel == 0:
        return None
    return dataclasses.replace(layout, groups=())


def gather_holdings(layouts: list[Layout | None], names: list[str], group: dist.ProcessGroup | None,
                    group_name: str) -> tuple[list[list[Layout | None]], list[list[int]], list[set[int]]]:
    """Every rank's layout (groups left out; None: holds nothing) of each parameter, gathered over ``group``
    (None: this process alone) and checked; the ranks that hold each parameter, and those that send its
    pieces (of identical copies, the lowest rank). Raise ValueError if the ranks disagree on a parameter's
    shape or fused blocks, none holds it, or its distinct pieces do not add up to m·n elements."""
    size = dist.get_world_size(group) if group is not None else 1
    mine = [_geometry(lay) for lay in layouts]
    everyone = [mine] if group is None else [None] * size
    if group is not None:
        dist.all_gather_object(everyone, mine, group=group)
    holders, senders = [], []
    for i, name in enumerate(names):
        geoms = {r: theirs[i] for r, theirs in enumerate(everyone) if theirs[i] is not None}
        if not geoms or len({(g.shape, g.fused) for g in geoms.values()}) != 1:
            raise ValueError(f"ranks of {group_name!r} disagree on the shape or fused blocks of parameter "
                             f"{name}, or none holds any of it")
        distinct = {}  # a replicated piece is sent by its lowest rank
        for r, g in geoms.items():
            distinct.setdefault((g.rows, g.cols, g.flat), r)
        (m, n), total = next(iter(geoms.values())).shape, sum(geoms[r].numel for r in distinct.values())
        if total != m * n:
            raise ValueError(f"the layouts of parameter {name} do not add up: the ranks of {group_name!r} "
                             f"hold {total} distinct elements of its {m}×{n}")
        holders.append(sorted(geoms))
        senders.append(set(distinct.values()))
    return everyone, holders, senders


def _elements_per_rank(moves: list[list[tuple[object, tuple[Rect, ...]]]]) -> list[int]:
    return [sum(r.h * r.w for _, rects in per_rank for r in rects) for per_rank in moves]


class OwnerPlan:
    """The static moves of one group's matrices over ``group`` (None: this process alone)."""

    def __init__(self, layouts: list[Layout | None], names: list[str], group: dist.ProcessGroup | None,
                 group_name: str) -> None:
        self.group, self.group_name = group, group_name
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        everyone, holders, senders = gather_holdings(layouts, names, group, group_name)
        self.matrices: list[tuple[int, int, tuple[int, int]]] = []  # (parameter, block, (m, n))
        candidates = []
        for i, ranks in enumerate(holders):
            for k, block_shape in enumerate(everyone[ranks[0]][i].block_shapes):
                self.matrices.append((i, k, block_shape))
                candidates.append(ranks)
        costs = [newton_schulz_cost(m, n) for _, _, (m, n) in self.matrices]
        self.owners = plan_owners(costs, self.size, candidates)
        self.imbalance = imbalance(costs, self.owners, self.size)

        def rects(r: int, i: int, k: int) -> tuple[Rect, ...]:
            return tuple(x for x in everyone[r][i].rects if x.block == k) if everyone[r][i] is not None else ()

        # slots: the owned matrices, grouped by shape into stacks
        self.stacks: dict[tuple[int, int], list[int]] = defaultdict(list)
        slot: dict[int, tuple[tuple[int, int], int]] = {}
        for j, ((i, k, shape), owner) in enumerate(zip(self.matrices, self.owners)):
            if owner == self.rank:
                slot[j] = (shape, len(self.stacks[shape]))
                self.stacks[shape].append(j)
        self.send: list[list[Move]] = [[] for _ in range(self.size)]
        self.recv: list[list[Slot]] = [[] for _ in range(self.size)]
        self.back_send: list[list[Slot]] = [[] for _ in range(self.size)]
        self.back_recv: list[list[Move]] = [[] for _ in range(self.size)]
        for j, ((i, k, _), owner) in enumerate(zip(self.matrices, self.owners)):
            for r in range(self.size):
                held_r = rects(r, i, k)
                if not held_r:
                    continue
                if r == self.rank:
                    self.back_recv[owner].append((i, held_r))
                    if r in senders[i]:
                        self.send[owner].append((i, held_r))
                if owner == self.rank:
                    self.back_send[r].append((slot[j], held_r))
                    if r in senders[i]:
                        self.recv[r].append((slot[j], held_r))
        sizes = _elements_per_rank
        self.send_sizes, self.recv_sizes = sizes(self.send), sizes(self.recv)
        self.back_send_sizes, self.back_recv_sizes = sizes(self.back_send), sizes(self.back_recv)
        off_rank = sum(s for r, s in enumerate(self.send_sizes) if r != self.rank)
        off_rank += sum(s for r, s in enumerate(self.back_send_sizes) if r != self.rank)
        flag = torch.tensor([off_rank > 0], dtype=torch.int32)
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        self.moves_data = bool(flag.item())  # False: every move stays on its rank, no collective needed

    @property
    def owned(self) -> int:
        """How many matrices this rank transforms per step."""
        return sum(len(js) for js in self.stacks.values())

    def _exchange(self, send: Tensor, send_sizes: list[int], recv_sizes: list[int],
                  stats: CommStats | None) -> Tensor:
        recv = send.new_empty(sum(recv_sizes))
        if not self.moves_data:
            recv.copy_(send)  # everything is this rank's own
            return recv
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        count(stats, self.group_name, send, "all_to_all",
              sent=(send.numel() - send_sizes[self.rank]) * send.element_size())
        return recv

    def run(self, locals_: dict[int, Tensor], fn: Callable[[Tensor], Tensor], move_dtype: torch.dtype,
            work_dtype: torch.dtype, stats: CommStats | None = None) -> dict[int, Tensor]:
        """``fn`` applied to every whole matrix on its owner; returns, for every parameter held here,
        its local elements of the result (``move_dtype``, shaped like ``locals_[i]``).

        ``locals_`` maps parameter index to this rank's contiguous elements of it; ``fn`` takes a
        ``(B, m, n)`` stack in ``work_dtype`` and returns one of the same shape.
        """
        device = next(iter(locals_.values())).device if locals_ else torch.device("cpu")
        flats = {i: x.reshape(-1) for i, x in locals_.items()}
        parts = [flats[i][r.start : r.start + r.h * r.w] for moves in self.send for i, rs in moves for r in rs]
        send = torch.cat(parts).to(move_dtype) if parts else torch.empty(0, dtype=move_dtype, device=device)
        recv = self._exchange(send, self.send_sizes, self.recv_sizes, stats)

        mats = {shape: torch.zeros(len(js), *shape, dtype=work_dtype, device=device)
                for shape, js in self.stacks.items()}
        at = 0
        for moves in self.recv:
            for (shape, b), rs in moves:
                for r in rs:
                    mats[shape][b, r.brow : r.brow + r.h, r.col : r.col + r.w] = recv[at : at + r.h * r.w].view(r.h, r.w)
                    at += r.h * r.w
        done = {shape: fn(x) for shape, x in mats.items()}

        parts = [done[shape][b, r.brow : r.brow + r.h, r.col : r.col + r.w].reshape(-1)
                 for moves in self.back_send for (shape, b), rs in moves for r in rs]
        send = torch.cat(parts).to(move_dtype) if parts else torch.empty(0, dtype=move_dtype, device=device)
        back = self._exchange(send, self.back_send_sizes, self.back_recv_sizes, stats)

        out = {i: torch.empty(x.numel(), dtype=move_dtype, device=device) for i, x in locals_.items()}
        at = 0
        for moves in self.back_recv:
            for i, rs in moves:
                for r in rs:
                    out[i][r.start : r.start + r.h * r.w] = back[at : at + r.h * r.w]
                    at += r.h * r.w
        return {i: out[i].view(locals_[i].shape) for i in out}


# A local stack of same-shape matrices holds at most this many bytes (always at least one parameter). It
# bounds the step's scratch memory whatever the model size, and on the CPU keeps each scratch buffer
# under glibc's largest mmap threshold, so it is reused instead of page-faulted in every step.
STACK_BYTES = 32 * 2**20


class LocalPlan:
    """The owner plan of matrices this process holds whole (trivial layouts, no group): no moves.

    Same-shape matrices are stacked, in order, into ``(B, m, n)`` batches of at most ``STACK_BYTES``
    (the matrices of one parameter are never cut) and ``fn`` runs once per batch; a lone matrix is
    handed over as a view rather than copied into a stack.
    """

    group, group_name, size, rank, imbalance, moves_data = None, "local", 1, 0, 0.0, False

    def __init__(self, layouts: list[Layout]) -> None:
        self.layouts = layouts
        self.matrices = [(i, k, shape) for i, lay in enumerate(layouts) for k, shape in enumerate(lay.block_shapes)]
        self.owners = [0] * len(self.matrices)

    @property
    def owned(self) -> int:
        return len(self.matrices)

    def run(self, locals_: dict[int, Tensor], fn: Callable[[Tensor], Tensor], move_dtype: torch.dtype,
            work_dtype: torch.dtype, stats: CommStats | None = None) -> dict[int, Tensor]:
        """``fn`` on every matrix, written back into ``locals_`` (``move_dtype`` plays no part: nothing moves)."""
        by_shape: dict[tuple[int, int], list[list[list[Tensor]]]] = defaultdict(list)  # shape → params → matrices
        for i, x in locals_.items():
            lay = self.layouts[i]
            rows = x.view(lay.shape)
            views: dict[int, list[Tensor]] = defaultdict(list)  # a matrix as its row segments
            for start, end, k in lay.segments:
                views[k].append(rows[start:end])
            for shape in set(lay.block_shapes):
                by_shape[shape].append([views[k] for k, s in enumerate(lay.block_shapes) if s == shape])
        itemsize = torch.empty((), dtype=work_dtype).element_size()
        for (m, n), params in by_shape.items():
            for run in stacks(params, [len(mats) * m * n * itemsize for mats in params], STACK_BYTES):
                mats = [segments for mats in run for segments in mats]
                whole = [torch.cat(s) if len(s) > 1 else s[0] for s in mats]
                out = fn((whole[0].unsqueeze(0) if len(whole) == 1 else torch.stack(whole)).to(work_dtype))
                for segments, result in zip(mats, out):
                    row = 0
                    for view in segments:
                        view.copy_(result[row : row + view.shape[0]])
                        row += view.shape[0]
        return locals_


def stacks(items: list, sizes: list[int], budget: int) -> list[list]:
    """``items`` cut, in order, into runs whose ``sizes`` add up to at most ``budget`` (or one item)."""
    runs: list[list] = []
    total = budget + 1
    for item, size in zip(items, sizes):
        if total + size > budget:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs
