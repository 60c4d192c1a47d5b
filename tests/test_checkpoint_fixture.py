"""Checkpoints written by the code before the one-step-engine rewrite (commit 6c01638, committed
under ``tests/fixtures`` by ``tests/fixtures/make_checkpoints.py``) still load: the state comes back
bit for bit, and the next step from it is the step the writing code took."""

from pathlib import Path

import pytest
import torch

from conftest import TinyGPT, fixed_grads
from reg_dist import REG, Muon, MuonEq, checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
FIXTURES = Path(__file__).parent / "fixtures"
# a fresh optimizer of each kind, at default hyper-parameters but for ns_dtype: load restores lr=0.02
FRESH = {"reg": lambda m: REG(m), "muon": lambda m: Muon(m, ns_dtype=torch.float32),
         "muoneq": lambda m: MuonEq(m, ns_dtype=torch.float32)}


def _loaded(name: str):
    expected = torch.load(FIXTURES / f"ckpt_{name}_expected.pt", weights_only=True)
    torch.manual_seed(1)  # other initial weights than the writer's: they come from the fixture
    model = TinyGPT()
    opt = FRESH[name](model)
    checkpoint.load(opt, FIXTURES / f"ckpt_{name}")
    return model, opt, expected


def _named(opt) -> dict:
    return {n: p for g in opt.param_groups for p, n in zip(g["params"], g["param_names"])}


@pytest.mark.parametrize("name", list(FRESH))
def test_pre_engine_checkpoint_loads_its_exact_state(name):
    model, opt, expected = _loaded(name)
    params = _named(opt)
    assert sorted(params) == sorted(expected["state"])
    for pname, saved in expected["state"].items():
        state = opt.state[params[pname]]
        assert sorted(state) == sorted(saved), pname
        for key, value in saved.items():
            got = state[key]
            assert got.dtype == value.dtype and torch.equal(got, value), f"{pname}/{key}"
    assert opt.skipped_steps == expected["skipped_steps"]
    assert len(opt.param_groups) == len(expected["param_groups"])
    for group, saved in zip(opt.param_groups, expected["param_groups"]):
        assert {k: group[k] for k in saved} == saved
    assert opt.param_groups[0]["lr"] == 0.02  # not the fresh optimizer's default


@pytest.mark.parametrize("name", list(FRESH))
def test_pre_engine_checkpoint_resumes_the_trajectory(name):
    model, opt, expected = _loaded(name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(expected["params"][pname])
    params = list(model.parameters())
    for p, g in zip(params, fixed_grads(params, 2)):  # the writer's third step
        p.grad = g
    opt.step()
    for pname, p in model.named_parameters():
        # the writing code's third step to fp32 rounding (bit for bit on the machine that wrote it)
        torch.testing.assert_close(p.detach(), expected["params_after_step_3"][pname], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{pname}: {m}")
