"""Run a function on N gloo ranks forked from the (already warm) pytest process.

Each child binds gloo on a free localhost port, sets one torch thread, runs ``fn(rank, world)``
and reports its result or traceback; the parent raises with every failing rank's traceback.
"""

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import subprocess
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, queue, init_group):
    try:
        torch.set_num_threads(1)
        if init_group:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=TIMEOUT_S))
        else:  # the environment torchrun gives its ranks; fn makes its own group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        queue.put((rank, True, fn(rank, world)))
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # flush the report before the hard exit
        for child in mp.active_children():  # e.g. the Manager Megatron's torch_dist save starts: no orphans
            child.terminate()
        os._exit(0)


def torchrun(script, nproc: int, args: list[str], *options: str, timeout: float = 240,
             **run_kwargs) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc *options script *args`` on a free
    localhost port, its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *options,
                           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *args],
                          capture_output=True, text=True, timeout=timeout, **run_kwargs)


def run_ranks(world: int, fn, init_group: bool = True) -> list:
    """``[fn(0, world), …, fn(world − 1, world)]``, each run in its own forked gloo rank (with
    ``init_group=False``, in a forked process with torchrun's environment variables instead)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, queue, init_group)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=TIMEOUT_S + 30)
            results[rank] = (ok, value)
    except queue_mod.Empty:
        pass
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    missing = [r for r in range(world) if r not in results]
    if failures or missing:
        raise AssertionError("\n".join(failures) + (f"\nranks that hung or died silently: {missing}" if missing else ""))
    return [results[r][1] for r in range(world)]
