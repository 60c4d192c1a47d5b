"""What reg_dist's collectives carry in one optimizer step, rank by rank, predicted from the shapes
and the layout alone: the ``opt.comm_stats()`` of every rank, the owner plans (from the real
planner, ``reg_dist.comm.ownership``), each rank's Newton–Schulz work and optimizer state.

It follows the code path by path (no process group is made):

    statistics   per RACS iteration (REG) or per owner plan (MuonEq's equilibration), one packed
                 all-reduce per group name that splits any of the rank's laid-out matrices, of the
                 entries of its m + K·n floats (fp32; K fused blocks) another rank of the group touches
                 (``Layout.shared``): a group splitting rows carries the held columns of each fused matrix
                 two of its ranks hold rows of, one splitting columns the held rows; none where nothing
                 is shared. REG's "rms" scale adds one of K floats per matrix, except for a matrix
                 whose rows no group shares: its last pass carries its shared columns twice (the
                 norm's column sums, ``comm.statistics.fold_columns``) instead. Under FSDP2 × TP with a
                 row-parallel matrix (``two_level``): tp first, then dp with each tp rank's slice of
                 the column-parallel matrices' column sums, one all-gather of the slices over tp, the
                 norms' sums riding along and their K floats per matrix over tp alone
    owner moves  per owner plan whose moves leave a rank, two all-to-alls: every distinct held element
                 to its matrix's owner, every owned matrix back to every holder (in the Newton–Schulz dtype, bf16 by default);
                 "bytes" is the rank's send buffer, "sent" its off-rank part
                 (``owner_group_size``: two hops each way, ``grouped_plan``, with HSDP's replica groups
                 sharing the work or repeating it as the real planner chooses)
    split NS     where the real planner splits a matrix's Newton–Schulz (``comm.split``), the group's
                 split plan instead: its two all-to-alls (two hops each with ``owner_group_size``), and its
                 runs' collectives (``scale.split``); refused (ValueError) with ``owner_replicas``
                 "share"/"repeat" or ``owner_overlap``, as the engine refuses it
    native dp    per bucket of ``bucket_bytes`` of the owners' streams, one reduce-scatter and one
                 all-gather over dp of dp × segment parameter-dtype elements
    world        one int32 all-reduce (the non-finite agreement) once anything is laid out, except where
                 it rides on the first statistics all-reduce, one entry more in each of its groups'
                 buffers (REG, MuonEq under FSDP2, FSDP2 × TP or TP alone, at most RIDE_ELEMENTS of the
                 split matrices per rank: ``comm.agree.Agreement``)

Parameters are DTensors exactly where reg_dist makes them so (``parallel``): under FSDP2 all of
them (row-sharded over dp after tensor parallelism, chunks as ``torch.chunk`` cuts them), otherwise
only the tensor-parallel ones; a 2-D matrix with fused rows is laid out even when plain. Owner plans
run where reg_dist runs them: FSDP2, one over the whole (dp, tp) mesh ("dp" or "dp×tp"); replicated
dp, one over the TP DTensors' root mesh ("tp", or "dp×tp" with copies over dp); native with tp, one
per dp owner over its tp group. Of identical copies the lowest rank sends; owners may be any rank
holding part of the parameter. Sizes are kept per rank as torch tensors, so 16,384 ranks cost
milliseconds per matrix; parameters of one shape and split share them.

``tests/test_scale_calibration.py`` checks every rank's ``comm_stats()`` and owner plans against live
gloo runs of every layout above (up to 4 ranks), and against benchmarks/results/comm.json.
"""

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..comm.agree import RIDE_ELEMENTS
from ..comm.collectives import WIRE
from ..comm.split import SPLIT_GROUP_SIZE, check_split_args
from ..comm.native import BUCKET_BYTES, plan_streams, segments
from ..comm.owner import newton_schulz_cost
from ..comm.ownership import REPLICAS, choose_replicas, imbalance, loads, plan_owners
from ..ops.stats import check_count
from ..optim import registry
from ..optim.scaling import check_scale
from .parallel import Parallel
from .shapes import MATRIX, Model, Param
from .hops import Hop, exchange, first_of_each, hop_calls, route
from .split import SplitPlanModel, peers, split_plan

OPTIMIZERS = tuple(registry.ALGORITHMS)
INT = torch.int64


@dataclass(frozen=True)
class Settings:
    """The optimizer options that change traffic and work (reg_dist's defaults)."""

    iters: int = 1  # REG's RACS iterations
    scale: str = "rms"  # after a statistic stage (REG, NorMuon): "rms" needs one more all-reduce (the norms)
    move_bytes: int = 2  # owner moves in bf16
    param_bytes: int = 4  # parameter (and gradient, momentum, AdamW moment) dtype: fp32
    bucket_bytes: int = BUCKET_BYTES  # native mode
    ns_steps: int = 5
    ns_bytes: int = 2  # Newton–Schulz in bf16 (a split matrix's Gram all-reduces)
    ns_split: str = "auto"  # comm.split: "auto", "force", "off"
    split_group_size: int = SPLIT_GROUP_SIZE
    owner_group_size: int | None = None  # owner moves in two hops over groups of this many ranks (None: one)
    owner_replicas: str = "auto"  # HSDP replica groups: "share", "repeat" or the planner's choice
    owner_overlap: bool = False  # one round of moves per matrix shape, the next in flight during the transform

    def __post_init__(self) -> None:
        for name in ("iters", "ns_steps", "bucket_bytes"):
            check_count(name, getattr(self, name))
        if self.owner_group_size is not None:
            check_count("owner_group_size", self.owner_group_size)
        if self.owner_replicas not in REPLICAS:
            raise ValueError(f"owner_replicas must be one of {REPLICAS}, got {self.owner_replicas!r}")
        check_scale(self.scale)
        check_split_args(self.ns_split, self.split_group_size)
        for name in ("move_bytes", "param_bytes", "ns_bytes"):
            if getattr(self, name) not in (2, 4, 8):
                raise ValueError(f"{name} must be 2, 4 or 8 (bf16/fp16, fp32, fp64), got {getattr(self, name)!r}")

    @property
    def stat_bytes(self) -> int:
        """The statistics' accumulation dtype: fp32, fp64 for fp64 parameters."""
        return 8 if self.param_bytes == 8 else 4


