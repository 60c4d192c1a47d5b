"""Owner moves: every matrix transformed whole, exactly once, on one rank of a process group.

For the parameters of one optimizer group, each held in pieces by the ranks of ``group`` (every
rank's ``Layout``, exchanged once at construction), every fused matrix j gets one owner among the
ranks that hold some of it (``plan_owners``, longest-processing-time first on the Newton–Schulz cost
m·n·min(m, n)). A step then runs

    send       every element travels from one rank holding it to owner(j) (a replicated piece is
               sent once, by its lowest rank in the owner's group), in ``move_dtype``
    transform  the owner stacks same-shape matrices ``(B, m, n)`` and calls ``fn`` once per stack
    return     every rank holding elements of j receives them from owner(j)

Each move is one all-to-all over the group, or, with owner groups of g ranks, two (``hops.TwoHop``)
of at most max(g, P/g) ranks each. Where every group holds every matrix (HSDP's replicas), a plan may
instead repeat the work in each group ("repeat": owners per group, no traffic across groups).
Split sizes are fixed by the layouts, so uneven and empty pieces need no padding and every rank
calls the same collectives (possibly with nothing to send) in the same order: nothing can hang. A
hop whose moves all stay on their rank (each matrix whole on its only holder) makes no collective.
"""

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout, Rect
from .collectives import CommStats
from .hops import InFlight, Run, TwoHop, agree_off_rank, axis_groups
from .ownership import REPLICAS, choose_replicas, imbalance, loads, plan_owners


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


