"""The native torchrun mode, ``REG(model, mesh=…)`` with no DDP/FSDP wrapper: gradients averaged
onto whole-tensor owners over dp, state only on owners, parameters gathered back; equal to the
single-process run on the concatenated batch for dp × tp within 4 ranks (gloo, forked ranks)."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from multiproc import run_ranks
from reg_dist import REG
from reg_dist.comm.ownership import imbalance, plan_owners
from sharded import Net, assert_matches, data, loss_of, reference, run_native


MATRICES = {"up.weight", "down.weight", "squeeze.weight", "expand.weight"}


def _native(dp, tp, kwargs):
    def state_sizes(model, opt):  # name -> elements of state (momentum, or AdamW's first moment) here
        return {n: opt.state[p].get("momentum_buffer", opt.state[p].get("exp_avg")).numel()
                for g in opt.param_groups for p, n in zip(g["params"], g["param_names"]) if opt.state[p]}

    held = run_native(dp, tp, REG, kwargs, reference(REG, kwargs), check=state_sizes)
    sizes = {n: p.numel() for n, p in Net().named_parameters()}
    for t in range(tp):  # per TP rank, over its dp group: every tensor's state exists once
        per_dp = [held[d * tp + t] for d in range(dp)]
        for name in sizes:
            holders = [h[name] for h in per_dp if name in h]
            if name in MATRICES:  # whole, on its one owner
                assert len(holders) == 1, name
            if tp == 1:  # flat slices of the AdamW tensors add up to the tensor
                assert sum(holders) == sizes[name], name
    return held


@pytest.mark.parametrize("dp,tp", [(2, 1), (4, 1), (2, 2), (1, 2)])
def test_native_dp_x_tp_reg_equals_single_process(dp, tp):
    _native(dp, tp, {"lr": 0.02})


def test_native_mode_keeps_optimizer_state_only_on_owners():
    held = _native(4, 1, {"lr": 0.02})
    total = sum(p.numel() for p in Net().parameters())
    assert all(0 < sum(h.values()) < total for h in held)  # every rank holds a part, none all of it


def test_native_mode_collectives_do_not_grow_with_parameters():
    def body(rank, world):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = Net()
        opt = REG(model, mesh=mesh)
        loss_of(model, data()[0][rank * 4:(rank + 1) * 4]).backward()
        opt.step()
        return opt.comm_stats()

    for stats in run_ranks(2, body):
        assert stats["dp"]["calls"] == 2  # one reduce-scatter of the grads, one all-gather of the params
        assert stats["world"]["calls"] == 1 and set(stats) == {"dp", "world"}


def test_buckets_bound_the_buffers_and_keep_the_result():
    expected = reference(REG, {"lr": 0.02})

    def body(rank, world):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = Net()
        opt = REG(model, mesh=mesh, lr=0.02, bucket_bytes=2048)  # a few tensors per owner per bucket
        for tokens in data():
            opt.zero_grad()
            loss_of(model, tokens[rank * 4:(rank + 1) * 4]).backward()
            opt.step()
        assert_matches(model, expected)
        buckets = len(opt._native.buckets)
        largest = max(segment for segment, _ in opt._native.buckets)
        return buckets, largest, opt.comm_stats()["dp"]["calls"]

    for buckets, largest, calls in run_ranks(2, body):
        assert buckets > 1 and calls == 2 * buckets
        assert largest <= 56 * 18  # one bucket's segment: at most the largest tensor (over the budget alone)


def test_process_groups_serve_as_the_mesh():
    expected = reference(REG, {"lr": 0.02})

    def body(rank, world):
        import torch.distributed as dist

        torch.manual_seed(0)
        model = Net()
        opt = REG(model, mesh={"dp": dist.group.WORLD}, lr=0.02)
        for tokens in data():
            opt.zero_grad()
            loss_of(model, tokens[rank * 4:(rank + 1) * 4]).backward()
            opt.step()
        assert_matches(model, expected)

    run_ranks(2, body)


def test_mesh_without_dp_dimension_is_an_error():
    def body(rank, world):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data",))
        with pytest.raises(ValueError, match="mesh must have a dimension named 'dp'"):
            REG(Net(), mesh=mesh)

    run_ranks(2, body)


def test_ownership_plan_is_longest_first_and_balanced():
    costs = [10, 70, 30, 30, 60, 40]
    owners = plan_owners(costs, 2)
    # 70 → r0; 60 → r1; 40 → r1 (60 < 70); 30 → r0 (70 < 100); 30 → r0 (tie: lower rank); 10 → r1
    assert owners == [1, 0, 0, 0, 1, 1]
    assert abs(imbalance(costs, owners, 2) - (130 / 120 - 1)) < 1e-12
    assert plan_owners(costs, 2) == owners  # deterministic


def test_flat_tensors_level_the_owners_streams():
    from reg_dist.comm.native import water_fill

    assert water_fill([10, 0, 5], 7) == [0, 6, 1]  # ranks 1 and 2 rise to 6; rank 0 is above it
    assert water_fill([3, 3], 5) == [3, 2]  # the odd element to the first of the lowest
    assert water_fill([4, 1], 0) == [0, 0]
