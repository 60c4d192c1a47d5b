"""REG on DTensor parameters (FSDP2, tensor parallelism, both) equals single-process REG on the
concatenated batch, step by step (gloo, forked ranks)."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from multiproc import run_ranks, torchrun
from reference import racs_ref, scale_ref
from reg_dist import REG
from reg_dist.comm import statistics
from sharded import STEPS, Net, assert_same, data, full_state, fsdp, fsdp_x_tp, loss_of, reference, run_sharded, tp



def _is_sharded(model, opt):
    assert any(isinstance(p, DTensor) for p in model.parameters())


def _run_sharded(world, shard, kwargs, fused=False):
    run_sharded(world, shard, REG, kwargs, reference(REG, kwargs, fused), fused=fused, check=_is_sharded)


@pytest.mark.parametrize("scale", ["rms", "match_rms_adamw"])
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_reg_equals_single_process(world, scale):
    _run_sharded(world, fsdp, {"lr": 0.02, "scale": scale})


def test_fsdp2_reg_with_iterated_racs_and_inf_norm_equals_single_process():
    _run_sharded(4, fsdp, {"lr": 0.02, "p": float("inf"), "iters": 3})


VARIANTS = {"exponent": {"exponent": -1.0}, "tolerance": {"iters": 6, "tol": 0.2}, "gradient": {"stats": "gradient"},
            "averaged": {"stats_beta": 0.9, "p": float("inf")}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("world,shard", [(4, fsdp), (4, fsdp_x_tp)], ids=["fsdp4", "fsdp2xtp2"])
def test_reg_variants_equal_single_process(world, shard, variant):
    _run_sharded(world, shard, {"lr": 0.02, **VARIANTS[variant]})


def test_reg_variants_together_on_fused_qkv_and_expert_stacks_equal_separate_matrices():
    _run_sharded(4, fsdp_x_tp, {"lr": 0.02, **{k: v for variant in VARIANTS.values() for k, v in variant.items()}},
                 fused=True)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_reg_equals_single_process(world):
    _run_sharded(world, tp, {"lr": 0.02})


def test_fsdp2_x_tensor_parallel_reg_equals_single_process():
    _run_sharded(4, fsdp_x_tp, {"lr": 0.02})


def test_reg_is_invariant_to_the_tensor_parallel_degree():
    kwargs = {"lr": 0.02}
    expected = reference(REG, kwargs)
    runs = [run_sharded(w, tp, REG, kwargs, expected, check=full_state)[0] for w in (2, 4)]
    assert_same(*runs)


def test_reg_is_invariant_to_the_data_parallel_degree():
    kwargs = {"lr": 0.02}
    expected = reference(REG, kwargs)
    runs = [run_sharded(w, fsdp, REG, kwargs, expected, check=full_state)[0] for w in (2, 4)]
    assert_same(*runs)


@pytest.mark.parametrize("world,shard", [(4, fsdp), (2, tp), (4, fsdp_x_tp)], ids=["fsdp4", "tp2", "fsdp2xtp2"])
def test_fused_qkv_and_expert_stack_reg_equals_separate_matrices(world, shard):
    _run_sharded(world, shard, {"lr": 0.02}, fused=True)


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank():
    """Under FSDP2 the agreement rides on REG's statistics all-reduce (no all-reduce of its own): a NaN on
    rank 1 skips the step on both ranks, parameters and momentum as they were (the momentum is updated only
    once the statistics say the step goes ahead), and a skipped first step leaves no state."""
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model)

        def step(nan):
            opt.zero_grad()
            loss_of(model, data()[0][rank * 4:(rank + 1) * 4]).backward()
            if nan and rank == 1:
                model.up.weight.grad.to_local().view(-1)[0] = float("nan")
            opt.step()

        def snapshot():
            return ({k: v.full_tensor().clone() for k, v in model.state_dict().items()},
                    {n: opt.state[p]["momentum_buffer"].to_local().clone()
                     for n, p in model.named_parameters() if "momentum_buffer" in opt.state.get(p, {})})

        before = snapshot()
        step(nan=True)
        assert opt.skipped_steps == 1 and not opt.state and "world" not in opt.comm_stats()
        step(nan=False)
        before = snapshot()
        assert before[1] and any(b.abs().sum() > 0 for b in before[1].values())
        step(nan=True)
        assert opt.skipped_steps == 2
        for got, want in zip(snapshot(), before):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    run_ranks(2, body)


def test_the_agreement_is_an_all_reduce_of_its_own_where_a_rank_holds_more_than_ride_elements():
    """Storing the momentum in a pass of its own costs more than the all-reduce it saves where a rank steps
    many elements (``comm.agree.RIDE_ELEMENTS``, here lowered to 100): the agreement keeps its int32
    all-reduce, and a NaN on one rank still skips the step on both."""
    def body(rank, world):
        statistics.RIDE_ELEMENTS = 100
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model)
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        loss_of(model, data()[0][rank * 4:(rank + 1) * 4]).backward()
        if rank == 1:
            model.up.weight.grad.to_local().view(-1)[0] = float("nan")
        opt.step()
        assert opt.skipped_steps == 1 and opt.comm_stats() == {"world": {"calls": 1, "bytes": 4, "sent": 4}}
        for k, v in model.state_dict().items():
            assert torch.equal(v.full_tensor(), before[k]), k

    run_ranks(2, body)


def test_gradient_accumulation_equals_one_big_batch_and_transforms_once_per_step():
    def check(model, opt):
        # one RACS iteration, carrying the RMS norms' sums (FSDP2 row shards: rows whole on each rank)
        assert opt.comm_stats()["dp"]["calls"] == 1
        assert opt.transformed == STEPS * 4  # each of the 4 matrices' local pieces, once per step

    kwargs = {"lr": 0.02}
    run_sharded(2, fsdp, REG, kwargs, reference(REG, kwargs), micro=2, check=check)


def test_comm_stats_report_one_packed_collective_per_group_per_racs_iteration():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = REG(model, iters=3)
        loss_of(model, data()[0][rank * 4:(rank + 1) * 4]).backward()
        opt.step()
        return opt.comm_stats()

    stats = run_ranks(2, body)
    matrices = [(56, 18), (18, 56), (3, 18), (18, 3)]
    vector_bytes = 4 * sum(n for m, n in matrices)  # FSDP2 row shards: the rows stay local, the n column sums travel
    for s in stats:
        # an all-reduce over 2 ranks sends 2·(2−1)/2 = 1× its buffer (ring); the first iteration's also carries
        # the non-finite agreement (one float: no all-reduce of its own), the last one the RMS norm's n column
        # sums Σ_i r_i² x_ij² (rows whole on each rank: no norm all-reduce)
        assert s == {"dp": {"calls": 3, "bytes": (3 + 1) * vector_bytes + 4, "sent": (3 + 1) * vector_bytes + 4}}


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


@pytest.mark.parametrize("mode", ["fsdp", "native"])
def test_torchrun_two_processes_equal_single_process(tmp_path, mode):
    from pathlib import Path

    out = tmp_path / "params.pt"
    run = torchrun(Path(__file__).with_name("torchrun_sharded.py"), 2, [mode, str(out)], timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(out)
    for name, value in reference(REG, {"lr": 0.02}).items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_layouts_that_do_not_add_up_fail_at_construction_on_every_rank():
    def body(rank, world):
        import torch.distributed as dist

        from reg_dist.layout import Layout

        w = torch.nn.Parameter(torch.zeros(1, 4))
        w.reg_layout = Layout((4, 4), (rank, rank + 1), (0, 4), groups=(("dp", dist.group.WORLD),))  # rows 2-3: no one
        with pytest.raises(ValueError, match=r"layouts of parameter w do not add up: the ranks of dp hold 8 "
                                             r"elements of its 4×4"):
            REG([("w", w)])

    run_ranks(2, body)


def test_blockwise_mode_scales_each_tensor_parallel_block_as_its_own_matrix():
    """``tp_mode="blockwise"`` is a property of the layout, for every algorithm: REG's statistics then
    stay inside each TP block (no TP collective), and the block's RMS scale is its own."""
    lr = 0.02

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        tp(model, rank, world)
        opt = REG(model, tp_mode="blockwise", weight_decay=0.0, momentum=0.0, nesterov=False, lr=lr)
        before = model.up.weight.to_local().clone()
        loss_of(model, data()[0]).backward()
        grad = model.up.weight.grad.to_local().clone()
        opt.step()
        expected = before.double() - lr * scale_ref(racs_ref(grad.double(), exponent=-1.0), "rms", 0.2)
        torch.testing.assert_close(model.up.weight.to_local(), expected.float(), rtol=1e-5, atol=1e-6)
        assert "tp" not in opt.comm_stats()  # no statistics over tp

    run_ranks(2, body)
