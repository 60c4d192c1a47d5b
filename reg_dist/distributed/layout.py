"""Which elements of a logical m × n matrix a rank holds, and which process groups split it.

A rank holds a *block* of the logical matrix, rows ``[r0, r1)`` × columns ``[c0, c1)`` (a tensor-
parallel shard, an FSDP row shard, or both), stored either as a 2-D ``(r1−r0, c1−c0)`` tensor or,
with ``flat=(s, e)``, as the elements ``s … e−1`` of that block's row-major flattening (a DeepSpeed
ZeRO or Megatron distributed-optimizer partition, which may cut rows anywhere). ``groups`` names the
process groups whose ranks together hold the rest of the matrix; statistics are summed over them
in the order of their names, the same on every rank.

``pieces`` cuts the local tensor into at most three rectangles with their logical offsets, which
is all the statistics and the scaling need to know.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch.distributed as dist
from torch import Tensor


class Piece(NamedTuple):
    """A 2-D view of local elements and the logical (row, col) of its top-left element."""

    view: Tensor
    row: int
    col: int


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    flat: tuple[int, int] | None = None
    groups: tuple[tuple[str, dist.ProcessGroup], ...] = ()

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

    @property
    def numel(self) -> int:
        """Number of elements this rank holds."""
        if self.flat is not None:
            return self.flat[1] - self.flat[0]
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])

    def check(self, local: Tensor) -> None:
        expected = (self.numel,) if self.flat is not None else (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])
        if tuple(local.shape) != expected:
            raise ValueError(f"local tensor of shape {tuple(local.shape)} does not match its layout, which needs {expected}")

    def pieces(self, local: Tensor) -> list[Piece]:
        """``local`` (as ``check`` wants it) as rectangles with logical offsets; empty ones left out."""
        self.check(local)
        (r0, _), (c0, c1) = self.rows, self.cols
        if self.flat is None:
            return [Piece(local, r0, c0)] if local.numel() else []
        width = c1 - c0
        s, e = self.flat
        out = []
        head_end = min(e, -(-s // width) * width)
        if head_end > s:
            out.append(Piece(local[: head_end - s].view(1, -1), r0 + s // width, c0 + s % width))
        full = (e - head_end) // width
        if full:
            out.append(Piece(local[head_end - s : head_end - s + full * width].view(full, width),
                             r0 + head_end // width, c0))
        tail = head_end + full * width
        if e > tail:
            out.append(Piece(local[tail - s :].view(1, -1), r0 + tail // width, c0))
        return out
