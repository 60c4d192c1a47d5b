"""The scale model (``reg_dist.scale``) against measured runs: on every layout the tests can run here
(gloo, forked ranks: FSDP2 dp 2 and 4, tensor parallel 2, FSDP2 × TP 2 × 2 (with and without the
two-level statistics reduction), replicated 2 × TP 2,
native (2, 1) and (2, 2), and Newton–Schulz split over runs of 2 and 4 ranks),
its predicted bytes, wire bytes ("sent") and calls per process group equal ``opt.comm_stats()`` of
REG, Muon and MuonEq exactly, on every rank, and its owner plans are the optimizer's own. The same
holds, without running anything, for the GPT-2-small measurements in benchmarks/results/comm.json.
Plus: shapes and layouts that cannot exist are errors that say why."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from multiproc import run_ranks
from reg_dist import mark_fused
from reg_dist.optim.registry import ALGORITHMS
from reg_dist.scale import Cluster, Model, Param, Parallel, Settings, cluster, predict, preset, traffic
from reg_dist.scale.shapes import from_module
from sharded import QKV, Net, data, fsdp, fsdp_x_tp, hsdp, loss_of, native, tp

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = {name: entry.cls for name, entry in ALGORITHMS.items()}  # every algorithm of the registry
TP_PLAN = {"up": "colwise", "down": "rowwise", "qkv": "colwise", "proj": "rowwise"}  # sharded._tp_plan (fused)


def _wrapper(fn, **kwargs):
    def shard(model, rank, world):
        dp_rank, dp_size = fn(model, rank, world)
        return dict(kwargs), dp_rank, dp_size
    return shard


def _split(shard, size):
    """``shard``, and a Newton–Schulz split over runs of ``size`` ranks forced (comm.split)."""
    def split(model, rank, world):
        kwargs, dp_rank, dp_size = shard(model, rank, world)
        return {**kwargs, "ns_split": "force", "split_group_size": size}, dp_rank, dp_size
    return split


def _replicated_x_tp(model, rank, world):
    """DDP-style replicas (no data sharding) × tensor parallel 2 on a 2-D mesh."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel(),
                                           "qkv": ColwiseParallel(), "proj": RowwiseParallel()})
    return {}, rank // 2, 2


