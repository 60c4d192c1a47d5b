"""Megatron-core tensor parallelism (ColumnParallelLinear, RowParallelLinear, TP 2 over gloo, forked
ranks): the layouts read from Megatron's TP attributes describe the local shards exactly, and
reg_dist's REG, Muon and MuonEq stepping the TP shards equal the single-process optimizers on the
full weights."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed", absl: import once, here
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from multiproc import run_ranks
from reg_dist import REG, Muon, MuonEq, optim
from reg_dist.layout import fused_rows
from reg_dist.integrations.megatron.layouts import attach_layouts, megatron_layout

TP = 2
HIDDEN, FFN = 10, 24  # col: 24 × 10 split by rows; row: 10 × 24 split by columns
QKV, GROUPS = (8, 4, 4), 2  # per query group: q, k, v rows; TP 2 gives each rank one group
STEPS = 3
ALGORITHMS = {
    "reg": (REG, optim.REG, {"lr": 0.02}),
    "muon": (Muon, optim.Muon, {"lr": 0.02, "ns_dtype": torch.float32}),
    "muoneq": (MuonEq, optim.MuonEq, {"lr": 0.02, "ns_dtype": torch.float32, "mode": "rowcol", "phase": 2}),
}


def _init(**sizes) -> ModelParallelConfig:
    """Megatron's parallel state with TP 2 (and ``sizes``), and a CPU-initialising layer config."""
    warnings.simplefilter("ignore")  # megatron's "tp_group is None" deprecation notices, in this child only
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, **sizes)
    torch.manual_seed(0)  # the master weights megatron initialises and splits: the same on every rank
    return ModelParallelConfig(tensor_model_parallel_size=TP, use_cpu_initialization=True, **sizes)


def _layers(config, bias=False, col_rows=FFN):
    init = nn.init.xavier_normal_
    return nn.ModuleDict({
        "col": ColumnParallelLinear(HIDDEN, col_rows, config=config, init_method=init, bias=bias,
                                    keep_master_weight_for_test=True),
        "row": RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=bias, input_is_parallel=True,
                                 skip_bias_add=False, keep_master_weight_for_test=True),
    })


def _block(full: torch.Tensor, layout) -> torch.Tensor:
    (r0, r1), (c0, c1) = layout.rows, layout.cols
    return full[r0:r1, c0:c1]


def _separate(full: dict, qkv: bool) -> dict:
    """The single-process parameters: with ``qkv``, the fused weight's q, k and v as three (each its
    rows of every query group, in order), as megatron's optimizer splits them."""
    out = {n: nn.Parameter(w.clone()) for n, w in full.items() if not (qkv and n == "col.weight")}
    if qkv:
        segments = fused_rows(QKV, GROUPS)
        for k, part in enumerate("qkv"):
            rows = [full["col.weight"][start:end] for start, end, block in segments if block == k]
            out[part] = nn.Parameter(torch.cat(rows).clone())
    return out


def _join(ref: dict, qkv: bool) -> dict:
    """``_separate`` undone: the fused weight from its q, k and v."""
    if not qkv:
        return ref
    taken, rows = [0, 0, 0], []
    for start, end, k in fused_rows(QKV, GROUPS):
        rows.append(ref["qkv"[k]][taken[k]:taken[k] + end - start])
        taken[k] += end - start
    out = {n: w for n, w in ref.items() if n not in ("q", "k", "v")}
    out["col.weight"] = torch.cat(rows)
    return out


