"""The scale report: what REG, Muon and MuonEq cost per optimizer step from 8 to 16,384 GPUs, beside
AdamW (ZeRO-1), from the scale model (``reg_dist.scale``), with its calibration and the published
anchors it must agree with.

    1. calibration   the model's bytes, wire bytes and calls per group against the measured
                     benchmarks/results/comm.json (GPT-2-small shapes, 4 gloo ranks, 11 cases)
                     — tests/test_scale_calibration.py does the same, and runs the small layouts live
    2. sweep         LLaMA 7B (tp 1), 70B and 405B (tp 8 inside a node), FSDP2 (zero 3), on H100
                     nodes of 8 GPUs, 8 … 16,384 GPUs: optimizer time as a % of forward+backward,
                     traffic against ZeRO-1 AdamW, state per rank, Newton–Schulz on the busiest rank
    3. anchors       Moonlight (comm 1–1.25× ZeRO-1, optimizer latency 1–3 % of fwd+bwd), Essential
                     AI's 5·d/B, Megatron's layer-wise Muon (632 → 157 ms at 32 GPUs)
    4. limits        where the design stops scaling, and the mitigation (from the model's notes,
                     plus a tensor-parallel group spanning two nodes)
    5. owner modes   Muon with owner groups (two-hop moves), overlapped moves, HSDP replicas and the split
                     Newton–Schulz with owner groups, on llama-7b at 1,024 GPUs and llama-405b at 16,384
                     (target: ≤ 3 % of forward+backward)

Assumptions (flags): forward+backward at --mfu of the BF16 peak (6·N·B FLOPs, no attention FLOPs),
Newton–Schulz at --ns-efficiency of it, tokens per step = the model's reference batch (LLaMA 2: 4M,
Llama 3 405B: 16M), raised to one sequence per data-parallel replica; fp32 parameters, gradients and
state (as reg_dist steps them), bf16 owner moves; activations are not counted in "fits".

Run:  .venv/bin/python benchmarks/scale_report.py [--quick]   (minutes on 2 shared cores; --quick: 4 GPU counts)
Writes benchmarks/results/scale.json, scale.svg, and scale.png when matplotlib is importable.
"""

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reg_dist.comm.ownership import plan_owners  # noqa: E402
from reg_dist.scale import (  # noqa: E402
    ALL, MATRIX, NAMES, Parallel, Settings, cluster, essential_ai, from_module, ns_flops, predict, preset, traffic,
)

GPUS = [2**k for k in range(3, 15)]  # 8 … 16,384
QUICK = [8, 256, 4096, 16384]
SWEEP = (("llama-7b", "llama-7b", 1, 3), ("llama-70b", "llama-70b", 8, 3), ("llama-405b", "llama-405b", 8, 3),
         ("llama-7b native", "llama-7b", 1, 1))  # (label, preset, tp, zero stage)
TABLE_GPUS = (8, 64, 512, 4096, 16384)
COLORS = {"adamw": "#555555", "reg": "#1f77b4", "muon": "#d62728", "muoneq": "#ff7f0e", "normuon": "#2ca02c"}


# ---- 1. calibration against the measured comm.json --------------------------------------------------

def calibration() -> dict:
    from step_time import VOCAB, D, Block

    measured = json.loads((HERE / "results" / "comm.json").read_text())
    tp_plan = {"qkv": "colwise", "fc": "colwise", "attn_proj": "rowwise", "fc_proj": "rowwise"}
    with torch.device("meta"):
        net = nn.Module()
        net.wte = nn.Embedding(VOCAB, D)
        net.h = nn.ModuleList(Block() for _ in range(measured["layers"]))
        net.ln_f = nn.LayerNorm(D)
    rows, exact = [], 0
    for case in measured["cases"] + measured.get("owner_modes", []):  # owner modes: once comm.json measures them
        model = from_module(net, tp_plan if case["tp"] > 1 else None, name="gpt2-small")
        par = Parallel(1, case["dp"] * case["tp"], tp=case["tp"], zero=1 if case["dp_sync_measured"] else 3,
                       shard=case.get("shard"))
        split = {"ns_split": "force", "split_group_size": case["split"]} if case.get("split") else {}
        t = traffic(model, par, case["optimizer"].lower(),
                    Settings(iters=measured["iters"], **split, **case.get("options", {})))
        same = [t.comm_stats(r["rank"]) == r["comm"] for r in case["ranks"]]
        exact += all(same)
        r0 = case["ranks"][0]["comm"]
        rows.append({"layout": case["layout"], "optimizer": case["optimizer"], "ranks_exact": sum(same),
                     "ranks": len(same), "measured_sent_rank0": sum(e["sent"] for e in r0.values()),
                     "predicted_sent_rank0": sum(e["sent"] for e in t.comm_stats(0).values()),
                     "measured_calls_rank0": sum(e["calls"] for e in r0.values()),
                     "predicted_calls_rank0": sum(e["calls"] for e in t.comm_stats(0).values())})
    return {"source": "benchmarks/results/comm.json", "cases": rows, "cases_exact": exact, "cases_total": len(rows)}


