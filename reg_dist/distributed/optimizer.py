"""REG, Muon and MuonEq on sharded parameters: FSDP2 ``fully_shard``, tensor parallelism (DTensor),
fused matrices (``mark_fused``), and reg_dist's own data parallelism (``mesh=``).

Every rank keeps momentum for the elements it holds and computes ``N`` there. Then, for a group's
matrices with layouts (``layout``):

    REG     U = racs(N)        statistics path: one packed all-reduce per mesh dim per iteration,
            s = ρ·√(mn)/||U||  one more for the norms; every rank scales its own elements
    Muon    U = s·NS(N)        owner path (``owner``): pieces travel to one owner per matrix, which
    MuonEq  U = s·NS(eq(N))    orthogonalises whole same-shape stacks; MuonEq equilibrates first
                               on the statistics path, so only the scaled matrix travels
    all     W = W·(1 − lr·wd) − lr·U   on the local elements

Gradients must already be reduced across data parallelism (FSDP2 does so; a TP-only model sees the
same batch on every rank; ``mesh=`` does it here). A sharded matrix without a gradient steps with a
zero one, as every rank holding it must take part. Plain tensors take the single-process step, and
every rank that shares parameters (all, or one pipeline stage's) agrees on skipping a step with a
non-finite gradient anywhere.
"""

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..ops.newton_schulz import orthogonalize
from ..ops.stats import acc_dtype
from ..optim import muon, muoneq, reg
from ..optim.adamw import adamw_step, init_adamw_state
from ..optim.momentum import momentum_into_
from ..optim.routing import Route
from ..optim.scaling import rms_factor, scale_factors, shape_factor
from ..optim.tensors import local_tensor
from .dtensor import FUSED_ATTR, LAYOUT_ATTR, dim_names, dtensor_layout, mesh_group, plain_layout
from .layout import Layout
from .native import BUCKET_BYTES, NativeDP
from .owner import OwnerPlan, newton_schulz_cost
from .stats import CommStats, check_layouts_add_up, count, sharded_equilibrate_, sharded_frobenius_norms, sharded_racs_

logger = logging.getLogger("reg_dist")

TP_MODES = ("gather", "blockwise")


def agreement_group(routes: list[Route], peers: set[int]) -> dist.ProcessGroup | None:
    """The ranks that hold this rank's parameters, as a group (None: the world), checked.

    One ``all_gather_object`` of every rank's routes (names, logical shapes, algorithms) and of
    ``peers``, the ranks it shares collectives with (its layouts' and mesh's groups). Ranks with the
    same routes are one pipeline stage (without pipeline parallelism: every rank, the world); each
    stage gets a group of its own (``new_group``: every rank makes all of them, in one order). A rank
    whose peer routes other parameters fails on every rank alike: the packed collectives would pair
    up different matrices (or hang)."""
    mine = [(r.name, tuple(r.shape), r.algorithm) for r in routes]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, sorted(peers)))
    for rank, (theirs, their_peers) in enumerate(everyone):
        for peer in their_peers:
            other = everyone[peer][0]
            if other != theirs:
                i = next((i for i, (a, b) in enumerate(zip(theirs, other)) if a != b), min(len(theirs), len(other)))
                raise ValueError(f"ranks disagree on the parameters: entry {i} is "
                                 f"{theirs[i] if i < len(theirs) else 'nothing'} on rank {rank} but "
                                 f"{other[i] if i < len(other) else 'nothing'} on rank {peer}")
    stages: dict[tuple, list[int]] = {}
    for rank, (theirs, _) in enumerate(everyone):
        stages.setdefault(tuple(theirs), []).append(rank)
    if len(stages) == 1:
        return None
    groups = [dist.new_group(ranks) for ranks in stages.values()]
    return groups[list(stages).index(tuple(mine))]


def _mesh_groups(mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None) -> list[dist.ProcessGroup]:
    """The group of each dimension of a ``mesh=`` argument (none for anything else)."""
    if isinstance(mesh, DeviceMesh):
        return [mesh.get_group(name) for name in mesh.mesh_dim_names or ()]
    return [g for g in mesh.values() if isinstance(g, dist.ProcessGroup)] if isinstance(mesh, dict) else []


