"""Which elements of a logical m × n parameter a rank holds, which groups split it, and which
separate matrices are fused inside it.

A rank holds a *block* of the logical parameter, rows ``[r0, r1)`` × columns ``[c0, c1)`` (a tensor-
parallel shard, an FSDP row shard, or both), stored either as a 2-D ``(r1−r0, c1−c0)`` tensor or,
with ``flat=(s, e)``, as the elements ``s … e−1`` of that block's row-major flattening (a DeepSpeed
ZeRO or Megatron distributed-optimizer partition, which may cut rows anywhere). ``groups`` names the
process groups whose ranks together hold the rest of the parameter; statistics are summed over
them in the order of their names, the same on every rank, or with ``inner`` (from
``share_statistics``) over that group first, then over the other with the ``replicated`` entries
(column sums equal on every rank of ``inner`` once reduced there) reduced in slices, one per rank
of ``inner``.

``fused`` cuts the parameter's rows into segments ``(start, end, k)``, each belonging to matrix
``k`` (QKV, gate/up, the experts of a stacked MoE weight): matrix k is its segments' rows, in order,
× all n columns. Without it the parameter is one matrix.

``rects`` cuts the local elements into rectangles, each a contiguous run of the local tensor's
row-major flattening inside one segment: all the statistics, the scaling and the owner moves need.

``shared`` says, per group name, which entries of the parameter's statistics vector (its m row
sums, then the n column sums of each fused matrix k at ``m + k·n + j``) another rank of that group
also touches, as sorted runs ``[a, b)``: only those travel (``comm.statistics.share_statistics``
fills it in); None: every entry, over every group.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

Segment = tuple[int, int, int]  # rows [start, end) of the parameter belong to fused matrix k
Runs = tuple[tuple[int, int], ...]  # sorted, disjoint [a, b) ranges of a statistics vector


class Rect(NamedTuple):
    """``h × w`` local elements stored at ``[start, start + h·w)`` of the local row-major flattening,
    at logical ``(row, col)`` of the parameter; they are rows ``brow …`` of fused matrix ``block``."""

    start: int
    h: int
    w: int
    row: int
    col: int
    block: int
    brow: int


def fused_rows(sizes: tuple[int, ...], repeat: int = 1) -> tuple[Segment, ...]:
    """Segments of a parameter whose rows are ``repeat`` times the blocks ``sizes`` (matrix k gets
    the k-th block of every repeat): ``(q, k, v)`` for a fused QKV, ``(hd·q/g, hd, hd)`` repeated ``g``
    times for Megatron's grouped-query QKV, ``(m,) * E`` for E stacked experts."""
    if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes) or repeat < 1:
        raise ValueError(f"fused rows need positive integer block sizes and repeat >= 1, got {sizes} × {repeat}")
    segments, start = [], 0
    for _ in range(repeat):
        for k, size in enumerate(sizes):
            segments.append((start, start + size, k))
            start += size
    return tuple(segments)


def check_segments(fused: tuple[Segment, ...], rows: int) -> None:
    """Raise ValueError unless ``fused`` cuts rows 0 … ``rows`` in order, without gaps, into
    segments of matrices 0, 1, …"""
    ends = [0] + [end for _, end, _ in fused]
    contiguous = all(start == ends[i] and end > start for i, (start, end, _) in enumerate(fused))
    blocks = sorted({k for _, _, k in fused})
    if not contiguous or ends[-1] != rows or blocks != list(range(len(blocks))):
        raise ValueError(f"fused segments {fused} must cover rows 0 … {rows} in order, without gaps, "
                         f"naming matrices 0, 1, …")