class OwnerPlan:
    """The static moves of one group's matrices over ``group`` (None: this process alone).

    ``group_size`` g (default: the whole group) cuts the group's ranks into inner groups of g consecutive
    ranks; the moves then run in two hops (``hops.TwoHop``): no all-to-all has more than max(g, P/g) − 1
    peers. Where every inner group holds every matrix whole (HSDP's shard groups: one replica each),
    ``replicas`` says how they share the work: "share" (each matrix transformed once, by an owner
    anywhere, pieces sent from its own group's replica, results fanned out to every replica), "repeat"
    (each group transforms every matrix on its own ranks: no traffic across groups) or "auto" (the one
    ``ownership.choose_replicas`` predicts faster); ``self.replicas`` is the choice (None: one group).
    ``overlap``: one round of moves per matrix shape (``rounds``), the next round's in flight while
    one is transformed (asynchronous all-to-alls); otherwise one round.
    """

    def __init__(self, layouts: list[Layout | None], names: list[str], group: dist.ProcessGroup | None,
                 group_name: str, group_size: int | None = None, replicas: str = "auto", move_bytes: int = 2,
                 overlap: bool = False) -> None:
        self.group, self.group_name = group, group_name
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        g = self.size if group_size is None else group_size
        if replicas not in REPLICAS:
            raise ValueError(f"owner_replicas must be one of {REPLICAS}, got {replicas!r}")
        if not isinstance(g, int) or isinstance(g, bool) or g < 1 or self.size % g:
            raise ValueError(f"owner_group_size must be a positive integer dividing the {self.size} ranks of "
                             f"{group_name!r}, got {group_size!r}")
        self.group_size = g
        everyone, ranks_of, _ = gather_holdings(layouts, names, group, group_name)
        inner = [r // g for r in range(self.size)]  # each rank's inner group
        self.matrices: list[tuple[int, int, tuple[int, int]]] = []  # (parameter, block, (m, n))
        holders: list[dict[int, object]] = []  # per matrix: holder rank -> the class of its piece
        for i, ranks in enumerate(ranks_of):
            classes = {r: (everyone[r][i].rows, everyone[r][i].cols, everyone[r][i].flat) for r in ranks}
            for k, block_shape in enumerate(everyone[ranks[0]][i].block_shapes):
                self.matrices.append((i, k, block_shape))
                holders.append(classes)
        costs = [newton_schulz_cost(m, n) for _, _, (m, n) in self.matrices]

        def rects(r: int, j: int) -> tuple[Rect, ...]:
            i, k, _ = self.matrices[j]
            return tuple(x for x in everyone[r][i].rects if x.block == k) if everyone[r][i] is not None else ()

        groups = self.size // g
        whole = groups > 1 and all(  # every inner group holds every matrix whole
            sum(sum(x.h * x.w for x in rects(min(r for r in hs if inner[r] == G and hs[r] == c), j))
                for c in {hs[r] for r in hs if inner[r] == G}) == m * n
            for j, (hs, (_, _, (m, n))) in enumerate(zip(holders, self.matrices)) for G in range(groups))
        if replicas == "repeat" and not whole:
            raise ValueError(f"owner_replicas='repeat' needs every group of {g} ranks of {group_name!r} to hold "
                             f"every matrix whole (HSDP's shard groups); these do not")
        share = plan_owners(costs, self.size, [sorted(hs) for hs in holders])
        per_group = [plan_owners(costs, self.size, [[r for r in sorted(hs) if inner[r] == G] for hs in holders])
                     for G in range(groups)] if whole else []
        choice = replicas if replicas != "auto" else "share"
        if replicas == "auto" and whole:
            # elements each rank receives from other groups under "share", and sends to them (the owner's
            # group's rank of the same index fans each result out)
            received, sent = [0] * self.size, [0] * self.size
            for j, o in enumerate(share):
                for r in holders[j]:
                    if inner[r] != inner[o]:
                        size = sum(x.h * x.w for x in rects(r, j))
                        received[r] += size
                        sent[inner[o] * g + r % g] += size
            choice = choose_replicas(max(loads(costs, share, self.size)),
                                     max(max(loads(costs, owners, self.size)) for owners in per_group),
                                     max(received + sent), groups, move_bytes)
        self.replicas = choice if whole else None
        # transformers: (owner, its domain of ranks) of every matrix, one per group when repeating
        if self.replicas == "repeat":
            mine_g = inner[self.rank]
            transformers = [[(per_group[G][j], list(range(G * g, G * g + g))) for G in range(groups)]
                            for j in range(len(costs))]
            self.owners = per_group[mine_g]
            self.imbalance = imbalance(costs, [o - mine_g * g for o in self.owners], g)
        else:
            transformers = [[(o, list(range(self.size)))] for o in share]
            self.owners = share
            self.imbalance = imbalance(costs, share, self.size)

        # rounds: one exchange there and back each (with ``overlap``, one per matrix shape, costliest first,
        # so that a round's moves are in flight while the one before is transformed); the owned matrices
        # of each round grouped by shape into stacks
        shapes = sorted({shape for *_, shape in self.matrices}, key=lambda sh: (-newton_schulz_cost(*sh),
                        next(j for j, (*_, s) in enumerate(self.matrices) if s == sh)))
        round_of = [shapes.index(shape) if overlap else 0 for *_, shape in self.matrices]
        self.rounds = [_Round(self.size) for _ in range(max(round_of, default=0) + 1)]
        slot: dict[int, tuple[tuple[int, int], int]] = {}
        for j, (_, _, shape) in enumerate(self.matrices):
            if any(o == self.rank for o, _ in transformers[j]):
                stack = self.rounds[round_of[j]].stacks[shape]
                slot[j] = (shape, len(stack))
                stack.append(j)
        # the runs of every (source, destination) pair, and this rank's packing and unpacking of its own
        fwd: list[dict[tuple[int, int], list[Run]]] = [defaultdict(list) for _ in self.rounds]
        back: list[dict[tuple[int, int], list[Run]]] = [defaultdict(list) for _ in self.rounds]
        for j, (i, _, _) in enumerate(self.matrices):
            hs, rnd, k = holders[j], self.rounds[round_of[j]], round_of[j]
            for owner, domain in transformers[j]:
                here = [r for r in domain if r in hs]
                near = [r for r in here if inner[r] == inner[owner]]  # a piece's copy in the owner's group sends
                senders = {min((r for r in (near if any(hs[q] == c for q in near) else here) if hs[r] == c))
                           for c in {hs[r] for r in here}}
                for r in here:
                    held_r = rects(r, j)
                    key = tuple((j, x.brow, x.col, x.h, x.w) for x in held_r)
                    back[k][(owner, r)].extend((key_x, x.h * x.w) for key_x, x in zip(key, held_r))
                    if r in senders:
                        fwd[k][(r, owner)].extend((key_x, x.h * x.w) for key_x, x in zip(key, held_r))
                    if r == self.rank:
                        rnd.back_recv[owner].append((i, held_r))
                        if r in senders:
                            rnd.send[owner].append((i, held_r))
                    if owner == self.rank:
                        rnd.back_send[r].append((slot[j], held_r))
                        if r in senders:
                            rnd.recv[r].append((slot[j], held_r))
        groups_pg, names = axis_groups(group, group_name, self.size, self.rank, g)
        # there: outer hop first (a far gather lands on every rank of the owner's group); back: inner first
        # (each result crosses the owner's group once, then fans out to its replicas)
        for rnd, there_runs, back_runs in zip(self.rounds, fwd, back):
            rnd.there = TwoHop(there_runs, self.size, g, self.rank, "outer", groups_pg, names)
            rnd.back = TwoHop(back_runs, self.size, g, self.rank, "inner", groups_pg, names)
        # False: every move stays on its rank, no collective needed
        self.moves_data = agree_off_rank([two for rnd in self.rounds for two in (rnd.there, rnd.back)], group)

    @property
    def owned(self) -> int:
        """How many matrices this rank transforms per step."""
        return sum(len(js) for rnd in self.rounds for js in rnd.stacks.values())

    def run(self, locals_: dict[int, Tensor], fn: Callable[[Tensor], Tensor], move_dtype: torch.dtype,
            work_dtype: torch.dtype, stats: CommStats | None = None) -> dict[int, Tensor]:
        """``fn`` applied to every whole matrix on its owner; returns, for every parameter held here,
        its local elements of the result (``move_dtype``, shaped like ``locals_[i]``).

        ``locals_`` maps parameter index to this rank's contiguous elements of it; ``fn`` takes a
        ``(B, m, n)`` stack in ``work_dtype`` and returns one of the same shape. Round k + 1's moves are
        launched before round k is transformed, and round k's results before round k + 1's arrive.
        """
        device = next(iter(locals_.values())).device if locals_ else torch.device("cpu")
        flats = {i: x.reshape(-1) for i, x in locals_.items()}

        def launch(rnd: _Round) -> InFlight:
            parts = [flats[i][r.start : r.start + r.h * r.w] for moves in rnd.send for i, rs in moves for r in rs]
            send = torch.cat(parts).to(move_dtype) if parts else torch.empty(0, dtype=move_dtype, device=device)
            return rnd.there.start(send, stats)

        out = {i: torch.empty(x.numel(), dtype=move_dtype, device=device) for i, x in locals_.items()}
        there, back = [launch(self.rounds[0])], []
        for k, rnd in enumerate(self.rounds):
            recv = there[k].wait()
            if k + 1 < len(self.rounds):
                there.append(launch(self.rounds[k + 1]))  # in flight while this round is transformed
            mats = {shape: torch.zeros(len(js), *shape, dtype=work_dtype, device=device)
                    for shape, js in rnd.stacks.items()}
            for src, moves in enumerate(rnd.recv):
                at = rnd.there.offsets.get(src, 0)
                for (shape, b), rs in moves:
                    for r in rs:
                        mats[shape][b, r.brow : r.brow + r.h, r.col : r.col + r.w] = \
                            recv[at : at + r.h * r.w].view(r.h, r.w)
                        at += r.h * r.w
            done = {shape: fn(x) for shape, x in mats.items()}
            for pending in (*there[k + 1:], *back):
                pending.advance()  # first hops landed during the transform: their second hops go
            parts = [done[shape][b, r.brow : r.brow + r.h, r.col : r.col + r.w].reshape(-1)
                     for moves in rnd.back_send for (shape, b), rs in moves for r in rs]
            send = torch.cat(parts).to(move_dtype) if parts else torch.empty(0, dtype=move_dtype, device=device)
            back.append(rnd.back.start(send, stats))
        for rnd, pending in zip(self.rounds, back):
            buf = pending.wait()
            for src, moves in enumerate(rnd.back_recv):
                at = rnd.back.offsets.get(src, 0)
                for i, rs in moves:
                    for r in rs:
                        out[i][r.start : r.start + r.h * r.w] = buf[at : at + r.h * r.w]
                        at += r.h * r.w
        return {i: out[i].view(locals_[i].shape) for i in out}


class _Round:
    """One exchange of an ``OwnerPlan``: this rank's moves per peer there and back, and its stacks."""

    def __init__(self, size: int) -> None:
        self.send: list[list[Move]] = [[] for _ in range(size)]
        self.recv: list[list[Slot]] = [[] for _ in range(size)]
        self.back_send: list[list[Slot]] = [[] for _ in range(size)]
        self.back_recv: list[list[Move]] = [[] for _ in range(size)]
        self.stacks: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.there: TwoHop | None = None
        self.back: TwoHop | None = None


# A local stack of same-shape matrices holds at most this many bytes (always at least one parameter). It
# bounds the step's scratch memory whatever the model size, and on the CPU keeps each scratch buffer
# under glibc's largest mmap threshold, so it is reused instead of page-faulted in every step.
STACK_BYTES = 32 * 2**20
# the devices whose matrices LocalPlan hands to Newton–Schulz one at a time, as views, rather than copied into
# a stack: the CPU, where Newton–Schulz loops over a stack's matrices anyway (``ops.newton_schulz.orthogonalize``)
UNSTACKED_DEVICES = ("cpu",)


class LocalPlan:
    """The owner plan of matrices this process holds whole (trivial layouts, no group): no moves.

    Same-shape matrices are stacked, in order, into ``(B, m, n)`` batches of at most ``STACK_BYTES``
    (the matrices of one parameter are never cut) and ``fn`` runs once per batch; a lone matrix is
    handed over as a view rather than copied into a stack. On the ``UNSTACKED_DEVICES`` (the CPU, where
    Newton–Schulz runs one matrix at a time whatever the stack), ``fn`` runs on each matrix's view
    instead (``(1, m, n)``): the same values without the copy into a stack. A parameter
    that is one matrix takes ``fn``'s result as it is; the matrices of a fused one are copied back.
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
        """``fn`` on every matrix; returns each parameter's result: ``fn``'s where the parameter is one
        matrix, else written back into ``locals_`` (``move_dtype`` plays no part: nothing moves)."""
        by_shape: dict[tuple[int, int], list[tuple[int, list[list[Tensor]]]]] = defaultdict(list)  # → (param, matrices)
        for i, x in locals_.items():
            lay = self.layouts[i]
            rows = x.view(lay.shape)
            views: dict[int, list[Tensor]] = defaultdict(list)  # a matrix as its row segments
            for start, end, k in lay.segments:
                views[k].append(rows[start:end])
            for shape in set(lay.block_shapes):
                by_shape[shape].append((i, [views[k] for k, s in enumerate(lay.block_shapes) if s == shape]))
        results = dict(locals_)
        itemsize = torch.empty((), dtype=work_dtype).element_size()
        for (m, n), params in by_shape.items():
            for run in stacks(params, [len(mats) * m * n * itemsize for _, mats in params], STACK_BYTES):
                mats = [(i, segments) for i, ms in run for segments in ms]
                whole = [torch.cat(s) if len(s) > 1 else s[0] for _, s in mats]
                if whole[0].device.type in UNSTACKED_DEVICES or len(whole) == 1:
                    out = [fn(w.unsqueeze(0).to(work_dtype))[0] for w in whole]
                else:
                    out = fn(torch.stack(whole).to(work_dtype))
                for (i, segments), result in zip(mats, out):
                    if len(self.layouts[i].segments) == 1:
                        results[i] = result.view(locals_[i].shape)
                        continue
                    row = 0
                    for view in segments:
                        view.copy_(result[row : row + view.shape[0]])
                        row += view.shape[0]
        return results


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
