"""Independent fp64 reference code, written from ALGORITHMS.md with plain sums and loops.

Nothing here imports reg_dist: these are what the library is checked against.
"""

import math

import torch

JORDAN = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _pnorm(v: torch.Tensor, p: float) -> torch.Tensor:
    if p == math.inf:
        return v.abs().max()
    return (v.abs() ** p).sum() ** (1.0 / p)


def racs_ref(x: torch.Tensor, p: float = 2.0, iters: int = 1, eps: float = 1e-8, exponent: float = -0.5) -> torch.Tensor:
    """One matrix (m, n), fp64 (``exponent``: the power of each side's scaling; REG's default is −1)."""
    X = x.double().clone()
    m, n = X.shape
    for _ in range(iters):
        r = torch.stack([_pnorm(X[i, :], p) for i in range(m)])
        c = torch.stack([_pnorm(X[:, j], p) for j in range(n)])
        X = torch.diag((r + eps) ** exponent) @ X @ torch.diag((c + eps) ** exponent)
    return X


def equilibrate_ref(x: torch.Tensor, mode: str = "row", exponent: float = -0.5, eps: float = 1e-8) -> torch.Tensor:
    X = x.double()
    r = (X * X).sum(dim=1)
    c = (X * X).sum(dim=0)
    if mode in ("row", "rowcol"):
        X = torch.diag((r + eps) ** exponent) @ X
    if mode in ("col", "rowcol"):
        X = X @ torch.diag((c + eps) ** exponent)
    return X


def newton_schulz_ref(x: torch.Tensor, steps: int = 5, coefficients: str = "jordan") -> torch.Tensor:
    X = x.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    safety = 0.0 if coefficients == "jordan" else 0.01
    X = X / (torch.sqrt((X * X).sum()) * (1 + safety) + 1e-7)
    for k in range(steps):
        a, b, c = JORDAN if coefficients == "jordan" else POLAR_EXPRESS[min(k, 4)]
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


def scale_ref(u: torch.Tensor, scale: str, rms: float) -> torch.Tensor:
    m, n = u.shape
    if scale == "rms":
        return u * rms * math.sqrt(m * n) / (torch.sqrt((u * u).sum()) + 1e-8)
    if scale == "match_rms_adamw":
        return u * rms * math.sqrt(max(m, n))
    return u * math.sqrt(max(1.0, m / n))


def racs_variant_ref(p: float = 2.0, iters: int = 1, eps: float = 1e-8, exponent: float = -1.0, tol: float = 0.0,
                     stats: str = "momentum", beta: float = 0.0):
    """REG's transform with its variants as a ``transform(N, t, G)`` for ``matrix_steps_ref`` (which then
    passes the raw gradient G), keeping its running averages across calls: ``iters`` times
    X ← diag((r + eps)^exponent) · X · diag((c + eps)^exponent) with r, c the row and column p-norms of X,
    except that the first time they come from the p-th power sums of G (``stats="gradient"``) and, with
    ``beta > 0``, from their average a ← beta·a + (1 − beta)·s over steps; with ``tol > 0`` it stops as
    soon as the non-zero row norms agree within max/min − 1 <= tol and the column norms too.
    ``transform.steps`` lists the scalings it made at each call."""
    state = {"steps": []}

    def powers(S: torch.Tensor, dim: int) -> torch.Tensor:
        return S.abs().amax(dim=dim) if p == math.inf else (S.abs() ** p).sum(dim=dim)

    def roots(s: torch.Tensor) -> torch.Tensor:
        return s if p == math.inf else s ** (1.0 / p)

    def spread(v: torch.Tensor) -> float:
        v = v[v > 0]
        return float(v.max() / v.min() - 1) if len(v) else 0.0

    def transform(N: torch.Tensor, t: int, G: torch.Tensor) -> torch.Tensor:
        X = N.double().clone()
        done = 0
        for k in range(iters):
            S = G.double() if k == 0 and stats == "gradient" else X
            r, c = powers(S, 1), powers(S, 0)
            if k == 0 and beta > 0:
                state["r"] = beta * state.get("r", torch.zeros_like(r)) + (1 - beta) * r
                state["c"] = beta * state.get("c", torch.zeros_like(c)) + (1 - beta) * c
                r, c = state["r"], state["c"]
            r, c = roots(r), roots(c)
            if tol > 0 and max(spread(r), spread(c)) <= tol:
                break
            X = torch.diag((r + eps) ** exponent) @ X @ torch.diag((c + eps) ** exponent)
            done += 1
        state["steps"].append(done)
        return X

    transform.gradient = True
    transform.steps = state["steps"]
    return transform