def _assemble(local: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical matrix from every rank's local shard placed where its layout says, and how many
    ranks claimed each element."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (layout.rows, layout.cols, local.detach().numpy().copy()))
    full, claims = torch.zeros(layout.shape), torch.zeros(layout.shape, dtype=torch.int64)
    for (r0, r1), (c0, c1), x in everyone:
        full[r0:r1, c0:c1] = torch.from_numpy(x)
        claims[r0:r1, c0:c1] += 1
    return full, claims


def test_layouts_describe_the_local_shards_of_column_and_row_parallel_weights():
    def body(rank, world):
        model = _layers(_init(), bias=True)
        assert attach_layouts(model) == 2  # the weights; the 1-D biases keep the plain path
        out = {}
        for name, layer in model.items():
            w, lay = layer.weight, layer.weight.reg_layout
            dim = w.partition_dim
            shards = [torch.empty_like(w) for _ in range(world)]
            dist.all_gather(shards, w.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            full = torch.cat(shards, dim=dim)  # megatron's own convention: TP rank t holds chunk t
            torch.testing.assert_close(full, layer.master_weight, rtol=0, atol=0)
            assert lay.shape == tuple(full.shape) and [n for n, _ in lay.groups] == ["tp"]
            assert torch.equal(_block(full, lay), w.detach())
            assembled, claims = _assemble(w, lay)
            assert torch.equal(assembled, full) and bool((claims == 1).all())
            out[name] = (lay.rows, lay.cols)
        return out

    got = run_ranks(TP, body)
    assert [g["col"] for g in got] == [((0, 12), (0, HIDDEN)), ((12, 24), (0, HIDDEN))]
    assert [g["row"] for g in got] == [((0, HIDDEN), (0, 12)), ((0, HIDDEN), (12, 24))]


@pytest.mark.parametrize("qkv", [False, True], ids=["plain", "qkv"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_sharded_megatron_weights_step_like_the_single_process_optimizer(algorithm, qkv):
    cls, single, kwargs = ALGORITHMS[algorithm]
    extra = {} if cls is REG else {"move_dtype": torch.float32}

    def body(rank, world):
        model = _layers(_init(), col_rows=GROUPS * sum(QKV) if qkv else FFN)
        if qkv:  # what megatron's optimizer setup marks on a linear_qkv weight
            model["col"].weight.is_qkv, model["col"].weight.qkv_split_shapes = True, list(QKV)
        attach_layouts(model)
        names = {f"{n}.weight": layer.weight for n, layer in model.items()}
        gen = torch.Generator().manual_seed(0)
        full = {n: torch.randn(p.reg_layout.shape, generator=gen) for n, p in names.items()}
        grads = [{n: torch.randn(p.reg_layout.shape, generator=gen) for n, p in names.items()} for _ in range(STEPS)]
        ref = _separate(full, qkv)
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(_block(full[n], p.reg_layout))
        opt, ref_opt = cls(model, **kwargs, **extra), single(list(ref.items()), **kwargs)
        for g in grads:
            for n, p in names.items():
                p.grad = _block(g[n], p.reg_layout).clone()
            for n, r in _separate(g, qkv).items():
                ref[n].grad = r.detach()
            opt.step()
            ref_opt.step()
        expected = _join({n: r.detach() for n, r in ref.items()}, qkv)
        for n, p in names.items():
            assembled, _ = _assemble(p, p.reg_layout)
            torch.testing.assert_close(assembled, expected[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        return opt.transformed

    work = run_ranks(TP, body)
    matrices = 2 + (len(QKV) - 1 if qkv else 0)
    # REG scales every rank's pieces; Muon/MuonEq orthogonalise each logical matrix once, on one rank
    assert sum(work) == STEPS * (matrices * TP if cls is REG else matrices)


def test_expert_weights_take_the_expert_tensor_parallel_group():
    def body(rank, world):
        config = _init(expert_tensor_parallel_size=1)
        dense = _layers(config)["col"]
        expert = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=nn.init.xavier_normal_, bias=False,
                                      is_expert=True)
        # megatron marks the expert weight allreduce=False; its expert TP group (size 1) holds it whole
        layouts = megatron_layout(dense.weight, "dense.weight"), megatron_layout(expert.weight, "expert.weight")
        return [(lay.shape, lay.rows, lay.cols, [n for n, _ in lay.groups]) for lay in layouts]

    for rank, (dense, expert) in enumerate(run_ranks(TP, body)):
        assert dense == ((FFN, HIDDEN), (12 * rank, 12 * (rank + 1)), (0, HIDDEN), ["tp"])
        assert expert == ((FFN, HIDDEN), (0, FFN), (0, HIDDEN), [])


def test_strided_partitions_and_shards_that_do_not_add_up_raise():
    def body(rank, world):
        config = _init()
        strided = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=nn.init.xavier_normal_, bias=False,
                                       stride=2)
        with pytest.raises(ValueError, match=r"strided\.weight has partition_stride=2"):
            attach_layouts(nn.ModuleDict({"strided": strided}))
        col = _layers(config)["col"]
        singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        col.tp_group = singles[rank]  # a group it was not split over
        with pytest.raises(ValueError, match=r"weight: local shard \[12, 10\] .* makes a \[12, 10\] matrix, "
                                             r"but its layer is \[24, 10\]"):
            attach_layouts(col)

    run_ranks(TP, body)


def test_replicated_and_malformed_parameters():
    replicated = torch.empty(4, 6)
    lay = megatron_layout(replicated, "replicated")
    assert (lay.shape, lay.rows, lay.cols, lay.groups) == ((4, 6), (0, 4), (0, 6), ())
    flat = torch.empty(12)
    flat.tensor_model_parallel, flat.partition_dim, flat.partition_stride = True, 0, 1
    with pytest.raises(ValueError, match="flat of shape \\[12\\]: only 2-D"):
        megatron_layout(flat, "flat")
    odd = torch.empty(4, 6)
    odd.tensor_model_parallel, odd.partition_dim, odd.partition_stride = True, 2, 1
    with pytest.raises(ValueError, match="odd is tensor-parallel with partition_dim=2"):
        megatron_layout(odd, "odd")


def test_grouped_gemm_experts_are_refused_with_the_reason():
    """megatron-core 0.19.2's grouped-GEMM experts (``TEGroupedMLP``) need Transformer Engine, not importable here:
    an instance made without its ``__init__`` (which would build Transformer Engine's layers) stands for one."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    experts = TEGroupedMLP.__new__(TEGroupedMLP)
    nn.Module.__init__(experts)
    with pytest.raises(ValueError, match="Megatron module mlp.experts: grouped-GEMM experts .* are not supported: "
                                         "reg_dist's layouts do not describe their weights"):
        attach_layouts(nn.ModuleDict({"mlp": nn.ModuleDict({"experts": experts})}))


@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_blockwise_tp_mode_steps_each_tensor_parallel_block_as_its_own_matrix(algorithm):
    """``--reg-tp-mode blockwise`` (``attach_layouts(blockwise=True)``): every algorithm steps each rank's
    TP block as a matrix of its own, with no TP traffic, like one process on the blocks."""
    cls, single, kwargs = ALGORITHMS[algorithm]

    def body(rank, world):
        model = _layers(_init())
        attach_layouts(model, blockwise=True)
        gen = torch.Generator().manual_seed(rank)
        blocks = {n: layer.weight for n, layer in model.items()}
        assert all(not p.reg_layout.groups and p.reg_layout.shape == tuple(p.shape) for p in blocks.values())
        ref = {n: nn.Parameter(p.detach().clone()) for n, p in blocks.items()}
        opt, ref_opt = cls(model, **kwargs), single(list(ref.items()), **kwargs)
        for _ in range(STEPS):
            for n, p in blocks.items():
                p.grad = torch.randn(p.shape, generator=gen)
                ref[n].grad = p.grad.clone()
            opt.step()
            ref_opt.step()
        for n, p in blocks.items():
            torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=1e-6, atol=1e-7)
        return "tp" in opt.comm_stats()

    assert run_ranks(TP, body) == [False] * TP
