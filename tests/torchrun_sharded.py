"""Run by a test under a real ``torchrun``: REG on the ``sharded`` test model, sharded as argv[1]
says (``fsdp``: FSDP2; ``native``: no wrapper, ``REG(model, mesh=…)`` with dp = world); rank 0
saves the full parameters to argv[2]."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from reg_dist import REG
from sharded import BATCH, Net, data, fsdp, loss_of

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