def block_shapes(segments: tuple[Segment, ...], n: int) -> tuple[tuple[int, int], ...]:
    """``(rows, n)`` of every fused matrix the segments name."""
    rows: dict[int, int] = {}
    for start, end, k in segments:
        rows[k] = rows.get(k, 0) + end - start
    return tuple((rows[k], n) for k in range(len(rows)))


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    flat: tuple[int, int] | None = None
    groups: tuple[tuple[str, dist.ProcessGroup], ...] = ()
    fused: tuple[Segment, ...] | None = None
    shared: tuple[tuple[str, Runs], ...] | None = None
    rows_whole: bool = False  # every rank holding part of the matrix holds whole rows (``share_statistics``)
    inner: str | None = None  # the group reduced first (``comm.statistics.share_statistics``)
    replicated: Runs = ()  # the column entries equal on every rank of ``inner`` once reduced there

    def __post_init__(self) -> None:
        (m, n), (r0, r1), (c0, c1) = self.shape, self.rows, self.cols
        if not (0 <= r0 <= r1 <= m and 0 <= c0 <= c1 <= n):
            raise ValueError(f"layout block rows {self.rows} × cols {self.cols} does not fit the {m}×{n} matrix")
        if self.flat is not None:
            s, e = self.flat
            if not 0 <= s <= e <= (r1 - r0) * (c1 - c0):
                raise ValueError(
                    f"flat range {self.flat} does not fit the {r1 - r0}×{c1 - c0} block of the {m}×{n} matrix"
                )
        names = [name for name, _ in self.groups]
        if names != sorted(set(names)):
            raise ValueError(f"layout groups must have distinct names in sorted order, got {names}")
        if self.fused is not None:
            check_segments(self.fused, m)
        if self.shared is not None:
            self._check_shared()
        if self.replicated and self.inner is None:  # ``inner`` is the batch's: a layout need not name it
            raise ValueError("layout replicated statistics need an inner group to be reduced over first")
        self._check_runs("replicated statistics", self.replicated)

    def _check_shared(self) -> None:
        names = [name for name, _ in self.shared]
        if names != sorted(set(names)):
            raise ValueError(f"layout shared statistics must name distinct groups in sorted order, got {names}")
        for name, runs in self.shared:
            self._check_runs(f"shared statistics of group {name!r}", runs)

    def _check_runs(self, what: str, runs: Runs) -> None:
        length = self.stat_length
        flat = [v for run in runs for v in run]
        if flat != sorted(flat) or any(a >= b for a, b in runs) or (flat and (flat[0] < 0 or flat[-1] > length)):
            raise ValueError(f"layout {what} must be sorted, disjoint, non-empty runs inside [0, {length}), got {runs}")

    @property
    def stat_length(self) -> int:
        """Entries of the statistics vector: m row sums, then n column sums per fused matrix."""
        return self.shape[0] + len(self.block_shapes) * self.shape[1]

    def shared_runs(self, name: str, length: int) -> Runs:
        """The runs of the statistics vector's first ``length`` entries that group ``name`` reduces."""
        if self.shared is None:
            return ((0, length),) if length else ()
        runs = dict(self.shared).get(name)
        if runs is None:
            raise ValueError(f"layout shared statistics name no group {name!r} (they name {[g for g, _ in self.shared]})")
        return tuple((a, min(b, length)) for a, b in runs if a < length)

    @cached_property
    def shared_index(self) -> dict[str, Tensor]:
        """``shared`` as int64 indices of the statistics vector, per group name (empty without ``shared``)."""
        return {name: torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.int64)
                for name, runs in self.shared or ()}

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.fused if self.fused is not None else ((0, self.shape[0], 0),)

    @cached_property
    def block_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(rows, n)`` of every fused matrix (one for an unfused parameter)."""
        return block_shapes(self.segments, self.shape[1])

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of the local tensor this layout describes."""
        if self.flat is not None:
            return (self.flat[1] - self.flat[0],)
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def numel(self) -> int:
        """Number of elements this rank holds."""
        return math.prod(self.local_shape)

    def check(self, local: Tensor) -> None:
        if local.numel() != self.numel or (local.ndim == 2 and tuple(local.shape) != self.local_shape):
            raise ValueError(f"local tensor of shape {tuple(local.shape)} does not match its layout, "
                             f"which needs {self.local_shape}")

    @cached_property
    def rects(self) -> tuple[Rect, ...]:
        """The local elements as rectangles (see ``Rect``), in local storage order; none empty."""
        (r0, r1), (c0, c1) = self.rows, self.cols
        width = c1 - c0
        s, e = self.flat if self.flat is not None else (0, (r1 - r0) * width)
        out: list[Rect] = []
        if width == 0 or e == s:
            return ()
        brow = {}
        cuts = []  # (local row start, local row end, block, block row of the start) of each segment
        for start, end, k in self.segments:
            first = brow.get(k, 0)
            brow[k] = first + end - start
            lo, hi = max(start, r0), min(end, r1)
            if lo < hi:
                cuts.append((lo - r0, hi - r0, k, first + lo - start))
        for lo, hi, k, b in cuts:
            a, z = max(s, lo * width), min(e, hi * width)  # flat range of this segment that is held
            while a < z:
                row, col = divmod(a, width)
                if col or z - a < width:  # a partial row
                    w = min(width - col, z - a)
                    out.append(Rect(a - s, 1, w, r0 + row, c0 + col, k, b + row - lo))
                    a += w
                else:
                    h = (z - a) // width
                    out.append(Rect(a - s, h, width, r0 + row, c0, k, b + row - lo))
                    a += h * width
        return tuple(out)

    def pieces(self, local: Tensor) -> list[tuple[Tensor, Rect]]:
        """``local`` (contiguous, as ``check`` wants it) as ``(h × w view, rect)`` pairs."""
        self.check(local)
        if not local.is_contiguous():
            raise ValueError("a sharded local tensor must be contiguous")
        flat = local.view(-1)
        return [(flat[r.start : r.start + r.h * r.w].view(r.h, r.w), r) for r in self.rects]

