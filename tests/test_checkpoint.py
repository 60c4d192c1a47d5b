"""Optimizer checkpoints (``reg_dist.checkpoint``, DCP) saved in one layout resume in another: the
continued trajectory equals the uninterrupted single-process one (gloo, forked ranks)."""

import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from multiproc import run_ranks
from reg_dist import REG, Muon, MuonEq, checkpoint, optim
from sharded import BATCH, Net, assert_matches, data, fsdp, loss_of, native, reference

KWARGS = {"lr": 0.02}
EXACT_MOVES = {"move_dtype": torch.float32}
ALGORITHMS = {  # sharded class, single-process class, their hyper-parameters, the sharded ones' extras
    "reg": (REG, optim.REG, KWARGS, {}),
    "muon": (Muon, optim.Muon, {**KWARGS, "ns_dtype": torch.float32}, EXACT_MOVES),
    "muoneq": (MuonEq, optim.MuonEq, {**KWARGS, "ns_dtype": torch.float32, "mode": "rowcol", "phase": 2}, EXACT_MOVES),
}
VARIANTS = {"reg_averaged": (REG, optim.REG, {**KWARGS, "stats_beta": 0.9, "stats": "gradient"}, {})}


def _fsdp(model, rank, world):
    fsdp(model, rank, world)
    return {}, rank, world


def _one_process(model, rank, world):
    return {}, 0, 1


LAYOUTS = {"native_4x1": (4, native(4, 1)), "native_2x2": (4, native(2, 2)), "native_2x1": (2, native(2, 1)),
           "one_process": (1, _one_process), "fsdp_4": (4, _fsdp)}


def _steps(model, opt, batches, dp_rank, dp):
    per = BATCH // dp
    for tokens in batches:
        opt.zero_grad()
        loss_of(model, tokens[dp_rank * per:(dp_rank + 1) * per]).backward()
        opt.step()


def _save_then_resume(tmp_path, algorithm, saved_at, resumed_at):
    cls, single, kwargs, sharded = {**ALGORITHMS, **VARIANTS}[algorithm]
    expected = reference(single, kwargs)
    kwargs = {**kwargs, **sharded}
    path = str(tmp_path / "ckpt")

    def save(rank, world):
        torch.manual_seed(0)
        model = Net()
        extra, dp_rank, dp = LAYOUTS[saved_at][1](model, rank, world)
        opt = cls(model, **kwargs, **extra)
        _steps(model, opt, data()[:2], dp_rank, dp)
        checkpoint.save(opt, path)
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:  # the model as plain full tensors (the optimizer state is what is under test)
            torch.save(full, tmp_path / "model.pt")

    def resume(rank, world):
        model = Net()
        model.load_state_dict(torch.load(tmp_path / "model.pt"))
        extra, dp_rank, dp = LAYOUTS[resumed_at][1](model, rank, world)
        opt = cls(model, **kwargs, **extra)
        checkpoint.load(opt, path)
        _steps(model, opt, data()[2:], dp_rank, dp)
        assert_matches(model, expected)
        for name, value in model.state_dict().items():  # and relative 1e-6 per parameter, in norm
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            assert (full - expected[name]).norm() <= 1e-6 * expected[name].norm(), name

    run_ranks(LAYOUTS[saved_at][0], save)
    if LAYOUTS[resumed_at][0] == 1:
        resume(0, 1)
    else:
        run_ranks(LAYOUTS[resumed_at][0], resume)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("resumed_at", ["native_2x2", "one_process", "fsdp_4"])
def test_state_saved_at_dp4_resumes_in_another_layout(tmp_path, algorithm, resumed_at):
    _save_then_resume(tmp_path, algorithm, "native_4x1", resumed_at)


def test_fsdp2_state_resumes_in_the_native_mode(tmp_path):
    _save_then_resume(tmp_path, "muon", "fsdp_4", "native_2x1")


def test_reg_running_averages_of_the_statistics_resume_in_another_layout(tmp_path):
    _save_then_resume(tmp_path, "reg_averaged", "fsdp_4", "native_2x2")


def _saved_once(tmp_path, cls=REG):
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, **KWARGS)
    _steps(model, opt, data()[:1], 0, 1)
    checkpoint.save(opt, tmp_path / "ckpt")
    return model, opt


def _fresh_state(opt):
    return {n: {k: v.clone() for k, v in opt.state[p].items()}
            for g in opt.param_groups for p, n in zip(g["params"], g["param_names"])}


def test_checkpoint_of_another_optimizer_is_refused_and_leaves_state_alone(tmp_path):
    _saved_once(tmp_path, REG)
    model, opt = _saved_once(tmp_path / "other", Muon)
    before = _fresh_state(opt)
    with pytest.raises(ValueError, match="is of REG, not Muon"):
        checkpoint.load(opt, tmp_path / "ckpt")
    assert all(torch.equal(v, before[n][k]) for n, s in _fresh_state(opt).items() for k, v in s.items())


def test_checkpoint_with_other_parameters_names_them(tmp_path):
    _saved_once(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"other parameters: missing here \['down.weight'"):
        checkpoint.load(REG(model), tmp_path / "ckpt")


def test_checkpoint_with_other_shapes_names_the_tensor(tmp_path):
    _saved_once(tmp_path)
    model = Net()
    with torch.no_grad():
        model.up.weight = torch.nn.Parameter(torch.zeros(56, 17))
    with pytest.raises(ValueError, match=r"up.weight/momentum_buffer is \[56, 18\], the parameter here is \[56, 17\]"):
        checkpoint.load(REG(model), tmp_path / "ckpt")


