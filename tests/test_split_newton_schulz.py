"""Newton–Schulz split over a few ranks (``comm.split``): each rank of a run holds a block of the matrix
(rows of a tall one, columns of a wide one), the Gram matrix and the Frobenius norm are all-reduced over
the run, and the result equals the single-process optimizer (gloo, forked ranks; fp32 Newton–Schulz and
moves), on uneven and empty FSDP2 shards, a fused QKV and an expert stack; each matrix counts once."""

import pytest
import torch

from multiproc import run_ranks
from reg_dist import Muon
from reg_dist.comm.ownership import plan_owners
from reg_dist.comm.split import SplitPlan, place, split_degrees
from reg_dist.ops.newton_schulz import iterate
from sharded import STEPS, Net, fsdp, fsdp_x_tp, reference, run_sharded
from test_distributed_muon import ALGORITHMS, EXACT, MATRICES


def _split_work(model, opt):
    splits = [p for p in opt.plans() if isinstance(p, SplitPlan)]
    return opt.transformed, [(p.degrees, p.owners) for p in splits], sorted(opt.comm_stats())


def _run(world, shard, algorithm, size, **extra):
    cls, single, kwargs = ALGORITHMS[algorithm]
    kwargs = {**EXACT, **kwargs, **extra}
    expected = reference(single, kwargs, fused=True)
    return run_sharded(world, shard, cls, {**kwargs, "ns_split": "force", "split_group_size": size}, expected,
                       fused=True, check=_split_work)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("world", [2, 4])
def test_split_over_every_rank_equals_single_process_and_counts_each_matrix_once(world, algorithm):
    out = _run(world, fsdp, algorithm, world)
    assert sum(t for t, _, _ in out) == STEPS * MATRICES
    degrees, _ = out[0][1][0]
    assert set(degrees) == {world}  # every matrix's long side (>= 18) splits over all ranks
    assert f"split{world}" in out[0][2]


def test_runs_of_two_in_a_world_of_four_equal_single_process():
    out = _run(4, fsdp, "muon", 2)
    assert sum(t for t, _, _ in out) == STEPS * MATRICES
    (degrees, owners), = out[0][1]
    assert set(degrees) == {2} and set(owners) == {0, 2}  # both runs of two ranks get matrices


@pytest.mark.parametrize("algorithm", ["muon", "muoneq_rowcol_phase"])
def test_split_under_fsdp2_x_tensor_parallel_equals_single_process(algorithm):
    out = _run(4, fsdp_x_tp, algorithm, 4)
    assert sum(t for t, _, _ in out) == STEPS * MATRICES


@pytest.mark.parametrize("shard, size, name", [(fsdp, 2, "dp"), (fsdp_x_tp, 4, "dp×tp")])
@pytest.mark.parametrize("algorithm", ["muon", "muoneq_rowcol_phase"])
def test_split_with_owner_groups_of_two_moves_in_two_hops_and_equals_single_process(algorithm, shard, size, name):
    # runs of 2 inside a group of 2, or of 4 across both groups: each block still reaches its rank in two hops
    out = _run(4, shard, algorithm, size, owner_group_size=2)
    assert sum(t for t, _, _ in out) == STEPS * MATRICES
    assert {f"{name}:group", f"{name}:across", f"split{size}"} <= set(out[0][2])


def test_split_with_the_rms_scale_and_gram_iteration_equals_single_process():
    out = _run(2, fsdp, "muon", 2, scale="rms", ns_method="gram")
    assert sum(t for t, _, _ in out) == STEPS * MATRICES