def matrix_steps_ref(w0, grads, transform, lr, momentum, nesterov, weight_decay, scale, rms):
    """ALGORITHMS.md §4 on one matrix; ``transform(N, t)`` gets the step index t = 0, 1, … (and the raw
    gradient, ``transform(N, t, G)``, where it has the attribute ``gradient``)."""
    W = w0.double().clone()
    M = torch.zeros_like(W)
    for t, G in enumerate(grads):
        G = G.double()
        M = momentum * M + G
        N = G + momentum * M if nesterov else M
        U = scale_ref(transform(N, t, G) if getattr(transform, "gradient", False) else transform(N, t), scale, rms)
        W = W * (1 - lr * weight_decay) - lr * U
    return W


def adamw_steps_ref(w0, grads, lr, betas, eps, weight_decay):
    W = w0.double().clone()
    m = torch.zeros_like(W)
    v = torch.zeros_like(W)
    b1, b2 = betas
    for t, G in enumerate(grads, start=1):
        G = G.double()
        W = W * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * G
        v = b2 * v + (1 - b2) * G * G
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        W = W - lr * mhat / (vhat.sqrt() + eps)
    return W


def normuon_transform_ref(steps: int = 5, beta2: float = 0.95, eps: float = 1e-8):
    """NorMuon's transform of one matrix (arXiv 2510.05491, Algorithm 1) as a ``transform(N, t)`` for
    ``matrix_steps_ref``, keeping its per-row second moment across calls:
    O = NS(N); v = β₂·v + (1 − β₂)·mean_j O_ij²; O_ij / (√v_i + ε)."""
    state = {}

    def transform(N: torch.Tensor, t: int) -> torch.Tensor:
        O = newton_schulz_ref(N, steps)
        v = state.get("v", torch.zeros(O.shape[0], dtype=O.dtype))
        v = beta2 * v + (1 - beta2) * (O * O).mean(dim=1)
        state["v"] = v
        return O / (v.sqrt() + eps).unsqueeze(1)

    return transform


def newton_schulz_gram_ref(x: torch.Tensor, steps: int = 5, coefficients: str = "jordan",
                           restart_every: int = 3) -> torch.Tensor:
    """Gram Newton–Schulz of one matrix in fp64: the iteration on R = X Xᵀ of the wide orientation,
    X = Q·X₀ formed only at the restarts (steps restart_every, 2·restart_every, …) and the end; a
    square matrix runs ``newton_schulz_ref``."""
    X = x.double()
    if X.shape[0] == X.shape[1]:
        return newton_schulz_ref(x, steps, coefficients)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    safety = 0.0 if coefficients == "jordan" else 0.01
    X = X / (torch.sqrt((X * X).sum()) * (1 + safety) + 1e-7)
    eye = torch.eye(X.shape[0], dtype=X.dtype)
    R, Q = X @ X.T, eye
    for k in range(steps):
        a, b, c = JORDAN if coefficients == "jordan" else POLAR_EXPRESS[min(k, 4)]
        if k > 0 and k % restart_every == 0:
            X = Q @ X
            R, Q = X @ X.T, eye
        Z = b * R + c * (R @ R)
        Q = a * Q + Q @ Z
        R = (a * eye + Z) @ R @ (a * eye + Z)
    X = Q @ X
    return X.T if tall else X
