"""reg_dist's own data parallelism for a model with no DDP/FSDP wrapper (``REG(model, mesh=…)``).

Every tensor (a TP shard where the model is tensor parallel) gets one owner among the ``dp`` ranks
(``ownership.plan_owners`` on a cost computed from the logical shape, so the TP ranks of one
matrix agree: its element count for REG, its Newton–Schulz cost for Muon).
Each owner's tensors are cut, in order, into runs of at most ``bucket_bytes``; bucket b holds the
b-th run of every owner, packed owner by owner with each segment padded to the bucket's longest.
Per bucket:

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

from ..optim.base import stacks
from ..optim.tensors import local_tensor
from .ownership import imbalance, plan_owners
from .stats import CommStats, count

BUCKET_BYTES = 64 * 2**20  # per owner per bucket


class NativeDP:
    def __init__(self, mesh: DeviceMesh, params: list[Tensor], costs: list[int],
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        names = mesh.mesh_dim_names or ()
        if "dp" not in names:
            raise ValueError(f"mesh must have a dimension named 'dp' (and optionally 'tp'), got names {names}")
        if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.group = mesh.get_group("dp")
        tp = mesh.size(names.index("tp")) if "tp" in names else 1
        self.tp_group = mesh.get_group("tp") if tp > 1 else None  # plain tensors are copies over it
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
        owners = plan_owners(costs, self.size)
        self.imbalance = imbalance(costs, owners, self.size)
        self._owned = {id(p) for p, o in zip(params, owners) if o == self.rank}
        runs = []  # runs[r][b]: owner r's tensors in bucket b
        for r in range(self.size):
            mine = [p for p, o in zip(params, owners) if o == r]
            runs.append(stacks(mine, [local_tensor(p).numel() * p.element_size() for p in mine], bucket_bytes))
        # bucket b: (segment length, [(tensor, owner, offset in the owner's segment)])
        self.buckets: list[tuple[int, list[tuple[Tensor, int, int]]]] = []
        for b in range(max(len(rs) for rs in runs)):
            entries, segment = [], 0
            for r, rs in enumerate(runs):
                offset = 0
                for p in rs[b] if b < len(rs) else []:
                    entries.append((p, r, offset))
                    offset += local_tensor(p).numel()
                segment = max(segment, offset)
            self.buckets.append((segment, entries))

    def owns(self, p: Tensor) -> bool:
        return id(p) in self._owned

    @staticmethod
    def _slices(buf: Tensor, entries, segment: int, owner: int | None = None):
        """``(tensor, view of buf)`` of the bucket's tensors: all, laid out over every owner's
        segment, or only ``owner``'s, in a buffer of one segment."""
        for p, r, offset in entries:
            if owner is None or r == owner:
                start = (r if owner is None else 0) * segment + offset
                local = local_tensor(p)
                yield p, buf[start : start + local.numel()].view_as(local)

    def average_grads_to_owners(self, stats: CommStats) -> None:
        """The dp-averaged gradient of every owned tensor into its ``.grad`` (a missing grad counts as 0)."""
        for segment, entries in self.buckets:
            send = torch.zeros(self.size * segment, dtype=self.dtype, device=self.device)
            for p, view in self._slices(send, entries, segment):
                if p.grad is not None:
                    view.copy_(local_tensor(p.grad))
            mine = torch.empty(segment, dtype=self.dtype, device=self.device)
            dist.reduce_scatter_tensor(mine, send, op=dist.ReduceOp.SUM, group=self.group)
            count(stats, "dp", send, "reduce_scatter", self.group)
            mine.div_(self.size)
            for p, view in self._slices(mine, entries, segment, owner=self.rank):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local_tensor(p.grad).copy_(view)

    def gather_params_from_owners(self, stats: CommStats) -> None:
        """Every rank's copy of every tensor set to its owner's."""
        for segment, entries in self.buckets:
            mine = torch.zeros(segment, dtype=self.dtype, device=self.device)
            for p, view in self._slices(mine, entries, segment, owner=self.rank):
                view.copy_(local_tensor(p))
            everyone = torch.empty(self.size * segment, dtype=self.dtype, device=self.device)
            dist.all_gather_into_tensor(everyone, mine, group=self.group)
            count(stats, "dp", everyone, "all_gather", self.group)
            for p, view in self._slices(everyone, entries, segment):
                if not self.owns(p):
                    local_tensor(p).copy_(view)