class Sharded:
    """Mixin over a ``MatrixOptimizer``: layouts, native data parallelism, comm stats, agreement."""

    supports_dtensor = True
    blockwise_dims: tuple[str, ...] = ()

    def __init__(self, params: Any, mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None,
                 bucket_bytes: int = BUCKET_BYTES,
                 **kwargs: Any) -> None:
        self._layouts: dict[int, Layout] = {}
        self._comm: CommStats = {}
        self._native: NativeDP | None = None
        self._agree: dist.ProcessGroup | None = None
        super().__init__(params, **kwargs)
        if self._layouts or mesh is not None:
            groups = [g for lay in self._layouts.values() for _, g in lay.groups] + _mesh_groups(mesh)
            self._agree = agreement_group(self.routes, {r for g in groups for r in dist.get_process_group_ranks(g)})
            laid = [(p, name) for g in self.param_groups for p, name in zip(g["params"], g["param_names"])
                    if id(p) in self._layouts]
            check_layouts_add_up([self._layouts[id(p)] for p, _ in laid], [name for _, name in laid])
        if mesh is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            self._native = NativeDP(mesh, params, [self._cost(p) for p in params], bucket_bytes)
            logger.info("%s native data parallelism over %d ranks in %d bucket(s): ownership imbalance %.1f %%",
                        type(self).__name__, self._native.size, len(self._native.buckets), 100 * self._native.imbalance)

    def _cost(self, p: Tensor) -> int | None:
        """What owning ``p`` whole costs its data-parallel owner per step (its logical size); None
        for the element-wise AdamW tensors, which the native mode shards flat instead."""
        return p.numel() if id(p) in self._view else None

    def _adamw_step(self, params: list[Tensor], group: dict) -> None:
        """AdamW on what this rank steps: under ``mesh=``, its flat slice of each AdamW tensor."""
        if self._native is None:
            return super()._adamw_step(params, group)
        views, grads = [], []
        for p in params:
            part = self._native.slice_of(p)
            x, g = local_tensor(p), local_tensor(p.grad)
            views.append(x.view(-1)[part] if part is not None else x)
            grads.append(g.view(-1)[part] if part is not None else g)
            if not self.state[p]:
                init_adamw_state(views[-1], self.state[p])
        adamw_step(views, grads, [self.state[p] for p in params], group)

    def comm_stats(self) -> CommStats:
        """Collectives of the last step, per group name: ``{"dp": {"calls": …, "bytes": …, "sent": …}, …}``
        (``bytes``: the collectives' buffers; ``sent``: what this rank transmitted, ring estimate for
        reductions and gathers, exact for owner moves); ``"world"`` is the agreement on non-finite
        gradients (over the world, or the ranks of this pipeline stage)."""
        return {name: dict(entry) for name, entry in self._comm.items()}

    @torch.no_grad()
    def step(self, closure=None):
        """One step; with ``mesh=``, gradients are first averaged onto their owners over ``dp``
        (reduce-scatter), and the owners' updated tensors all-gathered back afterwards."""
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
        if self._native is not None and not self._native.owns(p):
            return False
        return p.grad is not None or id(p) in self._layouts

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Every rank sharing parameters with this one skips together once anything is sharded: one
        all-reduce over the world, or over this pipeline stage's ranks (``agreement_group``)."""
        if not (dist.is_initialized() and (self._layouts or self._native is not None)):
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._agree)
        count(self._comm, "world", flag, "all_reduce", self._agree)
        return bool(flag.item())

    def add_param_group(self, param_group: dict) -> None:
        first_new = len(self.param_groups)
        super().add_param_group(param_group)
        for group in self.param_groups[first_new:]:
            if group["algorithm"] == self.algorithm:
                for p, name in zip(group["params"], group["param_names"]):
                    if hasattr(p, LAYOUT_ATTR):
                        self._layouts[id(p)] = getattr(p, LAYOUT_ATTR)
                    elif isinstance(p, DTensor):
                        self._layouts[id(p)] = dtensor_layout(p, name, self.blockwise_dims)
                    elif hasattr(p, FUSED_ATTR):
                        self._layouts[id(p)] = plain_layout(p, self._view[id(p)])

    def _matrix_step(self, params: list[Tensor], group: dict) -> None:
        laid = [p for p in params if id(p) in self._layouts]
        super()._matrix_step([p for p in params if id(p) not in self._layouts], group)
        self._sharded_step(laid, group)

    def _momentum(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """``N`` of every parameter's local elements (fp32 or wider); a missing gradient counts as 0."""
        locals_ = [local_tensor(p) for p in params]
        n = [torch.empty_like(x, dtype=acc_dtype(x.dtype), memory_format=torch.contiguous_format) for x in locals_]
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(x) for p, x in zip(params, locals_)]
        bufs = [local_tensor(self.matrix_state(p)["momentum_buffer"]) for p in params]
        momentum_into_(grads, bufs, n, group["momentum"], group["nesterov"])
        return n

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        raise NotImplementedError


