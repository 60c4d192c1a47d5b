"""NorMuon, the algorithm added through the engine alone: three fp64 steps against an independent
reference of the paper's update, its state, and the layouts the other algorithms' tests do not cover."""

import pytest
import torch

from conftest import TinyGPT, fixed_grads
from reference import matrix_steps_ref, normuon_transform_ref
from reg_dist import NorMuon, optim
from sharded import run_native, reference

SHAPES = [(6, 6), (10, 4), (4, 7)]


@pytest.mark.parametrize("scale", ["rms", "match_rms_adamw"])
@pytest.mark.parametrize("beta2", [0.95, 0.5])
def test_three_steps_match_the_papers_update_in_fp64(scale, beta2):
    hp = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, scale=scale, rms=0.3)
    w0 = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    params = [w.clone().requires_grad_() for w in w0]
    steps = [fixed_grads(params, seed=10 + t) for t in range(3)]
    opt = NorMuon(params, beta2=beta2, ns_dtype=torch.float64, **hp)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for i, (w, p) in enumerate(zip(w0, params)):
        expected = matrix_steps_ref(w, [s[i] for s in steps], normuon_transform_ref(beta2=beta2), **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)


def test_state_is_the_momentum_and_one_second_moment_per_row():
    model = TinyGPT()
    opt = NorMuon(model, ns_dtype=torch.float32)
    for p, g in zip(model.parameters(), fixed_grads(list(model.parameters()), seed=0)):
        p.grad = g
    opt.step()
    qkv = model.blocks[0]["qkv"].weight
    state = opt.state[qkv]
    assert set(state) == {"step", "momentum_buffer", "row_second_moment"}
    assert state["row_second_moment"].shape == (qkv.shape[0],) and bool((state["row_second_moment"] > 0).all())


@pytest.mark.parametrize("kwargs, message", [({"beta2": 1.0}, "beta2 must be a finite number in"),
                                             ({"eps": 0.0}, "eps must be > 0")])
def test_invalid_hyper_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NorMuon(TinyGPT(), **kwargs)


def test_native_dp2_x_tp2_equals_single_process():
    exact = {"lr": 0.02, "ns_dtype": torch.float32}
    run_native(2, 2, NorMuon, exact, reference(optim.NorMuon, exact))


def test_registry_reaches_it_under_every_name():
    from reg_dist.integrations.deepspeed import OPTIMIZERS
    from reg_dist.integrations.megatron.optimizer import NAMES
    from reg_dist.optim.registry import get

    assert get("normuon").cls is NorMuon
    assert OPTIMIZERS["normuon"].cls is NorMuon and NAMES["normuon"] is NorMuon




def test_checkpoint_round_trip_restores_the_row_second_moment(tmp_path):
    from reg_dist import checkpoint

    def trained(steps):
        torch.manual_seed(0)
        model = TinyGPT()
        opt = NorMuon(model, ns_dtype=torch.float32)
        for t in range(steps):
            for p, g in zip(model.parameters(), fixed_grads(list(model.parameters()), seed=t)):
                p.grad = g
            opt.step()
        return model, opt

    model, opt = trained(2)
    checkpoint.save(opt, tmp_path / "ckpt")
    fresh_model, fresh = trained(0)
    checkpoint.load(fresh, tmp_path / "ckpt")
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[q][key], value), key