def test_truncated_checkpoint_raises_and_leaves_state_alone(tmp_path):
    model, opt = _saved_once(tmp_path)
    before = _fresh_state(opt)
    data_file = next(f for f in (tmp_path / "ckpt").iterdir() if f.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="is unreadable"):
        checkpoint.load(opt, tmp_path / "ckpt")
    assert all(torch.equal(v, before[n][k]) for n, s in _fresh_state(opt).items() for k, v in s.items())


def test_checkpoint_with_an_extra_parameter_here_names_it(tmp_path):
    _saved_once(tmp_path)
    model = Net()
    model.extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"missing there \['extra.bias', 'extra.weight'\]"):
        checkpoint.load(REG(model), tmp_path / "ckpt")


NO_GRAD = ("up.bias", "squeeze.weight")  # an AdamW vector and a matrix that never get a gradient


def _steps_without(model, opt, batches, dp_rank, dp, no_grad=NO_GRAD):
    per = BATCH // dp
    named = dict(model.named_parameters())
    for tokens in batches:
        opt.zero_grad()
        loss_of(model, tokens[dp_rank * per:(dp_rank + 1) * per]).backward()
        for name in no_grad:
            named[name].grad = None
        opt.step()


def _named_state(opt):
    """Parameter name → its state (local tensors), for the parameters that have any."""
    local = lambda v: v.to_local() if isinstance(v, DTensor) else v  # noqa: E731
    return {n: {k: local(v).clone() for k, v in opt.state[p].items()}
            for g in opt.param_groups for p, n in zip(g["params"], g["param_names"]) if opt.state.get(p)}


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for name, state in a.items():
        assert sorted(state) == sorted(b[name]), name
        for key, value in state.items():
            assert torch.equal(value, b[name][key]), f"{name}/{key}"


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_checkpoint_saved_before_the_first_step_loads_back(tmp_path, algorithm):
    cls, _, kwargs, _ = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, **kwargs)
    checkpoint.save(opt, tmp_path / "ckpt")
    checkpoint.load(opt, tmp_path / "ckpt")  # into the optimizer that wrote it
    assert _named_state(opt) == {}
    stepped = Net()
    stepped_opt = cls(stepped, **kwargs)
    _steps(stepped, stepped_opt, data()[:1], 0, 1)
    checkpoint.load(stepped_opt, tmp_path / "ckpt")  # loading the state "none yet" drops the state it had
    assert _named_state(stepped_opt) == {}
    stepped.load_state_dict(model.state_dict())
    _steps(model, opt, data()[:1], 0, 1)
    _steps(stepped, stepped_opt, data()[:1], 0, 1)  # and steps as a fresh optimizer does
    assert all(torch.equal(v, stepped.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_parameter_that_never_got_a_gradient_stays_stateless_on_load(tmp_path, algorithm):
    cls, _, kwargs, _ = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = Net()
    opt = cls(model, **kwargs)
    _steps_without(model, opt, data()[:2], 0, 1)
    saved = _named_state(opt)
    assert not set(NO_GRAD) & set(saved) and len(saved) == len(list(model.parameters())) - len(NO_GRAD)
    checkpoint.save(opt, tmp_path / "ckpt")
    resumed = Net()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = cls(resumed, **kwargs)
    checkpoint.load(resumed_opt, tmp_path / "ckpt")
    _assert_same_state(_named_state(resumed_opt), saved)
    _steps(model, opt, data()[2:], 0, 1)  # now with every gradient: the stateless ones start fresh
    _steps(resumed, resumed_opt, data()[2:], 0, 1)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())


def test_fsdp2_checkpoints_without_some_state_load_back(tmp_path):
    cls, _, kwargs, sharded = ALGORITHMS["muon"]
    kwargs = {**kwargs, **sharded}

    def body(rank, world):
        torch.manual_seed(0)
        model = Net()
        fsdp(model, rank, world)
        opt = cls(model, **kwargs)
        checkpoint.save(opt, tmp_path / "empty")  # before the first step
        checkpoint.load(opt, tmp_path / "empty")
        assert _named_state(opt) == {}
        _steps_without(model, opt, data()[:2], rank, world)
        saved = _named_state(opt)
        assert "up.bias" not in saved  # (a sharded matrix without a gradient is stepped with a zero one)
        checkpoint.save(opt, tmp_path / "ckpt")
        resumed = Net()
        fsdp(resumed, rank, world)
        resumed.load_state_dict(model.state_dict())
        resumed_opt = cls(resumed, **kwargs)
        checkpoint.load(resumed_opt, tmp_path / "ckpt")
        _assert_same_state(_named_state(resumed_opt), saved)
        _steps(model, opt, data()[2:], rank, world)
        _steps(resumed, resumed_opt, data()[2:], rank, world)
        for k, v in model.state_dict().items():
            assert torch.equal(v.to_local(), resumed.state_dict()[k].to_local()) if isinstance(v, DTensor) \
                else torch.equal(v, resumed.state_dict()[k]), k

    run_ranks(2, body)


def test_checkpoint_is_a_public_name_of_the_package():
    code = "import reg_dist; assert reg_dist.checkpoint.save and reg_dist.checkpoint.load; print(reg_dist.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "checkpoint" in out.stdout