def _apply(params: list[Tensor], updates: list[Tensor], group: dict, state: dict) -> None:
    """``W ← W·(1 − lr·wd) − lr·U`` on the local elements."""
    lr, wd = group["lr"], group["weight_decay"]
    for p, u in zip(params, updates):
        x = local_tensor(p)
        if wd != 0 and lr != 0:
            x.mul_(1.0 - lr * wd)
        x.add_(u.view(x.shape).to(x.dtype), alpha=-lr)
        state[p]["step"] += 1


class REG(Sharded, reg.REG):
    """``reg_dist.optim.REG`` that also steps sharded and fused parameters in place, exactly."""

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        if not params:
            return
        layouts = [self._layouts[id(p)] for p in params]
        n = self._momentum(params, group)
        sharded_racs_(n, layouts, group["p"], group["iters"], group["eps"], self._comm)
        self.transformed += sum(len(lay.block_shapes) for lay in layouts)
        rms = group["rms"]
        if group["scale"] == "rms":
            norms = sharded_frobenius_norms(n, layouts, self._comm)
            factors = [torch.stack([rms_factor(v, rms, m, k) for v, (m, k) in zip(norm, lay.block_shapes)])
                       for norm, lay in zip(norms, layouts)]
        else:
            factors = [torch.tensor([shape_factor(group["scale"], rms, m, k) for m, k in lay.block_shapes])
                       for lay in layouts]
        for u, lay, s in zip(n, layouts, factors):
            if len(s) == 1:
                u.mul_(s.to(u.device))
            else:
                for view, r in lay.pieces(u):
                    view.mul_(s[r.block].to(u.device))
        _apply(params, n, group, self.state)