def test_split_blocks_iterate_as_the_whole_matrix():
    """``iterate`` on the row blocks of a tall matrix (columns of a wide one), its sums reduced over the
    blocks, gives the blocks of the whole matrix's Newton–Schulz (two ranks)."""
    def body(rank, world):
        import torch.distributed as dist

        g = torch.Generator().manual_seed(3)
        out = []
        for shape, wide in (((40, 12), False), ((12, 40), True)):
            x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
            whole = iterate(x, 5, "polar_express", torch.float64, "standard")
            block = (x[:, 17 * rank:17 + 23 * rank] if not wide else x[:, :, 17 * rank:17 + 23 * rank])
            part = iterate(block, 5, "polar_express", torch.float64, "standard", wide=wide,
                           reduce=lambda t: dist.all_reduce(t))
            want = whole[:, 17 * rank:17 + 23 * rank] if not wide else whole[:, :, 17 * rank:17 + 23 * rank]
            out.append((part - want).abs().max().item())
        return out

    assert max(max(r) for r in run_ranks(2, body)) < 1e-12


def test_auto_splits_only_a_matrix_that_outweighs_the_mean_load():
    big, small = (8192, 2048), (256, 256)
    # 64 ranks: the big matrix alone is far above the mean; the small ones are not worth an all-reduce
    degrees = split_degrees([big] + [small] * 100, 64, "auto", 8, 5, 2)
    assert degrees[0] in (2, 4, 8) and set(degrees[1:]) == {1}
    assert split_degrees([big] + [small] * 100, 64, "off", 8, 5, 2) == [1] * 101
    assert split_degrees([big] * 64, 64, "auto", 8, 5, 2) == [1] * 64  # one matrix per rank: balanced already


def test_placement_without_splits_is_the_owner_planner():
    costs = [5, 9, 9, 1, 4, 7, 2]
    cands = [[0, 1, 2], [1, 2], [0, 1, 2], [2], [0, 1], [0, 1, 2], [1]]
    firsts, _ = place(costs, [1] * len(costs), 3, cands)
    assert firsts == plan_owners(costs, 3, cands)


def test_split_runs_are_aligned_and_balanced():
    firsts, load = place([10, 10, 3, 3], [2, 2, 1, 1], 4, [[0, 1, 2, 3]] * 4)
    assert firsts == [0, 2, 0, 1] and load == [13, 13, 10, 10]


@pytest.mark.parametrize("kwargs, message", [
    ({"ns_split": "sometimes"}, "ns_split must be one of"),
    ({"split_group_size": 0}, "split_group_size must be an integer >= 1"),
])
def test_bad_split_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon(Net(), **kwargs)


def test_a_forced_split_size_that_does_not_divide_the_group_is_an_error():
    with pytest.raises(ValueError, match="split_group_size=3 does not divide the 4 ranks"):
        split_degrees([(8, 8)], 4, "force", 3, 5, 4)


def test_flat_shards_that_cut_rows_split_exactly():
    """DeepSpeed/Megatron-style flat element ranges (rows cut anywhere) of a tall and a wide matrix, split
    over two ranks: every rank gets back its elements of the whole matrix's Newton–Schulz."""
    def body(rank, world):
        import torch.distributed as dist

        from reg_dist.layout import Layout
        from reg_dist.ops.newton_schulz import orthogonalize

        g = torch.Generator().manual_seed(5)
        mats = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((7, 5), (5, 9))]
        cuts = [(0, 17, 35), (0, 29, 45)]
        layouts = [Layout(x.shape, (0, x.shape[0]), (0, x.shape[1]), flat=(c[rank], c[rank + 1]))
                   for x, c in zip(mats, cuts)]
        plan = SplitPlan(layouts, ["tall", "wide"], dist.group.WORLD, "dp", [2, 2], [1, 1])

        def split(x, wide, run, shape):
            return iterate(x, 5, "jordan", torch.float64, "standard", wide=wide, reduce=run.reduce,
                           polynomial=run.polynomial)

        locals_ = {i: x.reshape(-1)[c[rank]:c[rank + 1]].clone() for i, (x, c) in enumerate(zip(mats, cuts))}
        out = plan.run(locals_, None, torch.float64, torch.float64, {}, split)
        want = [orthogonalize(x[None], 5, "jordan", torch.float64)[0].reshape(-1)[c[rank]:c[rank + 1]]
                for x, c in zip(mats, cuts)]
        return max((out[i] - w).abs().max().item() for i, w in enumerate(want))

    assert max(run_ranks(2, body)) < 1e-12
