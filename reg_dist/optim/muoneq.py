"""MuonEq: momentum, then row/column equilibration (arXiv 2603.28254), then Newton–Schulz."""

from typing import Any

import torch
from torch import Tensor

from ..ops.equilibrate import check_equilibrate_args, equilibrate_
from .base import MatrixOptimizer
from .hyper import strict
from .muon import Muon


class MuonEq(Muon):
    """MuonEq on hidden matrices, AdamW on the rest (see ``routing``).

    ``U = newton_schulz(equilibrate(N; mode, exponent))``. With ``mode="rowcol"`` and ``phase=P``,
    steps 0 … P−1 use "rowcol" and steps P, P+1, … use "row". No statistics carry across steps.
    """

    algorithm = "muoneq"

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
        mode: str = "row",
        exponent: float = -0.5,
        phase: int | None = None,
        ns_steps: int = 5,
        coefficients: str = "jordan",
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            mode=mode, exponent=exponent, phase=phase, ns_steps=ns_steps, coefficients=coefficients,
            ns_dtype=ns_dtype, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        MatrixOptimizer.__init__(self, params, defaults, nonfinite)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_equilibrate_args(group["mode"], group["exponent"], 1e-8)
        phase = group["phase"]
        if phase is not None:
            if not isinstance(phase, int) or isinstance(phase, bool) or phase < 0:
                raise ValueError(f"phase must be None or an integer >= 0, got {phase!r}")
            if group["mode"] != "rowcol":
                raise ValueError(f"phase applies only to mode='rowcol', got mode={group['mode']!r}")

    def bucket_tag(self, group: dict, step: int) -> str:
        """The equilibration mode in force at ``step``."""
        phase = group["phase"]
        return "row" if phase is not None and step >= phase else group["mode"]

    def transform(self, x: Tensor, group: dict, tag: str) -> Tensor:
        return super().transform(equilibrate_(x, tag, group["exponent"]), group, tag)
