"""Run by a test under a real ``torchrun``: FSDP2 + REG on the ``sharded`` test model and
data; rank 0 saves the full parameters to argv[1]."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sharded import BATCH, Net, data, fsdp, loss_of
from reg_dist import REG

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)
model = Net()
fsdp(model, rank, world)
opt = REG(model, lr=0.02)
per = BATCH // world
for tokens in data():
    opt.zero_grad()
    loss_of(model, tokens[rank * per:(rank + 1) * per]).backward()
    opt.step()
full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
if rank == 0:
    torch.save(full, sys.argv[1])
dist.destroy_process_group()
