"""``--optimizer reg|reg_muon|muoneq`` in Megatron: flags → ``validate_args`` → ``OptimizerConfig`` →
``get_megatron_optimizer``, and TP 2 × DP 2 training (gloo, forked ranks, the CUDA → CPU shim
in ``launch.megatron_cpu``) equal to the single-process reg_dist optimizer on the full weights: with Megatron's
DDP, with its distributed optimizer (flat shards that cut rows, empty shards), under bf16 (fp32 main
parameters), and on PP 2 × DP 2 where the stages hold different parameters."""

import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():  # Apex / TE not installed, absl: import once, here
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    import reg_dist.megatron as rm  # before megatron.training: the typing.override alias on Python 3.11
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.arguments import parse_args, validate_args

from multiproc import run_ranks
from reg_dist import optim
from reg_dist.layout import fused_rows
from reg_dist.integrations.megatron.optimizer import NAMES, local_matrices

TP, DP = 2, 2
HIDDEN, FFN = 8, 12
HEADS, GROUPS, KV = 4, 2, 2  # linear_qkv per query group: q = HEADS / GROUPS · KV = 4, k = v = 2 rows
QKV = (HEADS // GROUPS * KV, KV, KV)
QKV_ROWS = GROUPS * sum(QKV)
STEPS, BATCH = 3, 4
BASE = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "8",
        "--max-position-embeddings", "8", "--micro-batch-size", "1", "--train-iters", "3", "--lr", "0.02"]


def _parse(argv, provider=None, monkeypatch=None):
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_args(extra_args_provider=provider or rm.extra_args_provider)
        validate_args(args)
    return args


def _column(config: TransformerConfig, n_in: int, n_out: int, bias: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(n_in, n_out, config=config, init_method=nn.init.xavier_normal_, bias=bias,
                                gather_output=False)


def _row(config: TransformerConfig, n_in: int, n_out: int) -> RowParallelLinear:
    return RowParallelLinear(n_in, n_out, config=config, init_method=nn.init.xavier_normal_, bias=False,
                             input_is_parallel=True, skip_bias_add=False)


class Tiny(MegatronModule):
    """``linear_qkv`` (column-parallel, with a bias) → tanh → ``linear_proj`` (row-parallel)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.linear_qkv = _column(config, HIDDEN, QKV_ROWS, bias=True)
        self.linear_proj = _row(config, QKV_ROWS, HIDDEN)

    def forward(self, x):
        h, _ = self.linear_qkv(x)
        y, _ = self.linear_proj(torch.tanh(h))
        return y


def _reference_forward(w: dict, x):
    return torch.tanh(x @ w["qkv.weight"].T + w["qkv.bias"]) @ w["proj.weight"].T


def _setup(tp=TP, pp=1, **extra):
    """Megatron's parallel state (TP ``tp`` × PP ``pp`` × DP the rest), the CUDA → CPU shim and a
    CPU-initialising TransformerConfig (``extra`` on top); the seed is the pipeline stage."""
    from launch import megatron_cpu

    warnings.simplefilter("ignore")
    megatron_cpu.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(parallel_state.get_pipeline_model_parallel_rank())
    return TransformerConfig(num_layers=pp, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
                             kv_channels=KV, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             use_cpu_initialization=True, **extra)


def _gather_tp(p: torch.Tensor, dim: int) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter, its shards concatenated along ``dim``."""
    shards = [torch.empty_like(p) for _ in range(TP)]
    dist.all_gather(shards, p.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=dim)


def _data(seed: int, width: int = HIDDEN) -> tuple[list, list]:
    """``STEPS`` inputs, then ``STEPS`` targets, each ``(DP, BATCH, width)``."""
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(DP, BATCH, width, generator=gen) for _ in range(STEPS)],
            [torch.randn(DP, BATCH, width, generator=gen) for _ in range(STEPS)])


def _ddp(config, model):
    return DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)


def _inner(optimizer):
    """Our torch optimizer inside Megatron's ChainedOptimizer / FP32Optimizer wrappers."""
    ours = [o.optimizer for o in optimizer.chained_optimizers if isinstance(o.optimizer, tuple(NAMES.values()))]
    assert len(ours) == 1
    return ours[0]


# ---- flags -------------------------------------------------------------------------------------

