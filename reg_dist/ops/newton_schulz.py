"""Newton–Schulz approximation of the polar factor (the Muon transform).

    cast to dtype;  X = X / (||X||_F · (1 + safety) + 1e-7)
    (written for m ≤ n; a tall X runs the transposed iteration: XᵀX, products on the right)
    method "standard":  for k in 0..steps−1:  A = X Xᵀ;  B = b_k·A + c_k·A²;  X = a_k·X + B·X
    method "gram" (m ≠ n; a square X takes "standard", which costs fewer products there):
        R = X Xᵀ (m×m);  Q = I
        for k in 0..steps−1:
            if k > 0 and k % RESTART_EVERY == 0:  X = Q·X;  R = X Xᵀ;  Q = I     (restart)
            Z = b_k·R + c_k·R²;  Q = a_k·Q + Q·Z;  R = (a_k·I + Z)·R·(a_k·I + Z)
                                                           (R is skipped before a restart and at the end)
        X = Q·X

"gram" is "standard" in exact arithmetic (every factor a·I + Z is a polynomial in the same R, so
they commute: Xₖ = Qₖ·X₀ and Xₖ Xₖᵀ = Rₖ), but its loop multiplies m×m matrices instead of m×n ones:
26 against 35 m³ multiply-adds for 5 steps at n = 3m, 30 against 45 at n = 4m. In bf16 the rounding
of R and Q compounds over the steps Q spans (Q's eigenvalues grow like a₀·a₁·… for the small singular
values), so every RESTART_EVERY = 3 steps X and R are formed afresh: Dao-AILab's single restart at
step 2 drifted in bf16 (most at κ = 1e3 with polar_express) and diverged at 7 steps; restarting
every 3 steps matched "standard" to 0.1 % on average (``benchmarks/newton_schulz_accuracy.py``).
Rounding also leaves R slightly indefinite, and a step maps an eigenvalue λ < 0 of R to λ·p(λ)²,
p(λ) = a + b·λ + c·λ²: polar_express's first steps (c ≈ 16, then 0.5) grow it 68-fold, then ~23-fold, then
by p(λ)² ≫ a² once |λ| ≈ 1. On nearly rank-deficient matrices (rank 1–3 plus noise, as a momentum early
in training) bf16 "gram" with polar_express returned spectral norms of 10⁷ and more (restarting at 2 then
every 3, or every 2, still blew up on some seeds), so that combination is refused; Jordan's c ≈ 2 stays
below 1.2 in bf16 and fp16, polar_express below 1.15 in fp16 and fp32 (``tests/test_ops_newton_schulz.py``).

x is ``(..., m, n)``; off the CPU all trailing matrices go through one batched matmul per product.
Any input dtype works with any Newton–Schulz dtype (bf16, fp16, fp32, fp64). The Frobenius norm of
the cast X is accumulated in fp32, or fp64 when the input or the Newton–Schulz dtype is fp64 (for one
matrix on the CPU as the trace of X Xᵀ, see ``_normalised_gram``).
``orthogonalize`` returns the Newton–Schulz dtype (its callers cast); ``newton_schulz`` the input's.
"""

import math
from collections.abc import Callable

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
RESTART_EVERY = 3  # "gram" recomputes X = Q·X and R = X Xᵀ at steps 3, 6, …


def check_newton_schulz_args(steps: int, coefficients: str, dtype: torch.dtype, method: str = "standard") -> None:
    check_count("ns_steps", steps)
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"coefficients must be one of {tuple(COEFFICIENTS)}, got {coefficients!r}")
    if dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {dtype!r}")
    if method not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {NS_METHODS}, got {method!r}")
    if method == "gram" and coefficients == "polar_express" and dtype == torch.bfloat16:
        raise ValueError("ns_method='gram' with coefficients='polar_express' is unstable in bf16: on a nearly "
                         "rank-deficient matrix (a momentum early in training) its output reached norms of 1e7 and more; "
                         "use ns_dtype=torch.float16 or torch.float32, coefficients='jordan', or ns_method='standard'")


