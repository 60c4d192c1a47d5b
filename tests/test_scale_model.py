"""The scale model's own invariants at sizes no test machine runs (no process group): every matrix is
transformed exactly once, owner moves conserve bytes, the statistics carry only the sums other ranks share,
pipeline stages partition the model, Essential AI's 5·d/B holds for square matrices, and the
alpha–beta model picks a tree for small all-reduces and a ring for large ones."""

import dataclasses

import pytest

from reg_dist.scale import (H100, MATRIX, Model, Param, Parallel, Settings, dense, essential_ai, ns_flops, predict,
                            preset, traffic)
from reg_dist.scale.timing import all_reduce, span

LAYOUTS = [Parallel(8, 8, zero=3), Parallel(8, 8, tp=8, zero=3), Parallel(2, 8, tp=2, zero=1),
           Parallel(2, 8, tp=4, zero=0), Parallel(4, 8, tp=1, zero=1)]


def _total_ns(model, steps=5):
    return sum(ns_flops(m, n, steps) for p in model.params if p.algorithm == MATRIX for m, n in p.blocks)


@pytest.mark.parametrize("par", LAYOUTS, ids=lambda p: f"zero{p.zero}-dp{p.dp}-tp{p.tp}")
def test_every_matrix_is_transformed_once_and_moves_conserve_bytes(par):
    model = preset("gpt-350m")
    for opt in ("muon", "muoneq"):
        t = traffic(model, par, opt)
        if par.zero == 0:  # plain matrices: every replica steps its own copy
            plain = sum(ns_flops(m, n, 5) for p in model.params if p.algorithm == MATRIX and p.tp is None
                        for m, n in p.blocks)
            assert float(t.ns_flops.sum()) == pytest.approx(_total_ns(model) - plain + plain * par.world)
        else:
            assert float(t.ns_flops.sum()) == pytest.approx(_total_ns(model))
        for c in t.calls:
            if c.kind == "all_to_all":
                assert int(c.sent.sum()) == int((c.a2a["recv_near"] + c.a2a["recv_far"]).sum())
                assert int((c.a2a["send_far"]).sum()) == int(c.a2a["recv_far"].sum())
        # the non-finite agreement: an int32 all-reduce, or MuonEq's rides on its statistics where their groups
        # span the stage (FSDP2; TP without dp: ``comm.agree.Agreement``; GPT-350M leaves every rank far
        # fewer than RIDE_ELEMENTS matrix elements)
        rides = opt == "muoneq" and (par.zero == 3 or (par.zero == 0 and par.dp == 1))
        want = None if rides else {"calls": 1, "bytes": 4, "sent": round(2 * (par.world - 1) / par.world * 4)}
        assert t.comm_stats(0).get("world") == want


def test_fsdp2_statistics_carry_the_n_column_sums_per_matrix_whatever_dp():
    model = preset("llama-7b")  # FSDP2 row shards: each row is one rank's, every rank needs every column sum
    floats = sum(p.logical[1] for p in model.params if p.algorithm == MATRIX)
    # 810M and 12.6M matrix elements per rank: the non-finite agreement rides on the statistics (one float
    # more) only where a rank holds at most comm.agree.RIDE_ELEMENTS = 2²⁶
    for par, rides in ((Parallel(1, 8), False), (Parallel(64, 8), True)):
        t = traffic(model, par, "reg", Settings(iters=2))
        stats = t.comm_stats(0)["dp"]
        assert t.agreement_rides == rides and ("world" in t.comm_stats(0)) != rides
        assert stats["calls"] == 2  # two RACS iterations, the last one carrying the norms' column sums too
        assert stats["bytes"] == (2 + 1) * 4 * floats + 4 * rides


