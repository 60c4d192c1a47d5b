"""Optimizer checkpoints (``reg_dist.checkpoint``, DCP) saved in one layout resume in another: the
continued trajectory equals the uninterrupted single-process one (gloo, forked ranks)."""

import pytest
import torch

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
    cls, single, kwargs, sharded = ALGORITHMS[algorithm]
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
