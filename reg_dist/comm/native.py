"""reg_dist's own data parallelism for a model with no DDP/FSDP wrapper (``REG(model, mesh=…)``).

Every tensor (a TP shard where the model is tensor parallel) gets one owner among the ``dp`` ranks,
longest-processing-time first (``ownership.plan_owners``), on a cost computed from the logical
shape so the TP ranks of one matrix agree: first the tensors with a compute cost (the Newton–Schulz
cost of Muon's matrices), then the rest by size, onto the ranks' element loads so far.

Each owner's tensors form one stream, in order; the streams are cut into windows of
``bucket_bytes``, and window b of every owner is one bucket, packed owner by owner (a tensor may
span windows; only the shorter streams' tails are padding). Per bucket:

    reduce-scatter (SUM) over dp, ÷ dp   → every owner holds the averaged gradient of its tensors
    the owners step what they own         → momentum and AdamW state exist only on the owner
    all-gather over dp                    → every rank holds every updated tensor

Two collectives per bucket per step, whatever the number of parameters; a bucket's buffers, not
the model's, bound the scratch memory.
"""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..ops.stats import check_count
from ..layout import local_tensor
from .collectives import CommStats, count
from .ownership import imbalance, plan_owners

BUCKET_BYTES = 64 * 2**20  # of each owner's stream per bucket


def water_fill(loads: list[int], total: int) -> list[int]:
    """How much of ``total`` each rank takes so that the least-loaded ranks rise to one level."""
    order = sorted(range(len(loads)), key=lambda r: (loads[r], r))
    k = len(loads)
    while k > 1 and (total + sum(loads[r] for r in order[:k])) // k < loads[order[k - 1]]:
        k -= 1
    level = (total + sum(loads[r] for r in order[:k])) // k
    give = [0] * len(loads)
    for r in order[:k]:
        give[r] = level - loads[r]
    for r in order[: total - sum(give)]:  # the remainder, one element each
        give[r] += 1
    return give


def plan_streams(sizes: list[int], costs: list[int | None], ranks: int) -> tuple[dict[int, int], float, list[int]]:
    """The native mode's plan of tensors ``0 … len(sizes)−1`` (``sizes`` elements each) over ``ranks``:
    the owner of every tensor with a cost (``plan_owners``, in order), the planner's imbalance, and
    how many elements of the flat (cost None) tensors each rank takes, to level the streams."""
    whole = [i for i, c in enumerate(costs) if c is not None]
    owner_list = plan_owners([costs[i] for i in whole], ranks)
    owners = dict(zip(whole, owner_list))
    stream = [0] * ranks
    for i, o in owners.items():
        stream[o] += sizes[i]
    give = water_fill(stream, sum(s for s, c in zip(sizes, costs) if c is None))
    return owners, imbalance([costs[i] for i in whole], owner_list, ranks), give


def segments(longest: int, window: int) -> list[int]:
    """The length of every bucket's segment of streams up to ``longest`` elements, in windows of ``window``."""
    return [min(w0 + window, longest) - w0 for w0 in range(0, longest, window)]


