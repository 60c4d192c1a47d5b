"""DeepSpeed (ZeRO 0, 1, 2, 3, gloo ranks forked from this process): REG, MuonEq and reg_dist's Muon
named in the JSON config equal the single-process optimizers on the concatenated batch (fp32), with
gradient accumulation, clipping, a JSON scheduler and a checkpoint round trip; each matrix is
transformed once per step; bf16 trains; bad params fail early; any other optimizer type is plain
``deepspeed.initialize``.

``Net`` (``sharded``) is uneven: under ZeRO 1/2 on 2 ranks its 3368 elements split 1684 / 1684 cut
``down`` (18 × 56) mid-row, and rank 1 holds nothing of ``up``, rank 0 nothing of ``squeeze`` and
``expand``; under ZeRO 3 every parameter is split on its own (``squeeze``, 3 × 18, mid-row; on 4
ranks the last rank's piece is short and padded). The fused variant adds a QKV weight marked as three
matrices and a 3-D stack of three experts."""

import contextlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
# what deepspeed.initialize would otherwise import in every forked rank (~8 s each): import it once, here
import deepspeed  # noqa: E402
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402,F401  (is_zero_supported_optimizer imports it)
import deepspeed.runtime.zero.stage_1_and_2  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401

import reg_dist.deepspeed as rds  # noqa: E402
from multiproc import run_ranks  # noqa: E402
from reg_dist import mark_fused, optim  # noqa: E402
import reg_dist.integrations.deepspeed as integration  # noqa: E402
from reg_dist.integrations.deepspeed import RegDistAdapter, parse_params, reg_dist_type  # noqa: E402
from sharded import BATCH, QKV, STEPS, Net, assert_matches, data, loss_of, reference  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
WORLD = 2
MATRICES = 4  # up, down, squeeze, expand (embed and head go to AdamW)
FUSED_MATRICES = MATRICES + 3 + 1 + 3  # q, k, v; proj; three experts
ALGORITHMS = {  # JSON type, JSON params, single-process reference, its kwargs
    "reg": ("REG", {"lr": 0.02}, optim.REG, {"lr": 0.02}),
    "muon": ("reg_dist.Muon", {"lr": 0.02, "ns_dtype": "float32", "move_dtype": "float32"}, optim.Muon,
             {"lr": 0.02, "ns_dtype": torch.float32}),
    "muoneq": ("MuonEq", {"lr": 0.02, "ns_dtype": "float32", "move_dtype": "float32", "mode": "rowcol", "phase": 2},
               optim.MuonEq, {"lr": 0.02, "ns_dtype": torch.float32, "mode": "rowcol", "phase": 2}),
    "normuon": ("NorMuon", {"lr": 0.02, "ns_dtype": "float32", "beta2": 0.9}, optim.NorMuon,  # moves default to fp32
                {"lr": 0.02, "ns_dtype": torch.float32, "beta2": 0.9}),
}


def _no_shm_build():
    """DeepSpeed JIT-builds a shared-memory comm op at every init_distributed on the CPU (40-60 s
    uncached); gloo is all these tests need. In the forked rank only."""
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _config(algorithm, stage, gas, world=WORLD, **extra):
    kind, params, _, _ = ALGORITHMS[algorithm]
    return {"train_micro_batch_size_per_gpu": BATCH // world // gas, "gradient_accumulation_steps": gas,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": kind, "params": dict(params)},
            "steps_per_print": 10**6, "gradient_clipping": 0.0, **extra}  # DeepSpeed 0.19.8 clips at 1.0 by default