def ns_flops(m: int, n: int, steps: int) -> int:
    """FLOPs of ``steps`` Newton–Schulz iterations on an m × n matrix (a = min, b = max side):
    A = X·Xᵀ (2a²b), B = b·A + c·A² (2a³), X = a·X + B·X (2a²b) per iteration."""
    a, b = min(m, n), max(m, n)
    return steps * (4 * a * a * b + 2 * a * a * a)


def _chunk(size: Tensor, parts: int, index: Tensor) -> tuple[Tensor, Tensor]:
    """``Shard`` of ``size`` units into ``parts`` (torch.chunk): part i holds [min(i·c, size), min((i+1)·c, size))."""
    c = (size + parts - 1) // parts
    return torch.minimum(index * c, size), torch.minimum((index + 1) * c, size)


@dataclass
class Holding:
    """One parameter on the ranks of a pipeline stage (stage rank r = d·tp + t)."""

    index: int  # in model.params
    param: Param
    dims: tuple[str, ...]  # mesh dims that shard it (its Layout's groups when it is a DTensor)
    dtensor: bool
    numel: Tensor  # (R,) elements each rank holds
    blocks: Tensor  # (K, R) elements of each fused matrix each rank holds
    extent: Tensor  # (4, R) the logical rows [r0, r1) and columns [c0, c1) each rank's block spans

    @property
    def rows(self) -> Tensor:
        """(R,) logical rows each rank holds."""
        return self.extent[1] - self.extent[0]

    @property
    def width(self) -> Tensor:
        """(R,) columns each rank holds."""
        return self.extent[3] - self.extent[2]
    piece: Tensor  # (R,) which piece each rank holds: equal ids, identical elements (copies)

    @property
    def laid(self) -> bool:
        """reg_dist gives it a Layout: a DTensor matrix, or a plain 2-D matrix with fused rows."""
        return self.param.algorithm == MATRIX and (self.dtensor or self.param.fused is not None)

    def shared_floats(self, group: str, cols: bool, par: Parallel) -> Tensor:
        """(R,) entries of its statistics vector (rows, and with ``cols`` the columns of each fused
        matrix) that ``group`` ("dp", HSDP's "shard" or "tp", one it is split over) reduces on each rank: the ranks of a
        group instance hold the same columns and disjoint rows, or ("tp" splitting columns) the same rows
        and disjoint columns, so it shares the held columns of every fused matrix two of them hold rows
        of (``shared_blocks``), or the held rows when two of them hold anything."""
        if group == "tp" and self.param.tp == 1:
            holders = (self.numel > 0).view(_mesh(par)).sum(-1, keepdim=True).expand(_mesh(par)).reshape(-1)
            return (holders >= 2) * self.rows
        if not cols:
            return torch.zeros_like(self.numel)
        return self.shared_blocks(group, par).sum(0) * self.width

    def holders(self, group: str, par: Parallel) -> Tensor:
        """(K, R) the ranks of each rank's instance of ``group`` that hold rows of each fused matrix."""
        k, mesh = len(self.param.blocks), _mesh(par)
        across = -1 if group == "tp" else -2  # the mesh dim the group's ranks differ in
        return (self.blocks > 0).view(k, *mesh).sum(across, keepdim=True).expand(k, *mesh).reshape(k, -1)

    def shared_blocks(self, group: str, par: Parallel) -> Tensor:
        """(K, R) the fused matrices whose held columns ``group`` reduces on each rank: those two ranks of the
        instance hold rows of, or where that would not reach every holder (``reaches``), those one of them
        holds rows of and two ranks hold rows of in all."""
        holders = self.holders(group, par)
        if not self.reaches(par):
            return (holders >= 1) & ((self.blocks > 0).sum(1, keepdim=True) >= 2)
        return holders >= 2

    def rows_local(self, par: Parallel) -> bool:
        """Whether no group it is split over shares a row entry of its statistics (``comm.statistics.rows_local``):
        every rank holds whole rows (FSDP2 row shards, column-parallel TP), or no two ranks of a group
        splitting its columns hold anything."""
        return all(not self.shared_floats(g, False, par).any() for g in self.dims)

    def reaches(self, par: Parallel) -> bool:
        """Whether reducing only the entries two ranks of a group share, over dp then tp, sums every
        holder's part of each column (``share_statistics``' first check). Only a column-parallel matrix
        split over both can fail: the ranks holding rows of one fused matrix may share neither group, and
        a dp group with one holder passes nothing on to its tp group."""
        if self.param.tp != 0 or set(self.dims) != {"dp", "tp"}:
            return True
        k = len(self.param.blocks)
        held = (self.blocks > 0).view(k, par.dp, par.tp)
        per_dp = held.sum(1, keepdim=True)  # holders in each dp group (a column of the mesh)
        after_dp = torch.where(per_dp >= 2, per_dp, held.long())  # holders whose part each rank has after dp
        per_tp = held.sum(2, keepdim=True)
        after_tp = torch.where(per_tp >= 2, after_dp.sum(2, keepdim=True).expand_as(after_dp), after_dp)
        return bool((after_tp == held.sum((1, 2), keepdim=True).expand_as(after_dp))[held].all())