class OwnerPath(Sharded):
    """Muon and MuonEq on sharded and fused matrices: the owner path (see ``owner``).

    ``tp_mode="gather"`` (default) assembles tensor-parallel matrices whole, exactly;
    ``"blockwise"`` orthogonalises each rank's TP block as its own matrix (no TP traffic; the update
    then depends on the TP degree). ``move_dtype`` is what the owner moves carry (bf16 by default).
    """

    def __init__(self, params: Any, mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None,
                 tp_mode: str = "gather",
                 move_dtype: torch.dtype = torch.bfloat16, bucket_bytes: int = BUCKET_BYTES, **kwargs: Any) -> None:
        if tp_mode not in TP_MODES:
            raise ValueError(f"tp_mode must be one of {TP_MODES}, got {tp_mode!r}")
        if move_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"move_dtype must be a floating dtype, got {move_dtype!r}")
        self.tp_mode, self.move_dtype = tp_mode, move_dtype
        self.blockwise_dims = ("tp",) if tp_mode == "blockwise" else ()
        self._plans: dict[int, list[tuple[OwnerPlan, list[Tensor]]]] = {}
        self._constructed = False
        super().__init__(params, mesh=mesh, bucket_bytes=bucket_bytes, **kwargs)
        if tp_mode == "blockwise":
            logger.warning("%s tp_mode='blockwise': each tensor-parallel block is orthogonalised on its own, "
                           "so the update changes with the TP degree", type(self).__name__)
        for group in self.param_groups:
            self._plan_group(group)
        self._constructed = True

    def _cost(self, p: Tensor) -> int | None:
        if id(p) not in self._view:
            return None
        count_, m, n = self._view[id(p)]
        return count_ * newton_schulz_cost(m, n)

    def add_param_group(self, param_group: dict) -> None:
        first_new = len(self.param_groups)
        super().add_param_group(param_group)
        if self._constructed:  # a group added later: its plan now (collective: every rank adds it)
            for group in self.param_groups[first_new:]:
                self._plan_group(group)

    def plans(self) -> list[OwnerPlan]:
        return [plan for entries in self._plans.values() for plan, _ in entries]

    def _plan_group(self, group: dict) -> None:
        """One ``OwnerPlan`` per communicator for the group's parameters with layouts stepped here."""
        if group["algorithm"] != self.algorithm:
            return
        # one plan per set of ranks (two meshes may hand out distinct group objects over the same ranks)
        by_ranks: dict[Any, tuple[dist.ProcessGroup | None, str, list[tuple[Tensor, str]]]] = {}
        for p, name in zip(group["params"], group["param_names"]):
            if self._native is not None and self._native.tp_group is not None and id(p) not in self._layouts:
                self._layouts[id(p)] = plain_layout(p, self._view[id(p)])  # a copy on every TP rank: move it once
            if id(p) in self._layouts and (self._native is None or self._native.owns(p)):
                pg, pg_name = self._communicator(p)
                ranks = tuple(dist.get_process_group_ranks(pg)) if pg is not None else None
                by_ranks.setdefault((ranks, pg_name), (pg, pg_name, []))[2].append((p, name))
        entries = []
        for pg, name, pairs in by_ranks.values():
            ps, names = [p for p, _ in pairs], [n for _, n in pairs]
            plan = OwnerPlan([self._layouts[id(p)] for p in ps], names, pg, name)
            logger.info("%s owner plan over %r: %d matrices, %d here, imbalance %.1f %%", type(self).__name__,
                        name, len(plan.matrices), plan.owned, 100 * plan.imbalance)
            entries.append((plan, ps))
        self._plans[id(group)] = entries

    def _communicator(self, p: Tensor) -> tuple[dist.ProcessGroup | None, str]:
        """The group whose ranks hold the pieces of ``p``: its whole root mesh, less blockwise dims
        (copies on the mesh dims that do not shard ``p`` are then one piece, moved once); under
        ``mesh=``, the parameter's own (TP) mesh, as each dp owner steps its own tensors."""
        if hasattr(p, LAYOUT_ATTR):  # an integration's layout: the ranks of its one group hold the pieces
            groups = getattr(p, LAYOUT_ATTR).groups
            if self.blockwise_dims and any(name in self.blockwise_dims for name, _ in groups):
                raise ValueError("tp_mode='blockwise' splits DTensor parameters only; an integration's "
                                 "reg_layout parameter is always orthogonalised whole")
            if len(groups) > 1:
                raise ValueError(f"a reg_layout split over several groups {[n for n, _ in groups]} needs a DTensor "
                                 f"or one group over all of them")
            return (groups[0][1], groups[0][0]) if groups else (None, "local")
        if not isinstance(p, DTensor):
            tp_copies = self._native.tp_group if self._native is not None else None
            return tp_copies, "tp" if tp_copies is not None else "local"
        mesh = p.device_mesh if self._native is not None else p.device_mesh._get_root_mesh()
        dims = tuple(d for d in dim_names(mesh) if d not in self.blockwise_dims)
        return mesh_group(mesh, dims), "×".join(dims) or "local"

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        stepping = {id(p) for p in params}
        for plan, ps in self._plans.get(id(group), []):
            if not all(id(p) in stepping for p in ps):
                raise RuntimeError("a sharded parameter is not stepped on a rank that holds it")
            n = self._momentum(ps, group)
            self._premove_(n, [self._layouts[id(p)] for p in ps], group, [int(self.state[p]["step"]) for p in ps])
            out = plan.run(dict(enumerate(n)), lambda x: self._orthogonalize_scaled(x, group), self.move_dtype,
                           n[0].dtype if n else torch.float32, self._comm)
            self.transformed += plan.owned
            _apply(ps, [out[i] for i in range(len(ps))], group, self.state)

    def _premove_(self, n: list[Tensor], layouts: list[Layout], group: dict, steps: list[int]) -> None:
        """What runs on the local pieces before they travel (MuonEq: equilibration)."""

    def _orthogonalize_scaled(self, x: Tensor, group: dict) -> Tensor:
        u = orthogonalize(x, group["ns_steps"], group["coefficients"], group["ns_dtype"])
        return u * scale_factors(u, group["scale"], group["rms"]).view(-1, 1, 1).to(u.device)


class Muon(OwnerPath, muon.Muon):
    """``reg_dist.optim.Muon`` that also steps sharded and fused matrices, each orthogonalised once."""


class MuonEq(OwnerPath, muoneq.MuonEq):
    """``reg_dist.optim.MuonEq`` on sharded and fused matrices: statistics path, then owner path."""

    def _premove_(self, n: list[Tensor], layouts: list[Layout], group: dict, steps: list[int]) -> None:
        tags = sorted({self.bucket_tag(group, s) for s in steps})
        for tag in tags:
            chosen = [i for i, s in enumerate(steps) if self.bucket_tag(group, s) == tag]
            sharded_equilibrate_([n[i] for i in chosen], [layouts[i] for i in chosen], tag, group["exponent"],
                                 stats=self._comm)