def schedule(steps: int, coefficients: str) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` iterations."""
    table = COEFFICIENTS[coefficients]
    return [table[min(k, len(table) - 1)] for k in range(steps)]


def orthogonalize(x: Tensor, steps: int, coefficients: str, dtype: torch.dtype, method: str = "standard") -> Tensor:
    """Newton–Schulz (``method`` "standard" or "gram") of ``x`` ``(B, m, n)``, returned contiguous in
    ``dtype`` (whatever ``x``'s dtype: callers cast back).

    A tall X is never transposed: its iteration multiplies on the right (``A = XᵀX``, ``X ← a·X + X·B``;
    "gram": ``R = XᵀX``, ``X ← X·Q``), the transpose of the wide one. On the CPU the matrices go one at
    a time through 2-D products, the last written straight into the output: there a batched matmul
    measured 8–16 % slower than a loop of single ones (``benchmarks/step_time.py``, GPT-2-small
    shapes, 2 threads), and a bf16 ``bmm`` of one matrix slower than ``mm``.
    """
    if x.device.type != "cpu":
        return iterate(x, steps, coefficients, dtype, method)
    out = torch.empty(x.shape, dtype=dtype)
    for b in range(x.shape[0]):
        iterate(x[b], steps, coefficients, dtype, method, out=out[b])
    return out


def _addmm(c: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float = 1.0, out: Tensor | None = None) -> Tensor:
    """beta·c + alpha·a·b for matrices or stacks of them."""
    return (torch.addmm if c.dim() == 2 else torch.baddbmm)(c, a, b, beta=beta, alpha=alpha, out=out)


def _times(P: Tensor, X: Tensor, wide: bool, beta: float | None = None, alpha: float = 1.0,
           out: Tensor | None = None) -> Tensor:
    """alpha·P·X (``wide``) or alpha·X·P, plus beta·X when ``beta`` is given."""
    left, right = (P, X) if wide else (X, P)
    return torch.matmul(left, right, out=out) if beta is None else _addmm(X, left, right, beta, alpha, out=out)


def iterate(x: Tensor, steps: int, coefficients: str, dtype: torch.dtype, method: str,
             out: Tensor | None = None, wide: bool | None = None, reduce: Callable[[Tensor], None] | None = None,
             polynomial: Callable[[Tensor, float, float], Tensor] | None = None) -> Tensor:
    """Newton–Schulz of one matrix ``(m, n)`` or a stack ``(B, m, n)``, one (batched) matmul per product,
    the last one into ``out``: what ``orthogonalize`` runs off the CPU, and on the CPU per matrix.

    Split over the blocks of the small side's orthogonal dimension (``comm.split``): ``x`` is one block
    (rows of a tall matrix, ``wide=False``; columns of a wide one, ``wide=True``) and ``reduce`` sums a
    tensor in place over the blocks. Every Gram matrix and the squared Frobenius norms are then
    reduced; the rest of the iteration is per block, so the blocks together are the matrix's iteration.
    ``polynomial(A, b, c)``, where given, forms "standard"'s b·A + c·A² instead of one product here (a
    split run forms a block of its rows on each rank and gathers them).
    """
    wide = x.shape[-2] <= x.shape[-1] if wide is None else wide
    X = x.to(dtype, copy=True)
    gram = ((lambda Y, out=None: torch.matmul(Y, Y.mT, out=out)) if wide else
            (lambda Y, out=None: torch.matmul(Y.mT, Y, out=out)))
    small = gram if reduce is None else (lambda Y, out=None: _reduced(gram(Y, out), reduce))
    acc = torch.promote_types(acc_dtype(x.dtype), acc_dtype(dtype))
    A, inv = _normalised_gram(X, small, SAFETY[coefficients], acc, reduce)
    plan = schedule(steps, coefficients)
    # every product after the first writes into a buffer of this call (a fresh one costs its page faults
    # on the CPU)
    spare = torch.empty_like(X) if len(plan) > 1 else None  # X's partner: a product never writes its input
    if method == "gram" and x.shape[-2] != x.shape[-1]:
        R, Q = A, None  # Q None: the identity
        Z, RZ, Qs = torch.empty_like(R), torch.empty_like(R), (torch.empty_like(R), torch.empty_like(R))
        for k, (a, b, c) in enumerate(plan):
            if k > 0 and k % RESTART_EVERY == 0:
                X, spare, inv = _times(Q, X, wide, out=spare), X, 1.0
                R, Q = small(X, out=R), None
            Z = _addmm(R, R, R, beta=b, alpha=c, out=Z)
            if Q is None:  # Q = (a·I + Z)/s while X is not yet divided by its norm s
                Q = torch.mul(Z, inv, out=Qs[0])
                Q.diagonal(dim1=-2, dim2=-1).add_(a * inv)
            else:
                Q = _addmm(Q, Q, Z, beta=a, out=Qs[Q is Qs[0]])
            if k + 1 < len(plan) and (k + 1) % RESTART_EVERY:
                RZ = _addmm(R, R, Z, beta=a, out=RZ)
                R = _addmm(RZ, Z, RZ, beta=a, out=R)
        return _times(Q, X, wide, out=out)
    B = torch.empty_like(A) if polynomial is None else None
    for k, (a, b, c) in enumerate(plan):
        A = A if k == 0 else small(X, out=A)
        B = _addmm(A, A, A, beta=b, alpha=c, out=B) if polynomial is None else polynomial(A, b, c)
        X, spare = _times(B, X, wide, beta=a * inv, alpha=inv, out=out if k == len(plan) - 1 else spare), X
        inv = 1.0
    return X


def _reduced(x: Tensor, reduce: Callable[[Tensor], None]) -> Tensor:
    reduce(x)
    return x


def _normalised_gram(X: Tensor, small, safety: float, acc: torch.dtype,
                     reduce: Callable[[Tensor], None] | None = None) -> tuple[Tensor, float]:
    """The Gram matrix of X / s, s = ||X||_F·(1 + safety) + 1e-7, and the factor 1/s still owed by X.

    One matrix on the CPU: ||X||_F² is the trace of the Gram matrix of X itself (accumulated in
    ``acc``), which is then divided by s², and X is left undivided (the first product divides it):
    two passes over X fewer. A stack, a norm below 1e-15 (whose square the Gram matrix would lose
    to underflow), or a block of a split matrix (``reduce``: its squared norms summed over the blocks):
    X is divided by its norm (accumulated in ``acc``) first.
    """
    if reduce is not None:
        squares = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc).square_()
        reduce(squares)
        X.div_(squares.sqrt_().mul_(1.0 + safety).add_(1e-7))
        return small(X), 1.0
    if X.dim() == 2 and X.device.type == "cpu":
        A = small(X)
        norm = math.sqrt(A.diagonal().sum(dtype=acc).item())
        if norm >= 1e-15:
            s = norm * (1.0 + safety) + 1e-7
            return A.mul_(1.0 / (s * s)), 1.0 / s
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc).mul_(1.0 + safety).add_(1e-7)
    X.div_(norm.item() if X.dim() == 2 else norm)  # a bf16 X divided by an fp32 tensor is slow on the CPU
    return small(X), 1.0


def newton_schulz(x: Tensor, steps: int = 5, coefficients: str = "jordan", dtype: torch.dtype = torch.bfloat16,
                  method: str = "standard") -> Tensor:
    """Approximate polar factor of every matrix of ``x`` (``(..., m, n)``); same shape and dtype."""
    check_matrix(x, "newton_schulz")
    check_newton_schulz_args(steps, coefficients, dtype, method)
    if x.numel() == 0:
        return torch.zeros_like(x)
    out = orthogonalize(x.reshape(-1, *x.shape[-2:]), steps, coefficients, dtype, method)
    return out.to(x.dtype).reshape(x.shape)
