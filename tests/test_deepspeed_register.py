"""``reg_dist.deepspeed.register()``: plain ``deepspeed.initialize`` (what the Hugging Face Trainer and
Accelerate call) with REG or reg_dist's Muon named in the JSON, and a reg_dist optimizer given as
``optimizer=`` at ZeRO 0-3, equal the single-process optimizers (2 gloo ranks, fp32); without
``register()`` the client optimizer fails at its first step with an error naming the fix."""

import inspect
import math

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")
import deepspeed  # noqa: E402

import reg_dist.deepspeed as rds  # noqa: E402
import reg_dist.integrations.deepspeed as integration  # noqa: E402
from multiproc import run_ranks  # noqa: E402
from reg_dist.integrations.deepspeed import RegDistAdapter  # noqa: E402
from sharded import BATCH, Net, assert_matches, data, loss_of  # noqa: E402
from test_integration_deepspeed import (ALGORITHMS, WORLD, _config, _full, _no_shm_build, _reference,  # noqa: E402
                                        _resumed_at_step_2)
from test_integration_deepspeed import _train as _train_micro_batches  # noqa: E402


def _train(engine, rank, world):
    per = BATCH // world
    for tokens in data():
        engine.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
        engine.step()


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_plain_deepspeed_initialize_after_register(algorithm, stage):
    config, expected = _config(algorithm, stage, 1), _reference(algorithm)

    def body(rank, world):
        _no_shm_build()
        rds.register()
        torch.manual_seed(0)
        model = Net()
        engine, *_ = deepspeed.initialize(model=model, config=config)
        assert isinstance(engine.basic_optimizer, RegDistAdapter)
        _train(engine, rank, world)
        with _full(model, stage):
            assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)


def _groups(model):
    """Two groups with their own hyper-parameters; the head sits in a module named ``3``, so the default
    rule sends it to the matrix algorithm: the adapter must follow the client's routing, not its own."""
    body = nn.ModuleList([model.up, model.down, model.squeeze, model.head])
    rest = nn.ModuleDict({"embed": model.embed, "expand": model.expand, "norm": model.norm})
    return [{"params": body, "lr": 0.03}, {"params": rest, "weight_decay": 0.0}]


def _client_reference(algorithm):
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = Net()
    opt = cls(_groups(model), **kwargs)
    for tokens in data():
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [(r.shape, r.algorithm) for r in opt.routes]


def _client_config(stage):
    return {"train_micro_batch_size_per_gpu": BATCH // WORLD, "zero_optimization": {"stage": stage},
            "steps_per_print": 10**6, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_client_optimizer_after_register(algorithm, stage):
    """``deepspeed.initialize(optimizer=cls(groups, nonfinite="raise", ...))`` (what ``accelerator.prepare``
    does): the groups' hyper-parameters, the routing and the constructor arguments carry over."""
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    expected, routes = _client_reference(algorithm)
    ctor = {"nonfinite": "raise", **({"move_dtype": torch.float32} if cls.moves else {})}

    def body(rank, world):
        _no_shm_build()
        rds.register()
        torch.manual_seed(0)
        model = Net()
        client = cls(_groups(model), **kwargs, **ctor)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=_client_config(stage))
        inner = engine.basic_optimizer.inner
        assert (inner.nonfinite, inner.move_dtype) == ("raise", ctor.get("move_dtype"))
        _train(engine, rank, world)
        with _full(model, stage):
            assert_matches(model, expected)
        return sorted((math.prod(r.shape), r.algorithm) for r in inner.routes)  # pieces show 1-D as 1 × n

    for got in run_ranks(WORLD, body, init_group=False):
        assert got == sorted((math.prod(s), a) for s, a in routes)
    assert ("reg" if algorithm == "reg" else "muon", (32, 18)) in [(a, tuple(s)) for s, a in routes]  # the head


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_client_optimizer_without_register_names_the_fix(stage):
    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = Net()
        engine, *_ = deepspeed.initialize(model=model, optimizer=rds.OPTIMIZERS["reg"].cls(model, lr=0.02),
                                          config=_client_config(stage))
        engine.backward(loss_of(engine, data()[0][rank * 4:(rank + 1) * 4]))
        with pytest.raises(RuntimeError, match=r"not built over.*call reg_dist\.deepspeed\.register\(\) before "
                                               r"deepspeed\.initialize"):
            engine.step()

    run_ranks(WORLD, body, init_group=False)


