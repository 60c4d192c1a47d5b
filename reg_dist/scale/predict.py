"""Predictions per optimizer step: traffic, state, Newton–Schulz work, memory traffic, and the
optimizer's time as a fraction of forward+backward, for AdamW (ZeRO-1), REG, Muon and MuonEq.

    forward+backward   6 · N · B FLOPs (N: ``Model.flop_params``, B: tokens per step; attention's
                       own FLOPs left out), spread over all GPUs at ``mfu`` of the BF16 peak
    Newton–Schulz      the busiest rank's owned matrices (``traffic``: the real planner), 5 steps of
                       4a²b + 2a³ FLOPs each, at ``ns_efficiency`` of the BF16 peak
    memory traffic     element-wise passes over HBM, per element (fp32 parameters: p = 4 bytes,
                       bf16 moves: q = 2), counted from the code:
                         momentum  read G, M; write M, N                         4p
                                   M stored apart where the agreement rides on the
                                   statistics (read G, M; write M), per laid element     3p
                         update    W·(1 − lr·wd), then W − lr·U                  5p
                         RACS      per iteration: |x|² sums (read), scale (r/w)  3p; "rms": norms + scale 3p
                         equilibration (MuonEq)                                  3p
                         owner moves, holder side: pack N, unpack U              p + 3q
                         owner side, per owned element: unpack, cast, scale, pack  2p + 4q
                         AdamW (fused): read p, g, m, v; write p, m, v           7p
    collectives        ``timing`` (alpha–beta), every optimizer collective in sequence, each as
                       slow as its slowest rank; the data-parallel gradient/parameter sync
                       (ZeRO-1's reduce-scatter + all-gather, the native mode's buckets) is
                       reported apart, as every optimizer pays it (it overlaps the backward): only
                       what the native mode's buckets take beyond ZeRO-1's counts to the optimizer
    optimizer time     memory + Newton–Schulz + optimizer collectives, on the busiest rank
    fits               parameters + gradients + optimizer state + the step's scratch ≤ HBM
                       (activations not counted). Scratch: N (p per stepped matrix element), the
                       owner moves' buffers (2q per held, q + 2p per owned element), the native
                       mode's bucket buffers ((dp + 1) × segment × p)

AdamW (ZeRO-1) is the reference: its two moments sharded over dp, its traffic the reduce-scatter of
gradients and all-gather of parameters over dp (2·(dp−1)/dp of the rank's replica bytes, as in
benchmarks/comm.py), no optimizer collectives.
"""

import math
from dataclasses import asdict, dataclass, field

import torch

from ..optim import registry
from .cluster import Cluster
from .parallel import Parallel
from .shapes import MATRIX, Model
from .timing import call_time, ring_collective, span
from .traffic import OPTIMIZERS, Settings, Traffic, holdings, ns_flops, traffic

ALL = ("adamw", *OPTIMIZERS)
NAMES = {"adamw": "AdamW (ZeRO-1)", **{name: e.cls.__name__ for name, e in registry.ALGORITHMS.items()}}


