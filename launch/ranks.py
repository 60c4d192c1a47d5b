"""Process groups and the mesh of ``launch/train.py``'s jobs: the rank's environment, the ``(dp, tp)``
mesh and the collectives the loops need (``Parallel``), the rank's set-up (threads, seed, corpora), and
``die``, the one way every rank leaves on bad input."""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import init_device_mesh

from launch.data import build_corpus


def world_env() -> dict[str, int]:
    """Rank, world size, local rank and local world size as torchrun sets them (one process: 0, 1, 0, 1)."""
    return {key: int(os.environ.get(var, default)) for key, var, default in (
        ("rank", "RANK", 0), ("world", "WORLD_SIZE", 1), ("local_rank", "LOCAL_RANK", 0),
        ("local_world", "LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))}  # LOCAL_SIZE: the deepspeed launcher's


def is_rank0() -> bool:
    return (dist.get_rank() if dist.is_initialized() else world_env()["rank"]) == 0


def die(message: str, code: int = 1):
    """Exit every rank with ``code``; rank 0 prints ``message``. (Every rank must call it.)"""
    if is_rank0():
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def attempt_store(env: dict[str, int]) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix of its own for this attempt (None: ``env://``).

    The agent keeps one store for all its restarts and ``env://`` adds no per-attempt prefix (torch
    2.13), so without one the ranks of a restarted job can read the addresses of the attempt before,
    whose ranks are dead, and fail to connect (seen with gloo: "connectFullMesh ... Connection refused")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env["world"],
                           is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"/launch.train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


# arguments a rank may hold on its own (its node's paths and threads; rank 0's --out is broadcast)
NODE_LOCAL_ARGS = ("local_rank", "threads", "data_dir", "out", "resume", "resume_mode", "meta", "init", "continuing",
                   "overwrite", "log_every", "die_at_step", "die_rank")


def check_same_run(args: argparse.Namespace) -> None:
    """Exit every rank, naming the argument and the ranks, unless all ranks (every node's torchrun)
    parsed the same run arguments; collective, before the mesh (another --dp or --tp would hang it)."""
    ours = {k: repr(v) for k, v in vars(args).items() if k not in NODE_LOCAL_ARGS}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, ours)
    differ = []
    for key in dict.fromkeys(k for theirs in every for k in theirs):
        ranks: dict[str, list[int]] = {}
        for rank, theirs in enumerate(every):
            ranks.setdefault(theirs.get(key, "(none)"), []).append(rank)
        if len(ranks) > 1:
            differ.append(f"--{key.replace('_', '-')} is " + ", ".join(
                f"{value} on ranks {r[:8]}{' …' if len(r) > 8 else ''}" for value, r in ranks.items()))
    if differ:
        die("the ranks (nodes) were started with different arguments: " + "; ".join(differ))


class Parallel:
    """The process group and mesh (or none, in one process) and the collectives the loop needs."""

    def __init__(self, args: argparse.Namespace) -> None:
        env = world_env()
        self.world, self.dp, self.tp = args.world, args.dp, args.tp
        if args.device == "cuda":
            torch.cuda.set_device(env["local_rank"])
            self.device = torch.device("cuda", env["local_rank"])
        else:
            self.device = torch.device("cpu")
        self.mesh = self.dp_group = self.tp_group = None
        self.rank = self.dp_rank = 0
        if self.world > 1:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo", store=attempt_store(env),
                                    rank=env["rank"], world_size=self.world,
                                    device_id=self.device if args.device == "cuda" else None)
            check_same_run(args)
            self.mesh = init_device_mesh(args.device, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
            self.rank = dist.get_rank()
            self.dp_rank = self.mesh.get_local_rank("dp")
            self.dp_group = self.mesh.get_group("dp") if self.dp > 1 else None
            self.tp_group = self.mesh.get_group("tp") if self.tp > 1 else None
        self.rank0 = self.rank == 0

    def mean_over_dp(self, value: float) -> float:
        if self.dp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return t.item() / self.dp

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error message, if any rank has one (every rank learns it)."""
        if self.world == 1:
            return error
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def all_reduce_mean_(tensors: list[Tensor], group, size: int) -> None:
    """``tensors`` (local shards) ← their mean over ``group``: one flat all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(size)
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


def prepare_rank(args: argparse.Namespace, par: "Parallel", env: dict) -> dict[str, dict[str, Path]]:
    """Threads per rank, rank 0's run directory and seed everywhere, the corpora of --data and
    --eval-also built once (rank 0 first): ``{domain: {"train": path, "val": path}}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.world > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env["local_world"]))
    args.out = Path(par.broadcast(str(args.out)))  # a default name's timestamp: rank 0's
    torch.manual_seed(args.seed)
    domains = dict.fromkeys([args.data, *args.eval_also])
    if par.rank0:
        corpora = {d: build_corpus(args.data_dir, domain=d) for d in domains}
    par.barrier()
    if not par.rank0:
        corpora = {d: build_corpus(args.data_dir, domain=d) for d in domains}
    return corpora
