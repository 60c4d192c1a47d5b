"""Three steps of REG, Muon and MuonEq with fixed gradients against ALGORITHMS.md §4 by hand."""

from functools import partial

import pytest
import torch

from conftest import fixed_grads
from reference import adamw_steps_ref, equilibrate_ref, matrix_steps_ref, newton_schulz_ref, racs_ref, racs_variant_ref
from reg_dist import REG, Muon, MuonEq

SHAPES = [(6, 6), (10, 4), (4, 7)]

# name -> (optimizer class, extra kwargs, reference transform(N, step), or a partial making a fresh one per matrix)
ALGORITHMS = {
    "reg": (REG, {}, lambda N, t: racs_ref(N, exponent=-1.0)),
    "reg_p3_iters2": (REG, {"p": 3.0, "iters": 2}, lambda N, t: racs_ref(N, 3.0, 2, exponent=-1.0)),
    "reg_exponent_half": (REG, {"exponent": -0.5}, lambda N, t: racs_variant_ref(exponent=-0.5)(N, t, N)),
    "reg_tol_iters10": (REG, {"iters": 10, "tol": 0.05}, lambda N, t: racs_variant_ref(iters=10, tol=0.05)(N, t, N)),
    "reg_gradient_stats": (REG, {"stats": "gradient"}, partial(racs_variant_ref, stats="gradient")),
    "reg_stats_beta_inf": (REG, {"stats_beta": 0.9, "p": float("inf")},
                           partial(racs_variant_ref, p=float("inf"), beta=0.9)),
    "muon": (Muon, {}, lambda N, t: newton_schulz_ref(N)),
    "muon_polar_express": (
        Muon, {"coefficients": "polar_express", "ns_steps": 6}, lambda N, t: newton_schulz_ref(N, 6, "polar_express")
    ),
    "muoneq_row": (MuonEq, {}, lambda N, t: newton_schulz_ref(equilibrate_ref(N, "row"))),
    "muoneq_col": (MuonEq, {"mode": "col"}, lambda N, t: newton_schulz_ref(equilibrate_ref(N, "col"))),
    "muoneq_rowcol_phase2": (
        MuonEq,
        {"mode": "rowcol", "phase": 2},
        lambda N, t: newton_schulz_ref(equilibrate_ref(N, "rowcol" if t < 2 else "row")),
    ),
}


def _run(cls, kwargs, params, grads_per_step):
    opt = cls(params, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("scale", ["rms", "match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_three_steps_match_hand_reference(algorithm, scale, nesterov, weight_decay):
    cls, extra, transform = ALGORITHMS[algorithm]
    hp = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=0.3)
    kwargs = {**hp, **extra}
    if cls is not REG:
        kwargs["ns_dtype"] = torch.float64
    w0 = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    params = [w.clone().requires_grad_() for w in w0]
    steps = [fixed_grads(params, seed=10 + t) for t in range(3)]
    _run(cls, kwargs, params, steps)
    for i, (w, p) in enumerate(zip(w0, params)):
        fresh = transform() if isinstance(transform, partial) else transform
        expected = matrix_steps_ref(w, [s[i] for s in steps], fresh, **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_fp32_parameters_match_fp64_reference(cls):
    w0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    p = w0.clone().requires_grad_()
    steps = [fixed_grads([p], seed=t) for t in range(3)]
    kwargs = {} if cls is REG else {"ns_dtype": torch.float32}
    _run(cls, {"lr": 0.02, **kwargs}, [p], steps)
    transform = {REG: lambda N, t: racs_ref(N, exponent=-1.0), Muon: lambda N, t: newton_schulz_ref(N),
                 MuonEq: lambda N, t: newton_schulz_ref(equilibrate_ref(N))}[cls]
    scale = "rms" if cls is REG else "match_rms_adamw"
    expected = matrix_steps_ref(w0, [s[0] for s in steps], transform, 0.02, 0.95, True, 0.1, scale, 0.2)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_non_matrix_parameters_take_adamw_steps(cls):
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b0 = bias.detach().clone()
    steps = [fixed_grads([bias], seed=t) for t in range(3)]
    _run(cls, {"lr": 0.01, "weight_decay": 0.1, "adamw_betas": (0.8, 0.9), "adamw_eps": 1e-6}, [bias], steps)
    expected = adamw_steps_ref(b0, [s[0] for s in steps], 0.01, (0.8, 0.9), 1e-6, 0.1)
    torch.testing.assert_close(bias.detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_all_zero_gradients_give_finite_weight_decay_only_step(cls):
    w = torch.randn(6, 5, requires_grad=True)
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    cls([w], lr=0.1, weight_decay=0.1).step()
    torch.testing.assert_close(w.detach(), w0 * (1 - 0.1 * 0.1))


def test_rms_scale_gives_update_of_requested_rms():
    w = torch.zeros(32, 16, dtype=torch.float64, requires_grad=True)
    w.grad = torch.randn(32, 16, dtype=torch.float64)
    REG([w], lr=1.0, weight_decay=0.0, rms=0.2).step()
    assert abs(w.detach().square().mean().sqrt().item() - 0.2) < 1e-7  # to the eps (1e-8) of the norm


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_bf16_parameters_step_in_fp32_and_stay_bf16(cls):
    w0 = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    grad = fixed_grads([w0], seed=1)[0]
    low = w0.bfloat16().requires_grad_()
    high = w0.bfloat16().float().requires_grad_()
    opts = []
    for p in (low, high):
        p.grad = grad.to(p.dtype)
        opts.append(cls([p], lr=0.05))
        opts[-1].step()
    assert low.dtype == opts[0].state[low]["momentum_buffer"].dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), high.detach(), rtol=2e-2, atol=2e-2)


def test_reg_balancing_stops_at_its_tolerance_and_reports_the_steps_taken():
    w0 = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = w0.clone().requires_grad_()
    steps = [fixed_grads([p], seed=t) for t in range(2)]
    opt = _run(REG, {"lr": 0.02, "iters": 10, "tol": 0.1, "weight_decay": 0.0}, [p], steps)
    transform = racs_variant_ref(iters=10, tol=0.1)
    expected = matrix_steps_ref(w0, [s[0] for s in steps], transform, 0.02, 0.95, True, 0.0, "rms", 0.2)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)
    assert 1 < transform.steps[-1] < 10
    assert opt.balance_steps() == {"param0": [transform.steps[-1]]}
