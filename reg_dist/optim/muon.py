"""Muon: momentum, then Newton–Schulz orthogonalisation, then the Moonlight scale."""

from typing import Any

import torch
from torch import Tensor

from ..ops.newton_schulz import check_newton_schulz_args, orthogonalize
from .base import MatrixOptimizer
from .hyper import strict


class Muon(MatrixOptimizer):
    """Muon on hidden matrices, AdamW on the rest (see ``routing``).

    ``U = newton_schulz(N; ns_steps, coefficients, ns_dtype)``; same-shape matrices go through one
    batched call. ``scale="match_rms_adamw"`` multiplies by ``rms·√max(m, n)``.
    """

    algorithm = "muon"

    @strict
    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        scale: str = "match_rms_adamw",
        rms: float = 0.2,
        ns_steps: int = 5,
        coefficients: str = "jordan",
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            ns_steps=ns_steps, coefficients=coefficients, ns_dtype=ns_dtype,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite)

    def check_group(self, group: dict) -> None:
        check_newton_schulz_args(group["ns_steps"], group["coefficients"], group["ns_dtype"])

    def transform(self, x: Tensor, group: dict, tag: Any) -> Tensor:
        return orthogonalize(x, group["ns_steps"], group["coefficients"], group["ns_dtype"])