def _mesh(par: Parallel) -> tuple[int, int, int]:
    """The stage's ranks as (replicate, shard, tp): HSDP's, else (1, dp, tp)."""
    shard = par.shard or par.dp
    return par.dp // shard, shard, par.tp


def two_level(laid: list[Holding], par: Parallel) -> str | None:
    """The group ``comm.statistics.share_statistics`` reduces first (``Layout.inner``), or None: "tp"
    where the split matrices name it and one other group, tp alone shares a row entry (a row-parallel
    matrix), every matrix takes the plain plan (``reaches``), and each tp instance holds rows of a
    column-parallel fused matrix on none or all of its ranks."""
    split = [h for h in laid if h.dtensor and h.dims]
    if len({g for h in split for g in h.dims}) != 2 or not any("tp" in h.dims for h in split):
        return None
    if not any(h.shared_floats("tp", False, par).any() for h in split if "tp" in h.dims):
        return None
    for h in split:
        if not h.reaches(par):
            return None
        if "tp" in h.dims and h.rows_local(par):
            holders = h.holders("tp", par)
            if not bool(((holders == 0) | (holders == par.tp)).all()):
                return None
    return "tp"


def holdings(model: Model, par: Parallel) -> list[Holding]:
    """Every parameter's holdings; parameters of one shape and split share their (read-only) tensors."""
    return [Holding(i, p, *_held(p.shape, p.tp, p.fused, p.algorithm, par)) for i, p in enumerate(model.params)]


@functools.lru_cache(maxsize=4096)
def _held(shape: tuple[int, ...], split: int | None, fused, algorithm: str, par: Parallel):
    p = Param("p", shape, algorithm, tp=split, fused=fused)
    R, tp, dp = par.stage_ranks, par.tp, par.dp
    r = torch.arange(R, dtype=INT)
    d, t = r // tp, r % tp
    units, width = p.shape[0], (p.logical[1] if len(p.shape) > 1 else 1)
    lo, hi = torch.zeros(R, dtype=INT), torch.full((R,), units, dtype=INT)
    c0, c1 = torch.zeros(R, dtype=INT), torch.full((R,), width, dtype=INT)
    dims = []
    if tp > 1 and p.tp is not None:
        dims.append("tp")
        if p.tp == 0:
            lo, hi = _chunk(hi, tp, t)
        else:
            c0, c1 = _chunk(c1, tp, t)
    piece = t if "tp" in dims else torch.zeros(R, dtype=INT)
    if par.zero == 3:  # FSDP2: dim 0 of the (TP-local) tensor over dp (HSDP: over the shard group)
        parts = par.shard or dp
        dims.append("shard" if par.hsdp else "dp")
        a, b = _chunk(hi - lo, parts, d % parts)
        lo, hi = lo + a, lo + b
        piece = piece + tp * (d % parts)
    w = c1 - c0
    numel = (hi - lo) * (p.shape[1] if len(p.shape) == 3 else 1) * w
    blocks = torch.zeros(len(p.blocks), R, dtype=INT)
    if p.algorithm == MATRIX:
        row0, row1 = lo * p.unit_rows, hi * p.unit_rows
        seg = torch.tensor(p.segments, dtype=INT)  # (S, 3)
        overlap = (torch.minimum(row1[None], seg[:, 1:2]) - torch.maximum(row0[None], seg[:, 0:1])).clamp_(min=0)
        blocks.index_add_(0, seg[:, 2], overlap * w[None])
    dtensor = par.zero == 3 or "tp" in dims
    return (tuple(sorted(dims)), dtensor, numel, blocks, torch.stack([lo * p.unit_rows, hi * p.unit_rows, c0, c1]),
            piece)


def group_order(model: Model) -> list[int]:
    """Parameter indices in reg_dist's param-group order: one group per algorithm, in the order the
    algorithms first appear, each in model order (the native mode's streams follow it)."""
    firsts = []
    for p in model.params:
        if p.algorithm not in firsts:
            firsts.append(p.algorithm)
    return [i for a in firsts for i, p in enumerate(model.params) if p.algorithm == a]


# ---- the collectives ------------------------------------------------------------------------------

@dataclass
class Call:
    """The collectives of one group name and kind in a step, summed per stage rank: how many calls,
    their buffer bytes and the bytes sent (``stats.count``'s definitions). An all-to-all also sums,
    per rank, the off-rank bytes sent and received inside the node (``*_near``) and across nodes
    (``*_far``), and its peers (ranks it exchanges anything with: the larger of its senders and
    receivers, per call)."""

    group: str
    kind: str
    size: int  # ranks in each group instance
    calls: Tensor  # (R,)
    bytes: Tensor  # (R,)
    sent: Tensor  # (R,)
    a2a: dict[str, Tensor] | None = None
    phase: tuple[int, str] | None = None  # overlapped owner moves: (round, "there" | "back")


class _Calls:
    def __init__(self, ranks: int) -> None:
        self.ranks, self.slots = ranks, {}

    def add(self, group: str, kind: str, size: int, part: Tensor, nbytes: Tensor, count: int = 1,
            sent: Tensor | None = None, a2a: dict[str, Tensor] | None = None,
            phase: tuple[int, str] | None = None) -> None:
        """``count`` calls on the ranks of ``part``, each of ``nbytes`` (per rank) with ``sent`` (default:
        the ring estimate, rounded per call as ``stats.count`` does); ``phase``: an overlapped move's."""
        if sent is None:
            sent = _ring_sent(kind, size, nbytes)
        z = lambda: torch.zeros(self.ranks, dtype=INT)  # noqa: E731
        slot = self.slots.setdefault((group, kind, phase),
                                     Call(group, kind, size, z(), z(), z(), {} if a2a else None, phase))
        if slot.size != size:
            raise AssertionError(f"group {group!r} with two sizes")
        part = part.to(INT)
        slot.calls += count * part
        slot.bytes += count * nbytes * part
        slot.sent += count * sent * part
        for k, value in (a2a or {}).items():
            slot.a2a[k] = slot.a2a.get(k, z()) + value * part

    def list(self) -> list[Call]:
        return list(self.slots.values())


