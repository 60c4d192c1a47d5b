"""reg_dist's own data parallelism for a model with no DDP/FSDP wrapper (``REG(model, mesh=…)``).

Every tensor (a TP shard where the model is tensor parallel) gets one owner among the ``dp`` ranks
(``ownership.plan_owners`` on a cost computed from the logical shape, so the TP ranks of one
matrix agree: its element count for REG, its Newton–Schulz cost for Muon).
The gradients are packed owner by owner, each owner's segment padded to the longest, and

    reduce-scatter (SUM) over dp, ÷ dp   → every owner holds the averaged gradient of its tensors
    the owners step what they own         → momentum and AdamW state exist only on the owner
    all-gather over dp                    → every rank holds every updated tensor

Two collectives per step over dp, whatever the number of parameters.
"""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..optim.tensors import local_tensor
from .ownership import imbalance, plan_owners
from .stats import CommStats, count


class NativeDP:
    def __init__(self, mesh: DeviceMesh, params: list[Tensor], costs: list[int]) -> None:
        names = mesh.mesh_dim_names or ()
        if "dp" not in names:
            raise ValueError(f"mesh must have a dimension named 'dp' (and optionally 'tp'), got names {names}")
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
        self.params = params
        self.owners = plan_owners(costs, self.size)
        self.imbalance = imbalance(costs, self.owners, self.size)
        self._owned = {id(p) for p, o in zip(params, self.owners) if o == self.rank}
        sizes = [local_tensor(p).numel() for p in params]
        self.offsets, load = [], [0] * self.size
        for size, owner in zip(sizes, self.owners):
            self.offsets.append(load[owner])
            load[owner] += size
        self.segment = max(load)

    def owns(self, p: Tensor) -> bool:
        return id(p) in self._owned

    def _slices(self, buf: Tensor, segment_of: int | None = None):
        for p, owner, offset in zip(self.params, self.owners, self.offsets):
            if segment_of is None or owner == segment_of:
                start = (owner if segment_of is None else 0) * self.segment + offset
                local = local_tensor(p)
                yield p, buf[start : start + local.numel()].view_as(local)

    def average_grads_to_owners(self, stats: CommStats) -> None:
        """The dp-averaged gradient of every owned tensor into its ``.grad`` (a missing grad counts as 0)."""
        dtype = self.params[0].dtype
        send = torch.zeros(self.size * self.segment, dtype=dtype, device=local_tensor(self.params[0]).device)
        for p, view in self._slices(send):
            if p.grad is not None:
                view.copy_(local_tensor(p.grad))
        mine = torch.empty(self.segment, dtype=dtype, device=send.device)
        dist.reduce_scatter_tensor(mine, send, op=dist.ReduceOp.SUM, group=self.group)
        count(stats, "dp", send, "reduce_scatter", self.group)
        mine.div_(self.size)
        for p, view in self._slices(mine, segment_of=self.rank):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local_tensor(p.grad).copy_(view)

    def gather_params_from_owners(self, stats: CommStats) -> None:
        """Every rank's copy of every tensor set to its owner's."""
        mine = torch.zeros(self.segment, dtype=self.params[0].dtype, device=local_tensor(self.params[0]).device)
        for p, view in self._slices(mine, segment_of=self.rank):
            view.copy_(local_tensor(p))
        everyone = torch.empty(self.size * self.segment, dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(everyone, mine, group=self.group)
        count(stats, "dp", everyone, "all_gather", self.group)
        for p, view in self._slices(everyone):
            if not self.owns(p):
                local_tensor(p).copy_(view)