def test_flags_parse_validate_and_reach_the_optimizer_config(monkeypatch):
    args = _parse(["--optimizer", "muoneq", "--muoneq-mode", "rowcol", "--muoneq-phase", "3", "--reg-ns-dtype",
                   "fp32", "--reg-rms", "0.3", "--no-reg-split-qkv", "--weight-decay", "0.05"], monkeypatch=monkeypatch)
    assert (args.optimizer, args.muoneq_mode, args.muoneq_phase, args.reg_split_qkv) == ("muoneq", "rowcol", 3, False)
    assert not args.use_layer_wise_distributed_optimizer
    config = rm.optimizer_config(args)
    assert (config.optimizer, config.lr, config.weight_decay) == ("muoneq", 0.02, 0.05)
    assert (config.muoneq_mode, config.muoneq_phase, config.reg_rms, config.reg_split_qkv) == ("rowcol", 3, 0.3, False)
    defaults = _parse(["--optimizer", "reg"], monkeypatch=monkeypatch)
    assert (defaults.reg_p, defaults.reg_iters, defaults.reg_split_qkv, defaults.reg_nesterov) == (2.0, 1, True, True)


def test_registry_flags_tp_mode_and_normuon_reach_the_optimizer(monkeypatch):
    from reg_dist.integrations.megatron.optimizer import optimizer_kwargs, settings_from

    args = _parse(["--optimizer", "normuon", "--reg-beta2", "0.9", "--reg-tp-mode", "blockwise"], monkeypatch=monkeypatch)
    config = rm.optimizer_config(args)
    assert (config.reg_beta2, config.reg_tp_mode, config.reg_move_dtype) == (0.9, "blockwise", None)
    kwargs = optimizer_kwargs("normuon", settings_from(config), config.lr, config.weight_decay)
    assert kwargs["beta2"] == 0.9 and "move_dtype" not in kwargs  # moves then travel in the Newton–Schulz dtype
    with pytest.raises(SystemExit):
        _parse(["--optimizer", "reg", "--reg-beta2", "0.9"], monkeypatch=monkeypatch)  # not one of REG's


@pytest.mark.parametrize("name", ["reg_muon", "muoneq", "normuon"])
def test_reg_ns_method_flag_reaches_the_newton_schulz_optimizers(name, monkeypatch):
    from reg_dist.integrations.megatron.optimizer import optimizer_kwargs, settings_from

    config = rm.optimizer_config(_parse(["--optimizer", name, "--reg-ns-method", "gram"], monkeypatch=monkeypatch))
    assert optimizer_kwargs(name, settings_from(config), config.lr, config.weight_decay)["ns_method"] == "gram"
    config = rm.optimizer_config(_parse(["--optimizer", name], monkeypatch=monkeypatch))
    assert "ns_method" not in optimizer_kwargs(name, settings_from(config), config.lr, config.weight_decay)


@pytest.mark.parametrize("flag", ["--reg-exponent", "--muoneq-exponent"])
def test_exponent_flag_reaches_reg_under_either_name(flag, monkeypatch):
    from reg_dist.integrations.megatron.optimizer import optimizer_kwargs, settings_from

    config = rm.optimizer_config(_parse(["--optimizer", "reg", flag, "-0.5"], monkeypatch=monkeypatch))
    assert optimizer_kwargs("reg", settings_from(config), config.lr, config.weight_decay)["exponent"] == -0.5
    config = rm.optimizer_config(_parse(["--optimizer", "reg"], monkeypatch=monkeypatch))
    assert "exponent" not in optimizer_kwargs("reg", settings_from(config), config.lr, config.weight_decay)


