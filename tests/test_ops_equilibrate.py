"""Equilibration (ALGORITHMS.md §2) against the fp64 reference."""

import pytest
import torch

from reg_dist.ops import equilibrate
from reference import equilibrate_ref


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (3, 11)], ids=str)
@pytest.mark.parametrize("mode", ["row", "col", "rowcol"])
@pytest.mark.parametrize("exponent", [-0.5, -0.25])
def test_equilibrate_matches_reference(shape, mode, exponent):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = equilibrate(x, mode=mode, exponent=exponent)
    torch.testing.assert_close(out, equilibrate_ref(x, mode, exponent), rtol=1e-12, atol=1e-12)


def test_equilibrate_row_mode_gives_unit_row_norms():
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(equilibrate(x, "row").norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_equilibrate_batched_and_bf16():
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    out = equilibrate(x.bfloat16(), "rowcol")
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    for i in range(3):
        ref = equilibrate_ref(x.bfloat16()[i].double(), "rowcol")
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-2, atol=1e-2)


def test_equilibrate_zero_rows_and_columns_stay_zero_without_nan():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    x[2] = 0
    x[:, 0] = 0
    for mode in ("row", "col", "rowcol"):
        out = equilibrate(x, mode)
        assert torch.isfinite(out).all()
        assert (out[2] == 0).all() and (out[:, 0] == 0).all()
