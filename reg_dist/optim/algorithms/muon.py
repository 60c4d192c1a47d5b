"""Muon: momentum, then Newton–Schulz orthogonalisation, then the Moonlight scale.

    U = newton_schulz(N; ns_steps, coefficients, ns_dtype)   one spectral stage: each matrix whole on
                                                             its owner, same shapes batched
    U = ρ·√max(m, n)·U                                       scale="match_rms_adamw" (default)
"""

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ...comm.native import BUCKET_BYTES
from ...ops.newton_schulz import check_newton_schulz_args, orthogonalize
from ..engine import MatrixOptimizer
from ..hyper import strict
from ..stages import Spectral


def newton_schulz_stage(group: dict) -> Spectral:
    """The Newton–Schulz stage of ``group``'s settings (Muon, MuonEq, NorMuon)."""
    steps, coefficients, dtype = group["ns_steps"], group["coefficients"], group["ns_dtype"]
    return Spectral(lambda x: orthogonalize(x, steps, coefficients, dtype))


class Muon(MatrixOptimizer):
    """Muon on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``)."""

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
        *,
        mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None,
        tp_mode: str = "gather",
        move_dtype: torch.dtype | None = None,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            ns_steps=ns_steps, coefficients=coefficients, ns_dtype=ns_dtype,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite, mesh=mesh, tp_mode=tp_mode, move_dtype=move_dtype,
                         bucket_bytes=bucket_bytes)

    def check_group(self, group: dict) -> None:
        check_newton_schulz_args(group["ns_steps"], group["coefficients"], group["ns_dtype"])

    def stages(self, group: dict) -> list[Spectral]:
        return [newton_schulz_stage(group)]