def _reference(algorithm, clip=0.0):
    """The full parameters after ``STEPS`` single-process steps on the whole batches (clipped first)."""
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, **kwargs)
    for tokens in data():
        opt.zero_grad()
        loss_of(model, tokens).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reg_with_lrs(lrs: list[float]):
    """The single-process REG model after one step per batch, step t at lr ``lrs[t]``."""
    torch.manual_seed(0)
    model = Net()
    opt = optim.REG(model, lr=0.02)
    for tokens, lr in zip(data(), lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    return model


def _resumed_at_step_2(engine_of, where: str, rank: int, world: int):
    """Two steps on ``engine_of(0)``'s engine and ``save_checkpoint``; then a fresh ``engine_of(1)`` (other
    initial weights) ``load_checkpoint``s and takes the other steps. Its model; ``engine_of(seed)`` gives
    ``(model, engine)``."""
    per, batches = BATCH // world, data()
    _, engine = engine_of(0)
    for tokens in batches[:2]:
        engine.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
        engine.step()
    engine.save_checkpoint(where, tag="step2")
    model, resumed = engine_of(1)
    resumed.load_checkpoint(where, tag="step2")
    for tokens in batches[2:]:
        resumed.backward(loss_of(resumed, tokens[rank * per:(rank + 1) * per]))
        resumed.step()
    return model


def _full(model, stage):
    """A context in which the model holds its full parameters (gathered under ZeRO 3)."""
    return deepspeed.zero.GatheredParameters(list(model.parameters())) if stage == 3 else contextlib.nullcontext()


def _train(config, expected, gas, world=WORLD, fused=False):
    """Every rank trains ``Net`` through reg_dist.deepspeed.initialize(config) on its share of each
    batch, in ``gas`` micro-batches, and must end at ``expected``; returns each rank's
    (transformed, engine.optimizer type, stage)."""
    stage = config["zero_optimization"]["stage"]

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = Net(fused=fused)
        if fused:
            mark_fused(model.qkv.weight, QKV)
        engine, optimizer, _, _ = rds.initialize(model=model, config=config)
        adapter = engine.basic_optimizer
        assert isinstance(adapter, RegDistAdapter) and adapter.inner is not None
        per = BATCH // world
        for tokens in data():
            for chunk in tokens[rank * per:(rank + 1) * per].chunk(gas):
                engine.backward(loss_of(engine, chunk))
                engine.step()
        with _full(model, stage):
            assert_matches(model, expected)
        return adapter.transformed, type(optimizer).__name__, adapter.stage

    return run_ranks(world, body, init_group=False)


WRAPPERS = {0: "RegDistAdapter", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer",
            3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_reg_equals_single_process(stage, gas):
    out = _train(_config("reg", stage, gas), _reference("reg"), gas)
    # REG counts the matrices whose pieces it scaled: every rank takes part in every matrix, once per step
    assert [t for t, _, _ in out] == [STEPS * MATRICES] * WORLD
    assert {(name, st) for _, name, st in out} == {(WRAPPERS[stage], stage)}


@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("algorithm", ["muon", "muoneq"])
def test_muon_and_muoneq_equal_single_process(algorithm, stage, gas):
    _owner_path_equals_single_process(algorithm, stage, gas)


@pytest.mark.parametrize("stage", [1, 3])
def test_normuon_equals_single_process(stage):
    _owner_path_equals_single_process("normuon", stage, 1)


def _owner_path_equals_single_process(algorithm, stage, gas):
    out = _train(_config(algorithm, stage, gas), _reference(algorithm), gas)
    work = [t for t, _, _ in out]
    if stage == 0:  # DDP-style: every rank orthogonalises every matrix
        assert work == [STEPS * MATRICES] * WORLD
    else:  # owner path: each matrix once per step, on one rank
        assert sum(work) == STEPS * MATRICES


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_fused_qkv_and_expert_stack_on_4_ranks(algorithm, stage):
    """4 ranks (ZeRO 3 pads the last rank's partitions); a QKV weight marked as three matrices and a
    3-D stack of three experts equal the single-process run on separate matrices."""
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    out = _train(_config(algorithm, stage, 1, world=4), reference(cls, kwargs, fused=True), 1, world=4, fused=True)
    work = [t for t, _, _ in out]
    assert work == [STEPS * FUSED_MATRICES] * 4 if algorithm == "reg" else sum(work) == STEPS * FUSED_MATRICES


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gradient_clipping_acts_on_raw_gradients(stage):
    clip = 0.05  # well below the gradient norms here, so every step is clipped
    _train(_config("reg", stage, 2, gradient_clipping=clip), _reference("reg", clip=clip), 2)


def test_config_file_through_args_and_lr_scheduler(tmp_path):
    """A JSON file named by ``args.deepspeed_config``, with a scheduler block: the schedule's lr
    reaches reg_dist's groups."""
    config = _config("reg", 2, 1, scheduler={"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 2, "warmup_type": "linear"}})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = Net()
        args = types.SimpleNamespace(deepspeed_config=str(path), local_rank=rank)
        engine, _, _, scheduler = rds.initialize(args=args, model=model)
        assert scheduler is not None
        lrs = []
        per = BATCH // world
        for tokens in data():
            lrs.append(engine.get_lr()[0])
            engine.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
            engine.step()
            inner = {g["lr"] for g in engine.basic_optimizer.inner.param_groups}
            assert inner == {lrs[-1]}  # the step used the scheduled lr
        return lrs, {k: v.numpy().copy() for k, v in model.state_dict().items()}

    (lrs, state), _ = run_ranks(WORLD, body, init_group=False)
    assert 0 <= lrs[0] < lrs[-1] <= 0.02  # a warm-up, applied
    model = _reg_with_lrs(lrs)  # the reference with the same lr per step
    for name, value in model.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(state[name]), value, rtol=1e-5, atol=1e-6)


def test_unknown_param_key_lists_the_valid_ones():
    config = _config("reg", 1, 1)
    config["optimizer"]["params"]["betas"] = [0.9, 0.95]
    with pytest.raises(ValueError, match=r"unknown optimizer param\(s\) \['betas'\].*valid: lr, momentum"):
        rds.initialize(model=Net(), config=config)


def test_bad_dtype_name_and_client_optimizer_with_config_optimizer_are_refused():
    config = _config("muon", 1, 1)
    config["optimizer"]["params"]["ns_dtype"] = "int8"
    with pytest.raises(ValueError, match="ns_dtype"):
        rds.initialize(model=Net(), config=config)
    model = Net()
    with pytest.raises(ValueError, match="give one of them"):
        rds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=_config("reg", 1, 1))


@pytest.mark.parametrize("kind", ["reg_dist.muon", "muoneq", "normuon"])
def test_ns_method_is_a_json_param_of_the_newton_schulz_optimizers(kind):
    assert parse_params(kind, {"ns_method": "gram", "ns_dtype": "fp32"}) == {"ns_method": "gram",
                                                                             "ns_dtype": torch.float32}
    with pytest.raises(ValueError, match=r"unknown optimizer param\(s\) \['ns_method'\] for type 'reg'"):
        parse_params("reg", {"ns_method": "gram"})


def test_bad_zero_stage_is_refused():
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        rds.initialize(model=Net(), config=_config("reg", 4, 1))


@pytest.mark.parametrize("optimizer", [None, {"type": "Muon", "params": {"lr": 0.02}},
                                       {"type": "AdamW", "params": {"lr": 0.02, "torch_adam": True}}],
                         ids=["no-optimizer", "deepspeed-muon", "adamw"])
def test_other_types_are_exactly_deepspeed_initialize(monkeypatch, optimizer):
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    if optimizer is not None:
        config["optimizer"] = optimizer
    calls = []
    monkeypatch.setattr(integration, "_DEEPSPEED_INITIALIZE", lambda **kw: calls.append(kw) or ("engine", "opt", None, None))
    model = Net()
    assert rds.initialize(model=model, config=config, mpu="mpu", distributed_port=1234) == ("engine", "opt", None, None)
    (kw,) = calls
    assert kw["config"] is config and kw["model"] is model and kw["optimizer"] is None
    assert kw["mpu"] == "mpu" and kw["distributed_port"] == 1234


def test_adamw_passes_through_and_trains():
    """A real run: AdamW (torch_adam) through reg_dist.deepspeed.initialize is DeepSpeed's own."""
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        engine, optimizer, _, _ = rds.initialize(model=Net(), config=config)
        assert type(engine.basic_optimizer) is torch.optim.AdamW
        tokens = data()[0][rank * 4:(rank + 1) * 4]
        losses = []
        for _ in range(3):
            loss = loss_of(engine, tokens)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses

    for losses in run_ranks(WORLD, body, init_group=False):
        assert losses[-1] < losses[0]


def test_shipped_configs_build_and_step():
    """Every ``configs/zero{stage}_{optimizer}.json``, by path: reg_dist's optimizer at that stage,
    each matrix transformed at every step."""
    paths = sorted(CONFIGS.glob("zero*.json"))
    assert len(paths) == 12
    for path in paths:
        config = json.loads(path.read_text())
        assert reg_dist_type(config) is not None and "train_batch_size" not in config  # any world size
        parse_params(reg_dist_type(config), config["optimizer"].get("params"))

    def body(rank, world):
        _no_shm_build()
        out = {}
        for path in paths:
            torch.manual_seed(0)
            engine, _, _, scheduler = rds.initialize(model=Net(), config=str(path))
            adapter = engine.basic_optimizer
            for tokens in data()[:2]:
                engine.backward(loss_of(engine, tokens[rank * 4:(rank + 1) * 4]))
                engine.step()
            out[path.stem] = (adapter.stage, adapter.cls.__name__, adapter.transformed, scheduler is not None)
        return out

    ranks = run_ranks(WORLD, body, init_group=False)
    for name in ranks[0]:
        stage, cls = int(name[4]), {"reg": "REG", "muon": "Muon", "muoneq": "MuonEq"}[name.split("_")[1]]
        assert [r[name][:2] for r in ranks] == [(stage, cls)] * WORLD and all(r[name][3] for r in ranks)
        work = [r[name][2] for r in ranks]
        assert (work == [2 * MATRICES] * WORLD) if stage == 0 or cls == "REG" else sum(work) == 2 * MATRICES


@pytest.mark.parametrize("stage,algorithm", [(1, "reg"), (2, "reg"), (2, "muon"), (2, "muoneq"), (3, "muoneq")])
def test_bf16_loss_falls(stage, algorithm):
    """bf16 weights (fp32 master partitions): the loss on a fixed batch falls."""
    config = _config(algorithm, stage, 1, bf16={"enabled": True})

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        engine, *_ = rds.initialize(model=Net(), config=config)
        assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
        tokens, losses = data()[0][rank * 4:(rank + 1) * 4], []
        for _ in range(4):
            loss = loss_of(engine, tokens)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses, engine.basic_optimizer.transformed

    out = run_ranks(WORLD, body, init_group=False)
    for losses, _ in out:
        assert losses[-1] < losses[0] - 0.3, losses
    assert sum(w for _, w in out) == 4 * MATRICES * (WORLD if algorithm == "reg" else 1)


def _fp16_run(stage, fp16, batches):
    """Rank 0's (loss scale, skipped steps, matrices transformed) and full weights (as float32 arrays)
    after REG under DeepSpeed fp16 with ``fp16`` settings, one step per batch."""

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = Net()
        engine, *_ = rds.initialize(model=model, config=_config("reg", stage, 1, fp16=fp16))
        per = BATCH // world
        for tokens in batches:
            engine.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
            engine.step()
        counts = (engine.optimizer.loss_scale, engine.skipped_steps, engine.basic_optimizer.transformed)
        with _full(model, stage):
            return counts, {k: v.float().numpy().copy() for k, v in model.state_dict().items()}

    return run_ranks(WORLD, body, init_group=False)[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_dynamic_loss_scale_skips_overflow_steps_and_steps_on_unscaled_gradients(stage):
    """fp16 weights, fp32 master partitions. Dynamic loss scaling from 2^17 (hysteresis 1) overflows on
    the first two batches: DeepSpeed skips those steps before ours is called (counted in
    ``engine.skipped_steps``; no matrix transformed, no state touched), then trains at 2^15. The result
    is bit for bit the run at a static scale of 2^10 on the other batches only (the scale cancels
    exactly), and the fp32 single-process run within fp16 rounding."""
    overflow = [torch.randint(0, 32, (BATCH, 6), generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    (scale, skipped, work), dynamic = _fp16_run(stage, {"enabled": True, "initial_scale_power": 17,
                                                        "hysteresis": 1}, overflow + data())
    assert (scale, skipped, work) == (2.0**15, 2, STEPS * MATRICES)
    (scale, skipped, _), static = _fp16_run(stage, {"enabled": True, "loss_scale": 2.0**10}, data())
    assert (scale, skipped) == (2.0**10, 0)
    expected = _reference("reg")
    for name, value in dynamic.items():
        assert (value == static[name]).all(), name
        torch.testing.assert_close(torch.from_numpy(value), expected[name], rtol=2e-3, atol=5e-4)


def test_unsupported_precisions_are_refused_before_deepspeed_starts():
    with pytest.raises(NotImplementedError, match="fp16 at ZeRO stage 0"):
        rds.initialize(model=Net(), config=_config("reg", 0, 1, fp16={"enabled": True}))
    with pytest.raises(NotImplementedError, match="bf16 at ZeRO stage 0"):
        rds.initialize(model=Net(), config=_config("reg", 0, 1, bf16={"enabled": True}))
    with pytest.raises(NotImplementedError, match="BF16_Optimizer"):
        rds.initialize(model=Net(), config=_config("reg", 1, 1, bf16={"enabled": True},
                                                   data_types={"grad_accum_dtype": "fp32"}))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_round_trip_resumes_the_same_trajectory(tmp_path, stage):
    """2 steps, ``save_checkpoint``, a fresh engine (other initial weights) ``load_checkpoint``s and
    takes the 3rd: the result is the uninterrupted run's (MuonEq's phase needs the step counts too)."""
    config, expected = _config("muoneq", stage, 1), _reference("muoneq")
    where = str(tmp_path / "ckpt")

    def engine_of(seed):
        torch.manual_seed(seed)
        model = Net()
        return model, rds.initialize(model=model, config=config)[0]

    def body(rank, world):
        _no_shm_build()
        model = _resumed_at_step_2(engine_of, where, rank, world)
        with _full(model, stage):
            assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_conv1d_kernel_is_one_out_by_in_k_matrix_at_every_stage(stage):
    """A 3-D ``nn.Conv1d`` kernel (out, in, k) is the conv kernel ``1×(out×in·k)`` under every stage,
    as in one process (stage 0 used to see it as an expert stack)."""

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 6, 5))
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "REG", "params": {"lr": 0.02}}, "gradient_clipping": 0.0}
        engine, _, _, _ = rds.initialize(model=model, config=config)
        (row,) = [r for r in engine.basic_optimizer.inner.routes if r.name == "0.weight"]
        return row.algorithm, row.matrix

    assert run_ranks(WORLD, body, init_group=False) == [("reg", (1, 6, 12))] * WORLD


@pytest.mark.parametrize("algorithm,saved,resumed", [("muoneq", (2, 2), (2, 1)), ("reg", (1, 3), (2, 1)),
                                                     ("muon", (1, 0), (2, 3))],
                         ids=["zero2-2ranks-to-zero2-1rank", "zero3-1rank-to-zero1-2ranks",
                              "zero0-1rank-to-zero3-2ranks"])
def test_checkpoint_resumes_at_another_world_size_and_stage(tmp_path, algorithm, saved, resumed):
    """``reg_dist.deepspeed.save_checkpoint`` after 2 steps on ``saved`` = (ranks, ZeRO stage), then a
    fresh engine (other initial weights) on ``resumed`` ``load_checkpoint``s and takes the 3rd step:
    weights, momentum, step counts and the scheduled lr carry over, and the result is the uninterrupted
    single-process run's."""
    where = str(tmp_path / "dcp")
    warmup = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.005, "warmup_max_lr": 0.02, "warmup_num_steps": 2,
                                             "warmup_type": "linear"}}

    def run(world, stage, batches, load):
        def body(rank, world):
            _no_shm_build()
            torch.manual_seed(1 if load else 0)
            model = Net()
            engine, *_ = rds.initialize(model=model, config=_config(algorithm, stage, 1, world, scheduler=warmup))
            if load:
                rds.load_checkpoint(engine, where)
            per, lrs = BATCH // world, []
            for tokens in batches:
                lrs.append(engine.get_lr()[0])
                engine.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
                engine.step()
            if not load:
                rds.save_checkpoint(engine, where)
            with _full(model, stage):
                return lrs, engine.global_steps, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

        return run_ranks(world, body, init_group=False)[0]

    first, _, _ = run(*saved, data()[:2], load=False)
    last, steps, state = run(*resumed, data()[2:], load=True)
    assert steps == STEPS
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, **kwargs)
    for tokens, lr in zip(data(), first + last):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    assert 0 < first[-1] < last[0]  # the warm-up, resumed where it stopped
    assert_matches(model, {k: torch.from_numpy(v) for k, v in state.items()})


def test_resharding_checkpoint_refuses_other_optimizers_and_fp16(tmp_path):
    def body(rank, world):
        _no_shm_build()
        adamw = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6,
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}
        engine, *_ = rds.initialize(model=Net(), config=adamw)
        with pytest.raises(ValueError, match="does not step a reg_dist optimizer"):
            rds.save_checkpoint(engine, tmp_path / "a")
        engine, *_ = rds.initialize(model=Net(), config=_config("reg", 2, 1, world, fp16={"enabled": True}))
        with pytest.raises(NotImplementedError, match="fp16"):
            rds.load_checkpoint(engine, tmp_path / "a")

    run_ranks(1, body, init_group=False)