# name: (shard, Parallel, fused Net, TP plan the model sees[, owner groups: Settings fields, passed to Muon & co.])
LAYOUTS = {
    "FSDP2 dp=2": (_wrapper(fsdp), Parallel(1, 2, zero=3), True, {}),
    "FSDP2 dp=4": (_wrapper(fsdp), Parallel(1, 4, zero=3), True, {}),
    "TP 2": (_wrapper(tp), Parallel(1, 2, tp=2, zero=0), True, TP_PLAN),
    "FSDP2 2 × TP 2": (_wrapper(fsdp_x_tp), Parallel(1, 4, tp=2, zero=3), True, TP_PLAN),
    # no fused QKV (TP 2 cuts it across the q/k/v blocks): tp reduced first, column sums in slices over dp
    "FSDP2 2 × TP 2, two-level statistics": (_wrapper(fsdp_x_tp), Parallel(1, 4, tp=2, zero=3), False,
                                             {"up": "colwise", "down": "rowwise"}),
    "replicated 2 × TP 2": (_replicated_x_tp, Parallel(1, 4, tp=2, zero=0), True, TP_PLAN),
    "native (2, 1)": (native(2, 1), Parallel(1, 2, tp=1, zero=1), True, {}),
    "native (2, 2)": (native(2, 2), Parallel(1, 4, tp=2, zero=1), True, {"up": "colwise", "down": "rowwise"}),
    "FSDP2 dp=4, NS split 2": (_split(_wrapper(fsdp), 2), Parallel(1, 4, zero=3), True, {}),
    "FSDP2 2 × TP 2, NS split 4": (_split(_wrapper(fsdp_x_tp), 4), Parallel(1, 4, tp=2, zero=3), True, TP_PLAN),
    "native (2, 2), NS split 2": (_split(native(2, 2), 2), Parallel(1, 4, tp=2, zero=1), True,
                                  {"up": "colwise", "down": "rowwise"}),
    "FSDP2 dp=4, owner groups of 2": (_wrapper(fsdp), Parallel(1, 4, zero=3), True, {}, {"owner_group_size": 2}),
    "FSDP2 dp=4, owner groups of 2, NS split 2": (_split(_wrapper(fsdp), 2), Parallel(1, 4, zero=3), True, {},
                                                  {"owner_group_size": 2}),
    "FSDP2 2 × TP 2, owner groups of 2, NS split 4": (_split(_wrapper(fsdp_x_tp), 4), Parallel(1, 4, tp=2, zero=3),
                                                      True, TP_PLAN, {"owner_group_size": 2}),
    "HSDP 2 × 2, share": (_wrapper(hsdp), Parallel(1, 4, zero=3, shard=2), True, {},
                          {"owner_group_size": 2, "owner_replicas": "share"}),
    "HSDP 2 × 2, repeat": (_wrapper(hsdp), Parallel(1, 4, zero=3, shard=2), True, {},
                           {"owner_group_size": 2, "owner_replicas": "repeat"}),
    "HSDP 2 × 2, one group": (_wrapper(hsdp), Parallel(1, 4, zero=3, shard=2), True, {}),
    "HSDP 2 × 2, auto": (_wrapper(hsdp), Parallel(1, 4, zero=3, shard=2), True, {}, {"owner_group_size": 2}),
    "FSDP2 2 × TP 2, owner groups of 2": (_wrapper(fsdp_x_tp), Parallel(1, 4, tp=2, zero=3), True, TP_PLAN,
                                          {"owner_group_size": 2}),
    "FSDP2 dp=4, overlapped": (_wrapper(fsdp), Parallel(1, 4, zero=3), True, {}, {"owner_overlap": True}),
    "HSDP 2 × 2, share, overlapped": (_wrapper(hsdp), Parallel(1, 4, zero=3, shard=2), True, {},
                                      {"owner_group_size": 2, "owner_replicas": "share", "owner_overlap": True}),
    "replicated 2 × TP 2, overlapped": (_replicated_x_tp, Parallel(1, 4, tp=2, zero=0), True, TP_PLAN,
                                        {"owner_overlap": True}),
    "native (2, 2), overlapped": (native(2, 2), Parallel(1, 4, tp=2, zero=1), True, {"up": "colwise", "down": "rowwise"},
                                  {"owner_overlap": True}),
}


def _groups(layout):
    """The owner-group options of ``layout`` (none: one group)."""
    return LAYOUTS[layout][4] if len(LAYOUTS[layout]) > 4 else {}


def _settings(layout) -> Settings:
    """The scale model's settings for ``layout``: the split or owner modes the optimizer was given."""
    split = {"ns_split": "force", "split_group_size": int(layout[-1])} if "NS split" in layout else {}
    return Settings(**split, **_groups(layout))


def _options(cls, kwargs, layout):
    """``kwargs`` and the owner modes, less the split and owner options for an algorithm without a
    Newton–Schulz (REG)."""
    if not cls.moves:
        return {k: v for k, v in kwargs.items() if k not in ("ns_split", "split_group_size")}
    return {**kwargs, **_groups(layout)}


def _measure(layout):
    shard, par, fused = LAYOUTS[layout][:3]

    def build(rank, world):
        torch.manual_seed(0)
        model = Net(fused=fused)
        kwargs, dp_rank, dp_size = shard(model, rank, world)
        if fused:
            mark_fused(model.qkv.weight, QKV)
        return model, kwargs, dp_rank, dp_size

    def body(rank, world):
        # one sharded model and one mesh for the three optimizers, as benchmarks/comm.py (values do not
        # change bytes) and as a training job has: a second DeviceMesh in the process would give the
        # native mode's tp copies a ProcessGroup object other than the TP DTensors', and two owner plans
        model, kwargs, dp_rank, dp_size = build(rank, world)
        out = {}
        for name, cls in OPTIMIZERS.items():
            per = len(data()[0]) // dp_size
            model.zero_grad(set_to_none=True)
            loss_of(model, data()[0][dp_rank * per:(dp_rank + 1) * per]).backward()
            opt = cls(model, **_options(cls, kwargs, layout))
            opt.step()
            plans = [(p.group_name, len(p.matrices), list(p.owners), p.replicas, p.imbalance) for p in opt.plans()] \
                if name != "reg" else []
            native = (opt._native.imbalance, sorted(n for g in opt.param_groups for p, n in
                                                    zip(g["params"], g["param_names"]) if id(p) in opt._native._owned)) \
                if opt._native is not None else None
            out[name] = {"comm": opt.comm_stats(), "plans": plans, "native": native}
        return out

    return run_ranks(par.world, body)


