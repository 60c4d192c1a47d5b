"""Collectives every stage shares: packed reductions over a layout's groups, and their accounting.

``comm_stats()`` reports, per group name, the collectives of the last step: ``calls``, ``bytes`` (their
full buffers) and ``sent`` (what this rank transmitted: a ring estimate for reductions and gathers,
exact for the owner moves' all-to-alls). A layout with no groups reduces nothing.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout

CommStats = dict[str, dict[str, int]]  # group name -> {"calls": …, "bytes": …, "sent": …}

# Bytes one rank puts on the wire per byte of the collective's full buffer, ring algorithms, R ranks
WIRE = {
    "all_reduce": lambda r: 2 * (r - 1) / r,
    "reduce_scatter": lambda r: (r - 1) / r,  # of the full (input) buffer
    "all_gather": lambda r: (r - 1) / r,  # of the full (output) buffer
}


def count(stats: CommStats | None, name: str, buf: Tensor, kind: str, group: dist.ProcessGroup | None = None,
          sent: int | None = None) -> None:
    """Add one collective over group ``name`` to ``stats`` (None: not counting): ``bytes`` is its full
    buffer, ``sent`` what this rank transmits (ring estimate, or ``sent`` where known exactly)."""
    if stats is None:
        return
    nbytes = buf.numel() * buf.element_size()
    if sent is None:
        sent = round(WIRE[kind](dist.get_world_size(group)) * nbytes)
    entry = stats.setdefault(name, {"calls": 0, "bytes": 0, "sent": 0})
    entry["calls"] += 1
    entry["bytes"] += nbytes
    entry["sent"] += sent


def all_gather_into(out: Tensor, mine: Tensor, group: dist.ProcessGroup) -> None:
    """Every rank's equal-sized ``mine`` concatenated into ``out`` in group-rank order: torch's
    ``all_gather_single`` where it has it (newer releases deprecate ``all_gather_into_tensor`` for it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def reduce_packed(vectors: list[Tensor], layouts: list[Layout], op: dist.ReduceOp,
                  stats: CommStats | None = None, over: list[tuple[str, ...]] | None = None) -> None:
    """In place: every ``vectors[k]`` reduced over each group of ``layouts[k]`` (of those named in
    ``over[k]`` where given), one collective per group name, counted into ``stats``."""
    groups = [dict(lay.groups) for lay in layouts]
    if over is not None:
        groups = [{name: g for name, g in gs.items() if name in names} for gs, names in zip(groups, over)]
    for name in sorted({g for gs in groups for g in gs}):
        members = [(v, gs[name]) for v, gs in zip(vectors, groups) if name in gs]
        group = members[0][1]
        if any(g is not group for _, g in members):
            raise ValueError(f"layouts on this rank name different process groups {name!r}")
        buf = torch.cat([v for v, _ in members])
        dist.all_reduce(buf, op=op, group=group)
        for v, chunk in zip((v for v, _ in members), buf.split([v.numel() for v, _ in members])):
            v.copy_(chunk)
        count(stats, name, buf, "all_reduce", group)


def check_layouts_add_up(layouts: list[Layout], names: list[str]) -> None:
    """Raise ValueError unless the ranks splitting each parameter hold m·n elements in all: the
    element counts summed over each layout's groups, one packed all-reduce per group name."""
    held = [torch.tensor([float(lay.numel)], dtype=torch.float64) for lay in layouts]
    reduce_packed(held, layouts, dist.ReduceOp.SUM)
    for total, lay, name in zip(held, layouts, names):
        m, n = lay.shape
        if int(total.item()) != m * n:
            groups = ", ".join(g for g, _ in lay.groups) or "no group"
            raise ValueError(f"the layouts of parameter {name} do not add up: the ranks of {groups} hold "
                             f"{int(total.item())} elements of its {m}×{n}")
