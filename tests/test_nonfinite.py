"""A non-finite gradient anywhere skips the whole step and leaves every state untouched."""

import copy
import logging

import pytest
import torch

from conftest import lm_loss
from reg_dist import REG, Muon, MuonEq


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
@pytest.mark.parametrize("where", ["blocks.1.fc.weight", "blocks.0.ln.bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step_and_counts(cls, where, bad, tiny_gpt, caplog):
    opt = cls(tiny_gpt, lr=0.01)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    lm_loss(tiny_gpt, tokens).backward()
    opt.step()  # state exists now
    opt.zero_grad()
    lm_loss(tiny_gpt, tokens).backward()
    dict(tiny_gpt.named_parameters())[where].grad.view(-1)[3] = bad
    before = _snapshot(tiny_gpt, opt)
    with caplog.at_level(logging.WARNING, logger="reg_dist"):
        opt.step()
    after = _snapshot(tiny_gpt, opt)
    assert opt.skipped_steps == 1
    _assert_same(before[0], after[0])
    before[1]["skipped_steps"] = 1
    _assert_same(before[1], after[1])
    assert any(where in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_nonfinite_raise_option_raises_and_changes_nothing(tiny_gpt):
    opt = REG(tiny_gpt, nonfinite="raise")
    for p in tiny_gpt.parameters():
        p.grad = torch.ones_like(p)
    tiny_gpt.blocks[0].qkv.weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(tiny_gpt.state_dict())
    with pytest.raises(FloatingPointError, match="blocks.0.qkv.weight"):
        opt.step()
    _assert_same(before, tiny_gpt.state_dict())
    assert not opt.state


def test_large_finite_gradients_are_not_mistaken_for_nonfinite():
    w = torch.zeros(4, 4, requires_grad=True)
    w.grad = torch.full((4, 4), 1e30)
    opt = REG([w], nonfinite="raise")
    opt.step()
    assert torch.isfinite(w).all() and opt.skipped_steps == 0
