"""The single-process step on a CUDA device equals the same step on the CPU (skipped without a GPU).

The CPU runs the fused kernels (reg_dist.ops.fused), CUDA the torch code they replace, and Newton–Schulz
batches a same-shape stack on CUDA where the CPU loops over it: each pair agrees to fp32 rounding.
"""

import math

import pytest
import torch

from reg_dist import REG, Muon, MuonEq, NorMuon
from test_fused_step import optimizer_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# two of one shape (a stack), wide, tall, and one above fused.PARALLEL_ELEMENTS
SHAPES = [(24, 40), (24, 40), (40, 24), (200, 192)]
NS = {"ns_dtype": torch.float32}


def _assert_same_on_both(cls, kwargs, dtype=torch.float32):
    got = optimizer_steps(cls, {"lr": 0.01, **kwargs}, dtype, shapes=SHAPES, device="cuda")
    want = optimizer_steps(cls, {"lr": 0.01, **kwargs}, dtype, shapes=SHAPES)
    # bf16: an fp32 rounding difference may move a value across a bf16 rounding boundary (one bf16 step)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"p": math.inf}, {"iters": 2}, {"exponent": -0.5, "tol": 1e-3, "iters": 4},
                                    {"stats": "gradient", "stats_beta": 0.9}])
def test_reg_step_on_cuda_equals_the_cpu_step(dtype, kwargs):
    _assert_same_on_both(REG, kwargs, dtype)


@pytest.mark.parametrize("cls, kwargs", [(Muon, NS), (Muon, {**NS, "ns_method": "gram"}),
                                         (MuonEq, {**NS, "mode": "rowcol"}), (NorMuon, NS)])
def test_muon_family_step_on_cuda_equals_the_cpu_step(cls, kwargs):
    _assert_same_on_both(cls, kwargs)
