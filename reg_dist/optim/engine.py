"""The one step engine: every matrix algorithm, on every layout, in one process or ten thousand.

Every matrix parameter W carries a ``Layout`` (``reg_dist.layout``): the elements of its logical
matrix this rank holds and the process groups that split it. A plain tensor has the trivial layout
(all of it here, no groups), where every collective below is a no-op. One step:

    finite check      every rank sharing the step agrees (or this process alone): one all-reduce, or,
                      for a statistic-first algorithm whose statistics' groups reach every such rank
                      (and no rank steps more than ``comm.agree.RIDE_ELEMENTS``: ``carries_agreement``),
                      an entry of its first statistics all-reduce (``comm.agree.Agreement``; M is
                      then updated once that is known, and the AdamW groups step after it)
    N                 M = μ·M + G;  N = G + μ·M (nesterov) | M          on the local elements
    stages            the algorithm's, in order (``Statistic`` / ``Spectral``, see ``stages``)
    U = s·U           "rms": ρ·√(mn)/||U||_F, the norms one packed reduction; the shape conventions a
                      constant. After a final spectral stage the owner scales the whole matrix instead.
    W                 W·(1 − lr·wd) − lr·U                                 on the local elements

An algorithm (``algorithms/``) is a subclass that gives its name, constructor, hyper-parameter checks
and ``stages(group)``; everything else is here. Parameters that are not hidden matrices go to AdamW
(``adamw``), routed by ``routing``. Under ``mesh=`` (reg_dist's own data parallelism, ``comm.native``)
gradients are first averaged onto one owner per tensor and the updated tensors gathered back.
"""

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..comm.agree import Agreement, NonFiniteStep, agreement_group, all_agree
from ..comm.collectives import CommStats, check_layouts_add_up
from ..comm.native import BUCKET_BYTES, NativeDP
from ..comm.owner import STACK_BYTES, LocalPlan, OwnerPlan, newton_schulz_cost, stacks
from ..comm.ownership import REPLICAS
from ..comm.split import SPLIT_GROUP_SIZE, SplitPlan, check_split_args, split_parameters
from ..comm.statistics import (Squares, carries_agreement, momentum_partial_row_col, partial_row_col,
                               share_statistics, sharded_frobenius_norms)
from ..layout import (FUSED_ATTR, LAYOUT_ATTR, Layout, dim_names, dtensor_layout, local_tensor, mesh_group,
                      whole_layout)
from ..ops import fused
from ..ops.stats import acc_dtype
from .adamw import adamw_step, init_adamw_state
from .momentum import commit_momentum_, momentum_into_
from .hyper import Hyper, constructor, warn_near_misses
from .routing import ADAMW, ParamInfo, Route, as_matrix, as_param, format_table, parse_params, route
from .scaling import check_scale, rms_factor, scale_factors, shape_factor
from .stages import Spectral, Statistic, scaled_on_owner, spectral

logger = logging.getLogger("reg_dist")

