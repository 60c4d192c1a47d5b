"""Communication per optimizer step of sharded REG, Muon and MuonEq, beside ZeRO-1 AdamW's.

GPT-2-small-shaped parameters (``step_time.gpt2_small``: 12 blocks of 768×2304, 768×768, 768×3072,
3072×768, a 50257×768 embedding, norms; ``--layers`` blocks) on 4 gloo ranks, in three layouts:

    native DP=4      reg_dist's own data parallelism (``mesh=`` of shape (4, 1), no wrapper)
    FSDP2 DP=4       ``fully_shard`` over a 1-D mesh of 4
    TP=2 × FSDP2=2   ``qkv``/``fc`` column-parallel, ``attn_proj``/``fc_proj`` row-parallel, FSDP2 over dp

and for each of REG (``--iters``), Muon and MuonEq (defaults: bf16 owner moves, 5 bf16 Newton–Schulz
steps), in turn on one model per layout. Every parameter gets a random gradient (seeded per rank, no
forward pass); after a warm-up step, ``opt.comm_stats()`` of one step is read on every rank.
Reported, per rank per step:

    ZeRO-1 AdamW   the baseline: reduce-scatter of the fp32 gradients + all-gather of the fp32
                   parameters over DP, ring: 2·(DP−1)/DP · B bytes sent, where B is the fp32 bytes of
                   one DP replica of the rank's parameters (the whole model at TP=1; at TP=2 the 48
                   matrices are halved, the embedding and norms are copies over TP)
    DP sync        the data parallelism's own gradient and parameter traffic. Native: measured (the
                   "dp" reduce-scatter + all-gather in comm_stats, padding included). FSDP2: not in
                   comm_stats, taken as the ZeRO-1 figure above (one reduce-scatter of gradients, one
                   all-gather of parameters; the backward re-gather of reshard_after_forward is not
                   counted)
    optimizer      every other byte comm_stats reports sent (statistics all-reduces, owner moves,
                   the non-finite agreement)
    total          DP sync + optimizer, on rank 0 and the most on any rank, and its ratio to ZeRO-1
                   (target ≤ 1.25×)

and the owner planner's imbalance on Newton–Schulz cost m·n·min(m, n) (native: ``opt.native_imbalance``;
FSDP2: the owner plans; target ≤ 10 %), plus REG's per-group table under TP=2 × FSDP2=2.

Then the owner path's modes for Muon and MuonEq, beside FSDP2 DP=4's one all-to-all each way over the
4 ranks: owner groups of 2 (``owner_group_size=2``: two hops each way, at most 1 peer per all-to-all),
overlapped moves (``owner_overlap=True``: one round per matrix shape), and HSDP (``fully_shard`` on
a (replicate 2, shard 2) mesh, owner groups = the shard groups) with the replicas sharing the work
or repeating it: per process group, calls and bytes sent (rank 0, and the most on any rank).

Run:  .venv/bin/python benchmarks/comm.py [--layers L] [--iters K] [--modes-only]
Results: benchmarks/results/comm.json
(4–6 minutes on 2 shared CPU cores at 12 blocks, most of it the native mode's ~1.4 GB per rank per step
over gloo; the bytes and the imbalance depend on ``--layers``, not on the machine)
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import LAYERS, gpt2_small  # noqa: E402

from reg_dist import REG, Muon, MuonEq  # noqa: E402

WORLD, TARGET_RATIO, TARGET_IMBALANCE, MB = 4, 1.25, 0.10, 1e6
TP = {"qkv": ColwiseParallel(), "fc": ColwiseParallel(), "attn_proj": RowwiseParallel(), "fc_proj": RowwiseParallel()}
OPTIMIZERS = {
    "REG": lambda model, iters, **kw: REG(model, iters=iters, **kw),
    "Muon": lambda model, iters, **kw: Muon(model, **kw),
    "MuonEq": lambda model, iters, **kw: MuonEq(model, **kw),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    dp: int
    tp: int
    native: bool  # reg_dist's own data parallelism (mesh=): its DP traffic is in comm_stats
    shard: int | None = None  # HSDP: fully_shard on a (replicate, shard) mesh
    owner: tuple[tuple[str, object], ...] = ()  # the owner path's options (Muon, MuonEq)


LAYOUTS = (Layout("native DP=4", 4, 1, True), Layout("FSDP2 DP=4", 4, 1, False), Layout("TP=2 × FSDP2=2", 2, 2, False))
CASES = [(lay, name) for lay in LAYOUTS for name in OPTIMIZERS]
MODES = (Layout("FSDP2 DP=4, groups of 2", 4, 1, False, owner=(("owner_group_size", 2),)),
         Layout("FSDP2 DP=4, overlapped", 4, 1, False, owner=(("owner_overlap", True),)),
         Layout("HSDP 2×2, share", 4, 1, False, 2, (("owner_group_size", 2), ("owner_replicas", "share"))),
         Layout("HSDP 2×2, repeat", 4, 1, False, 2, (("owner_group_size", 2), ("owner_replicas", "repeat"))))
MODE_CASES = [(lay, name) for lay in MODES for name in ("Muon", "MuonEq")]


def shard(model: nn.Module, lay: Layout) -> dict:
    """Lay ``model`` out as ``lay`` says; returns the optimizer's extra keyword arguments."""
    if lay.native:
        return {"mesh": init_device_mesh("cpu", (lay.dp, lay.tp), mesh_dim_names=("dp", "tp"))}
    if lay.shard is not None:
        dp, tp = init_device_mesh("cpu", (lay.dp // lay.shard, lay.shard), mesh_dim_names=("replicate", "shard")), None
    elif lay.tp == 1:
        dp, tp = init_device_mesh("cpu", (lay.dp,), mesh_dim_names=("dp",)), None
    else:
        mesh = init_device_mesh("cpu", (lay.dp, lay.tp), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh["dp"], mesh["tp"]
    for block in model.h:
        if tp is not None:
            parallelize_module(block, tp, TP)
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    return {}


def replica_bytes(model: nn.Module) -> int:
    """Bytes of one data-parallel replica of this rank's parameters: each logical tensor, divided by
    the tensor-parallel degree where the "tp" mesh dim shards it."""
    total = 0
    for p in model.parameters():
        tp = 1
        if isinstance(p, DTensor):
            mesh, names = p.device_mesh, p.device_mesh.mesh_dim_names
            tp = math.prod(mesh.size(i) for i, (n, pl) in enumerate(zip(names, p.placements))
                           if n == "tp" and pl.is_shard())
        total += p.numel() * p.element_size() // tp
    return total


def random_grads(model: nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
        (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).normal_(generator=gen)


def planner(opt) -> dict:
    """The owner planner's imbalance on NS cost: the native mode's dp owners, else the owner plans."""
    if isinstance(opt, REG):
        return {"imbalance": None, "plans": []}
    plans = [{"group": p.group_name, "matrices": len(p.matrices), "imbalance": p.imbalance} for p in opt.plans()]
    imbalances = [p["imbalance"] for p in plans] + ([opt.native_imbalance] if opt.native_imbalance is not None else [])
    return {"imbalance": max(imbalances), "plans": plans}


def measure(model: nn.Module, opt_kwargs: dict, name: str, iters: int, rank: int) -> dict:
    """This rank's comm_stats of ``name``'s step after a warm-up, with what the summary needs."""
    opt = OPTIMIZERS[name](model, iters, **opt_kwargs)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):  # warm-up, then the measured step
        random_grads(model, gen)
        opt.step()
    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in params)
    return {"rank": rank, "comm": opt.comm_stats(), "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "local_grad_bytes": local, "replica_bytes": replica_bytes(model), **planner(opt)}


def measure_layout(lay: Layout, layers: int, iters: int, rank: int,
                   names: tuple[str, ...] = tuple(OPTIMIZERS)) -> list[dict]:
    """Every optimizer of ``names`` in turn on one model laid out as ``lay`` (its values do not change the bytes)."""
    model = gpt2_small(layers, torch.device("cpu"))
    for p in model.parameters():
        p.grad = None
    opt_kwargs = shard(model, lay)
    return [measure(model, {**opt_kwargs, **dict(lay.owner)}, name, iters, rank) for name in names]


def rank_main(rank: int, world: int, port: int, layers: int, iters: int, out: str, modes_only: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    records = [] if modes_only else [rec for lay in LAYOUTS for rec in measure_layout(lay, layers, iters, rank)]
    records += [rec for lay in MODES for rec in measure_layout(lay, layers, iters, rank, ("Muon", "MuonEq"))]
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def summarize(lay: Layout, name: str, ranks: list[dict]) -> dict:
    """Bytes sent per rank per step against ZeRO-1 AdamW's (see the module docstring)."""
    zero1 = round(2 * (lay.dp - 1) / lay.dp * ranks[0]["replica_bytes"])
    totals = []
    for r in ranks:
        sent = sum(e["sent"] for e in r["comm"].values())
        dp_sync = r["comm"]["dp"]["sent"] if lay.native else zero1
        totals.append({"dp_sync": dp_sync, "optimizer": sent - (dp_sync if lay.native else 0)})
        totals[-1]["total"] = totals[-1]["dp_sync"] + totals[-1]["optimizer"]
    most = max(t["total"] for t in totals)
    return {"layout": lay.name, "dp": lay.dp, "tp": lay.tp, "optimizer": name, "zero1_adamw_bytes": zero1,
            "dp_sync_measured": lay.native, "sent_per_rank": totals, "total_rank0": totals[0]["total"],
            "total_max": most, "ratio_rank0": totals[0]["total"] / zero1, "ratio_max": most / zero1,
            "imbalance": ranks[0]["imbalance"], "plans": ranks[0]["plans"], "ranks": ranks}


def print_reg_table(case: dict, grad_bytes: int, iters: int) -> None:
    r0 = case["ranks"][0]
    print(f"REG (iters={iters}) on TP=2 × FSDP2=2, 4 gloo ranks, GPT-2-small shapes; rank 0, one step")
    print(f"{'group':<8}{'calls':>8}{'bytes':>14}{'% of model grad bytes':>24}{'% of rank grad shard':>22}")
    for name, e in sorted(r0["comm"].items()):
        print(f"{name:<8}{e['calls']:>8}{e['bytes']:>14,}{100 * e['bytes'] / grad_bytes:>23.4f}%"
              f"{100 * e['bytes'] / r0['local_grad_bytes']:>21.4f}%")
    total = sum(e["bytes"] for e in r0["comm"].values())
    print(f"{'total':<8}{sum(e['calls'] for e in r0['comm'].values()):>8}{total:>14,}"
          f"{100 * total / grad_bytes:>23.4f}%{100 * total / r0['local_grad_bytes']:>21.4f}%")
    print(f"model gradients: {grad_bytes:,} bytes (fp32); rank 0's shard: {r0['local_grad_bytes']:,} bytes")


def print_comparison(cases: list[dict], layers: int) -> None:
    print(f"\nBytes sent per rank per step (MB = 1e6 bytes), GPT-2-small shapes ({layers} blocks), 4 gloo ranks")
    print(f"{'layout':<16}{'optimizer':<10}{'ZeRO-1':>9}{'DP sync':>10}{'optim.':>9}{'total r0':>10}{'total max':>11}"
          f"{'× ZeRO-1 r0':>13}{'× max':>8}{'NS imbalance':>14}")
    for c in cases:
        t0 = c["sent_per_rank"][0]
        imb = "-" if c["imbalance"] is None else f"{100 * c['imbalance']:.1f} %"
        sync = f"{t0['dp_sync'] / MB:.2f}" + ("" if c["dp_sync_measured"] else "*")
        print(f"{c['layout']:<16}{c['optimizer']:<10}{c['zero1_adamw_bytes'] / MB:>9.2f}{sync:>10}"
              f"{t0['optimizer'] / MB:>9.2f}{c['total_rank0'] / MB:>10.2f}{c['total_max'] / MB:>11.2f}"
              f"{c['ratio_rank0']:>13.3f}{c['ratio_max']:>8.3f}{imb:>14}")
    print("ZeRO-1: AdamW's reduce-scatter of fp32 grads + all-gather of fp32 params over DP, ring: 2·(DP−1)/DP ×\n"
          "  the fp32 bytes of one DP replica of the rank's parameters (TP-sharded matrices halved at TP=2).\n"
          "DP sync, optim.: rank 0. DP sync, native: measured 'dp' reduce-scatters + all-gathers (buckets padded\n"
          "  to the longest owner stream, if any); * FSDP2: not in comm_stats, taken as the ZeRO-1 figure.\n"
          "optim.: the rest of comm_stats' 'sent' (statistics all-reduces, owner moves, non-finite agreement).\n"
          f"Targets: total ≤ {TARGET_RATIO}× ZeRO-1 AdamW; planner imbalance (LPT on NS cost m·n·min(m, n)) "
          f"≤ {100 * TARGET_IMBALANCE:.0f} %.")


def print_modes(modes: list[dict], baseline: list[dict], layers: int) -> None:
    print(f"\nThe owner path's modes, GPT-2-small shapes ({layers} blocks), 4 gloo ranks: per process group, calls and "
          f"MB sent per step\n(rank 0 / the most on any rank), statistics all-reduces and the agreement included")
    print(f"{'layout':<26}{'optimizer':<10}{'group':<24}{'calls':>6}{'sent r0':>10}{'sent max':>10}")
    for c in baseline + modes:
        for group in sorted(c["ranks"][0]["comm"]):
            e = c["ranks"][0]["comm"][group]
            most = max(r["comm"].get(group, {"sent": 0})["sent"] for r in c["ranks"])
            print(f"{c['layout']:<26}{c['optimizer']:<10}{group:<24}{e['calls']:>6}{e['sent'] / MB:>10.2f}"
                  f"{most / MB:>10.2f}")
    print("<name>:group / <name>:across: the two hops of owner groups (inside a group of 2 / between the groups);\n"
          "MuonEq's one 'dp' or 'shard' call is its equilibration's statistics all-reduce.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"transformer blocks (default {LAYERS})")
    ap.add_argument("--iters", type=int, default=1, help="REG's RACS iterations")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "comm.json"))
    ap.add_argument("--modes-only", action="store_true",
                    help="measure only the owner path's modes; keep the other cases of --out (same --layers, --iters)")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(Path(args.out).read_text()) if args.modes_only else None
    if kept is not None and (kept["layers"], kept["iters"]) != (args.layers, args.iters):
        raise SystemExit(f"--modes-only: {args.out} was measured with --layers {kept['layers']} "
                         f"--iters {kept['iters']}")
    tmp = args.out + ".ranks"
    mp.spawn(rank_main, args=(WORLD, free_port(), args.layers, args.iters, tmp, args.modes_only), nprocs=WORLD)
    ranks = json.loads(Path(tmp).read_text())
    os.remove(tmp)
    first = 0 if args.modes_only else len(CASES)
    cases = kept["cases"] if kept else [summarize(lay, name, [r[i] for r in ranks])
                                        for i, (lay, name) in enumerate(CASES)]
    modes = [summarize(lay, name, [r[first + i] for r in ranks]) | {"options": dict(lay.owner), "shard": lay.shard}
             for i, (lay, name) in enumerate(MODE_CASES)]
    grad_bytes = ranks[0][first]["grad_bytes"]
    print_reg_table(cases[CASES.index((LAYOUTS[2], "REG"))], grad_bytes, args.iters)
    print_comparison(cases, args.layers)
    print_modes(modes, [c for c in cases if c["layout"] == "FSDP2 DP=4" and c["optimizer"] != "REG"], args.layers)
    command = shlex.join([sys.executable, *sys.argv])
    result = {"command": kept["command"] if kept else command, "layers": args.layers, "iters": args.iters,
              "world": WORLD, "grad_bytes": grad_bytes, "target_ratio": TARGET_RATIO,
              "target_imbalance": TARGET_IMBALANCE, "cases": cases, "owner_modes": modes,
              "owner_modes_command": command}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
