"""Newton–Schulz approximation of the polar factor (the Muon transform).

    transpose if m > n (work on the wide orientation), cast to dtype
    X = X / (||X||_F · (1 + safety) + 1e-7)
    method "standard":  for k in 0..steps−1:  A = X Xᵀ;  B = b_k·A + c_k·A²;  X = a_k·X + B·X
    method "gram" (m < n; a square X takes "standard", which costs fewer products there):
        R = X Xᵀ (m×m);  Q = I
        for k in 0..steps−1:
            if k ∈ RESTARTS:  X = Q·X;  R = X Xᵀ;  Q = I     (re-anchors R on X against rounding drift)
            Z = b_k·R + c_k·R²;  Q = a_k·Q + Q·Z;  R = (a_k·I + Z)·R·(a_k·I + Z)
                                                           (R is skipped before a restart and at the end)
        X = Q·X
    transpose back

"gram" is "standard" in exact arithmetic (every factor a·I + Z is a polynomial in the same R, so
they commute: Xₖ = Qₖ·X₀ and Xₖ Xₖᵀ = Rₖ), but its loop multiplies m×m matrices instead of m×n ones:
26 against 35 m³ multiply-adds for 5 steps at n = 3m, 30 against 45 at n = 4m.

x is ``(..., m, n)``; all trailing matrices go through one batched matmul per product.
Any input dtype works with any Newton–Schulz dtype (bf16, fp16, fp32, fp64). The Frobenius norm of
the cast X is accumulated in fp32, or fp64 when the input or the Newton–Schulz dtype is fp64.
``orthogonalize`` returns the Newton–Schulz dtype (its callers cast); ``newton_schulz`` the input's.
"""

import torch
from torch import Tensor

from .stats import acc_dtype, check_count, check_matrix

COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "jordan": ((3.4445, -4.7750, 2.0315),),
    # Polar Express, arXiv 2505.16932; steps past the fifth repeat the last set.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
SAFETY = {"jordan": 0.0, "polar_express": 0.01}
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
NS_METHODS = ("standard", "gram")
RESTARTS = (2,)  # the "gram" steps that recompute X and R from Q (as Dao-AILab's gram-newton-schulz)


def check_newton_schulz_args(steps: int, coefficients: str, dtype: torch.dtype, method: str = "standard") -> None:
    check_count("ns_steps", steps)
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"coefficients must be one of {tuple(COEFFICIENTS)}, got {coefficients!r}")
    if dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {dtype!r}")
    if method not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {NS_METHODS}, got {method!r}")


def schedule(steps: int, coefficients: str) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` iterations."""
    table = COEFFICIENTS[coefficients]
    return [table[min(k, len(table) - 1)] for k in range(steps)]


def orthogonalize(x: Tensor, steps: int, coefficients: str, dtype: torch.dtype, method: str = "standard") -> Tensor:
    """Newton–Schulz (``method`` "standard" or "gram") of ``x`` ``(B, m, n)``, returned in ``dtype``
    (whatever ``x``'s dtype: callers cast back) with the layout of a contiguous x.

    For a tall x the last product is written transposed (``Xᵀ ← a·Xᵀ + Xᵀ·B``, B symmetric; for
    "gram" ``Xᵀ·Qᵀ``), so the result comes out ``(B, m, n)`` contiguous rather than as a transposed
    view. On the CPU the matrices go one at a time: there a batched matmul measured 8–16 % slower
    than a loop of single ones (``benchmarks/step_time.py``, GPT-2-small shapes, 2 threads).
    """
    if x.device.type == "cpu" and x.shape[0] > 1:
        out = torch.empty(x.shape, dtype=dtype)
        for b in range(x.shape[0]):
            out[b] = orthogonalize(x[b : b + 1], steps, coefficients, dtype, method)[0]
        return out
    tall = x.shape[-2] > x.shape[-1]
    X = (x.mT if tall else x).to(dtype, copy=True)
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(dtype))  # never below X's own dtype
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc)
    X = X.div_(norm.mul_(1.0 + SAFETY[coefficients]).add_(1e-7))
    plan = schedule(steps, coefficients)
    if method == "gram" and X.shape[-2] < X.shape[-1]:
        return _gram(X, plan, tall)
    for k, (a, b, c) in enumerate(plan):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        if tall and k == len(plan) - 1:
            return torch.baddbmm(X.mT, X.mT, B, beta=a)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def _gram(X: Tensor, plan: list[tuple[float, float, float]], tall: bool) -> Tensor:
    """The "gram" loop (module docstring) on the normalised wide ``X`` ``(B, m, n)``, m < n; ``tall``:
    return ``(Q·X)ᵀ`` contiguous."""
    R, Q = torch.bmm(X, X.mT), None  # Q None: the identity
    for k, (a, b, c) in enumerate(plan):
        if k in RESTARTS and Q is not None:
            X = torch.bmm(Q, X)
            R, Q = torch.bmm(X, X.mT), None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = torch.baddbmm(Q, Q, Z, beta=a)
        if k + 1 < len(plan) and k + 1 not in RESTARTS:
            RZ = torch.baddbmm(R, R, Z, beta=a)
            R = torch.baddbmm(RZ, Z, RZ, beta=a)
    return torch.bmm(X.mT, Q.mT) if tall else torch.bmm(Q, X)


def newton_schulz(x: Tensor, steps: int = 5, coefficients: str = "jordan", dtype: torch.dtype = torch.bfloat16,
                  method: str = "standard") -> Tensor:
    """Approximate polar factor of every matrix of ``x`` (``(..., m, n)``); same shape and dtype."""
    check_matrix(x, "newton_schulz")
    check_newton_schulz_args(steps, coefficients, dtype, method)
    if x.numel() == 0:
        return torch.zeros_like(x)
    out = orthogonalize(x.reshape(-1, *x.shape[-2:]), steps, coefficients, dtype, method)
    return out.to(x.dtype).reshape(x.shape)
