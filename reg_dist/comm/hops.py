"""Two-hop all-to-all: an exchange over a group of P = (P/g) × g ranks in which no collective has more
than max(g, P/g) − 1 peers.

Rank r = G·g + s belongs to inner group G (ranks G·g … G·g + g − 1) and outer group s (ranks s, g + s,
…). Every run (a key and a length, ``Run``) goes from a source to a destination rank in two hops, one
along each axis, through the rank that shares one coordinate with each:

    "outer" first   src = (G, s) → (G_dst, s) → dst = (G_dst, s_dst)     (spreads a gather's far hop
    "inner" first   src = (G, s) → (G, s_dst) → dst                      over every rank of the group)

Runs of one source with one key (the same elements for several destinations) travel their first hop
once: a result for every replica of a shard crosses the inner group once, then fans out across.
With g = P or g = 1 one hop is the identity and the other the single all-to-all over the group.
The split sizes are static, so every rank calls the same collectives in the same order; a hop that
moves nothing off any rank (agreed once, ``needed``) makes no collective at all.
"""

import dataclasses
from collections import defaultdict
from collections.abc import Hashable

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import CommStats, count

Run = tuple[Hashable, int]  # (key, elements)
AXES = ("inner", "outer")


def _slices(buf: Tensor, pieces: list[tuple[int, int]]) -> Tensor:
    """``buf``'s ranges ``(start, length)``, concatenated (adjacent ranges taken as one slice)."""
    merged: list[list[int]] = []
    for start, length in pieces:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        elif length:
            merged.append([start, length])
    if len(merged) == 1 and merged[0][1] == buf.numel():
        return buf
    return torch.cat([buf[s : s + n] for s, n in merged]) if merged else buf.new_empty(0)


@dataclasses.dataclass
class Hop:
    """One all-to-all along an axis: this rank's split sizes to and from its peers there, what it packs
    (ranges of its buffer) and whether any rank of the group moves anything off-rank."""

    group: dist.ProcessGroup | None
    name: str
    rank: int  # in the axis group
    send: list[list[tuple[int, int]]]  # per peer: (start, length) ranges of the buffer it packs from
    recv_sizes: list[int]
    off_rank: bool = False

    def start(self, buf: Tensor, stats: CommStats | None) -> tuple[dist.Work | None, Tensor]:
        """The all-to-all of ``buf`` launched (its work, None where nothing leaves any rank) and its output."""
        parts = [_slices(buf, ranges) for ranges in self.send]
        send = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not self.off_rank:
            return None, send  # everything is this rank's own (one peer: itself)
        recv = send.new_empty(sum(self.recv_sizes))
        send_sizes = [p.numel() for p in parts]
        work = dist.all_to_all_single(recv, send, self.recv_sizes, send_sizes, group=self.group, async_op=True)
        count(stats, self.name, send, "all_to_all", sent=(send.numel() - send_sizes[self.rank]) * send.element_size())
        return work, recv


class InFlight:
    """A ``TwoHop`` exchange under way: its first hop launched. ``advance`` launches the second once the
    first has landed; ``wait`` returns the output. Every rank calls them at the same points, so the
    collectives of several exchanges in flight are issued in one order everywhere."""

    def __init__(self, hop2: Hop, stats: CommStats | None, work: dist.Work | None, buf: Tensor) -> None:
        self.hop2, self.stats, self.work, self.buf, self.second = hop2, stats, work, buf, False

    def advance(self) -> None:
        if not self.second:
            if self.work is not None:
                self.work.wait()
            self.work, self.buf = self.hop2.start(self.buf, self.stats)
            self.second = True

    def wait(self) -> Tensor:
        self.advance()
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buf