def test_client_optimizer_without_register_at_zero_0_steps_the_parameters():
    """Unpatched ZeRO 0 (fp32) hands the optimizer the parameters themselves: equal to one process."""
    expected = _reference("reg")

    def body(rank, world):
        _no_shm_build()
        torch.manual_seed(0)
        model = Net()
        engine, *_ = deepspeed.initialize(model=model, optimizer=rds.OPTIMIZERS["reg"].cls(model, lr=0.02),
                                          config=_client_config(0))
        _train(engine, rank, world)
        assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)


def test_register_twice_and_reg_dist_initialize_after_it():
    """``register()`` twice patches once; both ``deepspeed.initialize`` and ``reg_dist.deepspeed.initialize``
    then build reg_dist's optimizer (no recursion: the wrapper calls DeepSpeed's own)."""
    expected = _reference("reg")

    def body(rank, world):
        _no_shm_build()
        original = deepspeed.initialize
        rds.register()
        rds.register()
        assert deepspeed.initialize is rds.initialize and integration._DEEPSPEED_INITIALIZE is original
        for start in (rds.initialize, deepspeed.initialize):
            torch.manual_seed(0)
            model = Net()
            engine, *_ = start(model=model, config=_config("reg", 2, 1))
            _train(engine, rank, world)
            assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)


def test_other_types_after_register_are_deepspeed_own(monkeypatch):
    monkeypatch.setattr(deepspeed, "initialize", deepspeed.initialize)  # undone after the test
    calls = []
    monkeypatch.setattr(integration, "_DEEPSPEED_INITIALIZE", lambda **kw: calls.append(kw) or ("engine",))
    rds.register()
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}
    assert deepspeed.initialize(model=Net(), config=config) == ("engine",)
    (kw,) = calls
    assert kw["config"] is config and kw["optimizer"] is None


def test_client_optimizer_refusals():
    model = Net()
    with pytest.raises(ValueError, match="give one of them"):
        rds.initialize(model=model, optimizer=rds.OPTIMIZERS["reg"].cls(model), config=_config("muon", 1, 1))
    stepped = rds.OPTIMIZERS["reg"].cls(model)
    loss_of(model, data()[0]).backward()
    stepped.step()
    with pytest.raises(ValueError, match="has stepped already"):
        rds.initialize(model=model, optimizer=stepped, config=_client_config(1))


