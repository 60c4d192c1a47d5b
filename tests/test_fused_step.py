"""The fused CPU kernels (reg_dist.ops.fused) against the torch ops they replace, switched off."""

import math

import pytest
import torch

from reg_dist import REG, MuonEq, NorMuon
from reg_dist.ops import fused
from reg_dist.optim.momentum import commit_momentum_, momentum_into_

# 200 × 192 is above fused.PARALLEL_ELEMENTS, so the threaded paths run too
SHAPES = [(24, 40), (40, 24), (200, 192)]


@pytest.fixture
def unfused():
    """Run a body with the kernels off, restoring them after."""
    def run(fn):
        fused.set_enabled(False)
        try:
            return fn()
        finally:
            fused.set_enabled(True)
    return run


def optimizer_steps(cls, kwargs, dtype, steps=3, shapes=SHAPES, device="cpu"):
    """Parameters and momenta (fp32, on the CPU) after ``steps`` seeded steps of ``cls`` on ``device``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes] for _ in range(steps)]
    opt = cls([{"params": params, "algorithm": cls.algorithm}], **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return [p.detach().float().cpu() for p in params] + [opt.state[p]["momentum_buffer"].float().cpu() for p in params]


def test_kernels_are_built_and_on_by_default():
    assert fused.enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"p": math.inf}, {"iters": 2}, {"p": 3.0, "nesterov": False},
                                    {"weight_decay": 0.0, "scale": "match_rms_adamw"}])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_reg_steps_equal_unfused_steps(dtype, kwargs, threads, unfused):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = optimizer_steps(REG, {"lr": 0.01, **kwargs}, dtype)
        want = unfused(lambda: optimizer_steps(REG, {"lr": 0.01, **kwargs}, dtype))
    finally:
        torch.set_num_threads(before)
    # bf16: an fp32 rounding difference may move a value across a bf16 rounding boundary (one bf16 step)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cls, kwargs", [(MuonEq, {"mode": "rowcol", "ns_dtype": torch.float32}),
                                         (NorMuon, {"ns_dtype": torch.float32})])
def test_fused_statistics_of_muoneq_and_normuon_equal_unfused(cls, kwargs, unfused):
    got = optimizer_steps(cls, kwargs, torch.float32)
    want = unfused(lambda: optimizer_steps(cls, kwargs, torch.float32))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_pow_sums_add_into_row_and_column_slices_of_a_rectangle(p):
    x = torch.randn(7, 300)
    rows, cols = torch.rand(9), torch.rand(2, 300)
    want_r, want_c = rows.clone(), cols.clone()
    q = x.abs() if p == math.inf else x.abs() ** p
    if p == math.inf:
        torch.maximum(want_r[1:8], q.amax(-1), out=want_r[1:8])
        torch.maximum(want_c[1], q.amax(-2), out=want_c[1])
    else:
        want_r[1:8] += q.sum(-1)
        want_c[1] += q.sum(-2)
    assert fused.add_pow_sums_(x, p, rows[1:8], cols[1])
    torch.testing.assert_close(rows, want_r, rtol=1e-5, atol=0)
    torch.testing.assert_close(cols, want_c, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [None, 2.0], ids=["momentum", "momentum_and_sums"])
def test_momentum_without_commit_leaves_the_buffer_and_the_commit_gives_the_committed_one(dtype, p, unfused):
    """``commit=False`` (the agreement riding on the statistics): N and the sums as with it, the buffer
    untouched; ``commit_momentum_`` afterwards stores the buffer the committing call stores; all bitwise,
    with the kernels and without them."""
    gen = torch.Generator().manual_seed(3)
    g, buf = (torch.randn(200, 192, generator=gen).to(dtype) for _ in range(2))

    def run(commit):
        m, n, rows, cols = buf.clone(), torch.empty(200, 192), torch.zeros(200), torch.zeros(192)
        if p is None:
            momentum_into_([g], [m], [n], 0.9, True, commit=commit)
        else:
            assert fused.momentum_into_(g, m, n, 0.9, True, p, rows, cols, commit=commit)
        return m, n, rows, cols

    for fn in (lambda f: f(), unfused) if p is None else (lambda f: f(),):
        (committed, *want), (left, *got) = fn(lambda: run(True)), fn(lambda: run(False))
        assert torch.equal(left, buf)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        commit_momentum_([g], [left], 0.9)
        assert torch.equal(left, committed)


def test_scaling_returns_the_sum_of_squares_of_its_result():
    x, row, col = torch.randn(30, 50), torch.rand(30), torch.rand(50)
    want = x * row[:, None] * col
    total = fused.scale_(x, row, col)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=0)
    assert total == pytest.approx(want.double().square().sum().item(), rel=1e-6)


def test_max_statistics_propagate_nan_like_torch():
    x = torch.randn(5, 64)
    x[2, 9] = math.nan
    rows, cols = torch.zeros(5), torch.zeros(64)
    assert fused.add_pow_sums_(x, math.inf, rows, cols)
    assert rows.isnan().tolist() == x.abs().amax(-1).isnan().tolist()
    assert cols.isnan().tolist() == x.abs().amax(-2).isnan().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_finds_one_nonfinite_element(dtype, bad):
    x = torch.randn(3, 50_000).to(dtype)
    assert fused.all_finite(x) is True
    x[2, 49_999] = bad
    assert fused.all_finite(x) is False


def test_kernels_decline_what_they_do_not_cover():
    x = torch.randn(8, 6, dtype=torch.float64)
    assert fused.all_finite(x) is None
    assert not fused.add_pow_sums_(x, 2.0, torch.zeros(8, dtype=torch.float64), None)
    assert fused.scale_(torch.randn(6, 8).mT, torch.ones(8), None) is None  # not contiguous
    assert fused.scale_(torch.randn(8, 6), torch.ones(7), None) is None  # row scale of the wrong length


def test_set_enabled_false_turns_every_kernel_off(unfused):
    x = torch.randn(8, 6)
    assert unfused(lambda: (fused.enabled(), fused.all_finite(x), fused.scale_(x, None, None))) == (False, None, None)
