"""Update scale conventions, applied to a batch of transformed matrices U ``(B, m, n)``.

    "rms":             ρ·√(m·n) / (||U||_F + eps)    the update's RMS is ρ (AdamW-like)
    "match_rms_adamw": ρ·√max(m, n)                  Moonlight
    "original":        √max(1, m/n)                  Keller Jordan's Muon
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

SCALES = ("rms", "match_rms_adamw", "original")
RMS_EPS = 1e-8


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def scale_factors(u: Tensor, scale: str, rms: float, shape: tuple[int, int] | None = None,
                  reduce: Callable[[Tensor], None] | None = None) -> Tensor:
    """Per-matrix factor ``(B,)`` (fp32 or wider) that multiplies each ``u[b]``; of ``shape`` matrices of
    which ``u`` holds blocks, their squared norms summed in place by ``reduce``, where given."""
    m, n = u.shape[-2:] if shape is None else shape
    if scale == "rms":
        norm = torch.linalg.vector_norm(u, dim=(-2, -1), dtype=torch.promote_types(u.dtype, torch.float32))
        if reduce is not None:
            reduce(norm.square_())
            norm.sqrt_()
        return rms_factor(norm, rms, m, n)
    return torch.full(u.shape[:-2], shape_factor(scale, rms, m, n), dtype=torch.promote_types(u.dtype, torch.float32),
                      device=u.device)


def rms_factor(norm: Tensor, rms: float, m: int, n: int) -> Tensor:
    """The "rms" factor ``ρ·√(m·n) / (||U||_F + eps)`` of matrices with Frobenius norms ``norm``."""
    return (rms * math.sqrt(m * n)) / (norm + RMS_EPS)


def shape_factor(scale: str, rms: float, m: int, n: int) -> float:
    """The factor of the conventions that depend on the shape alone ("match_rms_adamw", "original")."""
    return rms * math.sqrt(max(m, n)) if scale == "match_rms_adamw" else math.sqrt(max(1.0, m / n))
