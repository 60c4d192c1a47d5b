"""Newton–Schulz (ALGORITHMS.md §3) against the fp64 reference, and on matrices of known SVD."""

import pytest
import torch

from conftest import TinyGPT, fixed_grads
from reg_dist import Muon
from reg_dist.ops import newton_schulz
from reg_dist.ops.newton_schulz import NS_DTYPES, iterate, orthogonalize
from reference import matrix_steps_ref, newton_schulz_gram_ref, newton_schulz_ref


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


GRAM_SHAPES = [(12, 5), (4, 10), (9, 9), (3, 6, 14), (2, 15, 7)]  # tall, wide, square, batched stacks


def _gram_reference(x, steps, coefficients):
    flat = x.reshape(-1, *x.shape[-2:])
    return torch.stack([newton_schulz_gram_ref(m, steps, coefficients) for m in flat]).reshape(x.shape)


@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
@pytest.mark.parametrize("steps", [1, 3, 4, 5, 7])  # before, at and past the restarts at steps 3 and 6
def test_gram_newton_schulz_fp64_matches_gram_reference(shape, coefficients, steps):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out = newton_schulz(x, steps, coefficients, torch.float64, method="gram")
    torch.testing.assert_close(out, _gram_reference(x, steps, coefficients), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_gram_newton_schulz_fp32_matches_gram_reference(shape, coefficients):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    out = newton_schulz(x, coefficients=coefficients, dtype=torch.float32, method="gram")
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), _gram_reference(x, 5, coefficients), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 80), (80, 32), (2, 24, 64)], ids=str)
@pytest.mark.parametrize("coefficients,dtype", [("jordan", torch.bfloat16), ("polar_express", torch.float16)])
def test_gram_newton_schulz_16_bit_is_close_to_gram_reference(shape, coefficients, dtype):
    # 16-bit rounding of R compounds through the polynomial: measured 3 % (jordan, bf16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    out = newton_schulz(x, coefficients=coefficients, dtype=dtype, method="gram")
    ref = _gram_reference(x, 5, coefficients)
    assert out.dtype == torch.float32 and (out.double() - ref).norm() / ref.norm() < 0.15


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("coefficients,dtype", [("jordan", torch.bfloat16), ("jordan", torch.float16),
                                                ("polar_express", torch.float16), ("polar_express", torch.float32)])
def test_gram_newton_schulz_stays_bounded_on_nearly_rank_deficient_matrices(coefficients, dtype, seed):
    # a momentum early in training: rank 1–3 plus a little noise. Rounding leaves R = X Xᵀ slightly indefinite and
    # each step grows a negative eigenvalue λ as λ·p(λ)²; the singular values must stay where "standard" puts them
    g = torch.Generator().manual_seed(seed)
    for shape in ((32, 96), (96, 32), (256, 768)):
        for rank in (1, 2, 3):
            for noise in (0.0, 1e-4, 1e-2):
                x = (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
                     + noise * torch.randn(*shape, generator=g))
                out = orthogonalize(x[None], 5, coefficients, dtype, "gram")[0].double()
                assert torch.linalg.matrix_norm(out, 2) < 1.3, (shape, rank, noise)


def test_gram_with_polar_express_in_bf16_is_refused():
    # in bf16 such matrices reached spectral norms of 1e7 and more (polar_express's c ≈ 16 on an indefinite R)
    with pytest.raises(ValueError, match="'gram' with coefficients='polar_express' is unstable in bf16"):
        newton_schulz(torch.randn(4, 12), coefficients="polar_express", method="gram")
    with pytest.raises(ValueError, match="unstable in bf16"):
        Muon([torch.nn.Parameter(torch.randn(4, 12))], coefficients="polar_express", ns_method="gram")


@pytest.mark.parametrize("shape", [(3, 6, 14), (2, 15, 7), (2, 9, 9)], ids=str)
@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_batched_iteration_equals_the_per_matrix_one(shape, method, coefficients):
    # the stack in one batched call per product (the GPU path) against the CPU's loop of 2-D matrices
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    stacked = iterate(x, 5, coefficients, torch.float64, method)
    looped = orthogonalize(x, 5, coefficients, torch.float64, method)
    torch.testing.assert_close(stacked, looped, rtol=1e-12, atol=1e-12)
    assert stacked.is_contiguous()


def test_gram_newton_schulz_runs_the_standard_iteration_on_square_matrices():
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(10))
    assert torch.equal(newton_schulz(x, method="gram"), newton_schulz(x, method="standard"))


def test_gram_newton_schulz_output_is_contiguous_for_tall_input():
    out = orthogonalize(torch.randn(2, 20, 6), 5, "jordan", torch.float32, "gram")
    assert out.shape == (2, 20, 6) and out.is_contiguous()


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_muon_steps_with_each_newton_schulz_method_match_the_reference(method):
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(6, 14, dtype=torch.float64, generator=g)
    grads = [torch.randn(6, 14, dtype=torch.float64, generator=g) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.02, ns_dtype=torch.float64, ns_method=method)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    ns = newton_schulz_gram_ref if method == "gram" else newton_schulz_ref
    expected = matrix_steps_ref(w0, grads, lambda n, t: ns(n), 0.02, 0.95, True, 0.1, "match_rms_adamw", 0.2)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)
