"""Muon and MuonEq on sharded parameters (FSDP2, tensor parallel, both, the native mode) equal the
single-process run on the concatenated batch: the owner path assembles every matrix whole, exactly
once (gloo, forked ranks; Newton–Schulz and the moves in fp32)."""

import pytest
import torch

from multiproc import run_ranks
from reg_dist import Muon, MuonEq, NorMuon, optim
from reg_dist.comm.owner import OwnerPlan
from reg_dist.layout import Layout
from reg_dist.ops.newton_schulz import orthogonalize
from sharded import (STEPS, Net, assert_same, data, full_state, fsdp, fsdp_x_tp, hsdp, loss_of, reference, run_native,
                     run_sharded, tp)

EXACT = {"lr": 0.02, "ns_dtype": torch.float32}
ALGORITHMS = {
    "muon": (Muon, optim.Muon, {}),
    "muoneq_rowcol_phase": (MuonEq, optim.MuonEq, {"mode": "rowcol", "phase": 2}),
    "normuon": (NorMuon, optim.NorMuon, {"beta2": 0.9}),
}
MATRICES = 4 + 3 + 1 + 3  # up, down, squeeze, expand; q, k, v; proj; three experts


def _run(world, shard, algorithm, fused=True, micro=1, check=None, **extra):
    cls, single, kwargs = ALGORITHMS[algorithm]
    kwargs = {**EXACT, **kwargs, **extra}
    expected = reference(single, {k: v for k, v in kwargs.items() if k not in ("move_dtype", "tp_mode")}, fused)
    return run_sharded(world, shard, cls, {"move_dtype": torch.float32, **kwargs}, expected, fused=fused,
                       micro=micro, check=check)


def _work(model, opt):
    return opt.transformed


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_equals_single_process_and_orthogonalises_each_matrix_once(world, algorithm):
    work = _run(world, fsdp, algorithm, check=_work)
    assert sum(work) == STEPS * MATRICES
    assert all(w > 0 for w in work)  # the planner spreads the matrices over every rank


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_gather_mode_equals_single_process(world, algorithm):
    _run(world, tp, algorithm)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_fsdp2_x_tensor_parallel_equals_single_process_and_moves_copies_once(algorithm):
    # the norm-free experts live on the dp mesh only: their tp copies count as one piece
    work = _run(4, fsdp_x_tp, algorithm, check=_work)
    assert sum(work) == STEPS * MATRICES


@pytest.mark.parametrize("algorithm", ["muon", "normuon"])
def test_gram_newton_schulz_under_fsdp2_x_tensor_parallel_equals_single_process(algorithm):
    work = _run(4, fsdp_x_tp, algorithm, ns_method="gram", check=_work)
    assert sum(work) == STEPS * MATRICES


def test_gather_mode_is_invariant_to_the_tensor_parallel_degree():
    assert_same(_run(2, tp, "muon", check=full_state)[0], _run(4, tp, "muon", check=full_state)[0])


def test_gradient_accumulation_equals_one_big_batch():
    work = _run(2, fsdp, "muon", micro=2, check=_work)
    assert sum(work) == STEPS * MATRICES  # the transform ran once per optimizer step, not per micro-batch


@pytest.mark.parametrize("dp,tp_size", [(2, 1), (4, 1), (2, 2), (1, 2)])
def test_native_dp_x_tp_equals_single_process(dp, tp_size):
    work = run_native(dp, tp_size, Muon, {**EXACT, "move_dtype": torch.float32}, reference(optim.Muon, EXACT),
                      check=_work)
    assert sum(work) == STEPS * 4  # up, down, squeeze, expand: once each per step, on one rank


