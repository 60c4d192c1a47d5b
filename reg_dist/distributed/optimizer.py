"""REG on sharded (DTensor) parameters: FSDP2 ``fully_shard``, tensor parallelism, or both.

Every rank steps only the elements it holds. For the matrices of a group:

    M = μ·M + G;  N = G + μ·M            on the local shard (state lives where the elements live)
    U = racs(N)                          sharded_racs_: one packed all-reduce per mesh dim per iteration
    s = ρ·√(mn) / ||U||_F  ("rms")       one more packed all-reduce of the squared norms
    W = W·(1 − lr·wd) − lr·s·U           on the local shard

Gradients must already be reduced across data parallelism (FSDP2 does so; a TP-only model sees the
same batch on every rank). Plain tensors in the same optimizer take the single-process step, and
every rank agrees on skipping a step with a non-finite gradient anywhere.
"""

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..ops.stats import acc_dtype
from ..optim import reg
from ..optim.routing import Route
from ..optim.momentum import momentum_into_
from ..optim.scaling import rms_factor, shape_factor
from ..optim.tensors import local_tensor
from .dtensor import dtensor_layout
from .layout import Layout
from .native import NativeDP
from .stats import CommStats, count, sharded_frobenius_norms, sharded_racs_

logger = logging.getLogger("reg_dist")


def check_same_on_all_ranks(routes: list[Route]) -> None:
    """Every rank must route the same parameters (names, logical shapes, algorithms) in the same
    order, or the packed collectives would pair up different matrices (or hang)."""
    mine = [(r.name, r.shape, r.algorithm) for r in routes]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            ours = mine[diff] if diff < len(mine) else "nothing"
            other = theirs[diff] if diff < len(theirs) else "nothing"
            raise ValueError(f"ranks disagree on the parameters: entry {diff} is {ours} on rank "
                             f"{dist.get_rank()} but {other} on rank {rank}")


class REG(reg.REG):
    """``reg_dist.optim.REG`` that also steps DTensor parameters in place on their shards."""

    supports_dtensor = True

    def __init__(self, params: Any, mesh: DeviceMesh | None = None, **kwargs: Any) -> None:
        self._layouts: dict[int, Layout] = {}
        self._comm: CommStats = {}
        self._native: NativeDP | None = None
        super().__init__(params, **kwargs)
        if self._layouts or mesh is not None:
            check_same_on_all_ranks(self.routes)
        if mesh is not None:
            self._native = NativeDP(mesh, [p for g in self.param_groups for p in g["params"]])
            logger.info("REG native data parallelism over %d ranks: tensor ownership imbalance %.1f %%",
                        self._native.size, 100 * self._native.imbalance)

    def comm_stats(self) -> CommStats:
        """Collectives of the last step, per group name: ``{"dp": {"calls": …, "bytes": …}, …}``;
        ``"world"`` is the agreement on non-finite gradients."""
        return {name: dict(entry) for name, entry in self._comm.items()}

    @torch.no_grad()
    def step(self, closure=None):
        """One step; with ``mesh=``, gradients are first averaged onto their owners over ``dp``
        (one reduce-scatter), and the owners' updated tensors all-gathered back afterwards."""
        self._comm = {}
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._native is not None:
            self._native.average_grads_to_owners(self._comm)
        super().step()
        if self._native is not None:
            self._native.gather_params_from_owners(self._comm)
        return loss

    def _steps_here(self, p: Tensor) -> bool:
        return p.grad is not None and (self._native is None or self._native.owns(p))

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Every rank skips together: one all-reduce over the world once anything is sharded."""
        if not (dist.is_initialized() and (self._layouts or self._native is not None)):
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        count(self._comm, "world", flag)
        return bool(flag.item())

    def add_param_group(self, param_group: dict) -> None:
        first_new = len(self.param_groups)
        super().add_param_group(param_group)
        for group in self.param_groups[first_new:]:
            if group["algorithm"] == self.algorithm:
                for p, name in zip(group["params"], group["param_names"]):
                    if isinstance(p, DTensor):
                        self._layouts[id(p)] = dtensor_layout(p, name)

    def _matrix_step(self, params: list[Tensor], group: dict) -> None:
        sharded = [p for p in params if isinstance(p, DTensor)]
        super()._matrix_step([p for p in params if not isinstance(p, DTensor)], group)
        if sharded:
            self._sharded_step(sharded, group)

    def _sharded_step(self, params: list[DTensor], group: dict) -> None:
        layouts = [self._layouts[id(p)] for p in params]
        bufs = [local_tensor(self.matrix_state(p)["momentum_buffer"]) for p in params]
        locals_ = [p.to_local() for p in params]
        n = [torch.empty_like(x, dtype=acc_dtype(x.dtype)) for x in locals_]
        momentum_into_([local_tensor(p.grad) for p in params], bufs, n, group["momentum"], group["nesterov"])
        sharded_racs_(n, layouts, group["p"], group["iters"], group["eps"], self._comm)
        lr, wd, rms = group["lr"], group["weight_decay"], group["rms"]
        shapes = [lay.shape for lay in layouts]
        if group["scale"] == "rms":
            norms = sharded_frobenius_norms(n, layouts, self._comm)
            factors = [rms_factor(norm, rms, m, k) for (m, k), norm in zip(shapes, norms)]
        else:
            factors = [torch.tensor(shape_factor(group["scale"], rms, m, k)) for m, k in shapes]
        for p, x, u, s in zip(params, locals_, n, factors):
            if wd != 0 and lr != 0:
                x.mul_(1.0 - lr * wd)
            x.addcmul_(u, s.to(u.device), value=-lr)
            self.state[p]["step"] += 1
