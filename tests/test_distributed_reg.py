"""REG on DTensor parameters (FSDP2, tensor parallelism, both) equals single-process REG on the
concatenated batch, step by step (gloo, forked ranks)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from multiproc import run_ranks
from reg_dist import REG

STEPS = 3
BATCH = 8  # global batch, split across data-parallel ranks


class Net(nn.Module):
    """Uneven on purpose: 18 rows do not divide by 4, and 3 rows leave a rank empty."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 18)
        self.up = nn.Linear(18, 56)
        self.down = nn.Linear(56, 18, bias=False)
        self.squeeze = nn.Linear(18, 3, bias=False)
        self.expand = nn.Linear(3, 18, bias=False)
        self.norm = nn.LayerNorm(18)
        self.head = nn.Linear(18, 32, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        h = h + self.expand(self.squeeze(h))
        return self.head(self.norm(h))


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (BATCH, 6), generator=g) for _ in range(STEPS)]


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _reference(kwargs):
    torch.manual_seed(0)
    model = Net()
    opt = REG(model, **kwargs)
    for tokens in _data():
        opt.zero_grad()
        _loss(model, tokens).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_sharded(world, shard, kwargs):
    """``shard(model, rank, world) -> dp_rank, dp_size`` makes the model sharded in place."""
    expected = _reference(kwargs)

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        dp_rank, dp_size = shard(model, rank, world)
        opt = REG(model, **kwargs)
        assert any(isinstance(p, DTensor) for p in model.parameters())
        per = BATCH // dp_size
        for tokens in _data():
            opt.zero_grad()
            _loss(model, tokens[dp_rank * per:(dp_rank + 1) * per]).backward()
            opt.step()
        assert_matches(model, expected)

    run_ranks(world, body)


def assert_matches(model, expected):
    """Every full parameter of the (sharded) ``model`` equals the single-process one, fp32 tolerance."""
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(full, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def fsdp(model, rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    for module in (model.up, model.down, model.squeeze, model.expand):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return rank, world


def tp(model, rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return 0, 1


def fsdp_x_tp(model, rank, world):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    for module in (model.up, model.down, model.squeeze, model.expand):
        fully_shard(module, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return rank // 2, 2


@pytest.mark.parametrize("scale", ["rms", "match_rms_adamw"])
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_reg_equals_single_process(world, scale):
    _run_sharded(world, fsdp, {"lr": 0.02, "scale": scale})


def test_fsdp2_reg_with_iterated_racs_and_inf_norm_equals_single_process():
    _run_sharded(4, fsdp, {"lr": 0.02, "p": float("inf"), "iters": 3})


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_reg_equals_single_process(world):
    _run_sharded(world, tp, {"lr": 0.02})


def test_fsdp2_x_tensor_parallel_reg_equals_single_process():
    _run_sharded(4, fsdp_x_tp, {"lr": 0.02})


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model)
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        _loss(model, _data()[0][rank * 4:(rank + 1) * 4]).backward()
        if rank == 1:
            model.up.weight.grad.to_local().view(-1)[0] = float("nan")
        opt.step()
        assert opt.skipped_steps == 1
        for k, v in model.state_dict().items():
            assert torch.equal(v.full_tensor(), before[k]), k

    run_ranks(2, body)


def test_gradient_accumulation_equals_one_big_batch_and_transforms_once_per_step():
    expected = _reference({"lr": 0.02})

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model, lr=0.02)
        for tokens in _data():
            mine = tokens[rank * 4:(rank + 1) * 4]
            opt.zero_grad()
            for micro in mine.split(2):  # two micro-batches of 2
                (_loss(model, micro) / 2).backward()
            opt.step()
            assert opt.comm_stats()["dp"]["calls"] == 2  # one RACS iteration + the RMS norms, once per step
        assert_matches(model, expected)

    run_ranks(2, body)


def test_comm_stats_report_one_packed_collective_per_group_per_racs_iteration():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model, iters=3)
        _loss(model, _data()[0][rank * 4:(rank + 1) * 4]).backward()
        opt.step()
        return opt.comm_stats()

    stats = run_ranks(2, body)
    matrices = [(56, 18), (18, 56), (3, 18), (18, 3)]
    vector_bytes = 4 * sum(m + n for m, n in matrices)
    for s in stats:
        assert s == {
            "world": {"calls": 1, "bytes": 4},  # every rank agrees on the non-finite check: one int32
            "dp": {"calls": 3 + 1, "bytes": 3 * vector_bytes + 4 * len(matrices)},
        }


def test_ranks_that_disagree_on_parameters_fail_at_construction():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        params = list(model.named_parameters())
        try:
            REG(params if rank == 0 else params[::-1])
        except ValueError as e:
            assert "ranks disagree on the parameters: entry 0 is" in str(e), e
            return
        raise AssertionError("construction succeeded")

    run_ranks(2, body)


def test_torchrun_two_processes_fsdp2_reg_equals_single_process(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "params.pt"
    script = Path(__file__).with_name("torchrun_fsdp_reg.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={port}",
         "--master-addr=127.0.0.1", str(script), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(out)
    for name, value in _reference({"lr": 0.02}).items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