def _ring_sent(kind: str, size: int, nbytes: Tensor) -> Tensor:
    """``round(WIRE[kind](size) · bytes)`` per rank, exactly as ``stats.count`` rounds it."""
    out = torch.zeros_like(nbytes)
    for value in nbytes.unique().tolist():
        out[nbytes == value] = round(WIRE[kind](size) * value)
    return out


@dataclass
class OwnerPlanModel:
    """One owner plan: its matrices, owners (group ranks) and what its two all-to-alls move."""

    name: str
    ranks: Tensor  # stage ranks of the group, in group-rank order
    matrices: list[tuple[int, int, tuple[int, int]]]  # (param index, block, (m, n))
    owners: list[int]
    imbalance: float
    moves: bool
    vectors: dict[str, Tensor]  # per group rank, elements: send1/self1/send2/self2, *_far, peers1/peers2
    flops: Tensor  # (p,) Newton–Schulz FLOPs of the owned matrices
    owned: Tensor  # (p,) elements of the owned matrices
    group_size: int | None = None  # owner groups (``grouped_plan``)
    replicas: str | None = None  # "share" or "repeat" where every owner group holds every matrix


def owner_plan(entries: list[tuple[Holding, Tensor]], ranks: Tensor, name: str, node: Tensor,
               settings: Settings) -> OwnerPlanModel:
    """``OwnerPlan`` of ``entries`` (a holding and its sender mask over stage ranks: the lowest rank of
    each set of identical copies) over the group ``ranks``; ``node`` maps stage ranks to nodes."""
    p = len(ranks)
    mats, cands, held = [], [], []
    for h, sender in entries:
        mine = (h.numel[ranks] > 0).nonzero().flatten().tolist()
        if not mine:
            raise ValueError(f"no rank of group {name!r} holds any of parameter {h.param.name}")
        cand = range(mine[0], mine[-1] + 1) if mine[-1] - mine[0] + 1 == len(mine) else mine
        s = sender[ranks]
        for k, shape in enumerate(h.param.blocks):
            hk = h.blocks[k][ranks]
            sk = hk * s
            if int(sk.sum()) != shape[0] * shape[1]:
                raise AssertionError(f"{h.param.name} block {k}: distinct held elements do not add up")
            mats.append((h.index, k, shape))
            cands.append(cand)
            held.append((hk, sk))
    costs = [newton_schulz_cost(m, n) for _, _, (m, n) in mats]
    owners = list(_plan(tuple(costs), p, tuple(c if isinstance(c, range) else tuple(c) for c in cands)))
    z = lambda: torch.zeros(p, dtype=INT)  # noqa: E731
    v = {k: z() for k in ("send1", "self1", "recv1", "send1_far", "recv1_far",
                          "send2", "self2", "recv2", "send2_far", "recv2_far")}
    flops, owned = torch.zeros(p, dtype=torch.float64), z()
    gnode = node[ranks]
    by_owner: dict[int, list[int]] = defaultdict(list)
    for j, ((hk, sk), o, (_, _, (m, n))) in enumerate(zip(held, owners, mats)):
        far = gnode != gnode[o]
        own_s, own_h = int(sk[o]), int(hk[o])
        v["send1"] += sk
        v["self1"][o] += own_s
        v["recv1"][o] += m * n - own_s
        v["send1_far"] += sk * far
        v["recv1_far"][o] += int((sk * far).sum())
        total = int(hk.sum())
        v["send2"][o] += total
        v["self2"][o] += own_h
        v["recv2"] += hk
        v["recv2"][o] -= own_h
        v["send2_far"][o] += int((hk * far).sum())
        v["recv2_far"] += hk * far
        flops[o] += ns_flops(m, n, settings.ns_steps)
        owned[o] += m * n
        by_owner[o].append(j)
    v["peers1"], v["peers2"] = peers(p, {o: (torch.stack([held[j][1] > 0 for j in js]).any(0),
                                             torch.stack([held[j][0] > 0 for j in js]).any(0))
                                         for o, js in by_owner.items()})
    moves = bool(((v["send1"] - v["self1"]) > 0).any() or ((v["send2"] - v["self2"]) > 0).any())
    return OwnerPlanModel(name, ranks, mats, owners, imbalance(costs, owners, p), moves, v, flops, owned)


@functools.lru_cache(maxsize=1024)
def _plan(costs: tuple[int, ...], ranks: int, candidates: tuple) -> tuple[int, ...]:
    """The real planner (``ownership.plan_owners``), remembered: Muon and MuonEq plan alike."""
    return tuple(plan_owners(list(costs), ranks, list(candidates)))