class TwoHop:
    """A static exchange of ``runs[(src, dst)]`` (every rank knows all of them; list order = packing
    order) over a plan's ``size`` ranks in inner groups of ``g`` (``groups``: this rank's inner and
    outer process groups, None where that axis has one rank). The input buffer of a rank is its runs
    to every destination, in destination order; the output its runs from every source, each source's
    contiguous at ``offsets[src]``."""

    def __init__(self, runs: dict[tuple[int, int], list[Run]], size: int, g: int, rank: int, first: str,
                 groups: dict[str, dist.ProcessGroup | None], names: dict[str, str]) -> None:
        if first not in AXES:
            raise ValueError(f"first must be one of {AXES}, got {first!r}")
        self.size, self.g, self.rank, self.first = size, g, rank, first
        length = {pair: sum(n for _, n in rs) for pair, rs in runs.items()}
        by_src: dict[int, list[int]] = defaultdict(list)
        for src, dst in sorted(runs):
            by_src[src].append(dst)
        second = AXES[1 - AXES.index(first)]

        # hop 1: this rank's distinct runs to each mid rank, from its input buffer
        def hop1_runs(src: int, mid: int) -> list[tuple[Hashable, int, int]]:
            """(key, start in src's input buffer, length), first occurrence of each key."""
            out, seen, at = [], set(), 0
            for dst in by_src[src]:
                for key, n in runs[(src, dst)]:
                    if self._mid(src, dst) == mid and key not in seen:
                        seen.add(key)
                        out.append((key, at, n))
                    at += n
            return out

        peers1 = self._peers(rank, first)
        sends1 = [[(s, n) for _, s, n in hop1_runs(rank, q)] for q in peers1]
        froms1 = {q: hop1_runs(q, rank) for q in peers1}  # what each hop-1 peer sends to this (mid) rank
        where: dict[tuple[int, Hashable], int] = {}  # (src, key) -> start in the hop-1 output
        at = 0
        for q in peers1:
            for key, _, n in froms1[q]:
                where[(q, key)] = at
                at += n
        self.hop1 = Hop(groups[first], names[first], peers1.index(rank), sends1, [sum(n for *_, n in froms1[q]) for q in peers1])

        # hop 2: from the mid ranks to the destinations, each source's runs for dst in source order
        peers2 = self._peers(rank, second)
        sends2 = []
        for dst in peers2:
            ranges = [(where[(src, key)], n) for src in range(size) if (src, dst) in runs and self._mid(src, dst) == rank
                      for key, n in runs[(src, dst)]]
            sends2.append(ranges)
        recv2, self.offsets, at = [], {}, 0
        for q in peers2:
            total = 0
            for src in range(size):
                if (src, rank) in runs and self._mid(src, rank) == q:
                    self.offsets[src] = at
                    at += length[(src, rank)]
                    total += length[(src, rank)]
            recv2.append(total)
        self.hop2 = Hop(groups[second], names[second], peers2.index(rank), sends2, recv2)

    def _coords(self, r: int) -> tuple[int, int]:
        return divmod(r, self.g)

    def _mid(self, src: int, dst: int) -> int:
        (gs, ss), (gd, sd) = self._coords(src), self._coords(dst)
        return gs * self.g + sd if self.first == "inner" else gd * self.g + ss

    def _peers(self, r: int, axis: str) -> list[int]:
        G, s = self._coords(r)
        return [G * self.g + t for t in range(self.g)] if axis == "inner" else \
            [H * self.g + s for H in range(self.size // self.g)]

    def off_rank(self) -> list[bool]:
        """Whether each hop moves anything off this rank."""
        return [any(n for q, ranges in enumerate(h.send) if q != h.rank for _, n in ranges) for h in (self.hop1, self.hop2)]

    def start(self, send: Tensor, stats: CommStats | None = None) -> InFlight:
        """The exchange of this rank's input ``send`` launched; its ``wait()`` is the output (see the class)."""
        return InFlight(self.hop2, stats, *self.hop1.start(send, stats))


def axis_groups(group: dist.ProcessGroup | None, group_name: str, size: int, rank: int,
                g: int) -> tuple[dict[str, dist.ProcessGroup | None], dict[str, str]]:
    """The inner and outer process groups of this rank (``rank`` of ``group``'s ``size``) for inner groups of
    ``g`` consecutive ranks (None where an axis has one rank), and the names their collectives are
    counted as: ``<group_name>:group`` and ``<group_name>:across``, or ``group_name`` where one axis is
    the whole group. Collective: every rank of ``group`` calls it alike."""
    if 1 < g < size:
        granks = dist.get_process_group_ranks(group)
        me_g, me_s = divmod(rank, g)
        return ({"inner": dist.new_group([granks[me_g * g + t] for t in range(g)], use_local_synchronization=True),
                 "outer": dist.new_group([granks[G * g + me_s] for G in range(size // g)],
                                         use_local_synchronization=True)},
                {"inner": f"{group_name}:group", "outer": f"{group_name}:across"})
    names = {"inner": group_name, "outer": group_name}
    return ({"inner": None, "outer": group} if g == 1 else {"inner": group, "outer": None}), names


def agree_off_rank(exchanges: list[TwoHop], group: dist.ProcessGroup | None) -> bool:
    """Mark each hop of ``exchanges`` that moves anything off any rank of ``group`` (one MAX all-reduce of
    a flag per hop, so that every rank makes the same collectives); whether any does."""
    hops = [h for two in exchanges for h in (two.hop1, two.hop2)]
    flags = torch.tensor([f for two in exchanges for f in two.off_rank()], dtype=torch.int32)
    if group is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    for hop, flag in zip(hops, flags.tolist()):
        hop.off_rank = bool(flag)
    return bool(flags.any())