# ---- 2. the sweep ------------------------------------------------------------------------------------

def sweep(gpus: list[int], hw, mfu: float, ns_eff: float) -> list[dict]:
    out = []
    for label, name, tp, zero in SWEEP:
        model = preset(name)
        for n in gpus:
            par = Parallel(n // hw.gpus_per_node, hw.gpus_per_node, tp=tp, zero=zero)
            for opt in ALL:
                t0 = time.perf_counter()
                p = predict(model, par, hw, opt, mfu=mfu, ns_efficiency=ns_eff)
                out.append({**p.to_dict(), "label": label, "tp": tp, "zero": zero,
                            "seconds_to_model": time.perf_counter() - t0})
            print(f"  {label:<16} {n:>6} GPUs: " + "  ".join(
                f"{NAMES[r['optimizer']].split()[0]} {100 * r['overhead']:.2f}%" for r in out[-len(ALL):]), flush=True)
    return out


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:,.0f}" if seconds >= 0.01 else f"{1e3 * seconds:.1f}"


def main_table(rows: list[dict]) -> str:
    lines = ["| model, layout | GPUs (dp × tp) | tokens/step | fwd+bwd (s) | optimizer | opt. step (ms) | % of fwd+bwd | "
             "traffic × ZeRO-1 | state/rank (GB) | NS busiest (TFLOP) | busiest ÷ mean | fits 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["gpus"] not in TABLE_GPUS:
            continue
        dp = r["gpus"] // r["tp"]
        ratio = "–" if r["comm_ratio"] is None else f"{r['comm_ratio']:.3f}"
        ns = imb = "–"
        if r["ns_imbalance"] is not None:  # an algorithm with a Newton–Schulz stage
            ns = f"{r['ns_flops_busiest'] / 1e12:,.1f}"
            imb = f"{r['ns_imbalance'] + 1:,.1f}"
        layout = f"{r['label'].split()[0]}, " + ("native" if r["zero"] == 1 else "FSDP2")
        lines.append(f"| {layout} | {r['gpus']:,} ({dp} × {r['tp']}) | {r['tokens_per_step'] / 2**20:.0f}M | "
                     f"{r['fwd_bwd_s']:.2f} | {NAMES[r['optimizer']]} | {_ms(r['optimizer_s'])} | "
                     f"{100 * r['overhead']:.2f} % | {ratio} | {r['state_bytes'] / 1e9:.2f} | {ns} | {imb} | "
                     f"{'yes' if r['fits'] else '**no**'} |")
    return "\n".join(lines)


def group_table(hw, mfu: float, ns_eff: float) -> str:
    """Bytes and calls per process group on rank 0, llama-70b on 1,024 GPUs (FSDP2, dp 128 × tp 8)."""
    model, par = preset("llama-70b"), Parallel(128, 8, tp=8, zero=3)
    lines = ["| optimizer | group | calls | bytes (rank 0) | sent (rank 0) | most sent by a rank |",
             "|---|---|---|---|---|---|"]
    for opt in ALL:
        p = predict(model, par, hw, opt, mfu=mfu, ns_efficiency=ns_eff)
        for g, e in sorted(p.comm_rank0.items()):
            note = " (ZeRO-1's reduce-scatter + all-gather)" if opt == "adamw" else ""
            lines.append(f"| {NAMES[opt]} | {g}{note} | {e['calls']} | {e['bytes']:,} | {e['sent']:,} | "
                         f"{p.comm_max_sent.get(g, e['sent']):,} |")
    return "\n".join(lines)


# ---- 3. anchors --------------------------------------------------------------------------------------

def moonlight(hw, mfu: float, ns_eff: float) -> dict:
    """Moonlight-16B-A3B under ZeRO-1-style data parallelism (reg_dist's native mode, tp 1) and FSDP2."""
    model = preset("moonlight-16b-a3b")
    rows = []
    for gpus, zero in ((64, 1), (256, 1), (64, 3), (256, 3)):
        par = Parallel(gpus // 8, 8, zero=zero)
        for opt in ("muon", "muoneq", "reg"):
            p = predict(model, par, hw, opt, mfu=mfu, ns_efficiency=ns_eff)
            rows.append({"gpus": gpus, "zero": zero, "optimizer": opt, "comm_ratio": p.comm_ratio,
                         "overhead": p.overhead, "optimizer_ms": 1e3 * p.optimizer_s, "ns_ms": 1e3 * p.ns_s,
                         "comm_ms": 1e3 * p.comm_s, "memory_ms": 1e3 * p.memory_s, "fwd_bwd_s": p.fwd_bwd_s,
                         "ideal_ns": p.ideal_ns_overhead, "fits": p.fits, "notes": p.notes})
    return {"claim": "communication 1–1.25× ZeRO-1 AdamW; optimizer latency 1–3 % of forward+backward "
                     "(Liu et al. 2025, arXiv 2502.16982, §Distributed Muon)",
            "settings": "moonlight-16b-a3b (64 experts of 1408, top-6), 4M tokens/step (assumed), H100, "
                        "native mode (zero 1, whole matrices per dp owner) and FSDP2 (zero 3)",
            "rows": rows}


def essential(hw, mfu: float, ns_eff: float) -> dict:
    rows = []
    for name, tp, gpus in (("llama-7b", 1, 64), ("llama-70b", 8, 512), ("llama-405b", 8, 2048),
                           ("llama-405b", 8, 16384)):
        model = preset(name)
        par = Parallel(gpus // 8, 8, tp=tp)
        p = predict(model, par, hw, "muon", mfu=mfu, ns_efficiency=ns_eff)
        rule = essential_ai(model, p.tokens_per_step)
        rows.append({"model": name, "gpus": gpus, "tokens": p.tokens_per_step, "rule_5d_over_B": rule,
                     "model_total_ns_over_fwd_bwd_flops": p.ideal_ns_overhead,
                     "model_time_split_perfectly": p.ideal_ns_overhead * mfu / ns_eff,
                     "model_busiest_rank_ns_time": p.ns_s / p.fwd_bwd_s})
    return {"claim": "Newton–Schulz ≈ 5·d/B of forward+backward (Essential AI, arXiv 2505.02222)", "rows": rows}


def megatron(hw, ns_eff: float) -> dict:
    """Megatron's layer-wise ("layer-sharded") Muon: 32 GB300 GPUs, dense weights over a TP2 × GTP8 domain
    of 16 ranks, experts over EP8 × eGTP2; optimizer step 632 ms (duplicated: every rank of a domain
    orthogonalises every matrix) → 157 ms (one owner per matrix). The shapes are not published: the
    stand-in is Qwen3-30B-A3B, the MoE model NVIDIA's Megatron Muon post benchmarks."""
    model = preset("qwen3-30b-a3b")
    steps = Settings().ns_steps
    dense, experts = [], []  # Newton–Schulz FLOPs of each matrix
    for p in model.params:
        if p.algorithm != MATRIX:
            continue
        if len(p.shape) == 3:
            experts += [ns_flops(m, n, steps) for m, n in p.blocks]
        else:
            dense += [ns_flops(m, n, steps) for m, n in p.blocks]
    ep, egtp, domain = 8, 2, 16
    per_ep = [experts[i::ep] for i in range(ep)]  # expert e on EP rank e mod 8 (every layer alike)
    duplicated = sum(dense) + max(sum(x) for x in per_ep)
    dense_owners = plan_owners(dense, domain)
    dense_load = [0] * domain
    for c, o in zip(dense, dense_owners):
        dense_load[o] += c
    expert_load = []
    for x in per_ep:
        own = plan_owners(x, egtp)
        expert_load += [sum(c for c, o in zip(x, own) if o == r) for r in range(egtp)]
    owner = max(dense_load) + max(expert_load)
    rate = hw.bf16_flops * ns_eff
    return {"claim": "optimizer step 632 → 157 ms (4.0×) at 32 GPUs, duplicated → layer-sharded "
                     "(NVIDIA/Megatron-LM issue 6676; GB300, TP2 × gtp_remat8, EP8 × egtp2)",
            "stand_in": "qwen3-30b-a3b: 48 layers, q/k/v/o and router dense, 128 experts of 768 per layer",
            "dense_matrices": len(dense), "expert_matrices": len(experts),
            "duplicated_tflop_per_rank": duplicated / 1e12, "owner_tflop_busiest": owner / 1e12,
            "ratio_model": duplicated / owner, "ratio_measured": 632 / 157,
            "duplicated_ms_h100": 1e3 * duplicated / rate, "owner_ms_h100": 1e3 * owner / rate,
            "calls_per_step_model": 4, "calls_per_step_measured": "76/276 → 4"}


# ---- 4. limits ----------------------------------------------------------------------------------------

def limits(rows: list[dict], hw, mfu: float, ns_eff: float) -> dict:
    seen: dict[tuple[str, str, str], list[int]] = {}  # (model label, optimizer, limit) -> GPU counts flagged
    for r in rows:
        for note in r["notes"]:
            seen.setdefault((r["label"], r["optimizer"], note.split(":")[0]), []).append(r["gpus"])
    order = {label: i for i, (label, *_) in enumerate(SWEEP)}
    found = [{"model": m, "optimizer": o, "limit": k, "gpus": sorted(g)}
             for (m, o, k), g in sorted(seen.items(), key=lambda kv: (order[kv[0][0]], ALL.index(kv[0][1]), kv[0][2]))]
    text = {}
    for r in rows:
        for note in r["notes"]:
            text.setdefault(note.split(":")[0], note)
    model = preset("gpt-175b")
    spans = {}
    for tp in (8, 16):
        par = Parallel(128, 8, tp=tp)
        for opt in ("reg", "muon"):
            p = predict(model, par, hw, opt, mfu=mfu, ns_efficiency=ns_eff)
            spans[f"tp={tp} {opt}"] = {"comm_ms": 1e3 * p.comm_s, "optimizer_ms": 1e3 * p.optimizer_s,
                                       "overhead": p.overhead, "notes": p.notes}
            for note in p.notes:
                text.setdefault(note.split(":")[0], note)
    # how much the all-to-all verdict rests on the latency: NCCL's LL figures instead of Simple's
    fast = dataclasses.replace(hw, nvlink_latency_s=0.6e-6, ib_latency_s=2.7e-6, launch_latency_s=6.6e-6)
    latency = {}
    for name, tp, gpus in (("llama-70b", 8, 4096), ("llama-405b", 8, 16384)):
        par = Parallel(gpus // 8, 8, tp=tp)
        slow_p = predict(preset(name), par, hw, "muon", mfu=mfu, ns_efficiency=ns_eff)
        fast_p = predict(preset(name), par, fast, "muon", mfu=mfu, ns_efficiency=ns_eff)
        latency[f"{name} {gpus}"] = {"simple_overhead": slow_p.overhead, "ll_overhead": fast_p.overhead,
                                     "simple_comm_ms": 1e3 * slow_p.comm_s, "ll_comm_ms": 1e3 * fast_p.comm_s}
    return {"flagged": found, "examples": text, "tp_spanning_nodes_gpt175b_1024gpus": spans,
            "a2a_latency_sensitivity_muon": latency}


def _ranges(values: list[int]) -> str:
    """8, 16, 32, 512 -> "8–32, 512" over the sweep's doubling GPU counts."""
    out, run = [], [values[0]]
    for v in values[1:]:
        if v == run[-1] * 2:
            run.append(v)
        else:
            out.append(run)
            run = [v]
    out.append(run)
    return ", ".join(f"{r[0]:,}" if len(r) == 1 else f"{r[0]:,}–{r[-1]:,}" for r in out)


# ---- 5. owner modes ----------------------------------------------------------------------------------

# (label, Settings fields, HSDP shard group or None); the split Newton–Schulz "off" unless a row says
# otherwise, so that those rows move whole matrices; "split auto" rows are the optimizer's default split
# with owner groups (the two combine; owner_replicas "share"/"repeat" and owner_overlap do not)
OWNER_MODES = (("one group (default), split off", {}, None),
               ("groups of 8 (a node)", {"owner_group_size": 8}, None),
               ("groups of 8, overlapped", {"owner_group_size": 8, "owner_overlap": True}, None),
               ("groups of 64 (8 nodes)", {"owner_group_size": 64}, None),
               ("overlapped, one group", {"owner_overlap": True}, None),
               ("HSDP shard 8, groups of 8, auto", {"owner_group_size": 8}, 8),
               ("one group, split auto (the defaults)", {"ns_split": "auto"}, None),
               ("groups of 8 (a node), split auto", {"ns_split": "auto", "owner_group_size": 8}, None),
               ("groups of 32 (≈ √P), split auto", {"ns_split": "auto", "owner_group_size": 32}, None))
AT_16K = (("one group, split auto (the defaults)", {"ns_split": "auto"}, None),
          ("groups of 8 (a node), split auto", {"ns_split": "auto", "owner_group_size": 8}, None),
          ("groups of 128 (≈ √P), split auto", {"ns_split": "auto", "owner_group_size": 128}, None))
OWNER_CASES = (("llama-7b", 1, 1024, OWNER_MODES), ("llama-405b", 8, 16384, AT_16K), ("llama-70b", 8, 16384, AT_16K),
               ("llama-7b", 1, 16384, AT_16K))


def owner_modes(hw, mfu: float, ns_eff: float) -> list[dict]:
    """Muon's step under each owner mode (``Settings``; ``ns_split="off"`` unless the mode sets it): the real
    planner's groups, hops, rounds and split runs."""
    rows = []
    for name, tp, gpus, modes in OWNER_CASES:
        for label, options, shard in modes:
            par = Parallel(gpus // hw.gpus_per_node, hw.gpus_per_node, tp=tp, shard=shard)
            settings = Settings(**{"ns_split": "off", **options})
            p = predict(preset(name), par, hw, "muon", settings=settings, mfu=mfu, ns_efficiency=ns_eff)
            replicas = sorted({plan.replicas for plan in traffic(preset(name), par, "muon", settings).plans}
                              - {None}) if shard else []
            rows.append({"model": name, "gpus": gpus, "tp": tp, "mode": label, "options": options, "shard": shard,
                         "replicas": replicas, "overhead": p.overhead, "optimizer_ms": 1e3 * p.optimizer_s,
                         "ns_ms": 1e3 * p.ns_s, "comm_ms": 1e3 * p.comm_s, "memory_ms": 1e3 * p.memory_s,
                         "max_a2a_peers": p.max_a2a_peers, "optimizer_sent": p.optimizer_sent, "fits": p.fits})
            print(f"  {name} {gpus:>6} GPUs, {label:<34}: Muon {100 * p.overhead:.2f} % (NS {1e3 * p.ns_s:.1f} ms, "
                  f"exposed collectives {1e3 * p.comm_s:.1f} ms, ≤ {p.max_a2a_peers} peers)", flush=True)
    return rows


def owner_table(rows: list[dict]) -> str:
    lines = ["| model, GPUs | owner mode | Muon % of fwd+bwd | step (ms) | NS busiest (ms) | collectives exposed (ms) "
             "| most peers per all-to-all | sent by the busiest rank (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = r["mode"] + (f" → {'/'.join(r['replicas'])}" if r["replicas"] else "")
        lines.append(f"| {r['model']}, {r['gpus']:,} (tp {r['tp']}) | {mode} | {100 * r['overhead']:.2f} % | "
                     f"{r['optimizer_ms']:.1f} | {r['ns_ms']:.1f} | {r['comm_ms']:.1f} | {r['max_a2a_peers']:,} | "
                     f"{r['optimizer_sent'] / 1e6:,.0f} |")
    return "\n".join(lines)


# ---- the plot -----------------------------------------------------------------------------------------

def series(rows: list[dict], mfu: float, ns_eff: float) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["label"], {}).setdefault(r["optimizer"], []).append(
            (r["gpus"], 100 * r["overhead"], r["fits"]))
        if r["optimizer"] == "muon":
            out[r["label"]].setdefault("ideal", []).append((r["gpus"], 100 * r["ideal_ns_overhead"] * mfu / ns_eff, True))
    return out


def write_svg(data: dict, path: Path) -> None:
    """A dependency-free SVG of the plot: one panel per model, log-log axes."""
    W, H, pad = 330, 300, 48
    models = list(data)
    ys = [y for m in data.values() for s in m.values() for _, y, _ in s if y > 0]
    lo, hi = 10 ** math.floor(math.log10(min(ys))), 10 ** math.ceil(math.log10(max(ys)))
    xs = sorted({x for m in data.values() for s in m.values() for x, _, _ in s})
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(models)}" height="{H + 40}" '
           f'font-family="sans-serif" font-size="10">', '<rect width="100%" height="100%" fill="white"/>']
    for i, name in enumerate(models):
        ox = i * W

        def px(x):
            return ox + pad + (math.log2(x) - math.log2(xs[0])) / (math.log2(xs[-1]) - math.log2(xs[0])) * (W - pad - 12)

        def py(y):
            return 20 + (math.log10(hi) - math.log10(max(y, lo))) / (math.log10(hi) - math.log10(lo)) * (H - 60)

        out.append(f'<text x="{ox + W / 2}" y="14" text-anchor="middle" font-weight="bold">{name}</text>')
        out.append(f'<rect x="{ox + pad}" y="20" width="{W - pad - 12}" height="{H - 60}" fill="none" stroke="#999"/>')
        e = int(math.log10(lo))
        while 10**e <= hi:
            y = py(10**e)
            out.append(f'<line x1="{ox + pad}" x2="{ox + W - 12}" y1="{y}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{ox + pad - 4}" y="{y + 3}" text-anchor="end">{10**e:g}%</text>')
            e += 1
        for x in xs[::2]:
            out.append(f'<text x="{px(x)}" y="{H - 28}" text-anchor="middle">{x}</text>')
        out.append(f'<text x="{ox + W / 2}" y="{H - 14}" text-anchor="middle">GPUs (H100)</text>')
        for opt, pts in data[name].items():
            color = COLORS["muon"] if opt == "ideal" else COLORS[opt]
            dash = ' stroke-dasharray="4,3"' if opt == "ideal" else ""
            width = {"muon": 3, "ideal": 1}.get(opt, 1.5)  # Muon under MuonEq: drawn wider to stay visible
            path_d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y, _) in enumerate(pts))
            out.append(f'<path d="{path_d}" fill="none" stroke="{color}" stroke-width="{width}"{dash}/>')
            if opt != "ideal":
                for x, y, fits in pts:
                    fill = color if fits else "white"
                    out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{fill}" stroke="{color}"/>')
    labels = [(NAMES[o], COLORS[o]) for o in ALL] + [("Muon, NS split perfectly (5·d/B-like)", "#d62728")]
    for j, (label, color) in enumerate(labels):
        x = 10 + j * 165
        dash = ' stroke-dasharray="4,3"' if j == len(labels) - 1 else ""
        out.append(f'<line x1="{x}" x2="{x + 18}" y1="{H + 22}" y2="{H + 22}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 22}" y="{H + 25}">{label}</text>')
    out.append(f'<text x="{W * len(models) - 8}" y="{H + 36}" text-anchor="end" fill="#666">hollow: does not fit in '
               f'80 GB (activations not counted)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def write_png(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.6), sharey=True)
    for ax, (name, by_opt) in zip(axes, data.items()):
        for opt, pts in by_opt.items():
            xs, ys, fits = zip(*pts)
            if opt == "ideal":
                ax.plot(xs, ys, "--", color=COLORS["muon"], lw=1, label="Muon, NS split perfectly")
                continue
            ax.plot(xs, ys, "-", color=COLORS[opt], label=NAMES[opt], lw=3 if opt == "muon" else 1.5)
            ax.scatter([x for x, f in zip(xs, fits) if f], [y for y, f in zip(ys, fits) if f], color=COLORS[opt], s=12)
            ax.scatter([x for x, f in zip(xs, fits) if not f], [y for y, f in zip(ys, fits) if not f],
                       facecolors="white", edgecolors=COLORS[opt], s=12)
        ax.set(xscale="log", yscale="log", title=name, xlabel="GPUs (H100)")
        ax.set_xticks([8, 64, 512, 4096, 16384], ["8", "64", "512", "4096", "16384"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("optimizer step, % of forward+backward")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def markdown(cal: dict, rows: list[dict], groups: str, anchors: dict, lim: dict, args, owners: list[dict]) -> str:
    out = [f"## Calibration: {cal['cases_exact']} of {cal['cases_total']} measured cases exact on every rank "
           f"({cal['source']})", "",
           "| layout | optimizer | ranks exact | calls rank 0 (measured / model) | sent rank 0 (measured / model) |",
           "|---|---|---|---|---|"]
    for c in cal["cases"]:
        out.append(f"| {c['layout']} | {c['optimizer']} | {c['ranks_exact']}/{c['ranks']} | {c['measured_calls_rank0']} / "
                   f"{c['predicted_calls_rank0']} | {c['measured_sent_rank0']:,} / {c['predicted_sent_rank0']:,} |")
    out += ["", f"## Optimizer step on H100 nodes (MFU {args.mfu}, Newton–Schulz at {args.ns_efficiency} of peak)", "",
            main_table(rows), "", "## Bytes and calls per group: llama-70b, 1,024 GPUs, FSDP2 dp 128 × tp 8", "", groups]
    m = anchors["moonlight"]
    out += ["", "## Anchors", "", f"Moonlight: {m['claim']}. Settings: {m['settings']}.", "",
            "| layout | GPUs | optimizer | traffic × ZeRO-1 | optimizer % of fwd+bwd | NS (ms) | collectives (ms) | fits |",
            "|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        layout = "native (zero 1)" if r["zero"] == 1 else "FSDP2 (zero 3)"
        out.append(f"| {layout} | {r['gpus']} | {NAMES[r['optimizer']]} | "
                   f"{r['comm_ratio']:.3f} | {100 * r['overhead']:.2f} % | {r['ns_ms']:.1f} | {r['comm_ms']:.1f} | "
                   f"{'yes' if r['fits'] else 'no'} |")
    e = anchors["essential_ai"]
    out += ["", f"Essential AI: {e['claim']}.", "",
            "| model | GPUs | tokens/step | 5·d/B | model: NS FLOPs ÷ fwd+bwd FLOPs "
            "| model: busiest rank's NS time ÷ fwd+bwd time |",
            "|---|---|---|---|---|---|"]
    for r in e["rows"]:
        out.append(f"| {r['model']} | {r['gpus']:,} | {r['tokens'] / 2**20:.0f}M | {100 * r['rule_5d_over_B']:.2f} % | "
                   f"{100 * r['model_total_ns_over_fwd_bwd_flops']:.2f} % | {100 * r['model_busiest_rank_ns_time']:.2f} % |")
    g = anchors["megatron"]
    out += ["", f"Megatron: {g['claim']}. Stand-in shapes: {g['stand_in']} ({g['dense_matrices']} dense and "
            f"{g['expert_matrices']} expert matrices). Newton–Schulz per step, busiest rank: duplicated "
            f"{g['duplicated_tflop_per_rank']:.0f} TFLOP, one owner per matrix {g['owner_tflop_busiest']:.0f} TFLOP: "
            f"**{g['ratio_model']:.1f}×** (measured {g['ratio_measured']:.1f}×); on H100 at the assumed efficiency "
            f"{g['duplicated_ms_h100']:.0f} → {g['owner_ms_h100']:.0f} ms (measured on GB300: 632 → 157 ms); "
            f"collectives per step: {g['calls_per_step_model']} (two all-to-alls per owner domain; measured "
            f"{g['calls_per_step_measured']})."]
    out += ["", "## Where it stops scaling (GPU counts at which the model flags it)", "",
            "| model | optimizer | limit | GPUs |", "|---|---|---|---|"]
    for r in lim["flagged"]:
        out.append(f"| {r['model']} | {NAMES[r['optimizer']]} | {r['limit']} | {_ranges(r['gpus'])} |")
    out += ["", "What each limit says, and its mitigation (first instance in the sweep):", ""]
    out += [f"- {note}" for note in lim["examples"].values()]
    out += ["", "Tensor parallelism spanning nodes (gpt-175b, 1,024 GPUs, FSDP2): "
            + "; ".join(f"{k}: collectives {v['comm_ms']:.1f} ms, step {v['optimizer_ms']:.0f} ms"
                        for k, v in lim["tp_spanning_nodes_gpt175b_1024gpus"].items()),
            "", "All-to-all latency sensitivity (Muon; NCCL's Simple-protocol latencies, the default, against its LL "
            "ones): " + "; ".join(f"{k}: {100 * v['simple_overhead']:.1f} % → {100 * v['ll_overhead']:.1f} % of fwd+bwd "
                                  f"(collectives {v['simple_comm_ms']:.0f} → {v['ll_comm_ms']:.0f} ms)"
                                  for k, v in lim["a2a_latency_sensitivity_muon"].items())]
    out += ["", "## Owner modes: Muon with owner groups, overlapped moves, HSDP (FSDP2 unless HSDP)", "",
            owner_table(owners)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default="h100")
    ap.add_argument("--mfu", type=float, default=0.4, help="forward+backward at this fraction of the BF16 peak")
    ap.add_argument("--ns-efficiency", type=float, default=0.5, help="Newton–Schulz matmuls at this fraction of it")
    ap.add_argument("--quick", action="store_true", help=f"GPU counts {QUICK} only")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    # the model's tensors are small (one entry per rank): a second intra-op thread only adds its wake-up,
    # milliseconds per reduction on shared cores (the same predictions, several times faster)
    torch.set_num_threads(1)
    hw = cluster(args.cluster)
    start = time.perf_counter()
    print("calibration against benchmarks/results/comm.json …", flush=True)
    cal = calibration()
    print(f"  {cal['cases_exact']}/{cal['cases_total']} cases exact on every rank", flush=True)
    print("sweep …", flush=True)
    rows = sweep(QUICK if args.quick else GPUS, hw, args.mfu, args.ns_efficiency)
    anchors = {"moonlight": moonlight(hw, args.mfu, args.ns_efficiency),
               "essential_ai": essential(hw, args.mfu, args.ns_efficiency), "megatron": megatron(hw, args.ns_efficiency)}
    lim = limits(rows, hw, args.mfu, args.ns_efficiency)
    print("owner modes …", flush=True)
    owners = owner_modes(hw, args.mfu, args.ns_efficiency)
    report = markdown(cal, rows, group_table(hw, args.mfu, args.ns_efficiency), anchors, lim, args, owners)
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = series(rows, args.mfu, args.ns_efficiency)
    write_svg(data, out.with_suffix(".svg"))
    png = write_png(data, out.with_suffix(".png"))
    result = {"command": shlex.join([sys.executable, *sys.argv]), "cluster": hw.name,
              "assumptions": {"mfu": args.mfu, "ns_efficiency": args.ns_efficiency,
                              "tokens": "model reference batch, at least one sequence per dp replica",
                              "dtypes": "fp32 parameters/gradients/state, bf16 owner moves",
                              "layout": "FSDP2 (zero 3); tp 1 for 7B, 8 (inside a node) for 70B and 405B; pp 1; "
                                        "plus llama-7b in the native mode (zero 1)",
                              "fits": "parameters + gradients + state + step scratch ≤ HBM, activations not counted"},
              "calibration": cal, "sweep": rows, "anchors": anchors, "limits": lim, "owner_modes": owners,
              "markdown": report,
              "plot": {"svg": out.with_suffix(".svg").name, "png": out.with_suffix(".png").name if png else None},
              "seconds": time.perf_counter() - start}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}, {out.with_suffix('.svg')}" + (f", {out.with_suffix('.png')}" if png else
                                                          " (no PNG: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
