"""Newton–Schulz (ALGORITHMS.md §3) against the fp64 reference, and on matrices of known SVD."""

import pytest
import torch

from conftest import TinyGPT, fixed_grads
from reg_dist import Muon
from reg_dist.ops import newton_schulz
from reg_dist.ops.newton_schulz import NS_DTYPES, orthogonalize
from reference import newton_schulz_ref


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (4, 10)], ids=str)
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_newton_schulz_fp64_matches_reference(shape, coefficients, steps):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(x, steps=steps, coefficients=coefficients, dtype=torch.float64)
    torch.testing.assert_close(out, newton_schulz_ref(x, steps, coefficients), rtol=1e-10, atol=1e-10)


def test_newton_schulz_fp32_matches_reference():
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(x, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), newton_schulz_ref(x), rtol=1e-4, atol=1e-5)


def test_newton_schulz_bf16_default_is_close_to_reference():
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    out = newton_schulz(x)
    assert out.dtype == torch.float32
    ref = newton_schulz_ref(x)
    assert (out.double() - ref).norm() / ref.norm() < 0.03


def test_newton_schulz_bf16_input_returns_bf16():
    out = newton_schulz(torch.randn(6, 10).bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (6, 10)


def test_newton_schulz_batched_equals_one_by_one():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = newton_schulz(x, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], newton_schulz_ref(x[i, j]), rtol=1e-10, atol=1e-10)


def _known_svd(m, n, singular_values, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    return U, V, U @ torch.diag(singular_values) @ V.T


@pytest.mark.parametrize("coefficients,band", [("jordan", (0.5, 1.5)), ("polar_express", (0.85, 1.15))])
@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)], ids=str)
def test_newton_schulz_keeps_singular_vectors_and_lands_values_in_band(coefficients, band, shape):
    m, n = shape
    k = min(m, n)
    s = torch.logspace(0, -2, k, dtype=torch.float64)  # condition number 100
    U, V, x = _known_svd(m, n, s, seed=4)
    out = newton_schulz(x, coefficients=coefficients, dtype=torch.float64)
    core = U.T @ out @ V  # diagonal iff the singular vectors are kept
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-10
    d = torch.diagonal(core)
    assert band[0] <= d.min() and d.max() <= band[1], (d.min().item(), d.max().item())
    # nothing of the input leaks outside its row and column spaces
    torch.testing.assert_close(U @ core @ V.T, out, rtol=1e-10, atol=1e-10)


def test_newton_schulz_of_zero_and_empty_matrices():
    assert (newton_schulz(torch.zeros(4, 6)) == 0).all()
    assert newton_schulz(torch.zeros(0, 5, 3)).shape == (0, 5, 3)


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(12, 5), (4, 10), (3, 6, 4)], ids=str)
def test_fp32_input_with_fp64_newton_schulz_matches_reference(shape, coefficients):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    flat = x.reshape(-1, *shape[-2:])
    out = orthogonalize(flat, 5, coefficients, torch.float64)  # the optimizers' entry: returns ns_dtype
    assert out.dtype == torch.float64 and out.shape == flat.shape
    for b in range(len(flat)):  # the cast to fp64 is exact, so this is the fp64 computation
        torch.testing.assert_close(out[b], newton_schulz_ref(flat[b], 5, coefficients), rtol=1e-10, atol=1e-10)
    public = newton_schulz(x, coefficients=coefficients, dtype=torch.float64)
    assert public.dtype == torch.float32  # the input's dtype
    torch.testing.assert_close(public, out.reshape(shape).float(), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
def test_every_newton_schulz_dtype_works_on_every_input_dtype(x_dtype, ns_dtype):
    x = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(6)).to(x_dtype)
    out = orthogonalize(x, 5, "jordan", ns_dtype)
    assert out.dtype == ns_dtype and out.shape == x.shape and torch.isfinite(out).all()
    ref = torch.stack([newton_schulz_ref(m.double()) for m in x])
    tol = 1e-6 if torch.finfo(ns_dtype).bits == 64 and torch.finfo(x_dtype).bits >= 32 else 0.05
    assert (out.double() - ref).norm() <= tol * ref.norm()


def test_muon_with_fp64_newton_schulz_steps_fp32_parameters():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = Muon(model, lr=0.02, ns_dtype=torch.float64)
    ref_model = TinyGPT()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = Muon(ref_model, lr=0.02, ns_dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(2):
        for m in (model, ref_model):
            params = list(m.parameters())
            for p, g in zip(params, fixed_grads(params, seed)):
                p.grad = g
        opt.step()
        ref_opt.step()
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        assert all(v.dtype == torch.float32 for v in opt.state[p].values()), name
        assert not torch.equal(p, before[name]), name
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-5)  # as the fp32 Newton–Schulz, to its rounding