def _model(layout):
    _, par, fused, plan = LAYOUTS[layout][:4]
    net = Net(fused=fused)
    if fused:
        mark_fused(net.qkv.weight, QKV)
    return from_module(net, plan), par


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predicted_bytes_and_calls_equal_comm_stats_on_every_rank(layout):
    measured = _measure(layout)
    model, par = _model(layout)
    if "NS split" in layout:  # the split runs' all-reduces were made, and are predicted with the rest
        assert f"split{layout[-1]}" in measured[0]["muon"]["comm"]
    for name in OPTIMIZERS:
        predicted = traffic(model, par, name, _settings(layout))
        for rank, m in enumerate(measured):
            assert predicted.comm_stats(rank) == m[name]["comm"], f"{layout}, {name}, rank {rank}"
        # the owner plans are the optimizer's own (the real planner on the same costs and candidates)
        for rank, m in enumerate(measured):
            got = [(g, n, o, r) for g, n, o, r, _ in m[name]["plans"] if g != "local"]
            want = [(p.name, len(p.matrices), p.owners, p.replicas) for p in predicted.plans
                    if rank in p.ranks.tolist()]
            assert got == want, f"{layout}, {name}, rank {rank}"
            assert [i for g, *_, i in m[name]["plans"] if g != "local"] == pytest.approx(
                [p.imbalance for p in predicted.plans if rank in p.ranks.tolist()])
        if predicted.native is not None:
            for rank, m in enumerate(measured):
                d = rank // par.tp
                names = sorted(model.params[i].name for i, o in predicted.native.owners.items() if o == d)
                assert m[name]["native"][0] == pytest.approx(predicted.native.imbalance)
                assert set(names) <= set(m[name]["native"][1])


def _gpt2_small(layers=12):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import VOCAB, D, Block

    with torch.device("meta"):
        m = nn.Module()
        m.wte = nn.Embedding(VOCAB, D)
        m.h = nn.ModuleList(Block() for _ in range(layers))
        m.ln_f = nn.LayerNorm(D)
    return m