def test_fsdp2_x_tp_statistics_reduce_tp_first_then_each_tp_ranks_slice_of_the_column_sums_over_dp():
    model, par = preset("llama-7b"), Parallel(8, 8, tp=8, zero=3)  # dp 8: rank 0 is (dp 0, tp 0)
    matrices = [p for p in model.params if p.algorithm == MATRIX]
    assert {p.tp for p in matrices} == {0, 1}
    # tp first (it splits the row-parallel matrices' rows): their m/dp held rows, and the column-parallel
    # ones' n column sums with the norms' n sums beside them (``comm.statistics.reduce_two_level``); then
    # over dp rank 0's eighth of all the column-parallel sums and the row-parallel n/tp held columns, each
    # twice (the norms' sums); one all-gather of the eighths over tp; the norms, K floats per matrix, over tp.
    # (101M matrix elements per rank: the non-finite agreement is an all-reduce of its own, not one more float)
    columns = sum(len(p.blocks) * p.logical[1] for p in matrices if p.tp == 0)
    eighth = -(-columns // 8)
    dp = 2 * eighth + 2 * sum(p.logical[1] // 8 for p in matrices if p.tp == 1)
    tp = sum(2 * len(p.blocks) * p.logical[1] if p.tp == 0 else p.logical[0] // 8 for p in matrices)
    norms = sum(len(p.blocks) for p in matrices)
    stats = traffic(model, par, "reg").comm_stats(0)
    assert (stats["dp"]["calls"], stats["dp"]["bytes"]) == (1, 4 * dp)
    assert (stats["tp"]["calls"], stats["tp"]["bytes"]) == (3, 4 * (tp + 8 * eighth + norms))
    assert stats["world"]["calls"] == 1


def test_pipeline_stages_partition_the_model_and_predict_the_costliest_stage():
    model = preset("llama-13b")
    stages = [model.stage(4, i) for i in range(4)]
    assert [p.name for s in stages for p in s.params] == [p.name for p in model.params]
    assert [s.layers for s in stages] == [10, 10, 10, 10]
    p = predict(model, Parallel(16, 8, tp=8, pp=4), H100, "muon")
    assert p.fits and p.matrices == 70 and "stage" not in p.model


def test_essential_ai_rule_is_exact_for_square_matrices():
    d, layers, tokens = 1024, 4, 2**20
    params = tuple(Param(f"w{i}", (d, d), layer=i) for i in range(layers))
    model = Model("square", params, layers, d, flop_params=layers * d * d)
    p = predict(model, Parallel(1, 8), H100, "muon", tokens=tokens)
    assert p.ideal_ns_overhead == pytest.approx(essential_ai(model, tokens))


def test_small_all_reduces_take_the_tree_and_large_ones_the_ring():
    for s in (span("world", Parallel(1, 8)), span("world", Parallel(128, 8))):
        assert all_reduce(4, s, H100)[1] == "tree"
    assert all_reduce(2**32, span("world", Parallel(1, 8)), H100)[1] == "ring"  # 2(p−1)/p·n beats 2n
    one_node = span("tp", Parallel(1, 8, tp=8))
    assert one_node.nodes == 1 and span("dp", Parallel(16, 8, tp=8)).per_node == 1


def test_more_gpus_never_shrink_muons_busiest_rank_below_its_largest_matrix():
    model = dense("toy", 2, 512, 8, 8, 2048, 1000, gated=True, tied=False, bias=False)
    largest = max(ns_flops(m, n, 5) for p in model.params if p.algorithm == MATRIX for m, n in p.blocks)
    for gpus in (8, 64, 512):
        p = predict(model, Parallel(gpus // 8, 8), H100, "muon")
        assert p.ns_flops_busiest >= largest
        assert (p.matrices < gpus) == any(n.startswith("owner imbalance") for n in p.notes)


def test_cluster_latency_moves_the_all_to_all_time_only():
    model, par = preset("gpt-1.3b"), Parallel(32, 8)
    slow = predict(model, par, H100, "muon")
    fast = predict(model, par, dataclasses.replace(H100, ib_latency_s=1e-6), "muon")
    assert fast.comm_s < slow.comm_s and fast.ns_s == slow.ns_s and fast.comm_rank0 == slow.comm_rank0