def test_blockwise_mode_orthogonalises_each_tensor_parallel_block_on_its_own():
    lr = 0.02

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        tp(model, rank, world)
        opt = Muon(model, tp_mode="blockwise", weight_decay=0.0, momentum=0.0, nesterov=False, lr=lr,
                   ns_dtype=torch.float32, move_dtype=torch.float32)
        before = model.up.weight.to_local().clone()
        loss_of(model, data()[0]).backward()
        grad = model.up.weight.grad.to_local().clone()
        opt.step()
        block = model.up.weight.to_local()
        m, n = block.shape  # the local 28 × 18 block is the matrix: its own NS and its own scale
        expected = before - lr * 0.2 * max(m, n) ** 0.5 * orthogonalize(grad[None], 5, "jordan", torch.float32)[0]
        torch.testing.assert_close(block, expected, rtol=1e-5, atol=1e-6)
        assert opt.comm_stats().get("tp") is None  # no owner move over tp

    run_ranks(2, body)


def test_owner_moves_are_two_all_to_alls_per_plan_and_count_their_bytes():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = Muon(model)  # bf16 moves by default
        loss_of(model, data()[0][rank * 4:(rank + 1) * 4]).backward()
        opt.step()
        (plan,) = opt.plans()
        held = sum(p.to_local().numel() for p in (model.up.weight, model.down.weight, model.squeeze.weight,
                                                  model.expand.weight))
        owned = sum(m * n for (_, _, (m, n)), o in zip(plan.matrices, plan.owners) if o == rank)
        return opt.comm_stats(), held, owned

    for stats, held, owned in run_ranks(2, body):
        assert stats["dp"]["calls"] == 2  # pieces to their owners, results back
        assert stats["dp"]["bytes"] == 2 * (held + owned)  # bf16: every held element out, every owned one back
        assert 0 < stats["dp"]["sent"] < stats["dp"]["bytes"]  # what a rank owns itself stays


def test_layouts_that_do_not_add_up_fail_when_the_plan_is_made():
    def body(rank, world):
        import torch.distributed as dist

        lay = Layout((4, 4), (0, 2), (0, 4))  # both ranks claim rows 0-1: rows 2-3 held by no one
        with pytest.raises(ValueError, match=r"do not add up: the ranks of 'dp' hold 8 distinct elements of its 4×4"):
            OwnerPlan([lay], ["w"], dist.group.WORLD, "dp")

    run_ranks(2, body)


def test_invalid_tp_mode_and_move_dtype_are_rejected():
    with pytest.raises(ValueError, match="tp_mode must be one of"):
        Muon(Net(), tp_mode="local")
    with pytest.raises(ValueError, match="move_dtype must be a floating dtype"):
        MuonEq(Net(), move_dtype=torch.int8)


def test_blockwise_mode_refuses_layouts_it_cannot_split_instead_of_ignoring_them():
    def body(rank, world):
        import torch.distributed as dist

        w = torch.nn.Parameter(torch.zeros(2, 4))
        w.reg_layout = Layout((4, 4), (2 * rank, 2 * rank + 2), (0, 4), groups=(("tp", dist.group.WORLD),))
        with pytest.raises(ValueError, match="tp_mode='blockwise' splits DTensor parameters only"):
            Muon([("w", w)], tp_mode="blockwise")

    run_ranks(2, body)


def test_moves_default_to_the_newton_schulz_dtype_so_fp32_needs_no_other_argument():
    """``ns_dtype=float32`` alone (no ``move_dtype``): FSDP2 equals one process to fp32 rounding."""
    expected = reference(optim.Muon, EXACT, fused=True)
    run_sharded(4, fsdp, Muon, dict(EXACT), expected, fused=True)


def test_a_plain_fully_shard_reports_its_group_as_dp():
    def body(rank, world):
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = Net()
        fully_shard(model)  # its own unnamed 1-D mesh
        opt = Muon(model, **EXACT)
        loss_of(model, next(iter(data()))[rank::world]).backward()
        opt.step()
        return sorted(opt.comm_stats())

    assert run_ranks(2, body) == [["dp", "world"]] * 2


def test_owner_plans_survive_load_state_dict():
    """``load_state_dict`` replaces the param group dicts (torch's own): the owner plans still apply, and
    the run continues exactly as without the round trip."""
    def body(rank, world):
        out = []
        for round_trip in (False, True):
            torch.manual_seed(0)
            model = Net()
            fsdp(model, rank, world)
            opt = Muon(model, **EXACT)
            for t, tokens in enumerate(data()):
                if round_trip and t == 1:
                    opt.load_state_dict(opt.state_dict())
                opt.zero_grad()
                loss_of(model, tokens[rank * 4:(rank + 1) * 4]).backward()
                opt.step()
            out.append(full_state(model, opt))
        return out

    for plain, resumed in run_ranks(2, body):
        assert_same(plain, resumed)