def test_predictions_equal_the_gpt2_small_measurements_in_comm_json():
    """benchmarks/comm.py's run (4 gloo ranks, 124M parameters, 11 layout × optimizer cases and 10 of the
    owner path's modes): every rank's comm_stats, the ZeRO-1 figure and the planner's imbalance, predicted
    exactly."""
    result = json.loads((ROOT / "benchmarks" / "results" / "comm.json").read_text())
    tp_plan = {"qkv": "colwise", "fc": "colwise", "attn_proj": "rowwise", "fc_proj": "rowwise"}
    assert len(result["cases"]) == 11
    for case in result["cases"]:
        model = from_module(_gpt2_small(result["layers"]), tp_plan if case["tp"] > 1 else None)
        par = Parallel(1, case["dp"] * case["tp"], tp=case["tp"], zero=1 if case["dp_sync_measured"] else 3)
        split = {"ns_split": "force", "split_group_size": case["split"]} if case.get("split") else {}
        t = traffic(model, par, case["optimizer"].lower(), Settings(iters=result["iters"], **split))
        for r in case["ranks"]:
            assert t.comm_stats(r["rank"]) == r["comm"], f"{case['layout']} {case['optimizer']} rank {r['rank']}"
        assert (t.imbalance is None) == (case["imbalance"] is None)
        if case["imbalance"] is not None:
            assert t.imbalance == pytest.approx(case["imbalance"])
        p = predict(model, par, cluster("h100"), case["optimizer"].lower(),
                    settings=Settings(iters=result["iters"], **split))
        assert p.zero1_sent == case["zero1_adamw_bytes"]
    # the owner path's modes (owner groups of 2, overlapped moves, HSDP 2 × 2 sharing or repeating, owner
    # groups of 2 with every Newton–Schulz split over 2)
    assert len(result["owner_modes"]) == 10
    model = from_module(_gpt2_small(result["layers"]))
    for case in result["owner_modes"]:
        par = Parallel(1, 4, zero=3, shard=case["shard"])
        split = {"ns_split": "force", "split_group_size": case["split"]} if case.get("split") else {}
        t = traffic(model, par, case["optimizer"].lower(),
                    Settings(iters=result["iters"], **case["options"], **split))
        for r in case["ranks"]:
            assert t.comm_stats(r["rank"]) == r["comm"], f"{case['layout']} {case['optimizer']} rank {r['rank']}"
        assert t.imbalance == pytest.approx(case["imbalance"])


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: Parallel(3, 8, tp=16), r"world size 24 .* is not dp × tp × pp"),
    (lambda: Parallel(2, 8, tp=4, dp=8), r"world size 16 is not dp × tp × pp = 8 × 4 × 1"),
    (lambda: Parallel(1, 8, zero=2), r"zero must be one of \(0, 1, 3\)"),
    (lambda: Parallel(0, 8), "nodes must be an integer >= 1"),
    (lambda: Parallel(1, 8, tp=1.5), "tp must be an integer >= 1"),
    (lambda: Parallel(2, 8, tp=16).check(preset("llama-70b")), "tp=16 does not divide the 8 key/value heads"),
    (lambda: Parallel(1, 6, tp=6).check(preset("llama-7b")), "tp=6 does not divide the 32 attention heads"),
    (lambda: Parallel(4, 8, tp=1, pp=32).check(preset("gpt-125m")), "32 pipeline stages for the 12 layers"),
    (lambda: preset("gpt-5"), "unknown model preset 'gpt-5'"),
    (lambda: cluster("tpu"), "unknown cluster preset 'tpu'"),
    (lambda: Param("w", (4,), "matrix"), "a matrix algorithm needs a 2-D matrix"),
    (lambda: Param("w", (4, 0)), "shape must be positive integers"),
    (lambda: Param("w", (2, 4, 4), tp=1), "along its experts"),
    (lambda: Param("w", (6, 4), fused=((0, 2, 0), (3, 6, 1))), "must cover rows"),
    (lambda: Param("w", (6, 4), "sgd"), "algorithm must be"),
    (lambda: Model("m", (Param("a", (2, 2)), Param("a", (2,), "adamw")), 1, 2), "names repeat"),
    (lambda: Model("m", (Param("a", (2, 2)),), 1, 2, heads=6, kv_heads=4), "4 key/value heads do not divide 6"),
    (lambda: Settings(iters=0), "iters must be an integer >= 1"),
    (lambda: Settings(move_bytes=3), "move_bytes must be 2, 4 or 8"),
    (lambda: traffic(preset("gpt-125m"), Parallel(1, 8), "muon", Settings(ns_split="force", owner_overlap=True)),
     r"ns_split='force' splits .* cannot be combined with owner_overlap=True"),
    (lambda: Cluster("c", 8, 1e15, 1e12, 8e10, -1.0, 0, 5e10, 0, 0), "nvlink_bytes_per_s must be a positive"),
    (lambda: predict(preset("llama-7b"), Parallel(1, 8), cluster("h100"), "adam"), "optimizer must be one of"),
    (lambda: predict(preset("llama-7b"), Parallel(2, 16), cluster("h100"), "reg"), "16 GPUs per node"),
])
def test_impossible_shapes_and_layouts_are_errors_that_say_why(make, message):
    with pytest.raises(ValueError, match=message):
        make()
