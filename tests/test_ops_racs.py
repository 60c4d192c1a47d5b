"""RACS (ALGORITHMS.md §1) against the fp64 reference, and its properties."""

import math

import pytest
import torch

from reg_dist.ops import racs
from reference import racs_ref

SHAPES = [(6, 6), (9, 4), (3, 11)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("iters", [1, 3])
def test_racs_matches_reference(shape, p, iters):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(racs(x, p=p, iters=iters), racs_ref(x, p, iters), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exponent", [-1.0, -0.25])
def test_racs_exponent_matches_reference(exponent):
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(racs(x, p=2.0, iters=2, exponent=exponent), racs_ref(x, 2.0, 2, exponent=exponent),
                               rtol=1e-12, atol=1e-12)


def test_racs_fp32_matches_reference():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    out = racs(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), racs_ref(x), rtol=1e-5, atol=1e-6)


def test_racs_batched_treats_each_matrix_on_its_own():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = racs(x, iters=2)
    assert out.shape == x.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], racs_ref(x[i, j], iters=2), rtol=1e-12, atol=1e-12)


def test_racs_bf16_input_returns_bf16_from_fp32_statistics():
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    out = racs(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), racs_ref(x.double()), rtol=1e-2, atol=1e-2)


def test_racs_keeps_zero_rows_and_columns_zero_without_nan():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    x[1] = 0
    x[:, 4] = 0
    out = racs(x, iters=5)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[:, 4] == 0).all()
    assert torch.isfinite(racs(torch.zeros(3, 4))).all()


def test_repeated_racs_balances_row_and_column_norms():
    x = torch.rand(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1
    out = racs(x, iters=60)
    r = out.norm(dim=1)
    c = out.norm(dim=0)
    assert (r.max() - r.min()) / r.mean() < 1e-6
    assert (c.max() - c.min()) / c.mean() < 1e-6


@pytest.mark.parametrize("alpha", [1e-2, 7.0, 1e3])
def test_racs_is_invariant_to_positive_rescaling_up_to_a_scalar(alpha):
    x = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    a, b = racs(alpha * x), racs(x)
    ratio = a / b
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.mean().item()), rtol=1e-6, atol=0)


def test_racs_of_transpose_is_transpose_of_racs():
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(racs(x.T, iters=3), racs(x, iters=3).T, rtol=1e-12, atol=1e-12)