# ---- owner groups: two-hop moves, HSDP replicas ------------------------------------------------------

def _groups(model, opt):
    (plan,) = opt.plans()
    return opt.transformed, plan.replicas, plan.group_size, opt.comm_stats()


@pytest.mark.parametrize("algorithm", ["muon", "muoneq_rowcol_phase"])
def test_owner_groups_of_two_in_a_world_of_four_equal_single_process_in_two_hops(algorithm):
    out = _run(4, fsdp, algorithm, owner_group_size=2, check=_groups)
    assert sum(w for w, *_ in out) == STEPS * MATRICES  # each matrix once, though moved in two hops
    for _, replicas, size, stats in out:
        assert (replicas, size) == (None, 2)  # FSDP2's groups hold only parts: one owner per matrix
        assert stats["dp:group"]["calls"] == stats["dp:across"]["calls"] == 2  # there and back, a hop each
        assert ("dp" in stats) == (algorithm != "muon")  # only MuonEq's statistics reduce over all of dp


@pytest.mark.parametrize("replicas", ["share", "repeat"])
@pytest.mark.parametrize("algorithm", ["muon", "muoneq_rowcol_phase"])
def test_hsdp_replicas_share_or_repeat_the_work_and_equal_single_process(algorithm, replicas):
    out = _run(4, hsdp, algorithm, owner_group_size=2, owner_replicas=replicas, check=_groups)
    copies = 1 if replicas == "share" else 2  # "repeat": each replica group transforms every matrix
    assert sum(w for w, *_ in out) == copies * STEPS * MATRICES
    assert {r for _, r, *_ in out} == {replicas}
    across = [stats.get("replicate×shard:across") for *_, stats in out]
    # "share": results cross to the other replica; "repeat": nothing leaves a shard group
    assert all(a is not None for a in across) if replicas == "share" else across == [None] * 4


def test_hsdp_auto_takes_the_planners_choice_and_plans_say_which():
    out = _run(4, hsdp, "muon", owner_group_size=2, check=_groups)
    chosen = {r for _, r, *_ in out}
    assert len(chosen) == 1 and chosen <= {"share", "repeat"}


def test_owner_groups_that_do_not_divide_the_ranks_or_repeat_without_whole_groups_are_rejected():
    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        with pytest.raises(ValueError, match="owner_group_size must be a positive integer dividing the 4 ranks"):
            Muon(model, owner_group_size=3)
        with pytest.raises(ValueError, match="needs every group of 2 ranks of 'dp' to hold every matrix whole"):
            Muon(model, owner_group_size=2, owner_replicas="repeat")

    run_ranks(4, body)
    with pytest.raises(ValueError, match="owner_replicas must be one of"):
        Muon(Net(), owner_replicas="twice")


@pytest.mark.parametrize("shard, extra", [(fsdp, {}), (fsdp, {"owner_group_size": 2}),
                                          (hsdp, {"owner_group_size": 2, "owner_replicas": "share"})])
@pytest.mark.parametrize("algorithm", ["muon", "muoneq_rowcol_phase"])
def test_overlapped_moves_equal_single_process_one_round_per_shape(algorithm, shard, extra):
    def rounds(model, opt):
        (plan,) = opt.plans()
        return opt.transformed, (len(plan.rounds), len({shape for *_, shape in plan.matrices})), opt.comm_stats()

    out = _run(4, shard, algorithm, owner_overlap=True, check=rounds, **extra)
    assert sum(w for w, *_ in out) == STEPS * MATRICES
    assert all(rounds == shapes == 8 for _, (rounds, shapes), _ in out)  # k and v share 6 × 18
    moves = {name: e["calls"] for name, e in out[0][2].items() if name not in ("world", "shard") and
             not (name == "dp" and algorithm != "muon")}
    assert all(c > 2 for c in moves.values())  # more than one round there and back
