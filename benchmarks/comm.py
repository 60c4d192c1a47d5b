"""Communication per optimizer step of sharded REG, Muon and MuonEq, beside ZeRO-1 AdamW's.

GPT-2-small-shaped parameters (``step_time.gpt2_small``: 12 blocks of 768×2304, 768×768, 768×3072,
3072×768, a 50257×768 embedding, norms; ``--layers`` blocks) on 4 gloo ranks, in three layouts:

    native DP=4      reg_dist's own data parallelism (``mesh=`` of shape (4, 1), no wrapper)
    FSDP2 DP=4       ``fully_shard`` over a 1-D mesh of 4
    TP=2 × FSDP2=2   ``qkv``/``fc`` column-parallel, ``attn_proj``/``fc_proj`` row-parallel, FSDP2 over dp
    FSDP2 DP=4, split 4   FSDP2 DP=4 with every matrix's Newton–Schulz split over the 4 ranks
                     (``ns_split="force", split_group_size=4``, ``comm.split``; Muon and MuonEq only): the
                     per-step Gram all-reduces ("split4") beside the same owner moves. The default
                     ("auto") splits none of these matrices on 4 ranks: they are too small to be worth it

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

``--megatron`` instead compares Megatron's two distributed optimizers over ours (``--reg-distributed-optimizer
flat`` and ``layer-wise``) for REG, Muon and MuonEq at TP 1 × DP 4 and TP 2 × DP 2: megatron-core's GPTModel with
these shapes (vocabulary padded to 50304) on 4 gloo ranks under ``launch.megatron_cpu``'s CUDA → CPU shim, random
gradients in the DDP buffers, one step after a warm-up. Per rank per step: Megatron's gradient reduce-scatter and
weight all-gather over DP (ring estimate on its padded buffers; the layer-wise buffers are padded so that no
matrix crosses a DP shard) and reg_dist's measured ``comm_stats`` (results/comm_megatron.json).

Run:  .venv/bin/python benchmarks/comm.py [--layers L] [--iters K] [--layouts NAME …] [--modes-only] [--megatron]
Results: benchmarks/results/comm.json (``--layouts``: only those layouts measured, their cases replaced;
``--modes-only``: only the owner modes)
(4–6 minutes on 2 shared CPU cores at 12 blocks, most of it the native mode's ~1.4 GB per rank per step
over gloo; the bytes and the imbalance depend on ``--layers``, not on the machine)
"""

import argparse
import dataclasses
import gc
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
    split: int = 0  # > 0: every matrix's Newton–Schulz split over this many ranks (Muon, MuonEq)

    def optimizers(self) -> list[str]:
        return [name for name in OPTIMIZERS if not (self.split and name == "REG")]


LAYOUTS = (Layout("native DP=4", 4, 1, True), Layout("FSDP2 DP=4", 4, 1, False), Layout("TP=2 × FSDP2=2", 2, 2, False),
           Layout("FSDP2 DP=4, split 4", 4, 1, False, split=4))
CASES = [(lay, name) for lay in LAYOUTS for name in lay.optimizers()]
MODES = (Layout("FSDP2 DP=4, groups of 2", 4, 1, False, owner=(("owner_group_size", 2),)),
         Layout("FSDP2 DP=4, overlapped", 4, 1, False, owner=(("owner_overlap", True),)),
         Layout("HSDP 2×2, share", 4, 1, False, 2, (("owner_group_size", 2), ("owner_replicas", "share"))),
         Layout("HSDP 2×2, repeat", 4, 1, False, 2, (("owner_group_size", 2), ("owner_replicas", "repeat"))),
         Layout("FSDP2 DP=4, groups of 2, split 2", 4, 1, False, owner=(("owner_group_size", 2),), split=2))
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
    return {"ns_split": "force", "split_group_size": lay.split} if lay.split else {}


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
                   names: tuple[str, ...] = ()) -> list[dict]:
    """Every optimizer of ``names`` (default: the layout's) in turn on one model laid out as ``lay`` (its
    values do not change the bytes)."""
    model = gpt2_small(layers, torch.device("cpu"))
    for p in model.parameters():
        p.grad = None
    opt_kwargs = shard(model, lay)
    return [measure(model, {**opt_kwargs, **dict(lay.owner)}, name, iters, rank) for name in names or lay.optimizers()]