def test_a_client_optimizer_built_with_mesh_is_refused():
    def body(rank, world):
        from torch.distributed.device_mesh import init_device_mesh

        model = Net()
        opt = rds.OPTIMIZERS["reg"].cls(model, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
        with pytest.raises(ValueError, match="built with mesh="):
            rds.initialize(model=model, optimizer=opt, config=_client_config(1))

    run_ranks(1, body)


def test_the_wrapper_takes_deepspeed_initialize_arguments():
    """After ``register()`` every caller's arguments reach the wrapper: the same names, in order."""
    ours = inspect.signature(rds.initialize).parameters
    assert list(ours) == list(inspect.signature(integration._DEEPSPEED_INITIALIZE).parameters)


OFFLOAD = {"offload_optimizer": {"device": "cpu"}}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_offload_optimizer_steps_the_cpu_partitions(stage):
    """``"offload_optimizer": {"device": "cpu"}``: reg_dist (never DeepSpeedCPUAdam) steps the CPU fp32
    partitions, equal to one process; JSON-named REG and a client Muon."""
    config = _config("reg", stage, 1)
    config["zero_optimization"].update(OFFLOAD)
    client_config = _client_config(stage)
    client_config["zero_optimization"].update(OFFLOAD)
    _, _, cls, kwargs = ALGORITHMS["muon"]
    expected, client_expected = _reference("reg"), _client_reference("muon")[0]

    def body(rank, world):
        _no_shm_build()
        rds.register()
        for cfg, make, want in ((config, None, expected), (client_config, lambda m: cls(_groups(m), **kwargs),
                                                           client_expected)):
            torch.manual_seed(0)
            model = Net()
            engine, *_ = deepspeed.initialize(model=model, optimizer=make and make(model), config=cfg)
            offloaded = engine.optimizer.cpu_offload if stage < 3 else engine.optimizer.offload_optimizer
            assert offloaded and isinstance(engine.basic_optimizer, RegDistAdapter)
            assert engine.optimizer.optimizer is engine.basic_optimizer
            _train(engine, rank, world)
            with _full(model, stage):
                assert_matches(model, want)

    run_ranks(WORLD, body, init_group=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_with_gradient_accumulation(stage):
    """Offload accumulates micro-batch gradients on its own CPU path: 4 micro-batches still equal one process."""
    _train_micro_batches(_config("muon", stage, 4, zero_optimization={"stage": stage, **OFFLOAD}),
                         _reference("muon"), 4)


@pytest.mark.parametrize("offload", [{"device": "nvme", "nvme_path": "/tmp"}, {"device": "cpu", "ratio": 0.5}])
def test_nvme_and_partial_offload_refused(offload):
    config = _config("reg", 3, 1)
    config["zero_optimization"]["offload_optimizer"] = offload
    with pytest.raises(NotImplementedError, match='offload_optimizer.*use "offload_optimizer": {"device": "cpu"}'):
        rds.initialize(model=Net(), config=config)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_zero3_init_partitions_at_construction(algorithm, offload):
    """ZeRO 3 with the model built under ``deepspeed.zero.Init`` (what the Trainer does for
    ``from_pretrained``), with and without CPU optimizer and parameter offload: the parameters are placeholders from
    the start; routing reads ``ds_shape``."""
    config, expected = _config(algorithm, 3, 1), _reference(algorithm)
    if offload:
        config["zero_optimization"].update(OFFLOAD, offload_param={"device": "cpu"})
    reference_routes = sorted((math.prod(r.shape), r.algorithm) for r in _routes(algorithm))

    def body(rank, world):
        model = _registered_zero_init_net(config)
        assert all(p.numel() == 0 for p in model.parameters())  # partitioned at construction
        engine, *_ = deepspeed.initialize(model=model, config=config)
        assert engine.optimizer.offload_optimizer == engine.optimizer.offload_param == offload
        _train(engine, rank, world)
        with _full(model, 3):
            assert_matches(model, expected)
        return sorted((math.prod(r.shape), r.algorithm) for r in engine.basic_optimizer.inner.routes)

    for got in run_ranks(WORLD, body, init_group=False):
        assert got == reference_routes  # routed by the real shapes, not the placeholders' (0,)


def _registered_zero_init_net(config):
    """After ``register()``, the seeded ``Net`` built under ``deepspeed.zero.Init`` (placeholders from the start)."""
    _no_shm_build()
    rds.register()
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        return Net()


def _routes(algorithm):
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    return cls(Net(), **kwargs).routes


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_round_trip_with_a_client_optimizer_and_offload(tmp_path, stage):
    """Plain ``deepspeed.initialize`` after ``register()``, a client Muon with its own groups and CPU
    optimizer offload: 2 steps, ``save_checkpoint``, a fresh engine (other initial weights)
    ``load_checkpoint``s and takes the 3rd, ending at the uninterrupted run's weights."""
    _, _, cls, kwargs = ALGORITHMS["muon"]
    expected = _client_reference("muon")[0]
    config = _client_config(stage)
    config["zero_optimization"].update(OFFLOAD)
    where = str(tmp_path / "ckpt")

    def engine_of(seed):
        torch.manual_seed(seed)
        model = Net()
        return model, deepspeed.initialize(model=model, optimizer=cls(_groups(model), **kwargs), config=config)[0]

    def body(rank, world):
        _no_shm_build()
        rds.register()
        model = _resumed_at_step_2(engine_of, where, rank, world)
        with _full(model, stage):
            assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)


@pytest.mark.parametrize("algorithm", ["reg", "muon"])
def test_client_optimizer_on_zero_init_placeholders_is_routed_by_ds_shape(algorithm):
    """A client optimizer built after ``deepspeed.zero.Init`` (its parameters empty 1-D placeholders, all
    routed to AdamW, e.g. a Trainer's ``create_optimizer`` after ``from_pretrained`` at ZeRO 3), two
    groups with their own hyper-parameters and the head routed by its group's module names: routed
    again by ``ds_shape`` with what it read of each parameter, it equals the same optimizer built on
    the real parameters in one process, routes included."""
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    expected, routes = _client_reference(algorithm)
    config = _client_config(3)

    def body(rank, world):
        model = _registered_zero_init_net(config)
        client = cls(_groups(model), **kwargs)
        assert {r.algorithm for r in client.routes} == {"adamw"}  # the placeholders' (0,) shapes
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
        _train(engine, rank, world)
        with _full(model, 3):
            assert_matches(model, expected)
        return sorted((math.prod(r.shape), r.algorithm) for r in engine.basic_optimizer.inner.routes)

    for got in run_ranks(WORLD, body, init_group=False):
        assert got == sorted((math.prod(shape), algorithm) for shape, algorithm in routes)