def test_our_names_join_megatrons_choices_and_compose_with_a_users_provider(monkeypatch):
    def user(parser):
        parser.add_argument("--my-flag", type=int, default=0)
        return parser

    args = _parse(["--optimizer", "reg_muon", "--my-flag", "7", "--reg-ns-steps", "4"], rm.with_args(user),
                  monkeypatch)
    assert (args.optimizer, args.my_flag, args.reg_ns_steps) == ("reg_muon", 7, 4)
    # the other way round: the user's provider calls ours
    args = _parse(["--optimizer", "muon", "--my-flag", "1"], lambda p: rm.extra_args_provider(user(p)), monkeypatch)
    assert (args.optimizer, args.my_flag) == ("muon", 1)  # Megatron's own Muon stays reachable


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "reg", "--reg-iters", "0"], "argument --reg-iters: must be an integer >= 1, got 0"),
    (["--optimizer", "reg", "--reg-p", "0.5"], "--optimizer reg: p must be"),
    (["--optimizer", "muoneq", "--muoneq-mode", "diag"], "argument --muoneq-mode: invalid choice: 'diag'"),
    (["--optimizer", "muoneq", "--muoneq-phase", "2"], "--optimizer muoneq: phase applies only to mode='rowcol'"),
    (["--optimizer", "reg", "--muoneq-phase", "2"], "--muoneq-phase applies only to --optimizer muoneq, not reg"),
    (["--optimizer", "reg", "--use-torch-fsdp2"], "--optimizer reg does not support FSDP"),
    (["--optimizer", "reg_muon", "--reg-ns-dtype", "int8"], "argument --reg-ns-dtype: invalid choice: 'int8'"),
    (["--optimizer", "reg_muon", "--reg-ns-method", "fast"], "argument --reg-ns-method: invalid choice: 'fast'"),
    (["--optimizer", "regg"], "argument --optimizer: invalid choice: 'regg'"),
    (["--optimizer", "reg", "--reg-stats-beta", "0.9"], "--reg-stats-beta > 0 keeps a running average"),
    (["--optimizer", "reg", "--num-experts", "4", "--moe-grouped-gemm", "--transformer-impl", "local"],
     "--optimizer reg with --moe-grouped-gemm: megatron-core 0.19.2's --transformer-impl local ignores the flag and "
     "builds SequentialMLP experts"),
    (["--optimizer", "reg_muon", "--num-experts", "4", "--moe-grouped-gemm"],
     "--optimizer reg_muon with --moe-grouped-gemm: grouped-GEMM experts (megatron-core 0.19.2's TEGroupedMLP, which "
     "needs Transformer Engine) are not supported"),
    (["--optimizer", "reg", "--num-experts", "4", "--expert-model-parallel-size", "2", "--use-distributed-optimizer",
      "--expert-tensor-parallel-size", "1", "--tensor-model-parallel-size", "2", "--ckpt-format", "torch",
      "--save", "ckpt"], "--ckpt-format torch files hold one TP × PP × EP rank's state each"),
], ids=["iters", "p", "mode", "phase-mode", "phase-optimizer", "fsdp", "ns-dtype", "ns-method", "name", "stats-beta",
        "grouped-gemm-local", "grouped-gemm-te", "expert-tp-torch-format"])
def test_bad_flags_stop_the_parse_with_a_clear_message(argv, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv, monkeypatch=monkeypatch)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, split", [("reg", True), ("reg_muon", True), ("muoneq", False)])
def test_get_megatron_optimizer_builds_ours_from_parsed_flags(name, split, monkeypatch):
    extra = [] if split else ["--no-reg-split-qkv"]
    config = rm.optimizer_config(_parse(["--optimizer", name, "--reg-rms", "0.25", *extra], monkeypatch=monkeypatch))
    rm.register()

    def body(rank, world):
        model = _ddp(tc := _setup(), Tiny(tc))
        optimizer = get_megatron_optimizer(config, [model])
        inner = _inner(optimizer)
        (group,) = [g for g in inner.param_groups if g["algorithm"] != "adamw"]
        qkv = model.module.linear_qkv.weight
        others = [type(o.optimizer).__name__ for o in optimizer.chained_optimizers if o.optimizer is not inner]
        return (type(inner).__name__, group["rms"], group["lr"], group["param_names"], qkv.reg_layout.shape,
                qkv.reg_layout.fused is not None, others)

    for got in run_ranks(TP, body):
        cls, rms, lr, names, shape, fused, others = got
        assert (cls, rms, lr) == (NAMES[name].__name__, 0.25, 0.02)
        assert names == ["linear_qkv.weight", "linear_proj.weight"]
        assert shape == (QKV_ROWS, HIDDEN) and fused == split
        assert others == ["AdamW"]  # the bias: Megatron's Adam (torch AdamW without Apex / TE)


# ---- TP 2 × DP 2 trajectory ----------------------------------------------------------------------

