"""Communication of sharded REG per optimizer step, by process group, beside the gradients' bytes.

GPT-2-small-shaped parameters (``step_time.gpt2_small``: 12 blocks of 768×2304, 768×768, 768×3072,
3072×768, a 50257×768 embedding, norms) on 4 gloo ranks, tensor parallel 2 (``qkv``/``fc``
column-parallel, ``attn_proj``/``fc_proj`` row-parallel) × FSDP2 2. Every parameter gets a random
sharded gradient (no forward pass); after a warm-up step, ``opt.comm_stats()`` of one step is read.

Run:  .venv/bin/python benchmarks/comm.py [--iters K]      Results: benchmarks/results/comm.json
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import LAYERS, gpt2_small  # noqa: E402

from reg_dist import REG  # noqa: E402

TP = {"qkv": ColwiseParallel(), "fc": ColwiseParallel(), "attn_proj": RowwiseParallel(), "fc_proj": RowwiseParallel()}


def rank_main(rank: int, world: int, port: int, iters: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = gpt2_small(LAYERS, torch.device("cpu"))
    for p in model.parameters():
        p.grad = None
    for block in model.h:
        parallelize_module(block, mesh["tp"], TP)
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = REG(model, iters=iters)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):  # warm-up, then the measured step
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
            p.grad.to_local().normal_(generator=gen)
        opt.step()
    stats = opt.comm_stats()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    local_grad_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "comm": stats, "local_grad_bytes": local_grad_bytes})
    if rank == 0:
        Path(out).write_text(json.dumps({"grad_bytes": grad_bytes, "ranks": gathered}, indent=1))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=1, help="RACS iterations")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "comm.json"))
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".ranks"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(4, port, args.iters, tmp), nprocs=4)
    raw = json.loads(Path(tmp).read_text())
    os.remove(tmp)
    r0 = raw["ranks"][0]
    print(f"REG (iters={args.iters}) on TP=2 × FSDP2=2, 4 gloo ranks, GPT-2-small shapes; rank 0, one step")
    print(f"{'group':<8}{'calls':>8}{'bytes':>14}{'% of model grad bytes':>24}{'% of rank grad shard':>22}")
    for name, e in sorted(r0["comm"].items()):
        print(f"{name:<8}{e['calls']:>8}{e['bytes']:>14,}{100 * e['bytes'] / raw['grad_bytes']:>23.4f}%"
              f"{100 * e['bytes'] / r0['local_grad_bytes']:>21.4f}%")
    total = sum(e["bytes"] for e in r0["comm"].values())
    print(f"{'total':<8}{sum(e['calls'] for e in r0['comm'].values()):>8}{total:>14,}"
          f"{100 * total / raw['grad_bytes']:>23.4f}%{100 * total / r0['local_grad_bytes']:>21.4f}%")
    print(f"model gradients: {raw['grad_bytes']:,} bytes (fp32); rank 0's shard: {r0['local_grad_bytes']:,} bytes")
    result = {"command": shlex.join([sys.executable, *sys.argv]), "iters": args.iters, **raw,
              "stats_bytes_rank0": total, "stats_fraction_of_grad_bytes": total / raw["grad_bytes"]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