NONFINITE = ("skip", "raise")
TP_MODES = ("gather", "blockwise")
MOVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_number(name: str, value: Any, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (value < high if high_open else value <= high)
    if not ok:
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_common(group: dict) -> None:
    """The hyper-parameters every group carries, whatever its algorithm."""
    check_number("lr", group["lr"], 0.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
    check_scale(group["scale"])
    check_number("rms", group["rms"], 0.0)
    if group["rms"] == 0:
        raise ValueError("rms must be > 0, got 0")
    betas = group["adamw_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_number(f"adamw_betas[{i}]", b, 0.0, 1.0, high_open=True)
    check_number("adamw_eps", group["adamw_eps"], 0.0)
    if group["adamw_eps"] == 0:
        raise ValueError("adamw_eps must be > 0, got 0")


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """Bool ``(len(tensors),)`` on the CPU: False where a tensor holds a NaN or an Inf (or, in fp32, overflows).

    One fused ``max |x|`` over the list on accelerators; on the CPU, where that fused reduction is
    an order of magnitude slower, one read of each tensor (``fused.all_finite``), or ``aminmax``
    (which propagates NaN as well) where that kernel does not apply.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    if tensors[0].device.type == "cpu":
        return torch.tensor([_finite_on_cpu(t) for t in tensors], dtype=torch.bool)
    extremes = torch._foreach_norm(tensors, math.inf)
    flags = torch.stack([e.to(torch.float32) for e in extremes]).isfinite()
    return flags.cpu()


def _finite_on_cpu(t: Tensor) -> bool:
    finite = fused.all_finite(t)
    if finite is None:
        finite = not t.numel() or bool(torch.stack(torch.aminmax(t)).float().isfinite().all())
    return finite


def _local_grads(params: list[Tensor]) -> list[Tensor]:
    """The local elements of each parameter's gradient (zeros for one without)."""
    return [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in params]


def _mesh_groups(mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None) -> list[dist.ProcessGroup]:
    """The group of each dimension of a ``mesh=`` argument (none for anything else)."""
    if isinstance(mesh, DeviceMesh):
        return [mesh.get_group(name) for name in mesh.mesh_dim_names or ()]
    return [g for g in mesh.values() if isinstance(g, dist.ProcessGroup)] if isinstance(mesh, dict) else []


def _common(scale: str) -> tuple[Hyper, ...]:
    """The hyper-parameters every algorithm's constructor starts with (ALGORITHMS.md §4)."""
    return (Hyper("lr", 1e-3, float), Hyper("momentum", 0.95, float), Hyper("nesterov", True, bool),
            Hyper("weight_decay", 0.1, float), Hyper("scale", scale, str), Hyper("rms", 0.2, float))


TAIL = (Hyper("adamw_betas", (0.9, 0.95), tuple[float, float]), Hyper("adamw_eps", 1e-8, float),
        Hyper("nonfinite", "skip", str))


def _layout_keywords(moves: bool) -> tuple[Hyper, ...]:
    """The keyword-only arguments that say how the matrices are laid out, not what is computed."""
    return (Hyper("mesh", None, DeviceMesh | dict[str, dist.ProcessGroup] | None), Hyper("tp_mode", "gather", str),
            *((Hyper("move_dtype", None, torch.dtype | None), Hyper("ns_split", "auto", str),
               Hyper("split_group_size", SPLIT_GROUP_SIZE, int), Hyper("owner_group_size", None, int | None),
               Hyper("owner_replicas", "auto", str), Hyper("owner_overlap", False, bool)) if moves else ()),
            Hyper("bucket_bytes", BUCKET_BYTES, int))


def _key(group: dict) -> tuple[int, ...]:
    return tuple(map(id, group["params"]))


class MatrixOptimizer(Optimizer):
    """The engine. An algorithm subclass gives its name (``algorithm``), its own hyper-parameters
    (``hyper``, in constructor order, between the common ones and AdamW's), its default ``scale``,
    whether it moves whole matrices (``moves``), ``check_group`` and ``stages``; its constructor
    ``Cls(params, lr, momentum, nesterov, weight_decay, scale, rms, *hyper, adamw_betas, adamw_eps,
    nonfinite, *, mesh, tp_mode, [move_dtype,] bucket_bytes)`` is made from those (``hyper.constructor``).

    ``mesh``: reg_dist's own data parallelism for a model without a DDP/FSDP wrapper (``comm.native``).
    ``tp_mode``: "gather" (default) keeps every tensor-parallel matrix whole, exactly; "blockwise"
    makes each TP block of a DTensor its own matrix (no TP traffic; the update then depends on the TP
    degree). ``move_dtype``: what the owner moves of spectral stages carry (default: the group's
    ``ns_dtype``, so fp32 Newton–Schulz moves fp32 and every layout equals one process).
    ``ns_split``: "auto" (default) splits the Newton–Schulz of a matrix that would outweigh a rank's mean
    share over up to ``split_group_size`` ranks of its owner group, "force" splits every matrix over
    ``split_group_size`` ranks, "off" never splits (``comm.split``; exact either way).
    ``owner_group_size``: the owner moves run in two hops over groups of this many consecutive ranks
    (a node; HSDP's shard group), so no all-to-all has more than max(g, P/g) − 1 peers (default: one
    all-to-all over all P ranks holding the matrices). ``owner_replicas`` ("auto", "share", "repeat"):
    where every such group holds every matrix (HSDP), whether each matrix is transformed once and the
    result sent to every replica, or by every group; "auto" takes the one predicted faster
    (``comm.ownership.choose_replicas``); ``plans()`` says which (``OwnerPlan.replicas``).
    ``owner_overlap``: the moves run in one round per matrix shape, the next round's all-to-alls in
    flight while the current stack is orthogonalised (the same bytes, more calls).
    A split Newton–Schulz (``SplitPlan``) moves its blocks in one all-to-all, or in two hops with
    ``owner_group_size``, and transforms every matrix once (``replicas`` None, even over HSDP's replicas);
    it cannot be combined with ``owner_replicas`` "share"/"repeat" or ``owner_overlap`` (ValueError:
    pass ``ns_split="off"``).
    """

    algorithm: str
    hyper: tuple[Hyper, ...] = ()
    keyword_hyper: tuple[Hyper, ...] = ()
    default_scale = "match_rms_adamw"
    moves = False
    # a hyper-parameter added after checkpoints were written: the value those checkpoints ran with, where it
    # is not today's default (a checkpoint without the key resumes with it, not with the new default)
    legacy_hyper: dict[str, Any] = {}
    state_keys: tuple[str, ...] = ("momentum_buffer",)  # matrix state shaped like the parameter
    row_state_keys: tuple[str, ...] = ()  # matrix state of one value per logical row, whole on every holder

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        keyword_only = (*cls.keyword_hyper, *_layout_keywords(cls.moves))
        cls.__init__ = constructor(cls, _common(cls.default_scale), TAIL, keyword_only,
                                   MatrixOptimizer._build)

    def _build(self, params: Any, values: dict) -> None:
        layout = {k: values.pop(k) for k in ("mesh", "tp_mode", "move_dtype", "ns_split", "split_group_size",
                                             "owner_group_size", "owner_replicas", "owner_overlap", "bucket_bytes")
                  if k in values}
        nonfinite = values.pop("nonfinite")
        MatrixOptimizer.__init__(self, params, values, nonfinite, **layout)

    def __init__(self, params: Any, defaults: dict, nonfinite: str = "skip",
                 mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None, tp_mode: str = "gather",
                 move_dtype: torch.dtype | None = None, ns_split: str = "auto",
                 split_group_size: int = SPLIT_GROUP_SIZE, owner_group_size: int | None = None,
                 owner_replicas: str = "auto", owner_overlap: bool = False, bucket_bytes: int = BUCKET_BYTES) -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if tp_mode not in TP_MODES:
            raise ValueError(f"tp_mode must be one of {TP_MODES}, got {tp_mode!r}")
        if move_dtype is not None and move_dtype not in MOVE_DTYPES:
            raise ValueError(f"move_dtype must be a floating dtype, got {move_dtype!r}")
        check_split_args(ns_split, split_group_size)
        if owner_group_size is not None and (not isinstance(owner_group_size, int) or isinstance(owner_group_size, bool)
                                             or owner_group_size < 1):
            raise ValueError(f"owner_group_size must be None or an integer >= 1, got {owner_group_size!r}")
        if owner_replicas not in REPLICAS:
            raise ValueError(f"owner_replicas must be one of {REPLICAS}, got {owner_replicas!r}")
        if not isinstance(owner_overlap, bool):
            raise ValueError(f"owner_overlap must be True or False, got {owner_overlap!r}")
        self.nonfinite, self.tp_mode, self.move_dtype = nonfinite, tp_mode, move_dtype
        self.ns_split, self.split_group_size = ns_split, split_group_size
        self.owner_group_size, self.owner_replicas, self.owner_overlap = owner_group_size, owner_replicas, owner_overlap
        if ns_split == "force" and self._owner_modes():
            raise ValueError(f"ns_split='force' cannot be combined with {', '.join(self._owner_modes())}: a split "
                             "Newton–Schulz transforms each matrix once in one round (owner groups combine with it)")
        self.blockwise_dims = ("tp",) if tp_mode == "blockwise" else ()
        self.skipped_steps = 0
        self.transformed = 0  # matrices (or matrix pieces) this process has transformed, over all steps
        self.routes: list[Route] = []
        self._info: dict[int, ParamInfo] = {}
        self._view: dict[int, tuple[int, int, int]] = {}  # every matrix parameter's (count, m, n)
        self._layouts: dict[int, Layout] = {}  # every matrix parameter's
        self._built_over: set[int] = set()  # id of every tensor of its groups
        self._collective: set[int] = set()  # matrix parameters every rank holding them steps together
        # a group's owner plans, by its parameters (torch's load_state_dict replaces the group dicts)
        self._plans: dict[tuple[int, ...], list[tuple[OwnerPlan, list[Tensor]]]] = {}
        self._comm: CommStats = {}
        self._native: NativeDP | None = None
        self._agree: dist.ProcessGroup | None = None
        self._ride = False  # the agreement rides on the matrix group's first statistics all-reduce
        self._constructed = False
        check_common(defaults)
        self.check_group(defaults)
        groups, infos = parse_params(params)
        self._info.update(infos)
        super().__init__(groups, defaults)
        if (self._collective and dist.is_initialized()) or mesh is not None:
            groups = [g for i in self._collective for _, g in self._layouts[i].groups] + _mesh_groups(mesh)
            mine = [(r.name, tuple(r.shape), r.algorithm) for r in self.routes]
            self._agree = agreement_group(mine, {r for g in groups for r in dist.get_process_group_ranks(g)})
            laid = [(p, name) for g in self.param_groups for p, name in zip(g["params"], g["param_names"])
                    if id(p) in self._collective]
            check_layouts_add_up([self._layouts[id(p)] for p, _ in laid], [name for _, name in laid])
            mine = [g for g in self.param_groups if g["algorithm"] == self.algorithm]
            if (any(isinstance(s, Statistic) for g in mine for s in self.stages(g))
                    and all(self.local_statistics(g) for g in mine)):  # only entries another rank touches travel
                for (p, _), lay in zip(laid, share_statistics([self._layouts[id(p)] for p, _ in laid])):
                    self._layouts[id(p)] = lay
            if mesh is None and len(mine) == 1 and isinstance(self.stages(mine[0])[0], Statistic):
                self._ride = carries_agreement([self._layouts[id(p)] for p in mine[0]["params"]
                                                if id(p) in self._collective], self._agree)
        if mesh is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            newton_schulz = spectral(self.stages(self.defaults))
            self._native = NativeDP(mesh, params, [self._cost(p, newton_schulz) for p in params], bucket_bytes)
            logger.info("%s native data parallelism over %d ranks in %d bucket(s): ownership imbalance %.1f %%",
                        type(self).__name__, self._native.size, len(self._native.buckets), 100 * self._native.imbalance)
        if tp_mode == "blockwise":
            logger.warning("%s tp_mode='blockwise': each tensor-parallel block is its own matrix, so the update "
                           "changes with the TP degree", type(self).__name__)
        for group in self.param_groups:
            self._plan_group(group)
        self._constructed = True
        logger.info("%s routing:\n%s", type(self).__name__, self.routing_table())

    # ---- the algorithm's part -----------------------------------------------------------
    def check_group(self, group: dict) -> None:
        """Raise ValueError on an invalid algorithm-specific hyper-parameter of ``group``."""
        raise NotImplementedError

    @classmethod
    def stages(cls, group: dict) -> list[Statistic | Spectral]:
        """The transform of the momentum ``N``, as stages run in order (see ``stages``)."""
        raise NotImplementedError

    # ---- parameters and routing ---------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Route the group's tensors and add them as one matrix group and/or one AdamW group (a group
        added after construction plans its owner moves now: every rank must add it). Besides torch's
        keys a group may carry ``param_names`` and ``param_infos`` (``routing.ParamInfo``), one per tensor."""
        warn_near_misses(param_group, {*self.defaults, "params", "param_names", "param_infos", "algorithm"})
        first_new = len(self.param_groups)
        group = dict(param_group)
        raw = group.pop("params")
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        names = group.pop("param_names", None)
        infos = group.pop("param_infos", None)  # an integration's ParamInfo of each tensor (module types)
        tensors = [r[1] if isinstance(r, tuple) else r for r in raw]
        self._built_over.update(map(id, tensors))
        if infos is not None:
            self._info.update({id(t): info for t, info in zip(tensors, infos)})
        if names is None:
            first = sum(len(g["params"]) for g in self.param_groups)
            names = [r[0] if isinstance(r, tuple) else f"param{first + i}" for i, r in enumerate(raw)]
        requested = group.pop("algorithm", None)
        if requested not in (None, self.algorithm, ADAMW):
            raise ValueError(
                f"algorithm must be one of {(self.algorithm, ADAMW)} for {type(self).__name__}, got {requested!r}"
            )
        # a group naming its algorithm stays a group when empty (a wrapper that narrows groups per rank, like
        # Megatron's layer-wise optimizer, needs one group structure on every rank)
        split: dict[str, tuple[list, list]] = {requested: ([], [])} if requested is not None and not tensors else {}
        routes = []
        for t, name in zip(tensors, names):
            if not isinstance(t, Tensor):
                raise TypeError(f"optimizer can only optimize tensors, but parameter {name} is {type(t).__name__}")
            r = route(t, self._info.get(id(t), ParamInfo((name,))), requested, self.algorithm)
            if r.matrix is not None:
                self._view[id(t)] = r.matrix
                self._lay_out(t, name, r.matrix)
            routes.append(r)
            ts, ns = split.setdefault(r.algorithm, ([], []))
            ts.append(t)
            ns.append(name)
        for algorithm, (ts, ns) in split.items():
            sub = {**self.defaults, **group, "params": ts, "param_names": ns, "algorithm": algorithm}
            check_common(sub)
            self.check_group(sub)
            super().add_param_group(sub)
        self.routes.extend(routes)
        if self._constructed:
            for g in self.param_groups[first_new:]:
                self._plan_group(g)

    def _lay_out(self, p: Tensor, name: str, view: tuple[int, int, int]) -> None:
        """``p``'s layout: an integration's (``reg_layout``), a DTensor's placements, or the trivial one."""
        if hasattr(p, LAYOUT_ATTR):
            layout = getattr(p, LAYOUT_ATTR)
            if self.blockwise_dims and any(g in self.blockwise_dims for g, _ in layout.groups):
                raise ValueError("tp_mode='blockwise' splits DTensor parameters only; an integration's "
                                 "reg_layout parameter is always a whole matrix")
            self._collective.add(id(p))
        elif isinstance(p, DTensor):
            layout = dtensor_layout(p, name, self.blockwise_dims, self._info.get(id(p), ParamInfo(())).transposed)
            self._collective.add(id(p))
        else:
            layout = whole_layout(p, view)
        self._layouts[id(p)] = layout

    def param_info(self, p: Tensor) -> ParamInfo:
        """What routing read of parameter ``p``: its names and module type (its name alone for a bare tensor)."""
        if id(p) in self._info:
            return self._info[id(p)]
        for group in self.param_groups:
            for q, name in zip(group["params"], group["param_names"]):
                if q is p:
                    return ParamInfo((name,))
        raise KeyError(f"{type(self).__name__}.param_info: not one of its parameters")

    def routing_table(self) -> str:
        """Name, shape, algorithm and matrix view of every parameter, as logged at construction."""
        return format_table(self.routes)

    def layout(self, p: Tensor) -> Layout | None:
        """The layout of matrix parameter ``p`` (None for an AdamW one)."""
        return self._layouts.get(id(p))

    def holding(self, p: Tensor) -> tuple[bool, slice | None]:
        """Whether this rank keeps state for ``p``, and which slice of its local flattening (under
        ``mesh=``, an AdamW tensor's flat shard; None: all of it)."""
        if self._native is None:
            return True, None
        return self._native.owns(p), self._native.slice_of(p)

    # ---- owner plans (spectral stages) --------------------------------------------------
    def _cost(self, p: Tensor, newton_schulz: bool) -> int | None:
        """What owning ``p`` whole costs its data-parallel owner per step under ``mesh=``: its Newton–Schulz
        cost for an algorithm with one, else its size (None for the element-wise AdamW tensors, which
        the native mode shards flat instead)."""
        if id(p) not in self._view:
            return None
        if not newton_schulz:
            return p.numel()
        count, m, n = self._view[id(p)]
        return count * newton_schulz_cost(m, n)

    @property
    def native_imbalance(self) -> float | None:
        """Under ``mesh=``: the data-parallel owner planner's imbalance on its costs (None otherwise)."""
        return self._native.imbalance if self._native is not None else None

    def plans(self) -> list[OwnerPlan | SplitPlan]:
        """The owner plans of the spectral stages over process groups: per group of ranks, its ``OwnerPlan``,
        or its ``SplitPlan`` where a matrix's Newton–Schulz is split (``comm.split``)."""
        return [plan for entries in self._plans.values() for plan, _ in entries]

    def _plan_group(self, group: dict) -> None:
        """One ``OwnerPlan`` per communicator for the group's collective matrices stepped here, or a
        ``SplitPlan`` where a matrix's Newton–Schulz is split (the rest, whole on this process, get a
        ``LocalPlan`` at each step)."""
        if group["algorithm"] != self.algorithm or not spectral(self.stages(group)):
            return
        by_ranks: dict[Any, tuple[dist.ProcessGroup | None, str, list[tuple[Tensor, str]]]] = {}
        for p, name in zip(group["params"], group["param_names"]):
            if self._native is not None and self._native.tp_group is not None and id(p) not in self._collective:
                self._collective.add(id(p))  # a copy on every TP rank: move it once
            if id(p) in self._collective and (self._native is None or self._native.owns(p)):
                pg, pg_name = self._communicator(p)
                ranks = tuple(dist.get_process_group_ranks(pg)) if pg is not None else None
                by_ranks.setdefault((ranks, pg_name), (pg, pg_name, []))[2].append((p, name))
        entries = []
        splittable = next(s for s in self.stages(group) if isinstance(s, Spectral)).split is not None
        for pg, name, pairs in by_ranks.values():
            ps, names = [p for p, _ in pairs], [n for _, n in pairs]
            layouts = [self._layouts[id(p)] for p in ps]
            split = None
            if pg is not None and splittable:
                split = split_parameters([lay.block_shapes for lay in layouts], dist.get_world_size(pg), self.ns_split,
                                         self.split_group_size, group["ns_steps"], group["ns_dtype"].itemsize)
            if split is not None and self._owner_modes():
                raise ValueError(f"ns_split={self.ns_split!r} splits the Newton–Schulz of {sum(k > 1 for k in split[0])} "
                                 f"matrices over {name!r}, which cannot be combined with "
                                 f"{', '.join(self._owner_modes())}: pass ns_split='off' to keep the owner modes, "
                                 "or leave them at their defaults to split (owner_group_size combines with it)")
            if split is not None:
                plan = SplitPlan(layouts, names, pg, name, *split, group_size=self.owner_group_size)
                logger.info("%s split Newton–Schulz over %r: %d of %d matrices over runs of %s ranks, imbalance "
                            "%.1f %%", type(self).__name__, name, sum(k > 1 for k in plan.degrees), len(plan.degrees),
                            sorted({k for k in plan.degrees if k > 1}), 100 * plan.imbalance)
                entries.append((plan, ps))
                continue
            plan = OwnerPlan(layouts, names, pg, name, self.owner_group_size, self.owner_replicas,
                             self._move_dtype(group).itemsize, self.owner_overlap)
            logger.info("%s owner plan over %r: %d matrices, %d here, imbalance %.1f %%, groups of %d (%s)",
                        type(self).__name__, name, len(plan.matrices), plan.owned, 100 * plan.imbalance,
                        plan.group_size, plan.replicas or "one group")
            entries.append((plan, ps))
        self._plans[_key(group)] = entries

    def _communicator(self, p: Tensor) -> tuple[dist.ProcessGroup | None, str]:
        """The group whose ranks hold the pieces of ``p``: its whole root mesh, less blockwise dims
        (copies on the mesh dims that do not shard ``p`` are then one piece, moved once); under
        ``mesh=``, the parameter's own (TP) mesh, as each dp owner steps its own tensors."""
        if hasattr(p, LAYOUT_ATTR):  # an integration's layout: the ranks of its one group hold the pieces
            groups = getattr(p, LAYOUT_ATTR).groups
            if len(groups) > 1:
                raise ValueError(f"a reg_layout split over several groups {[n for n, _ in groups]} needs a DTensor "
                                 f"or one group over all of them")
            return (groups[0][1], groups[0][0]) if groups else (None, "local")
        if not isinstance(p, DTensor):
            return self._native.tp_group, "tp"  # native mode, a copy on every TP rank
        mesh = p.device_mesh if self._native is not None else p.device_mesh._get_root_mesh()
        dims = tuple(d for d in dim_names(mesh) if d not in self.blockwise_dims)
        return mesh_group(mesh, dims), "×".join(dims) or "local"

    # ---- the step -----------------------------------------------------------------------
    def comm_stats(self) -> CommStats:
        """Collectives of the last step, per group name: ``{"dp": {"calls": …, "bytes": …, "sent": …}, …}``
        (``bytes``: the collectives' buffers; ``sent``: what this rank transmitted, ring estimate for
        reductions and gathers, exact for owner moves); ``"world"`` is the agreement on non-finite
        gradients (over the world, or the ranks of this pipeline stage)."""
        return {name: dict(entry) for name, entry in self._comm.items()}

    def _steps_here(self, p: Tensor) -> bool:
        """Whether this process steps ``p`` now: it holds a gradient, or its matrix is split and every
        holder must take part (a missing gradient then counts as zero); under ``mesh=``, only its own."""
        if self._native is not None and not self._native.owns(p):
            return False
        return p.grad is not None or id(p) in self._collective

    def _local_finite(self) -> tuple[Tensor, list[str]]:
        """Whether each gradient this rank steps is finite, and the parameters' names."""
        grads, names = [], []
        for group in self.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                if not self._steps_here(p) or p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name})")
                grads.append(p.grad)
                names.append(name)
        return finite_flags([local_tensor(g) for g in grads]), names

    def _grads_finite(self) -> bool:
        finite, names = self._local_finite()
        ok = bool(finite.all())
        if dist.is_initialized() and (self._collective or self._native is not None):
            ok = all_agree(ok, self._agree, self._comm)
        return ok or self._skip(finite, names)

    def _skip(self, finite: Tensor, names: list[str]) -> bool:
        """A non-finite step, agreed by every rank sharing it: raise, or count and log it (False)."""
        bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
        where = f"in {len(bad)} parameter(s): {', '.join(bad[:8])}" if bad else "on another rank"
        message = f"non-finite gradient {where}"
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.skipped_steps += 1
        logger.warning("%s; step skipped, state unchanged (%d skipped so far)", message, self.skipped_steps)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every group; a non-finite gradient anywhere skips it (or raises). With ``mesh=``,
        gradients are first averaged onto their owners over ``dp`` (reduce-scatter), and the owners'
        updated tensors all-gathered back afterwards. Where the agreement rides on the matrix group's
        statistics, that group steps first."""
        self._comm = {}
        self._check_params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._native is not None:
            self._native.average_grads_to_owners(self._comm)
        mine = [g for g in self.param_groups if g["algorithm"] == self.algorithm]
        riding = mine[0] if self._ride and len(mine) == 1 else None
        if riding is not None:
            finite, names = self._local_finite()
            params = [p for p in riding["params"] if self._steps_here(p)]
            fresh = [p for p in params if p not in self.state]
            try:
                self._matrix_step(params, riding, Agreement(not bool(finite.all())))
            except NonFiniteStep:
                for p in fresh:  # the step made their state: it never happened
                    self.state.pop(p, None)
                self._skip(finite, names)
                return loss
        if riding is not None or self._grads_finite():
            for group in self.param_groups:
                if group is riding:
                    continue
                params = [p for p in group["params"] if self._steps_here(p)]
                if group["algorithm"] == ADAMW:
                    self._adamw_step(params, group)
                else:
                    self._matrix_step(params, group)
        if self._native is not None:
            self._native.gather_params_from_owners(self._comm)
        return loss

    def _check_params(self) -> None:
        """Raise if a wrapper swapped the groups' tensors for others (DeepSpeed ZeRO 1-3 puts flat
        partitions there): this optimizer has no layout for them."""
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._built_over:
                    raise RuntimeError(
                        f"{type(self).__name__}.step: its param groups now hold a tensor of shape {list(p.shape)} "
                        f"it was not built over; a wrapper replaced its parameters (DeepSpeed ZeRO 1-3 swaps them "
                        f"for flat partitions, which have no matrix layout). Under DeepSpeed call "
                        f"reg_dist.deepspeed.register() before deepspeed.initialize (or use "
                        f"reg_dist.deepspeed.initialize)")

    def _adamw_step(self, params: list[Tensor], group: dict) -> None:
        """AdamW on what this rank steps: under ``mesh=``, its flat slice of each AdamW tensor."""
        views, grads = [], []
        for p in params:
            part = self._native.slice_of(p) if self._native is not None else None
            x, g = local_tensor(p), local_tensor(p.grad)
            views.append(x.view(-1)[part] if part is not None else x)
            grads.append(g.view(-1)[part] if part is not None else g)
            if not self.state[p]:
                init_adamw_state(views[-1], self.state[p])
        adamw_step(views, grads, [self.state[p] for p in params], group)

    def local_statistics(self, group: dict) -> bool:
        """Whether ``group``'s statistics are read only where this rank holds elements, so that only the
        entries another rank touches need travel (``comm.statistics.share_statistics``): not where a vector
        state keeps them whole on every holder (``row_state_keys``)."""
        return not self.row_state_keys

    def vector_state(self, group: dict, layout: Layout) -> dict[str, int]:
        """The matrix state of ``group`` kept as one vector per parameter, whole on every rank holding a piece
        of it (per-row or per-column statistics): key → length (``row_state_keys``: one value per logical row)."""
        return dict.fromkeys(self.row_state_keys, layout.shape[0])

    def matrix_state(self, p: Tensor, group: dict) -> dict:
        """The state of matrix parameter ``p`` of ``group``, made on first use: a step count, the momentum
        buffer and the algorithm's vector state (``vector_state``: zeros, fp32 or wider)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for key, size in self.vector_state(group, self._layouts[id(p)]).items():
                state[key] = torch.zeros(size, dtype=acc_dtype(p.dtype), device=local_tensor(p).device)
        return state

    def _momentum(self, params: list[Tensor], group: dict, first: Statistic | None,
                  commit: bool = True) -> tuple[list[Tensor], list[Tensor | None]]:
        """``N`` of every parameter's local elements (fp32 or wider, contiguous; no gradient counts as 0),
        and, for a ``first`` stage that names its ``p``, the local row/column sums of N from the same pass
        where the fused kernel applies (None elsewhere; the raw gradient's for a ``first`` stage whose
        ``source`` is "gradient"; see ``stages``). Without ``commit`` the momentum buffers are left as
        they were (``_commit_momentum``)."""
        locals_ = [local_tensor(p) for p in params]
        n = [torch.empty_like(x, dtype=acc_dtype(x.dtype), memory_format=torch.contiguous_format) for x in locals_]
        grads = _local_grads(params)
        bufs = [local_tensor(self.matrix_state(p, group)["momentum_buffer"]) for p in params]
        mu, nesterov = group["momentum"], group["nesterov"]
        partials: list[Tensor | None] = [None] * len(params)
        for i, p in enumerate(params):
            if first is not None and first.source == "gradient":
                g = as_matrix(grads[i], self._info[id(p)]).contiguous() if self._transposed(p) else grads[i]
                partials[i] = partial_row_col(g, self._layouts[id(p)], first.p, first.cols)
            elif first is not None and first.p is not None and not self._transposed(p):
                partials[i] = momentum_partial_row_col(grads[i], bufs[i], n[i], self._layouts[id(p)], first.p,
                                                       first.cols, mu, nesterov, commit)
                if partials[i] is not None:
                    continue
            momentum_into_([grads[i]], [bufs[i]], [n[i]], mu, nesterov, commit)
        # a weight stored transposed (Conv1D): its matrix, contiguous, as its layout describes it
        n = [as_matrix(x, self._info[id(p)]).contiguous() if self._transposed(p) else x for x, p in zip(n, params)]
        return n, partials

    def _commit_momentum(self, params: list[Tensor], group: dict) -> None:
        """``M ← G + μ·M`` for ``params``, whose N ``_momentum`` formed without it."""
        commit_momentum_(_local_grads(params), [local_tensor(self.state[p]["momentum_buffer"]) for p in params],
                         group["momentum"])

    def _transposed(self, p: Tensor) -> bool:
        info = self._info.get(id(p))
        return info is not None and info.transposed

    def _local_batches(self, params: list[Tensor], stacked: bool) -> list[list[Tensor]]:
        """``params`` (whole on this process) in the batches stepped together: one each, or with ``stacked``
        the runs of ``stacks`` over the parameters of the same matrix shapes, in order of first appearance."""
        if not stacked:
            return [[p] for p in params]
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in params:
            by_shape.setdefault(frozenset(self._layouts[id(p)].block_shapes), []).append(p)
        sizes = {id(p): acc_dtype(p.dtype).itemsize * self._layouts[id(p)].numel for p in params}  # bytes of N
        return [run for ps in by_shape.values() for run in stacks(ps, [sizes[id(p)] for p in ps], STACK_BYTES)]

    def _matrix_step(self, params: list[Tensor], group: dict, agree: Agreement | None = None) -> None:
        """``group``'s step of ``params``; ``agree``: the non-finite agreement, riding on its first statistics
        reduction (given only where its layouts are split, ``carries_agreement``: the collective batch)."""
        if not params:
            return
        stages = self.stages(group)
        planned = self._plans.get(_key(group), [])
        if not planned and not any(self._layouts[id(p)].groups for p in params):
            # no collective to pack or plan to follow: one batch at a time, so the step's scratch (N, fp32, and the
            # transform's) is one batch's, reused from the allocator's cache: one matrix for a statistic-only
            # algorithm, one same-shape stack of at most STACK_BYTES for a spectral one (``LocalPlan``'s stacks)
            for batch in self._local_batches(params, spectral(stages)):
                self._step_batch(batch, group, stages, [])
            return
        stepping = {id(p) for p in params}
        in_plans = {id(p) for _, ps in planned for p in ps}
        missing = [n for n, p in zip(group["param_names"], group["params"]) if id(p) in in_plans and id(p) not in stepping]
        if missing:
            raise RuntimeError(f"sharded parameters {missing[:8]} are not stepped on a rank that holds them")
        self._step_batch(params, group, stages, planned, agree)

    def _step_batch(self, params: list[Tensor], group: dict, stages: list[Statistic | Spectral],
                    planned: list[tuple[OwnerPlan, list[Tensor]]], agree: Agreement | None = None) -> None:
        """Momentum, ``stages`` (the spectral ones through ``planned`` and a ``LocalPlan`` of the rest),
        scale and update of ``params``; with ``agree``, M is updated once the first stage has settled it."""
        in_plans = {id(p) for _, ps in planned for p in ps}
        layouts = [self._layouts[id(p)] for p in params]
        n, partials = self._momentum(params, group, stages[0] if isinstance(stages[0], Statistic) else None,
                                     commit=agree is None)
        states = [self.state[p] for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        local = [i for i, p in enumerate(params) if id(p) not in in_plans]
        runs = [(plan, [index[id(p)] for p in ps]) for plan, ps in planned]  # the spectral stages' plans
        runs.append((LocalPlan([layouts[i] for i in local]), local))
        squares = None  # the Σ U² of each fused matrix, where the last stage summed them
        for k, stage in enumerate(stages):
            if isinstance(stage, Statistic):
                riding = {"agree": agree} if k == 0 and agree is not None else {}
                squares = stage.run(n, layouts, states, self._comm, partials if k == 0 else [None] * len(n), **riding)
                if riding:
                    self._commit_momentum(params, group)
                continue
            squares, last = None, k == len(stages) - 1
            fn = (lambda x, fn=stage.fn: self._scaled(fn(x), group, out=x)) if last else stage.fn
            if last:  # a split matrix's blocks: scaled as the whole matrix (its shape, its norm reduced)
                split = lambda x, wide, run, shape, f=stage.split: self._scaled(f(x, wide, run), group,  # noqa: E731
                                                                                shape, run.reduce)
            else:
                split = lambda x, wide, run, shape, f=stage.split: f(x, wide, run)  # noqa: E731
            for plan, idx in runs:
                if not idx and plan.group is None:
                    continue
                extra = {"split": split} if isinstance(plan, SplitPlan) else {}
                out = plan.run({j: n[i] for j, i in enumerate(idx)}, fn, self._move_dtype(group),
                               n[0].dtype, self._comm, **extra)
                for j, i in enumerate(idx):
                    n[i] = out[j] if last else out[j].to(n[i].dtype)  # later stages work in fp32 (or wider)
                self.transformed += plan.owned
        if not spectral(stages):  # each rank counts the matrices it holds pieces of
            self.transformed += sum(len(lay.block_shapes) for lay in layouts)
        factors = [None] * len(n) if scaled_on_owner(stages) else self._scale_(n, layouts, group, squares)
        lr, wd = group["lr"], group["weight_decay"]
        for p, u, s, state in zip(params, n, factors, states):
            x = local_tensor(p)
            u = as_param(u, x, self._info[id(p)]) if self._transposed(p) else u.view(x.shape)
            if fused.update_(x, u, lr, wd, s):
                state["step"] += 1
                continue
            if wd != 0 and lr != 0:
                x.mul_(1.0 - lr * wd)
            if s is None:
                x.add_(u, alpha=-lr)
            else:  # W − lr·s·U in one pass
                x.addcmul_(u, s.to(x.device), value=-lr)
            state["step"] += 1

    def _owner_modes(self) -> list[str]:
        """The owner-move options set away from their defaults that a split plan does not combine with."""
        return [f"{k}={v!r}" for k, v, default in (("owner_replicas", self.owner_replicas, "auto"),
                                                   ("owner_overlap", self.owner_overlap, False)) if v != default]

    def _move_dtype(self, group: dict) -> torch.dtype:
        return self.move_dtype or group.get("ns_dtype", torch.float32)

    def _scaled(self, u: Tensor, group: dict, shape: tuple[int, int] | None = None,
                reduce: Callable[[Tensor], None] | None = None, out: Tensor | None = None) -> Tensor:
        """Whole matrices ``(B, m, n)`` times their scale factors (on the owner); or the blocks of split
        ``shape`` matrices, their squared norms summed by ``reduce`` (``comm.split``). ``out``: the
        transform's input, dead once ``u`` is made, written where it has the factors' dtype (one pass, no
        new buffer: a fresh one costs its page faults on the CPU)."""
        factors = scale_factors(u, group["scale"], group["rms"], shape, reduce)  # fp32 or wider: u cast once
        factors = factors.view(-1, 1, 1).to(u.device)
        if out is not None and out.dtype == factors.dtype and out.shape == u.shape and out.device == u.device:
            return torch.mul(u, factors, out=out)
        return u.to(factors.dtype).mul_(factors)

    def _scale_(self, n: list[Tensor], layouts: list[Layout], group: dict,
                squares: Squares | None) -> list[Tensor | None]:
        """The scale factor of every parameter whose matrices share one (a 0-dim tensor, applied with the
        update), after multiplying the pieces of the others (fused blocks) in place (None); ``"rms"``:
        one packed norm reduction (of the last stage's ``squares`` where it summed them)."""
        rms = group["rms"]
        if group["scale"] == "rms":
            norms = sharded_frobenius_norms(n, layouts, self._comm, squares)
            factors = [torch.stack([rms_factor(v, rms, m, k) for v, (m, k) in zip(norm, lay.block_shapes)])
                       for norm, lay in zip(norms, layouts)]
        else:
            factors = [torch.tensor([shape_factor(group["scale"], rms, m, k) for m, k in lay.block_shapes],
                                    dtype=u.dtype) for u, lay in zip(n, layouts)]
        out: list[Tensor | None] = []
        for u, lay, s in zip(n, layouts, factors):
            if len(s) == 1:
                out.append(s.view(()))
                continue
            for view, r in lay.pieces(u):
                view.mul_(s[r.block].to(u.device))
            out.append(None)
        return out

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        saved = [set(g) for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, saved):
            self.fill_missing_hyper(group, keys)
        self.skipped_steps = skipped

    def fill_missing_hyper(self, group: dict, saved: set[str]) -> None:
        """After loading a param group saved without some hyper-parameters (an older checkpoint): each missing
        one takes the value such checkpoints ran with (``legacy_hyper``), else this optimizer's default."""
        for key, value in self.defaults.items():
            if key not in saved:
                group[key] = self.legacy_hyper.get(key, value) if group["algorithm"] == self.algorithm else value
