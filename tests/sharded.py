"""A small model, data and the ways of sharding it that the distributed tests share, and the
single-process reference every sharded run must equal.

``Net`` is uneven on purpose: 18 rows do not divide by 4, the 3-row ``squeeze`` and the 3-expert
``experts`` stack leave a rank of 4 empty. ``fused=True`` adds a QKV projection whose one weight holds
three separate matrices (``mark_fused``); the reference model keeps them as three parameters.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from multiproc import run_ranks
from reg_dist import mark_fused

STEPS = 3
BATCH = 8  # global batch, split across data-parallel ranks
QKV = (20, 6, 6)  # 32 rows: TP 2 and 4 cut them across the q/k/v blocks


class Net(nn.Module):
    def __init__(self, fused: bool = False, split_qkv: bool = False) -> None:
        super().__init__()
        self.fused, self.split_qkv = fused, split_qkv
        self.embed = nn.Embedding(32, 18)
        self.up = nn.Linear(18, 56)
        self.down = nn.Linear(56, 18, bias=False)
        self.squeeze = nn.Linear(18, 3, bias=False)
        self.expand = nn.Linear(3, 18, bias=False)
        if fused or split_qkv:
            qkv = nn.Linear(18, sum(QKV), bias=False)
            if split_qkv:  # the reference: the same three matrices as separate parameters
                self.q, self.k, self.v = (nn.Parameter(w.clone()) for w in qkv.weight.detach().split(QKV))
            else:
                self.qkv = qkv
            self.proj = nn.Linear(sum(QKV), 18, bias=False)
            self.experts = nn.Parameter(torch.randn(3, 18, 18) / 18)
        self.norm = nn.LayerNorm(18)
        self.head = nn.Linear(18, 32, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        h = h + self.expand(self.squeeze(h))
        if self.fused or self.split_qkv:
            qkv = h @ torch.cat([self.q, self.k, self.v]).T if self.split_qkv else self.qkv(h)
            h = h + self.proj(torch.tanh(qkv))
            h = h + torch.einsum("btd,eod->bto", h, self.experts)
        return self.head(self.norm(h))


def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (BATCH, 6), generator=g) for _ in range(STEPS)]


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def reference(cls, kwargs, fused=False):
    """The full parameters after ``STEPS`` single-process steps of ``cls`` on the whole batches."""
    torch.manual_seed(0)
    model = Net(split_qkv=fused)
    opt = cls(model, **kwargs)
    for tokens in data():
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fused:
        out["qkv.weight"] = torch.cat([out.pop("q"), out.pop("k"), out.pop("v")])
    return out


def run_sharded(world, shard, cls, kwargs, expected, fused=False, micro=1, check=None):
    """Each rank builds ``Net``, shards it (``shard(model, rank, world) -> (dp_rank, dp_size)``),
    steps ``cls`` on its part of each batch (in ``micro`` micro-batches) and must end at ``expected``;
    returns ``check(model, opt)`` of every rank."""

    def body(rank, world):
        torch.manual_seed(0)
        model = Net(fused=fused)
        dp_rank, dp_size = shard(model, rank, world)
        if fused:
            mark_fused(model.qkv.weight, QKV)
        opt = cls(model, **kwargs)
        per = BATCH // dp_size
        for tokens in data():
            opt.zero_grad()
            for chunk in tokens[dp_rank * per:(dp_rank + 1) * per].chunk(micro):
                (loss_of(model, chunk) / micro).backward()
            opt.step()
        assert_matches(model, expected)
        return check(model, opt) if check else None

    return run_ranks(world, body)


def native(dp, tp_size):
    """``shard(model, rank, world) -> ({"mesh": …}, dp_rank, dp)`` for the native mode: no wrapper,
    ``up``/``down`` tensor parallel when tp_size > 1; the dict is the optimizer's extra arguments."""
    def shard(model, rank, world):
        mesh = init_device_mesh("cpu", (dp, tp_size), mesh_dim_names=("dp", "tp"))
        if tp_size > 1:
            parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        return {"mesh": mesh}, rank // tp_size, dp
    return shard


def run_native(dp, tp_size, cls, kwargs, expected, check=None):
    """``cls(model, mesh=(dp, tp_size), **kwargs)`` (see ``native``), each dp rank on its part of each
    batch; must end at ``expected``; returns ``check(model, opt)`` of every rank."""

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        extra, dp_rank, _ = native(dp, tp_size)(model, rank, world)
        opt = cls(model, **extra, **kwargs)
        per = BATCH // dp
        for tokens in data():
            opt.zero_grad()
            loss_of(model, tokens[dp_rank * per:(dp_rank + 1) * per]).backward()
            opt.step()
        assert_matches(model, expected)
        return check(model, opt) if check else None

    return run_ranks(dp * tp_size, body)


def full_state(model, opt=None):
    """The full parameters as numpy arrays (pickled by value through ``run_ranks``' result queue)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).numpy().copy() for k, v in model.state_dict().items()}


def assert_same(a, b):
    for name in a:
        torch.testing.assert_close(torch.from_numpy(a[name]), torch.from_numpy(b[name]), rtol=1e-5, atol=1e-6)


def assert_matches(model, expected):
    """Every full parameter of the (sharded) ``model`` equals the single-process one, fp32 tolerance."""
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(full, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _fully_shard(model, mesh):
    for name in ("up", "down", "squeeze", "expand", "qkv", "proj"):
        if hasattr(model, name):
            fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)


def _tp_plan(model):
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    if model.fused:
        plan.update(qkv=ColwiseParallel(), proj=RowwiseParallel())  # cuts the QKV rows across blocks
    return plan


def fsdp(model, rank, world):
    _fully_shard(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    return rank, world


def hsdp(model, rank, world):
    """HSDP: replicate 2 × shard world/2 (``fully_shard`` on a 2-D mesh), every rank its own data."""
    _fully_shard(model, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    return rank, world


def tp(model, rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, _tp_plan(model))
    return 0, 1


def fsdp_x_tp(model, rank, world):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], _tp_plan(model))
    _fully_shard(model, mesh["dp"])
    return rank // 2, 2

