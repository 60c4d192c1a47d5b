"""Run by a test under a real ``torchrun``: REG on the ``sharded`` test model, sharded as argv[1]
says (``fsdp``: FSDP2; ``native``: no wrapper, ``REG(model, mesh=…)`` with dp = world); rank 0
saves the full parameters to argv[2]. Leaves through ``launch.exits.run_and_exit`` (no interpreter
finalization: gloo's shutdown race, pytorch/pytorch#179291)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: launch.exits

from launch.exits import run_and_exit  # noqa: E402
from reg_dist import REG  # noqa: E402
from sharded import BATCH, Net, data, fsdp, loss_of  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net()
    if sys.argv[1] == "fsdp":
        fsdp(model, rank, world)
        opt = REG(model, lr=0.02)
    else:
        opt = REG(model, lr=0.02, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp")))
    per = BATCH // world
    for tokens in data():
        opt.zero_grad()
        loss_of(model, tokens[rank * per:(rank + 1) * per]).backward()
        opt.step()
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, sys.argv[2])
    dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)