class NativeDP:
    def __init__(self, mesh: DeviceMesh | dict[str, dist.ProcessGroup], params: list[Tensor],
                 costs: list[int | None], bucket_bytes: int = BUCKET_BYTES) -> None:
        if isinstance(mesh, DeviceMesh):
            names = mesh.mesh_dim_names or ()
            groups = {name: mesh.get_group(name) for name in names}
        elif isinstance(mesh, dict) and all(isinstance(g, dist.ProcessGroup) for g in mesh.values()):
            groups = dict(mesh)
        else:
            raise TypeError(f"mesh must be a DeviceMesh or a dict of process groups, got {type(mesh).__name__}")
        if "dp" not in groups or set(groups) - {"dp", "tp"}:
            raise ValueError(f"mesh must have a dimension named 'dp' (and optionally 'tp'), got names {tuple(groups)}")
        check_count("bucket_bytes", bucket_bytes)
        self.group = groups["dp"]
        tp = groups.get("tp")
        self.tp_group = tp if tp is not None and dist.get_world_size(tp) > 1 else None  # plain tensors are copies over it
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"native data parallelism needs one parameter dtype, got {sorted(map(str, dtypes))}")
        for p in params:
            if isinstance(p, DTensor) and "dp" in (p.device_mesh.mesh_dim_names or ()):
                raise ValueError("a parameter is already sharded over 'dp' (FSDP2?): build the optimizer "
                                 "without mesh=, it then steps the shards as they are")
        self.dtype, self.device = params[0].dtype, local_tensor(params[0]).device
        sizes = [local_tensor(p).numel() for p in params]
        owners, self.imbalance, give = plan_streams(sizes, costs, self.size)
        self._owned = {id(params[i]) for i, o in owners.items() if o == self.rank}
        stream = [0] * self.size
        placed = []  # (tensor, owner, offset in the owner's stream, first element in the tensor, count)
        for i, owner in owners.items():
            placed.append((params[i], owner, stream[owner], 0, sizes[i]))
            stream[owner] += sizes[i]
        # the rest (element-wise AdamW) flat, in order, cut to level the owners' streams
        flat = [i for i, c in enumerate(costs) if c is None]
        self._slice: dict[int, slice] = {}  # this rank's part of each flat-sharded tensor
        r = 0
        for i in flat:
            first = 0
            while first < sizes[i]:
                while give[r] == 0:
                    r += 1
                n = min(give[r], sizes[i] - first)
                placed.append((params[i], r, stream[r], first, n))
                if r == self.rank:
                    self._slice[id(params[i])] = slice(first, first + n)
                stream[r] += n
                give[r] -= n
                first += n
        window = max(1, bucket_bytes // params[0].element_size())
        longest = max(stream)
        # bucket: (segment length, [(tensor, owner, first element in the tensor, in the segment, count)])
        self.buckets: list[tuple[int, list[tuple[Tensor, int, int, int, int]]]] = []
        for w0 in range(0, longest, window):
            w1 = min(w0 + window, longest)
            entries = [(p, owner, first + max(w0, off) - off, max(w0, off) - w0, min(w1, off + n) - max(w0, off))
                       for p, owner, off, first, n in placed if off < w1 and off + n > w0]
            self.buckets.append((w1 - w0, entries))
        self.padding = sum(longest - s for s in stream)  # elements of padding per step and direction

    def owns(self, p: Tensor) -> bool:
        """Whether this rank steps ``p``: it owns it whole, or a slice of it (``slice_of``)."""
        return id(p) in self._owned or id(p) in self._slice

    def slice_of(self, p: Tensor) -> slice | None:
        """This rank's elements of a flat-sharded tensor ``p`` (of its local flattening); None if whole."""
        return self._slice.get(id(p))

    @staticmethod
    def _slices(buf: Tensor, entries, segment: int, owner: int | None = None):
        """``(tensor, its owner, flat slice of its elements in the bucket, view of buf)``: all the
        bucket's tensors laid out over every owner's segment, or only ``owner``'s in a one-segment buffer."""
        for p, r, first, at, n in entries:
            if owner is None or r == owner:
                start = (r if owner is None else 0) * segment + at
                yield p, r, slice(first, first + n), buf[start : start + n]

    def average_grads_to_owners(self, stats: CommStats) -> None:
        """The dp-averaged gradient of every owned tensor into its ``.grad`` (a missing grad counts as 0)."""
        for segment, entries in self.buckets:
            send = torch.zeros(self.size * segment, dtype=self.dtype, device=self.device)
            for p, _, part, view in self._slices(send, entries, segment):
                if p.grad is not None:
                    view.copy_(local_tensor(p.grad).reshape(-1)[part])
            mine = torch.empty(segment, dtype=self.dtype, device=self.device)
            dist.reduce_scatter_single(mine, send, op=dist.ReduceOp.SUM, group=self.group)
            count(stats, "dp", send, "reduce_scatter", self.group)
            mine.div_(self.size)
            for p, _, part, view in self._slices(mine, entries, segment, owner=self.rank):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local_tensor(p.grad).view(-1)[part].copy_(view)

    def gather_params_from_owners(self, stats: CommStats) -> None:
        """Every rank's copy of every tensor set to its owner's."""
        for segment, entries in self.buckets:
            mine = torch.zeros(segment, dtype=self.dtype, device=self.device)
            for p, _, part, view in self._slices(mine, entries, segment, owner=self.rank):
                view.copy_(local_tensor(p).reshape(-1)[part])
            everyone = torch.empty(self.size * segment, dtype=self.dtype, device=self.device)
            dist.all_gather_single(everyone, mine, group=self.group)
            count(stats, "dp", everyone, "all_gather", self.group)
            for p, r, part, view in self._slices(everyone, entries, segment):
                if r != self.rank:
                    local_tensor(p).view(-1)[part].copy_(view)