@dataclass
class Prediction:
    """One optimizer, one model, one layout, one cluster: per optimizer step (bytes, seconds, FLOPs);
    "per rank" values are the busiest rank's unless named rank 0."""

    optimizer: str
    model: str
    layout: str
    gpus: int
    tokens_per_step: int
    comm_rank0: dict  # group -> {"calls", "bytes", "sent"}, as comm_stats() on rank 0
    comm_max_sent: dict  # group -> most bytes any rank sends
    optimizer_sent: int  # optimizer collectives, busiest rank
    dp_sync_sent: int  # the data-parallel gradient/parameter sync (native: measured by the model; else ZeRO-1's)
    zero1_sent: int  # AdamW ZeRO-1's, per rank
    comm_ratio: float | None  # (dp sync + optimizer) / ZeRO-1
    state_bytes: int
    ns_flops_busiest: float
    ns_flops_total: float
    ns_imbalance: float | None  # busiest / mean − 1 over the stage's ranks
    planner_imbalance: float | None  # the owner plans' own (LPT on m·n·min(m, n))
    matrices: int
    ranks_with_ns: int
    max_a2a_peers: int
    racs_bytes: int  # REG's RACS (and rms-scale) memory traffic on the busiest rank
    memory_bytes: int  # all element-wise memory traffic on the busiest rank
    fwd_bwd_s: float
    memory_s: float
    ns_s: float
    comm_s: float  # optimizer collectives (+ the native dp sync's excess over ZeRO-1's)
    dp_sync_s: float
    optimizer_s: float
    overhead: float  # optimizer_s / fwd_bwd_s
    ideal_ns_overhead: float  # total Newton–Schulz FLOPs / total forward+backward FLOPs (perfect balance)
    hbm_bytes: int  # parameters + gradients + state + scratch per rank
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _replica_elements(model: Model, par: Parallel) -> int:
    """Elements of one data-parallel replica of a rank's parameters: TP-split tensors divided by tp
    (benchmarks/comm.py's definition)."""
    return sum(p.numel // (par.tp if p.tp is not None and par.tp > 1 else 1) for p in model.params)


def batch_tokens(model: Model, par: Parallel, tokens: int | None = None) -> int:
    """Tokens per step: ``tokens``, or the model's reference batch, raised to one sequence per dp replica."""
    return tokens if tokens is not None else max(model.batch_tokens, par.dp * model.seq_len)


def predict(model: Model, par: Parallel, cluster: Cluster, optimizer: str, *, settings: Settings = Settings(),
            mfu: float = 0.4, ns_efficiency: float = 0.5, tokens: int | None = None) -> Prediction:
    """What ``optimizer`` ("adamw" or a registry name) costs per step (see the module docstring);
    with pp > 1, on the pipeline stage where it costs the most."""
    if optimizer not in ALL:
        raise ValueError(f"optimizer must be one of {ALL}, got {optimizer!r}")
    for name, value in (("mfu", mfu), ("ns_efficiency", ns_efficiency)):
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    if par.gpus_per_node > cluster.gpus_per_node:
        raise ValueError(f"the layout puts {par.gpus_per_node} GPUs per node on {cluster.name}, which has "
                         f"{cluster.gpus_per_node}")
    par.check(model)
    stages = [model] if par.pp == 1 else _distinct_stages(model, par.pp)
    preds = [_predict_stage(model, s, par, cluster, optimizer, settings, mfu, ns_efficiency, tokens) for s in stages]
    return max(preds, key=lambda p: (p.optimizer_s, p.hbm_bytes))


def _distinct_stages(model: Model, pp: int) -> list[Model]:
    out, seen = [], set()
    for i in range(pp):
        s = model.stage(pp, i)
        key = tuple((p.shape, p.algorithm, p.tp, p.fused) for p in s.params)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _predict_stage(full: Model, model: Model, par: Parallel, cluster: Cluster, optimizer: str, settings: Settings,
                   mfu: float, ns_eff: float, tokens: int | None) -> Prediction:
    pb, mb = settings.param_bytes, settings.move_bytes
    B = batch_tokens(full, par, tokens)
    fb_flops = 6 * full.flop_params * B / par.world
    t_fb = fb_flops / (cluster.bf16_flops * mfu)
    replica = _replica_elements(model, par)
    zero1 = round(2 * (par.dp - 1) / par.dp * replica * pb)
    hold = holdings(model, par)
    params_here = torch.stack([h.numel for h in hold]).sum(0)  # (R,) parameter elements each rank keeps
    total_ns = float(sum(ns_flops(m, n, settings.ns_steps) for p in model.params if p.algorithm == MATRIX
                         for m, n in p.blocks))
    ideal = total_ns * par.pp / (6 * full.flop_params * B)  # every stage's matrices, over the whole model's FLOPs
    dp_sync_s = _zero1_time(replica * pb, par, cluster, settings)
    notes: list[str] = []
    if par.tp_spans_nodes:
        notes.append(f"tp spans nodes: tp={par.tp} on nodes of {par.gpus_per_node}, so tensor-parallel traffic (the "
                     f"model's activations, not modelled here, and the optimizer's tp statistics and moves) crosses "
                     f"the network. Mitigation: tp at most the GPUs of a node, pipeline stages across nodes")

    if optimizer == "adamw":
        shard = math.ceil(replica / par.dp)
        state = 2 * pb * shard
        mem = 7 * pb * shard
        resident = int(params_here.max()) * 2 * pb + state
        t_mem = mem / cluster.hbm_bytes_per_s
        buckets = math.ceil(shard * pb / settings.bucket_bytes) if par.dp > 1 else 0
        comm = {"dp": {"calls": 2 * buckets, "bytes": 2 * replica * pb, "sent": zero1}} if buckets else {}
        return Prediction(
            optimizer, full.name, par.describe(), par.world, B, comm,
            {"dp": zero1} if buckets else {}, 0, zero1, zero1, 1.0 if zero1 else None, state, 0.0, total_ns, None, None,
            model.matrices, 0, 0, 0, mem, t_fb, t_mem, 0.0, 0.0, dp_sync_s, t_mem, t_mem / t_fb, ideal,
            resident, resident <= cluster.hbm_bytes, notes)

    tr: Traffic = traffic(model, par, optimizer, settings)
    R = par.stage_ranks
    dp_kinds = ("reduce_scatter", "all_gather")
    sync = torch.zeros(R, dtype=torch.int64)
    opt_sent = torch.zeros(R, dtype=torch.int64)
    t_comm = torch.zeros(R, dtype=torch.float64)
    max_peers = 0
    rounds = len(tr.ns_rounds) if tr.ns_rounds is not None else 0
    moves = torch.zeros(2, rounds + 2, R, dtype=torch.float64)  # overlapped moves: there / back of round k at k + 1
    for c in tr.calls:
        if c.group == "dp" and c.kind in dp_kinds:
            sync += c.sent
            continue
        opt_sent += c.sent
        t, _ = call_time(c, par, cluster)
        if c.phase is not None:
            moves[0 if c.phase[1] == "there" else 1, c.phase[0] + 1] += t
        else:
            t_comm += t
        if c.a2a is not None:  # peers per all-to-all
            max_peers = max(max_peers, int((c.a2a["peers"] / c.calls.clamp(min=1)).max()))
    excess_s, bucket_scratch = 0.0, 0
    if tr.native is not None:  # the native mode's own dp sync: what it costs beyond ZeRO-1's is the optimizer's
        dp_sync = int(sync.max())
        native_s = sum(float(call_time(c, par, cluster)[0].max()) for c in tr.calls
                       if c.group == "dp" and c.kind in dp_kinds)
        excess_s, dp_sync_s = max(0.0, native_s - dp_sync_s), native_s
        segment = max((max(s) for s in tr.native.segments.values() if s), default=0)
        bucket_scratch = (par.dp + 1) * segment * pb  # a bucket's send (dp × segment) and own segment
    else:
        dp_sync = zero1
    opt_max = int(opt_sent.max())
    ratio = (dp_sync + opt_max) / zero1 if zero1 else None

    # element-wise memory traffic, per rank
    mat, laid, owned, adam = tr.matrix_elements, tr.laid_elements, tr.owned_elements, tr.adamw_elements
    stages = registry.stages(optimizer, iters=settings.iters, scale=settings.scale)
    spectral = registry.spectral(stages)
    passes = sum(s.passes for s in stages if isinstance(s, registry.Statistic))  # each: read for sums, scale
    passes += 1 if settings.scale == "rms" and not registry.scaled_on_owner(stages) else 0  # the norms
    racs = 3 * passes * pb * mat if not spectral else 0 * mat
    per = mat * (4 + 5) * pb + adam * 7 * pb + racs + laid * 3 * pb * tr.agreement_rides
    if spectral:
        per = per + laid * (pb + 3 * mb) + owned * (2 * pb + 4 * mb) + laid * 3 * passes * pb
    t_mem = per.to(torch.float64) / cluster.hbm_bytes_per_s
    t_ns = tr.ns_flops / (cluster.bf16_flops * ns_eff)
    t_comm = t_comm + excess_s
    if rounds:  # round k transformed while round k + 1 arrives and round k − 1 returns: only the rest is exposed
        n = tr.ns_rounds / (cluster.bf16_flops * ns_eff)
        there, back = moves[0], moves[1]
        pipe = there[1] + back[rounds] + torch.maximum(n, there[2:] + back[:rounds]).sum(0)
        t_comm = t_comm + pipe - n.sum(0)
    t_opt = t_mem + t_ns + t_comm
    busiest = int(torch.argmax(t_opt))
    scratch = mat * pb + (laid * 2 * mb + owned * (mb + 2 * pb) if spectral else 0) + bucket_scratch
    resident = params_here * 2 * pb + tr.state_bytes + scratch
    hbm = int(resident.max())

    # where it stops scaling
    matrices = model.matrices
    working = int((tr.ns_flops > 0).sum())
    mean_ns = total_ns / R
    ns_imb = float(tr.ns_flops.max()) / mean_ns - 1 if spectral and mean_ns else None
    if spectral:
        biggest = max(ns_flops(m, n, settings.ns_steps) for p in model.params if p.algorithm == MATRIX
                      for m, n in p.blocks)
        if matrices < R and float(tr.ns_flops.max()) >= biggest:
            notes.append(f"owner imbalance: {matrices} matrices over {R} ranks, {R - working} ranks transform "
                         f"nothing; the busiest rank's Newton–Schulz is at least one whole largest matrix "
                         f"({biggest / 1e12:.1f} TFLOP, {biggest / (cluster.bf16_flops * ns_eff) * 1e3:.0f} ms): "
                         f"{float(t_ns.max()) / t_fb:.1%} of forward+backward against {ideal:.2%} if perfectly "
                         f"split. Mitigation: split the largest matrices' Newton–Schulz over a few ranks "
                         f"(distributed NS with Gram all-reduces, as Megatron's 'distributed' mode), or run "
                         f"Muon on dp sub-groups with replicated work")
        if max_peers > 1024:
            a = cluster.ib_latency_s
            notes.append(f"all-to-all latency: up to {max_peers} peers per rank per move, ~{max_peers * a * 1e3:.0f} ms "
                         f"per all-to-all at {a * 1e6:.0f} µs each. Mitigation: owner groups (owner_group_size: "
                         f"two-hop moves, at most max(g, P/g) − 1 peers per all-to-all)")
    if passes:
        stats = sum(int(c.bytes.max()) for c in tr.calls if c.kind == "all_reduce" and c.group != "world")
        shard_bytes = int(laid.max()) * pb
        if shard_bytes and stats > shard_bytes:
            notes.append(f"statistics traffic: the all-reduces carry {stats / 1e6:.0f} MB per rank, more than its "
                         f"{shard_bytes / 1e6:.0f} MB of matrix shards: a row shard needs every column sum of its "
                         f"matrix, so the n column sums per matrix do not shrink with dp (only the rows do). " +
                         ("Mitigation: reduce-scatter the column sums over the tensor-parallel group first, "
                          "all-reduce 1/tp of them over dp, all-gather over tp" if par.tp > 1 else
                          "Without tensor parallelism that is the floor of an exact RACS on row shards"))
    if tr.native is not None and dp_sync > 1.05 * zero1:
        biggest = max(h.numel // (par.tp if h.tp is not None and par.tp > 1 else 1) for h in model.params
                      if h.algorithm == MATRIX)
        notes.append(f"native padding: the dp sync sends {dp_sync / zero1:.2f}× ZeRO-1's bytes, as whole-tensor "
                     f"owners cannot level the streams (the largest matrix tensor, {biggest / 1e6:.0f}M elements, "
                     f"against a mean share of {replica / par.dp / 1e6:.0f}M per rank), and every bucket is dp × the "
                     f"longest stream. Mitigation: keep dp well below the number of matrix tensors, own expert stacks "
                     f"per expert, and use FSDP2 (zero 3) beyond")
    if hbm > cluster.hbm_bytes:
        notes.append(f"does not fit: {hbm / 1e9:.0f} GB per rank (parameters, gradients, state, scratch) > "
                     f"{cluster.hbm_bytes / 1e9:.0f} GB, before activations. Mitigation: more ranks under FSDP2, "
                     f"or tensor / pipeline parallelism")
    peers = max_peers
    return Prediction(
        optimizer, full.name, par.describe(), par.world, B, tr.comm_stats(0),
        {c.group: int(c.sent.max()) for c in tr.calls}, opt_max, dp_sync, zero1, ratio,
        int(tr.state_bytes.max()), float(tr.ns_flops.max()), total_ns, ns_imb, tr.imbalance, matrices, working,
        peers, int(racs.max()) if not spectral else 0, int(per.max()), t_fb, float(t_mem[busiest]),
        float(t_ns[busiest]), float(t_comm[busiest]), dp_sync_s, float(t_opt[busiest]), float(t_opt[busiest]) / t_fb,
        ideal, hbm, hbm <= cluster.hbm_bytes, notes)


def _zero1_time(replica_bytes: int, par: Parallel, cluster: Cluster, settings: Settings) -> float:
    """ZeRO-1's reduce-scatter of gradients + all-gather of parameters over dp, in buckets."""
    s = span("dp", par)
    per_rank = math.ceil(replica_bytes / par.dp)
    full, last = divmod(per_rank, settings.bucket_bytes)
    t = full * 2 * ring_collective(settings.bucket_bytes * par.dp, s, cluster)
    return t + (2 * ring_collective(last * par.dp, s, cluster) if last else 0.0)


def predict_all(model: Model, par: Parallel, cluster: Cluster, **kwargs) -> dict[str, Prediction]:
    """``predict`` for AdamW (ZeRO-1), REG, Muon and MuonEq."""
    return {name: predict(model, par, cluster, name, **kwargs) for name in ALL}


def essential_ai(model: Model, tokens: int) -> float:
    """Essential AI's rule of thumb: Newton–Schulz ≈ 5·d/B of forward+backward (d the model width,
    B tokens per step) — "Practical Efficiency of Muon for Pretraining", arXiv 2505.02222."""
    return 5 * model.d_model / tokens