def rank_main(rank: int, world: int, port: int, layers: int, iters: int, out: str, layouts: tuple[Layout, ...],
              modes: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    records = [rec for lay in layouts for rec in measure_layout(lay, layers, iters, rank)]
    if modes:
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
    return {"layout": lay.name, "dp": lay.dp, "tp": lay.tp, "split": lay.split, "optimizer": name,
            "zero1_adamw_bytes": zero1,
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
    print(f"{'layout':<20}{'optimizer':<10}{'ZeRO-1':>9}{'DP sync':>10}{'optim.':>9}{'total r0':>10}{'total max':>11}"
          f"{'× ZeRO-1 r0':>13}{'× max':>8}{'NS imbalance':>14}")
    for c in cases:
        t0 = c["sent_per_rank"][0]
        imb = "-" if c["imbalance"] is None else f"{100 * c['imbalance']:.1f} %"
        sync = f"{t0['dp_sync'] / MB:.2f}" + ("" if c["dp_sync_measured"] else "*")
        print(f"{c['layout']:<20}{c['optimizer']:<10}{c['zero1_adamw_bytes'] / MB:>9.2f}{sync:>10}"
              f"{t0['optimizer'] / MB:>9.2f}{c['total_rank0'] / MB:>10.2f}{c['total_max'] / MB:>11.2f}"
              f"{c['ratio_rank0']:>13.3f}{c['ratio_max']:>8.3f}{imb:>14}")
    print("ZeRO-1: AdamW's reduce-scatter of fp32 grads + all-gather of fp32 params over DP, ring: 2·(DP−1)/DP ×\n"
          "  the fp32 bytes of one DP replica of the rank's parameters (TP-sharded matrices halved at TP=2).\n"
          "DP sync, optim.: rank 0. DP sync, native: measured 'dp' reduce-scatters + all-gathers (buckets padded\n"
          "  to the longest owner stream, if any); * FSDP2: not in comm_stats, taken as the ZeRO-1 figure.\n"
          "optim.: the rest of comm_stats' 'sent' (statistics all-reduces, owner moves, non-finite agreement).\n"
          f"Targets: total ≤ {TARGET_RATIO}× ZeRO-1 AdamW; planner imbalance (LPT on NS cost m·n·min(m, n)) "
          f"≤ {100 * TARGET_IMBALANCE:.0f} %.")


# ---- Megatron: its flat distributed optimizer against its layer-wise one -------------------------------------

MEGATRON_OPTIMIZERS = {"REG": "reg", "Muon": "reg_muon", "MuonEq": "muoneq"}  # --optimizer names
MEGATRON_MODES = ("flat", "layer-wise")  # --reg-distributed-optimizer
MEGATRON_TP = (1, 2)


def megatron_gpt(layers: int):
    """megatron-core's GPTModel (local layers, CPU init) with GPT-2-small shapes and ``layers`` blocks, on the
    current parallel state."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core import parallel_state
    from step_time import D, VOCAB

    config = TransformerConfig(num_layers=layers, hidden_size=D, num_attention_heads=12, ffn_hidden_size=4 * D,
                               tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True)
    vocab = -(-VOCAB // 128) * 128  # padded as Megatron's --make-vocab-size-divisible-by 128 does: 50304
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                    max_sequence_length=1024), config


def megatron_measure(layers: int, iters: int, tp: int, mode: str) -> list[dict]:
    """Each optimizer in turn on one GPTModel wrapped for ``mode``: random gradients in the DDP buffers, a warm-up
    step, then one measured: the DDP buffers' sizes (its gradient reduce-scatter and parameter all-gather) and
    every reg_dist optimizer's ``comm_stats()`` in the chain."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.training.training import wrap_model_chunks_with_ddp

    import reg_dist.megatron as rm
    from reg_dist.integrations.megatron.optimizer import NAMES

    model, config = megatron_gpt(layers)
    if mode == "layer-wise":
        (ddp,) = wrap_model_chunks_with_ddp([model], config, DistributedDataParallelConfig(),
                                            use_layer_wise_distributed_optimizer=True)
    else:
        ddp = DistributedDataParallel(config=config, module=model,
                                      ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
    dp = parallel_state.get_data_parallel_world_size()
    buffers = [b for b in ddp.buffers + ddp.expert_parallel_buffers]
    sync = sum(b.numel * (b.param_dtype.itemsize + b.grad_dtype.itemsize) for b in buffers) * (dp - 1) // dp
    padding = sum(b.numel - b.numel_unpadded for b in buffers)
    gen = torch.Generator().manual_seed(dist.get_rank())
    out = []
    for name, megatron_name in MEGATRON_OPTIMIZERS.items():
        opt = get_megatron_optimizer(rm.optimizer_config(
            optimizer=megatron_name, lr=1e-3, weight_decay=0.1, clip_grad=0.0, reg_iters=iters,
            use_distributed_optimizer=mode == "flat", use_layer_wise_distributed_optimizer=mode == "layer-wise"), [ddp])
        for _ in range(2):  # warm-up, then the measured step
            for p in ddp.parameters():
                p.main_grad.normal_(generator=gen)
            opt.step()
        ours = [o for o in _megatron_leaves(opt) if isinstance(o, tuple(NAMES.values()))]
        comm: dict = {}
        for o in ours:
            for group, e in o.comm_stats().items():
                comm[group] = {k: comm.get(group, {}).get(k, 0) + v for k, v in e.items()}
        out.append({"optimizer": name, "mode": mode, "tp": tp, "dp": dp, "rank": dist.get_rank(), "ddp_sync": sync,
                    "padding_elements": padding, "comm": comm})
        del opt, ours  # one optimizer's state at a time
        gc.collect()
    return out


def _megatron_leaves(optimizer) -> list:
    """The torch optimizers inside Megatron's wrappers (flat: the adapter's ``inner``)."""
    leaves = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(o, "chained_optimizers"):
            leaves += _megatron_leaves(o)
        else:
            leaves.append(getattr(o.optimizer, "inner", o.optimizer))
    return leaves


def megatron_rank_main(rank: int, world: int, port: int, layers: int, iters: int, out: str) -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch import megatron_cpu
    import reg_dist.megatron as rm  # noqa: F401  the typing.override alias megatron.training needs
    from megatron.core import parallel_state, tensor_parallel

    megatron_cpu.install()
    rm.register()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    records = []
    for tp in MEGATRON_TP:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        for mode in MEGATRON_MODES:
            records += megatron_measure(layers, iters, tp, mode)
        parallel_state.destroy_model_parallel()
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def megatron_summary(ranks: list[list[dict]]) -> list[dict]:
    """Per (TP, mode, optimizer): bytes sent per rank per step, DDP sync (ring estimate on the padded buffers) and
    reg_dist's own (measured), on rank 0 and the most on any rank."""
    cases = []
    for i, r0 in enumerate(ranks[0]):
        per_rank = [r[i] for r in ranks]
        totals = [r["ddp_sync"] + sum(e["sent"] for e in r["comm"].values()) for r in per_rank]
        cases.append({**{k: r0[k] for k in ("optimizer", "mode", "tp", "dp", "ddp_sync", "padding_elements")},
                      "optimizer_sent_rank0": sum(e["sent"] for e in r0["comm"].values()),
                      "optimizer_sent_max": max(sum(e["sent"] for e in r["comm"].values()) for r in per_rank),
                      "total_rank0": totals[0], "total_max": max(totals), "comm_rank0": r0["comm"]})
    return cases


def print_megatron(cases: list[dict], layers: int) -> None:
    print(f"\nMegatron's distributed optimizers, bytes sent per rank per step (MB = 1e6 bytes), GPT-2-small shapes "
          f"({layers} blocks), 4 gloo ranks")
    print(f"{'layout':<14}{'optimizer':<10}{'mode':<12}{'DDP sync':>10}{'padding':>10}{'optim. r0':>11}"
          f"{'optim. max':>12}{'total max':>11}{'groups (rank 0)':>18}")
    for c in cases:
        groups = ",".join(sorted(g for g, e in c["comm_rank0"].items() if e["sent"])) or "-"
        print(f"{'TP=%d × DP=%d' % (c['tp'], c['dp']):<14}{c['optimizer']:<10}{c['mode']:<12}"
              f"{c['ddp_sync'] / MB:>10.2f}{c['padding_elements']:>10,}{c['optimizer_sent_rank0'] / MB:>11.3f}"
              f"{c['optimizer_sent_max'] / MB:>12.3f}{c['total_max'] / MB:>11.2f}{groups:>18}")
    print("DDP sync: Megatron's gradient reduce-scatter + parameter all-gather over DP, ring: (DP−1)/DP × the padded\n"
          "  buffers' fp32 bytes, twice (the layer-wise buffers are padded so that no matrix crosses a DP shard;\n"
          "  padding: elements of it). optim.: reg_dist's comm_stats 'sent' (REG's statistics, Muon/MuonEq's owner\n"
          "  moves, the non-finite agreement), on rank 0 and the most on any rank.")


def print_modes(modes: list[dict], baseline: list[dict], layers: int) -> None:
    print(f"\nThe owner path's modes, GPT-2-small shapes ({layers} blocks), 4 gloo ranks: per process group, calls and "
          f"MB sent per step\n(rank 0 / the most on any rank), statistics all-reduces and the agreement included")
    print(f"{'layout':<34}{'optimizer':<10}{'group':<24}{'calls':>6}{'sent r0':>10}{'sent max':>10}")
    for c in baseline + modes:
        for group in sorted(c["ranks"][0]["comm"]):
            e = c["ranks"][0]["comm"][group]
            most = max(r["comm"].get(group, {"sent": 0})["sent"] for r in c["ranks"])
            print(f"{c['layout']:<34}{c['optimizer']:<10}{group:<24}{e['calls']:>6}{e['sent'] / MB:>10.2f}"
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
    ap.add_argument("--layouts", nargs="+", choices=[lay.name for lay in LAYOUTS], metavar="LAYOUT",
                    help="measure only these layouts and replace their cases in --out (same --layers and --iters)")
    ap.add_argument("--megatron", action="store_true",
                    help="instead: Megatron's flat and layer-wise distributed optimizers at TP 1 and 2 "
                         "(results/comm_megatron.json unless --out)")
    ap.add_argument("--out", default=None, help="results/comm.json (or comm_megatron.json)")
    ap.add_argument("--modes-only", action="store_true",
                    help="measure only the owner path's modes; keep the other cases of --out (same --layers, --iters)")
    args = ap.parse_args()
    results = Path(__file__).resolve().parent / "results"
    args.out = args.out or str(results / ("comm_megatron.json" if args.megatron else "comm.json"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.megatron:
        return megatron_main(args)
    layouts = () if args.modes_only else tuple(lay for lay in LAYOUTS if args.layouts is None or lay.name in args.layouts)
    with_modes = args.modes_only or args.layouts is None
    last = json.loads(Path(args.out).read_text()) if (args.modes_only or args.layouts is not None) else None
    if last is not None and (last["layers"], last["iters"]) != (args.layers, args.iters):
        raise SystemExit(f"{args.out} holds --layers {last['layers']} --iters {last['iters']}: run every layout")
    tmp = args.out + ".ranks"
    mp.spawn(rank_main, args=(WORLD, free_port(), args.layers, args.iters, tmp, layouts, with_modes), nprocs=WORLD)
    ranks = json.loads(Path(tmp).read_text())
    os.remove(tmp)
    run = [(lay, name) for lay, name in CASES if lay in layouts]
    cases = [summarize(lay, name, [r[i] for r in ranks]) for i, (lay, name) in enumerate(run)]
    modes = [summarize(lay, name, [r[len(run) + i] for r in ranks]) | {"options": dict(lay.owner), "shard": lay.shard}
             for i, (lay, name) in enumerate(MODE_CASES)] if with_modes else last["owner_modes"]
    command = shlex.join([sys.executable, *sys.argv])
    result = {"command": command, "layers": args.layers, "iters": args.iters, "world": WORLD,
              "grad_bytes": ranks[0][0]["grad_bytes"], "target_ratio": TARGET_RATIO,
              "target_imbalance": TARGET_IMBALANCE, "cases": cases, "owner_modes": modes,
              "owner_modes_command": command if with_modes else last["owner_modes_command"]}
    if last is not None:  # the other layouts' cases from the last run of them
        kept = {(c["layout"], c["optimizer"]): c for c in last["cases"]}
        kept.update({(c["layout"], c["optimizer"]): c for c in cases})
        result.update(command=last["command"], cases=[kept[(lay.name, name)] for lay, name in CASES if
                                                      (lay.name, name) in kept])
        if args.layouts is not None:
            result["updated"] = [*last.get("updated", []), {"command": command, "layouts": args.layouts}]
    if (LAYOUTS[2], "REG") in run:
        print_reg_table(cases[run.index((LAYOUTS[2], "REG"))], result["grad_bytes"], args.iters)
    print_comparison(result["cases"], args.layers)
    if with_modes:
        print_modes(modes, [c for c in result["cases"] if c["layout"] == "FSDP2 DP=4" and c["optimizer"] != "REG"],
                    args.layers)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def megatron_main(args) -> None:
    tmp = args.out + ".ranks"
    mp.spawn(megatron_rank_main, args=(WORLD, free_port(), args.layers, args.iters, tmp), nprocs=WORLD)
    ranks = json.loads(Path(tmp).read_text())
    os.remove(tmp)
    cases = megatron_summary(ranks)
    print_megatron(cases, args.layers)
    Path(args.out).write_text(json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "layers": args.layers,
                                          "iters": args.iters, "world": WORLD, "cases": cases}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