def grouped_plan(members: list[Holding], ranks: Tensor, name: str, node: Tensor, settings: Settings,
                 g: int) -> tuple[list[OwnerPlanModel], Tensor, Tensor, list[tuple[str, int, int, str, Hop]]]:
    """``OwnerPlan`` with ``group_size=g`` (and ``overlap``) over the group ``ranks``: its plan(s) (one per
    owner group when the replicas repeat the work), the Newton–Schulz FLOPs per round and group rank
    (one round, or one per matrix shape with ``owner_overlap``), the owned elements per group rank,
    and every round's four hops (name, group size, round, "there" | "back", flows): there outer then
    inner, back inner (one copy of each piece per mid rank) then outer, as ``comm.hops.TwoHop`` routes
    them. With g = P this is the one-group plan (one hop of each pair stays on its rank)."""
    p = len(ranks)
    if p % g:
        raise ValueError(f"owner_group_size must be a positive integer dividing the {p} ranks of {name!r}, got {g}")
    groups = p // g
    idx = torch.arange(p, dtype=INT)
    G = idx // g
    mats, cands, held, piece = [], [], [], []
    for h in members:
        mine = (h.numel[ranks] > 0).nonzero().flatten().tolist()
        if not mine:
            raise ValueError(f"no rank of group {name!r} holds any of parameter {h.param.name}")
        for k, shape in enumerate(h.param.blocks):
            hk = h.blocks[k][ranks]
            mats.append((h.index, k, shape))
            cands.append(tuple(mine))
            held.append(hk)
            piece.append(torch.where(hk > 0, h.piece[ranks], -1))
    costs = tuple(newton_schulz_cost(m, n) for _, _, (m, n) in mats)
    share = list(_plan(costs, p, tuple(cands)))
    whole = groups > 1 and all(
        bool((first_of_each(pc.view(groups, g), hk.view(groups, g), 1) == m * n).all())
        for pc, hk, (_, _, (m, n)) in zip(piece, held, mats))
    if settings.owner_replicas == "repeat" and not whole:
        raise ValueError(f"owner_replicas='repeat' needs every group of {g} ranks of {name!r} to hold every matrix "
                         f"whole (HSDP's shard groups); these do not")
    per_group = [list(_plan(costs, p, tuple(tuple(r for r in c if r // g == q) for c in cands)))
                 for q in range(groups)] if whole else []
    choice = settings.owner_replicas if settings.owner_replicas != "auto" else "share"
    if settings.owner_replicas == "auto" and whole:
        received, sent = torch.zeros(p, dtype=INT), torch.zeros(p, dtype=INT)
        for hk, o in zip(held, share):
            out = hk * (G != o // g)
            received += out
            sent[(o // g) * g: (o // g + 1) * g] += out.view(groups, g).sum(0)
        choice = choose_replicas(max(loads(list(costs), share, p)),
                                 max(max(loads(list(costs), owners, p)) for owners in per_group),
                                 int(torch.maximum(received, sent).max()), groups, settings.move_bytes)
    replicas = choice if whole else None
    everyone = torch.ones(p, dtype=torch.bool)
    if replicas == "repeat":
        transformers = [[(per_group[q][j], G == q) for q in range(groups)] for j in range(len(mats))]
    else:
        transformers = [[(o, everyone)] for o in share]
    gnode = node[ranks]
    shapes = sorted({shape for *_, shape in mats}, key=lambda sh: (-newton_schulz_cost(*sh),
                    next(j for j, (*_, s) in enumerate(mats) if s == sh)))  # the runtime's rounds
    round_of = [shapes.index(shape) if settings.owner_overlap else 0 for *_, shape in mats]
    rounds = max(round_of) + 1
    hops = [exchange(p, gnode, g) for _ in range(rounds)]
    flops, owned = torch.zeros(rounds, p, dtype=torch.float64), torch.zeros(p, dtype=INT)
    big = 2 * p
    for (hk, pc, (_, _, (m, n))), ts, k in zip(zip(held, piece, mats), transformers, round_of):
        for o, domain in ts:
            h = hk * domain
            holders = h > 0
            pcs = torch.where(holders, pc, -1)
            key = torch.where(holders, idx + p * (G != o // g), big)  # a copy in the owner's group sends
            first = torch.full((int(pcs.max()) + 2,), big, dtype=INT).scatter_reduce(0, pcs + 1, key, "amin")
            sent = h * (holders & (key == first[pcs + 1]))
            route(hops[k], o, g, sent, h, pcs)
            flops[k, o] += ns_flops(m, n, settings.ns_steps)
            owned[o] += m * n
    hop_list = [call for k in range(rounds) for call in hop_calls(name, p, g, hops[k], k)]
    total = flops.sum(0)
    if replicas == "repeat":
        plans = [OwnerPlanModel(name, ranks[q * g:(q + 1) * g], mats, per_group[q],
                                imbalance(list(costs), [o - q * g for o in per_group[q]], g), False, {},
                                total[q * g:(q + 1) * g], owned[q * g:(q + 1) * g], g, replicas)
                 for q in range(groups)]
    else:
        plans = [OwnerPlanModel(name, ranks, mats, share, imbalance(list(costs), share, p), False, {}, total, owned,
                                g, replicas)]
    return plans, flops, owned, hop_list


@dataclass
class NativePlanModel:
    """``NativeDP``'s plan: the dp owner of every whole matrix, each rank's flat AdamW share and the
    buckets (per tp rank, as TP-local sizes may differ)."""

    owners: dict[int, int]  # param index -> dp rank
    imbalance: float
    give: dict[int, list[int]]  # t -> flat elements per dp rank
    segments: dict[int, list[int]]  # t -> segment length of every bucket


def native_plan(model: Model, hold: list[Holding], par: Parallel, costs: list[int | None],
                settings: Settings) -> NativePlanModel:
    """``NativeDP``'s own planning (``comm.native.plan_streams``) on the tensors in the runtime's order,
    once per tp rank (TP-local sizes may differ)."""
    order = group_order(model)
    give, segs = {}, {}
    window = max(1, settings.bucket_bytes // settings.param_bytes)
    for t in range(par.tp):
        size = [int(hold[i].numel[t]) for i in order]  # rank (d=0, t) holds the TP-local tensor
        at, imb, give[t] = plan_streams(size, [costs[i] for i in order], par.dp)
        stream = list(give[t])
        for j, o in at.items():
            stream[o] += size[j]
        segs[t] = segments(max(stream), window)
    return NativePlanModel({order[j]: o for j, o in at.items()}, imb, give, segs)


@dataclass
class Traffic:
    """The predicted step of one optimizer on one pipeline stage: collectives, owner plans, and per
    stage rank the Newton–Schulz FLOPs, the state, and the elements stepped and owned."""

    model: Model
    parallel: Parallel
    optimizer: str
    settings: Settings
    calls: list[Call]
    plans: list[OwnerPlanModel | SplitPlanModel]
    native: NativePlanModel | None
    ns_flops: Tensor  # (R,) float64
    state_bytes: Tensor  # (R,)
    matrix_elements: Tensor  # (R,) matrix elements this rank keeps momentum for and updates
    adamw_elements: Tensor  # (R,) elements AdamW steps here
    owned_elements: Tensor  # (R,) elements of the whole matrices this rank transforms
    laid_elements: Tensor  # (R,) held elements of the laid-out matrices (statistics, moves)
    ns_rounds: Tensor | None = None  # owner_overlap: (rounds, R) Newton–Schulz FLOPs of each round's stacks
    agreement_rides: bool = False  # on the first statistics all-reduce: the momentum is stored in a pass of its own

    def comm_stats(self, rank: int) -> dict[str, dict[str, int]]:
        """What ``opt.comm_stats()`` returns on stage rank ``rank`` after a step."""
        out: dict[str, dict[str, int]] = {}
        for c in self.calls:
            if int(c.calls[rank]) == 0:
                continue
            e = out.setdefault(c.group, {"calls": 0, "bytes": 0, "sent": 0})
            e["calls"] += int(c.calls[rank])
            e["bytes"] += int(c.bytes[rank])
            e["sent"] += int(c.sent[rank])
        return out

    def sent(self, groups: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> Tensor:
        """(R,) bytes each rank sends per step over ``groups`` (None: all but ``exclude``)."""
        total = torch.zeros(self.parallel.stage_ranks, dtype=INT)
        for c in self.calls:
            if (groups is None and c.group not in exclude) or (groups is not None and c.group in groups):
                total += c.sent
        return total

    @property
    def imbalance(self) -> float | None:
        """The planners' imbalance on Newton–Schulz cost (worst owner plan; native: also the dp owners)."""
        values = [p.imbalance for p in self.plans if len(p.ranks) > 1]
        if self.native is not None and registry.is_spectral(self.optimizer):
            values.append(self.native.imbalance)
        return max(values) if values else None


def traffic(model: Model, par: Parallel, optimizer: str, settings: Settings = Settings()) -> Traffic:
    """reg_dist's ``optimizer`` (a registry name: "reg", "muon", "muoneq", "normuon") on ``model`` laid out
    as ``par`` (one pipeline stage: pass ``model.stage(pp, i)`` for pp > 1). The algorithm's stages
    (``registry.stages``) say what travels: statistic stages packed reductions, a spectral one owner moves."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if par.pp == 1:
        par.check(model)
    R, tp, dp = par.stage_ranks, par.tp, par.dp
    r = torch.arange(R, dtype=INT)
    d_of, t_of = r // tp, r % tp
    node = r // par.gpus_per_node  # stage 0's ranks (stages are contiguous blocks of ranks)
    hold = holdings(model, par)
    pb, sb, mb = settings.param_bytes, settings.stat_bytes, settings.move_bytes
    calls = _Calls(R)
    everyone = torch.ones(R, dtype=torch.bool)
    matrices = [h for h in hold if h.param.algorithm == MATRIX]
    laid = [h for h in hold if h.laid]

    # who steps each matrix (native: its dp owner's ranks), and the native mode's own collectives
    native = None
    steps = {h.index: everyone for h in hold}
    stages = registry.stages(optimizer, iters=settings.iters, scale=settings.scale)
    spectral = registry.spectral(stages)
    first = next((k for k, s in enumerate(stages) if isinstance(s, registry.Spectral)), len(stages))
    before, after = stages[:first], stages[first + 1:]  # statistic stages before and after the owner moves
    norms = settings.scale == "rms" and not registry.scaled_on_owner(stages)

    whole = bool(registry.get(optimizer).cls.row_state_keys)  # its statistics kept whole: never shared

    def floats(stage: registry.Statistic):
        if whole:
            return lambda h, g: torch.full_like(h.numel, h.param.logical[0] + stage.cols * len(h.param.blocks)
                                                * h.param.logical[1])
        return lambda h, g: h.shared_floats(g, stage.cols, par)

    if par.zero == 1:
        if not spectral:
            costs = [h.param.numel if h.param.algorithm == MATRIX else None for h in hold]
        else:
            costs = [h.param.view[0] * newton_schulz_cost(*h.param.view[1:]) if h.param.algorithm == MATRIX
                     else None for h in hold]
        native = native_plan(model, hold, par, costs, settings)
        for i, o in native.owners.items():
            steps[i] = d_of == o
        for t, segs in native.segments.items():
            for seg, n in sorted(_counts(segs).items()):
                nbytes = torch.full((R,), dp * seg * pb, dtype=INT)
                for kind in ("reduce_scatter", "all_gather"):
                    calls.add("dp", kind, dp, t_of == t, nbytes, count=n)

    inner = None if whole else two_level(laid, par)
    sizes = {"dp": dp, "shard": par.shard, "tp": tp}
    # the non-finite agreement rides on the first statistics all-reduce (``comm.agree.Agreement``) where the
    # algorithm begins with statistics, their groups reach every rank of the stage and no rank holds more
    # than RIDE_ELEMENTS of the split matrices (``carries_agreement``)
    split_matrices = [h for h in laid if h.dtensor and h.dims]
    ride = (isinstance(stages[0], registry.Statistic) and bool(split_matrices)
            and ((par.zero == 3 and not par.hsdp) or (par.zero == 0 and dp == 1))
            and bool((sum(h.numel for h in split_matrices) <= RIDE_ELEMENTS).all()))

    def stats(members: list[Holding], floats, part: Tensor, stage: registry.Statistic | None = None,
              fold: bool = False, carry: bool = False) -> None:
        """One packed all-reduce per group name splitting any of ``members`` that ``part``'s ranks step
        (``fold``: each column entry twice, the norms' sums beside the statistics; ``carry``: one entry more,
        the agreement); for a ``stage``'s statistics where ``inner`` is set, ``comm.statistics.reduce_two_level``:
        the outer group carries each rank's slice of the replicated column sums (a column-parallel
        matrix's, whole on every tp rank) and one all-gather over tp hands the slices round."""
        names = sorted({g for h in members if h.dtensor for g in h.dims})
        elems = {g: part.to(INT) * carry for g in names}
        runs = []  # (width, outer-shared) of every replicated fused matrix, in the order of the vectors
        outer = next((g for g in names if g != inner), None)
        for h in members:
            if not h.dtensor:
                continue
            on = steps[h.index] & part
            local = h.rows_local(par)
            for g in h.dims:  # a matrix whose rows tp splits sends its norms' sums once its rows are summed
                twice = fold and (inner is None or stage is None or g != inner or local)
                elems[g] += floats(h, g) * (2 if twice else 1) * on
            if inner is not None and stage is not None and stage.cols and inner in h.dims and local:
                shared = h.shared_blocks(outer, par) if outer in h.dims else torch.zeros_like(h.blocks, dtype=torch.bool)
                for b in range(len(h.param.blocks)):  # every column of it, on every rank alike
                    runs.append((h.width * on, shared[b] & on))
        if runs:
            total = sum(w for w, _ in runs)
            chunk = (total + tp - 1) // tp
            lo, hi = torch.minimum(t_of * chunk, total), torch.minimum((t_of + 1) * chunk, total)
            start = torch.zeros(R, dtype=INT)
            for w, shared in runs:  # the outer group reduces this rank's slice of them alone
                mine = (torch.minimum(hi, start + w) - torch.maximum(lo, start)).clamp(min=0)
                elems[outer] -= (w - mine) * shared * (2 if fold else 1)
                start += w
        for g in names:
            calls.add(g, "all_reduce", sizes[g], elems[g] > 0, elems[g] * sb)
        if runs and bool((total > 0).any()):
            calls.add(inner, "all_gather", tp, total > 0, tp * chunk * sb)

    plans: list[OwnerPlanModel] = []
    ns_rounds: list[Tensor] = []  # overlapped plans: (rounds, R) Newton–Schulz FLOPs
    flops = torch.zeros(R, dtype=torch.float64)
    owned = torch.zeros(R, dtype=INT)
    if not spectral:
        # ranks whose split matrices all have whole rows, or that reduce tp first: the last pass carries the
        # norms' column sums (then a norm reduction over tp alone, for the matrices it splits)
        folds = torch.zeros(R, dtype=torch.bool)
        if norms and any(s.fold for s in before):
            folds = everyone.clone()
            for h in laid:
                if inner is None and h.dtensor and not h.rows_local(par):
                    folds &= ~steps[h.index]
        for j, stage in enumerate(before):
            for k in range(stage.passes):
                carry = ride and j == k == 0
                if stage.fold and k == stage.passes - 1 and folds.any():
                    stats(laid, floats(stage), folds, stage, fold=True, carry=carry)
                    stats(laid, floats(stage), ~folds, stage, carry=carry)
                else:
                    stats(laid, floats(stage), everyone, stage, carry=carry)
        if norms:
            if inner is not None:
                stats(laid, lambda h, g: len(h.param.blocks) * (g == inner), folds)
            stats(laid, lambda h, g: len(h.param.blocks), ~folds)
    else:
        def sender(h: Holding, dims: tuple[str, ...]) -> Tensor:
            """Holders that send a piece: of identical copies (the group's dims that do not split the
            parameter), the lowest rank's."""
            out = h.numel > 0
            if "dp" in dims and "dp" not in h.dims:
                out = out & (d_of == 0)
            if "replicate" in dims:  # HSDP: every parameter a copy on each replica
                out = out & (d_of < par.shard)
            if "tp" in dims and "tp" not in h.dims:
                out = out & (t_of == 0)
            return out

        instances, local = [], []  # (name, group ranks, entries); single-process matrices
        if par.zero == 3:  # every matrix a DTensor on the root mesh: one plan over all of it
            dims = par.dp_dims + (("tp",) if tp > 1 else ())
            instances.append(("×".join(dims), r, [(h, sender(h, dims)) for h in matrices]))
        elif tp == 1:
            local = matrices
        elif par.zero == 0:  # TP DTensors on the root (dp, tp) mesh (a 1-D tp mesh when dp = 1); the rest plain
            dims = ("tp",) if dp == 1 else ("dp", "tp")
            instances.append(("×".join(dims), r, [(h, sender(h, dims)) for h in matrices if "tp" in h.dims]))
            local = [h for h in matrices if "tp" not in h.dims]
        else:  # native with tp: each dp rank's owned matrices over its tp group (plain copies moved once)
            for d in range(dp):
                mine = [(h, sender(h, ("tp",))) for h in matrices if native.owners[h.index] == d]
                if mine:
                    instances.append(("tp", d * tp + torch.arange(tp, dtype=INT), mine))
        for name, ranks, entries in instances:
            if not entries:
                continue
            part = torch.zeros(R, dtype=torch.bool)
            part[ranks] = True

            def spread(x: Tensor, ranks: Tensor = ranks) -> Tensor:
                out = torch.zeros(R, dtype=INT)
                out[ranks] = x
                return out

            def moves(v: dict[str, Tensor], name: str = name, ranks: Tensor = ranks, part: Tensor = part) -> None:
                for a in ("1", "2"):
                    sent = spread((v["send" + a] - v["self" + a]) * mb)
                    far_s, far_r = spread(v["send" + a + "_far"] * mb), spread(v["recv" + a + "_far"] * mb)
                    extra = {"send_far": far_s, "send_near": sent - far_s, "recv_far": far_r,
                             "recv_near": spread(v["recv" + a] * mb) - far_r, "peers": spread(v["peers" + a])}
                    calls.add(name, "all_to_all", len(ranks), part, spread(v["send" + a] * mb), sent=sent, a2a=extra)

            g = settings.owner_group_size or len(ranks)
            grouped = g != len(ranks) or settings.owner_overlap
            split = split_plan(entries, ranks, name, node, settings) if len(ranks) > 1 else None
            owner_modes = [f"{k}={getattr(settings, k)!r}" for k, default in (
                ("owner_replicas", "auto"), ("owner_overlap", False)) if getattr(settings, k) != default]
            if split is not None and owner_modes:
                raise ValueError(f"ns_split={settings.ns_split!r} splits the Newton–Schulz of matrices over {name!r}, "
                                 f"which cannot be combined with {', '.join(owner_modes)} (as the engine refuses): "
                                 "pass ns_split='off' to keep the owner modes")
            for j, stage in enumerate(before):
                for k in range(stage.passes):
                    stats([h for h, _ in entries], floats(stage), part, stage, carry=ride and j == k == 0)
            def add_hops(hops: list, ranks: Tensor = ranks, part: Tensor = part) -> None:
                for hop_name, size, k, phase, hop in hops:
                    if not bool((hop.sent > 0).any()):
                        continue  # everything stays on its rank: no collective
                    far_s, far_r, sent = spread(hop.send_far * mb), spread(hop.recv_far * mb), spread(hop.sent * mb)
                    extra = {"send_far": far_s, "send_near": sent - far_s, "recv_far": far_r,
                             "recv_near": spread(hop.recv * mb) - far_r, "peers": spread(hop.peers())}
                    calls.add(hop_name, "all_to_all", size, part, spread(hop.buf * mb), sent=sent, a2a=extra,
                              phase=(k, phase) if settings.owner_overlap else None)

            if grouped and split is None:  # owner groups, rounds: ``grouped_plan``
                group_plans, plan_flops, plan_owned, hops = grouped_plan([h for h, _ in entries], ranks, name, node,
                                                                         settings, g)
                plans.extend(group_plans)
                flops[ranks] += plan_flops.sum(0)
                owned[ranks] += plan_owned
                if settings.owner_overlap:
                    rounds = torch.zeros(len(plan_flops), R, dtype=torch.float64)
                    rounds[:, ranks] = plan_flops
                    ns_rounds.append(rounds)
                add_hops(hops)
            else:
                plan = split if split is not None else owner_plan(entries, ranks, name, node, settings)
                plans.append(plan)
                flops[ranks] += plan.flops
                owned[ranks] += plan.owned
            if split is not None:  # always its two all-to-alls (or their hops), and per run and shape its all-reduces
                if split.hops is not None:
                    add_hops(split.hops)
                else:
                    moves(split.vectors)
                norm_bytes = 8 if 8 in (settings.param_bytes, settings.ns_bytes) else 4
                for first, k, (m, n), b in split.reductions:
                    run = torch.zeros(R, dtype=torch.bool)
                    run[ranks[first:first + k]] = True
                    calls.add(f"split{k}", "all_reduce", k, run, torch.full((R,), b * norm_bytes, dtype=INT))
                    a = min(m, n)
                    for kind, elements in (("all_reduce", a * a), ("all_gather", k * -(-a // k) * a)):
                        nbytes = torch.full((R,), b * elements * settings.ns_bytes, dtype=INT)
                        calls.add(f"split{k}", kind, k, run, nbytes, count=settings.ns_steps)
            elif not grouped and plan.moves and len(ranks) > 1:
                moves(plan.vectors)
            members = [h for h, _ in entries]
            for stage in after:
                for _ in range(stage.passes):
                    stats(members, floats(stage), part, stage)
            if after and norms:
                stats(members, lambda h, g: len(h.param.blocks), part)
        for h in local:  # single-process: every rank stepping it transforms its whole copy
            flops += steps[h.index] * float(sum(ns_flops(m, n, settings.ns_steps) for m, n in h.param.blocks))
            owned += steps[h.index] * h.param.numel
    if (laid or native is not None) and not ride:
        four = torch.full((R,), 4, dtype=INT)
        calls.add("world", "all_reduce", par.world, everyone, four)

    mat_el, adam_el, laid_el = (torch.zeros(R, dtype=INT) for _ in range(3))
    for h in hold:
        if h.param.algorithm == MATRIX:
            mat_el += h.numel * steps[h.index]
            if h.laid:
                laid_el += h.numel * steps[h.index]
        elif native is None:
            adam_el += h.numel
    if native is not None:
        for t, give in native.give.items():
            adam_el[t_of == t] = torch.tensor(give, dtype=INT)[d_of[t_of == t]]
    state = mat_el * pb + adam_el * 2 * pb
    rounds = None
    if ns_rounds:  # plans over disjoint ranks (native tp groups) may have different numbers of rounds
        rounds = torch.zeros(max(len(x) for x in ns_rounds), R, dtype=torch.float64)
        for x in ns_rounds:
            rounds[: len(x)] += x
    return Traffic(model, par, optimizer, settings, calls.list(), plans, native, flops, state, mat_el, adam_el,
                   owned, laid_el, rounds, ride)


def _counts(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