REFERENCE = {"reg": optim.REG, "reg_muon": optim.Muon, "muoneq": optim.MuonEq, "normuon": optim.NorMuon}
# MuonEq and NorMuon name no move dtype: it defaults to the Newton–Schulz dtype, so fp32 moves are exact
SETTINGS = {"reg": {}, "reg_muon": {"reg_ns_dtype": "fp32", "reg_move_dtype": "fp32"},
            "muoneq": {"reg_ns_dtype": "fp32", "muoneq_mode": "rowcol", "muoneq_phase": 2},
            "normuon": {"reg_ns_dtype": "fp32", "reg_beta2": 0.9}}


def _reference_kwargs(name, config):
    from reg_dist.integrations.megatron.optimizer import optimizer_kwargs, settings_from

    kwargs = optimizer_kwargs(name, settings_from(config), config.lr, config.weight_decay)
    kwargs.pop("move_dtype", None)
    return kwargs


def _reference_adam(bias: nn.Parameter, config) -> torch.optim.AdamW:
    """The reference for Megatron's Adam on the bias: torch's AdamW with the config's hyper-parameters."""
    return torch.optim.AdamW([bias], lr=config.lr, weight_decay=config.weight_decay,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def _reference(name, config, full: dict, split: bool) -> tuple[dict, nn.Parameter, torch.optim.Optimizer,
                                                                 torch.optim.AdamW]:
    """The single-process reference over the full weights ``full`` (``qkv.weight``, ``qkv.bias`` and the
    other matrices): copies of the matrices (QKV split as ``split`` says) under reg_dist's optimizer
    ``name``, of the bias under AdamW; ``(matrices, bias, optimizer, adamw)``."""
    ref = {**{k: nn.Parameter(v.clone()) for k, v in _split(full["qkv.weight"], split).items()},
           **{n: nn.Parameter(v.clone()) for n, v in full.items() if "qkv" not in n}}
    bias = nn.Parameter(full["qkv.bias"].clone())
    optimizer = REFERENCE[name](list(ref.items()), **_reference_kwargs(name, config))
    return ref, bias, optimizer, _reference_adam(bias, config)


def _split(full: torch.Tensor, split: bool) -> dict:
    """The single-process matrices of the fused qkv weight: q, k, v (their rows of every group) or whole."""
    if not split:
        return {"qkv.weight": full}
    segments = fused_rows(QKV, GROUPS)
    return {f"qkv.{part}": torch.cat([full[s:e] for s, e, b in segments if b == k]) for k, part in enumerate("qkv")}


def _join(parts: dict, split: bool) -> torch.Tensor:
    if not split:
        return parts["qkv.weight"]
    taken, rows = [0, 0, 0], []
    for s, e, k in fused_rows(QKV, GROUPS):
        rows.append(parts["qkv." + "qkv"[k]][taken[k]:taken[k] + e - s])
        taken[k] += e - s
    return torch.cat(rows)


@pytest.mark.parametrize("split", [True, False], ids=["qkv-split", "qkv-whole"])
@pytest.mark.parametrize("name", list(NAMES))
def test_tp2_dp2_megatron_ddp_trajectory_equals_the_single_process_optimizer(name, split):
    config = rm.optimizer_config(optimizer=name, lr=0.02, weight_decay=0.1, clip_grad=0.0, reg_split_qkv=split,
                                 **SETTINGS[name])
    rm.register()
    batches, targets = _data(1)

    def body(rank, world):
        tc = _setup()
        model = _ddp(tc, Tiny(tc))
        optimizer = get_megatron_optimizer(config, [model])
        dp_rank = parallel_state.get_data_parallel_rank()
        params = {"qkv.weight": model.module.linear_qkv.weight, "qkv.bias": model.module.linear_qkv.bias,
                  "proj.weight": model.module.linear_proj.weight}
        dims = {"qkv.weight": 0, "qkv.bias": 0, "proj.weight": 1}

        def full(n):
            return _gather_tp(params[n], dims[n])

        # the single-process reference, on every rank: the full weights, the DP-averaged gradient
        ref_w = {n: full(n) for n in params}
        ref, ref_bias, ref_opt, ref_adam = _reference(name, config, ref_w, split)
        for x, t in zip(batches, targets):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            loss = ((model(x[dp_rank]) - t[dp_rank]) ** 2).mean()
            loss.backward()
            model.finish_grad_sync()
            ok, _, _ = optimizer.step()
            assert ok

            w = {"qkv.weight": _join(ref, split), "qkv.bias": ref_bias, "proj.weight": ref["proj.weight"]}
            ref_loss = sum(((_reference_forward(w, x[d]) - t[d]) ** 2).mean() for d in range(DP)) / DP
            ref_opt.zero_grad()
            ref_adam.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            ref_adam.step()
        expected = {"qkv.weight": _join({k: v.detach() for k, v in ref.items()}, split),
                    "qkv.bias": ref_bias.detach(), "proj.weight": ref["proj.weight"].detach()}
        for n in params:
            torch.testing.assert_close(full(n), expected[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        return _inner(optimizer).transformed, len(local_matrices(optimizer))

    work = run_ranks(TP * DP, body)
    assert all(matrices == 2 for _, matrices in work)
    pieces = 2 + (len(QKV) - 1 if split else 0)  # logical matrices per step
    per_replica = [w for w, _ in work[:TP]]  # ranks 0, 1: one TP group (one DP replica)
    assert sum(per_replica) == STEPS * (pieces * TP if name == "reg" else pieces)


# ---- TP 2 × DP 2 with Megatron's distributed optimizer ---------------------------------------------

WIDE, FC = 12, 16  # qkv (16 × 12), proj (12 × 16), fc1 (16 × 12), fc2 (12 × 16): 96 elements each per TP rank
BUCKET = 250  # grad-buffer buckets [fc2, fc1], [proj, bias, qkv] (64-element aligned starts), each halved over DP;
# Megatron's DDP keeps a bucket size only with overlap_grad_reduce
# each TP rank's (start, end) of its local shard on DP rank 0 and DP rank 1 (None: nothing)
HELD = {"fc2.weight": ((0, 96), None), "fc1.weight": ((0, 64), (64, 96)), "proj.weight": (None, (0, 96)),
        "qkv.bias": ((0, 8), None), "qkv.weight": ((0, 64), (64, 96))}


class Deeper(MegatronModule):
    """``linear_qkv`` (with a bias) → tanh → ``linear_proj`` → ``linear_fc1`` → tanh → ``linear_fc2``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.linear_qkv = _column(config, WIDE, QKV_ROWS, bias=True)
        self.linear_proj = _row(config, QKV_ROWS, WIDE)
        self.linear_fc1 = _column(config, WIDE, FC)
        self.linear_fc2 = _row(config, FC, WIDE)

    def forward(self, x):
        y, _ = self.linear_proj(torch.tanh(self.linear_qkv(x)[0]))
        return self.linear_fc2(torch.tanh(self.linear_fc1(y)[0]))[0]


def _deeper_reference(w: dict, x):
    y = torch.tanh(x @ w["qkv.weight"].T + w["qkv.bias"]) @ w["proj.weight"].T
    return torch.tanh(y @ w["fc1.weight"].T) @ w["fc2.weight"].T


def _deeper_trajectory(name: str, split: bool, layer_wise: bool = False) -> list:
    """``Deeper`` on TP 2 × DP 2 under Megatron's flat distributed optimizer (DDP buckets of ``BUCKET``) or its
    layer-wise one (DDP wrapped as ``megatron.training`` does for it), 3 steps checked against the
    single-process optimizer on the full weights; per rank: ``(flat range of each parameter held, or None,
    our matrices, our optimizer's last-step collectives)``."""
    config = rm.optimizer_config(optimizer=name, lr=0.02, weight_decay=0.1, clip_grad=0.0, reg_split_qkv=split,
                                 use_distributed_optimizer=not layer_wise,
                                 use_layer_wise_distributed_optimizer=layer_wise, **SETTINGS[name])
    rm.register()
    batches, targets = _data(2, WIDE)

    def body(rank, world):
        from megatron.training.training import wrap_model_chunks_with_ddp

        tc = _setup()
        if layer_wise:
            (model,) = wrap_model_chunks_with_ddp([Deeper(tc)], tc, DistributedDataParallelConfig(),
                                                  use_layer_wise_distributed_optimizer=True)
        else:
            model = DistributedDataParallel(config=tc, ddp_config=DistributedDataParallelConfig(
                use_distributed_optimizer=True, overlap_grad_reduce=True, bucket_size=BUCKET), module=Deeper(tc))
        optimizer = get_megatron_optimizer(config, [model])
        distopt = optimizer.chained_optimizers[-1]  # layer-wise: ours, then the flat one for Adam
        dp_rank = parallel_state.get_data_parallel_rank()
        m = model.module
        params = {"qkv.weight": m.linear_qkv.weight, "qkv.bias": m.linear_qkv.bias, "proj.weight": m.linear_proj.weight,
                  "fc1.weight": m.linear_fc1.weight, "fc2.weight": m.linear_fc2.weight}
        dims = {"qkv.weight": 0, "qkv.bias": 0, "proj.weight": 1, "fc1.weight": 0, "fc2.weight": 1}
        held = {}
        for n, p in params.items():
            try:
                r = distopt._get_model_param_range_map(p)["param"]
                held[n] = (r.start, r.end)
            except KeyError:
                held[n] = None

        def full(n):
            return _gather_tp(params[n], dims[n])

        ref_w = {n: full(n) for n in params}
        ref, ref_bias, ref_opt, ref_adam = _reference(name, config, ref_w, split)
        for x, t in zip(batches, targets):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            ((model(x[dp_rank]) - t[dp_rank]) ** 2).mean().backward()
            model.finish_grad_sync()
            ok, _, _ = optimizer.step()
            assert ok

            w = {"qkv.weight": _join(ref, split), "qkv.bias": ref_bias, **{n: ref[n] for n in ref if "qkv" not in n}}
            ref_loss = sum(((_deeper_reference(w, x[d]) - t[d]) ** 2).mean() for d in range(DP)) / DP
            ref_opt.zero_grad()
            ref_adam.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            ref_adam.step()
        expected = {"qkv.weight": _join({k: v.detach() for k, v in ref.items()}, split), "qkv.bias": ref_bias.detach(),
                    **{n: ref[n].detach() for n in ref if "qkv" not in n}}
        for n in params:
            torch.testing.assert_close(full(n), expected[n], rtol=1e-5, atol=1e-6, msg=lambda msg, n=n: f"{n}: {msg}")
        inner = _ours(optimizer)
        return held, sorted(n for g in inner.param_groups if g["algorithm"] != "adamw" for n in g["param_names"]), \
            inner.comm_stats()

    return run_ranks(TP * DP, body)


def _ours(optimizer):
    """Our torch optimizer in a Megatron optimizer chain (flat: inside ``DistOptAdapter``)."""
    for o in optimizer.chained_optimizers:
        for child in getattr(o, "chained_optimizers", [o]):
            inner = getattr(child.optimizer, "inner", child.optimizer)
            if isinstance(inner, tuple(NAMES.values())):
                return inner
    raise AssertionError("no reg_dist optimizer in the chain")


@pytest.mark.parametrize("name, split", [("reg", True), ("reg_muon", True), ("muoneq", True), ("normuon", True),
                                         ("reg_muon", False)],
                         ids=["reg", "reg_muon", "muoneq", "normuon", "reg_muon-qkv-whole"])
def test_tp2_dp2_distributed_optimizer_trajectory_equals_the_single_process_optimizer(name, split):
    """Megatron's DistributedOptimizer hands each DP rank flat ranges of the grad buffer (``HELD``): the
    QKV weight and fc1 are cut mid-row between the two DP ranks (QKV inside its k block), fc2 and proj
    lie wholly on one DP rank, with an empty shard on the other."""
    for rank, (held, matrices, _) in enumerate(_deeper_trajectory(name, split)):
        assert held == {n: ranges[rank // TP] for n, ranges in HELD.items()}
        assert len(matrices) == 4  # every rank passes every matrix, empty where it holds none


@pytest.mark.parametrize("name", ["reg", "reg_muon", "muoneq", "normuon"])
def test_tp2_dp2_layer_wise_optimizer_steps_whole_matrices_like_the_single_process_optimizer(name):
    """Megatron's layer-wise distributed optimizer: each DP rank steps whole (TP-local) matrices, its share
    of the four, with the DP-averaged gradient; the bias goes to Megatron's flat distributed optimizer
    (Adam). Our collectives are over the TP group alone: REG's row/column sums, Muon's and MuonEq's
    moves of TP blocks to one owner, no DP traffic."""
    results = _deeper_trajectory(name, True, layer_wise=True)
    owned = [set(matrices) for _, matrices, _ in results]
    assert owned[0] == owned[1] and owned[2] == owned[3]  # the TP ranks of a DP rank own the same matrices
    assert owned[0].isdisjoint(owned[2]) and owned[0] | owned[2] == {"linear_qkv.weight", "linear_proj.weight",
                                                                      "linear_fc1.weight", "linear_fc2.weight"}
    for held, _, comm in results:
        assert all(r is None for n, r in held.items() if n != "qkv.bias")  # the flat optimizer: the bias only
        assert set(comm) <= {"tp", "world"}, comm


# ---- pipeline parallelism: the stages hold different parameters ------------------------------------

class Pair(MegatronModule):
    """Pipeline stage 1's own layers: ``linear_fc1`` → tanh → ``linear_fc2``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.linear_fc1 = _column(config, HIDDEN, FFN)
        self.linear_fc2 = _row(config, FFN, HIDDEN)

    def forward(self, x):
        return self.linear_fc2(torch.tanh(self.linear_fc1(x)[0]))[0]


@pytest.mark.parametrize("name", ["reg", "reg_muon"])
def test_pipeline_stages_with_different_parameters_each_step_like_the_single_process_optimizer(name):
    """PP 2 × DP 2 (the distributed optimizer): stage 0 holds ``Tiny``, stage 1 ``Pair``. Each stage checks
    its routes and agrees on non-finite gradients among its own ranks only: a NaN gradient on stage 1
    in the last step skips that step there, while stage 0 takes it."""
    config = rm.optimizer_config(optimizer=name, lr=0.02, weight_decay=0.1, clip_grad=0.0,
                                 use_distributed_optimizer=True, **SETTINGS[name])
    rm.register()
    batches, targets = _data(3)

    def body(rank, world):
        tc = _setup(tp=1, pp=2, pipeline_dtype=torch.float32)
        stage, dp_rank = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        module = Tiny(tc) if stage == 0 else Pair(tc)
        model = DistributedDataParallel(config=tc, ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=True), module=module)
        optimizer = get_megatron_optimizer(config, [model])
        named = dict(module.named_parameters())
        qkv = named["linear_qkv.weight"].detach().clone() if stage == 0 else None
        ref = {k: nn.Parameter(v) for k, v in _split(qkv, True).items()} if stage == 0 else {}
        ref.update({n: nn.Parameter(p.detach().clone()) for n, p in named.items()
                    if p.ndim == 2 and n != "linear_qkv.weight"})
        ref_opt = REFERENCE[name](list(ref.items()), **_reference_kwargs(name, config))
        ref_bias = nn.Parameter(named["linear_qkv.bias"].detach().clone()) if stage == 0 else None
        ref_adam = _reference_adam(ref_bias, config) if stage == 0 else None

        def reference(x):
            if stage == 0:
                w = {"qkv.weight": _join(ref, True), "qkv.bias": ref_bias, "proj.weight": ref["linear_proj.weight"]}
                return _reference_forward(w, x)
            return torch.tanh(x @ ref["linear_fc1.weight"].T) @ ref["linear_fc2.weight"].T

        for step, (x, t) in enumerate(zip(batches, targets)):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            ((model(x[dp_rank]) - t[dp_rank]) ** 2).mean().backward()
            model.finish_grad_sync()
            nan = stage == 1 and step == STEPS - 1
            if nan:
                module.linear_fc2.weight.main_grad.fill_(float("nan"))
            optimizer.step()
            if nan:
                continue
            ref_loss = sum(((reference(x[d]) - t[d]) ** 2).mean() for d in range(DP)) / DP
            ref_loss.backward()
            for opt in (ref_opt, ref_adam):
                if opt is not None:
                    opt.step()
                    opt.zero_grad()
        expected = {n: ref[n] for n in named if n in ref}
        if stage == 0:
            expected.update({"linear_qkv.weight": _join(ref, True), "linear_qkv.bias": ref_bias})
        for n, p in named.items():
            torch.testing.assert_close(p.detach(), expected[n].detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda msg, n=n: f"stage {stage} {n}: {msg}")
        inner = optimizer.chained_optimizers[0].optimizer.inner
        return stage, inner.skipped_steps, inner.comm_stats().get("world", {}).get("calls", 0)

    # the agreement over the stage's DP group (its ranks' only group): REG's rides on its statistics
    # all-reduce (``comm.agree.Agreement``), Muon's is an all-reduce of its own, once per step
    calls = 0 if name == "reg" else 1
    assert run_ranks(4, body) == [(0, 0, calls), (0, 0, calls), (1, 1, calls), (1, 1, calls)]


# ---- bf16: Megatron's fp32 main parameters ------------------------------------------------------

@pytest.mark.parametrize("name, mode", [("reg", "ddp"), ("reg_muon", "flat"), ("muoneq", "flat"),
                                        ("reg_muon", "layer-wise")],
                         ids=["reg-float16-optimizer", "reg_muon-distopt", "muoneq-distopt", "reg_muon-layer-wise"])
def test_bf16_main_params_step_like_the_single_process_optimizer(name, mode):
    """``--bf16``: a bf16 model whose fp32 main parameters (Megatron's Float16OptimizerWithFloat16Params,
    the flat distributed optimizer's fp32 shards, or the layer-wise one's main copies of the matrices a DP rank
    owns) our optimizer steps. The reference steps fp32 copies of the full weights with the same gradients
    (the DP average of the bf16 model's, gathered over TP): the main parameters must equal them."""
    distopt = mode != "ddp"
    config = rm.optimizer_config(optimizer=name, lr=0.02, weight_decay=0.1, clip_grad=0.0, bf16=True,
                                 use_distributed_optimizer=mode == "flat",
                                 use_layer_wise_distributed_optimizer=mode == "layer-wise", **SETTINGS[name])
    rm.register()
    batches, targets = _data(4)

    def body(rank, world):
        from megatron.training.training import wrap_model_chunks_with_ddp

        tc = _setup(bf16=True, params_dtype=torch.bfloat16)
        (model,) = wrap_model_chunks_with_ddp([Tiny(tc)], tc, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distopt),
            use_layer_wise_distributed_optimizer=mode == "layer-wise")
        optimizer = get_megatron_optimizer(config, [model])
        dp_group = parallel_state.get_data_parallel_group()
        tp_rank, dp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        m = model.module
        params = {"qkv.weight": m.linear_qkv.weight, "qkv.bias": m.linear_qkv.bias, "proj.weight": m.linear_proj.weight}
        dims = {"qkv.weight": 0, "qkv.bias": 0, "proj.weight": 1}

        def full(t, n):
            return _gather_tp(t, dims[n])

        master = {n: full(p.detach(), n).float() for n, p in params.items()}
        ref, ref_bias, ref_opt, ref_adam = _reference(name, config, master, True)
        for x, t in zip(batches, targets):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            ((model(x[dp_rank].bfloat16()).float() - t[dp_rank]) ** 2).mean().backward()
            grads = {}
            for n, p in params.items():  # this rank's fp32 gradient, before Megatron reduces it
                g = p.main_grad.clone()
                dist.all_reduce(g, group=dp_group)
                grads[n] = full(g / DP, n)
            model.finish_grad_sync()
            ok, _, _ = optimizer.step()
            assert ok
            for k, g in _split(grads["qkv.weight"], True).items():
                ref[k].grad = g
            ref["proj.weight"].grad, ref_bias.grad = grads["proj.weight"], grads["qkv.bias"]
            ref_opt.step()
            ref_adam.step()
        expected = {"qkv.weight": _join({k: v.detach() for k, v in ref.items()}, True), "qkv.bias": ref_bias.detach(),
                    "proj.weight": ref["proj.weight"].detach()}
        for n, p in params.items():
            local = expected[n].chunk(TP, dim=dims[n])[tp_rank].reshape(-1)
            if distopt:  # this rank's fp32 shard of the flat local weight, if any (layer-wise: the matrix whole)
                try:
                    r = optimizer.chained_optimizers[-1]._get_model_param_range_map(p)["param"]
                    local = local[r.start:r.end]
                except KeyError:
                    if mode == "flat" or getattr(p, "main_param", None) is None:
                        continue
            assert p.main_param.dtype == torch.float32
            torch.testing.assert_close(p.main_param.reshape(-1), local, rtol=1e-5, atol=1e-6,
                                       msg=lambda msg, n=n: f"{n}: {msg}")
        return sum(getattr(p, "main_param", None) is not None for n, p in params.items() if n != "qkv.bias")

    owned = run_ranks(TP * DP, body)
    if mode == "layer-wise":  # each of the two matrices has fp32 main copies on one DP rank (its two TP ranks)
        assert owned[0] == owned[1] and owned[2] == owned[3] and owned[0] + owned[2] == 2
