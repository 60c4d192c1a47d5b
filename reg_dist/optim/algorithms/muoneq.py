"""MuonEq: momentum, then row/column equilibration (arXiv 2603.28254), then Newton–Schulz.

    N = equilibrate(N; mode, exponent)   a statistic stage: only the equilibrated pieces travel
    U = newton_schulz(N)                 Muon's spectral stage, then Muon's scale

With ``mode="rowcol"`` and ``phase=P``, steps 0 … P−1 use "rowcol" and steps P, P+1, … use "row".
No statistics carry across steps.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from ...comm.collectives import CommStats
from ...comm.native import BUCKET_BYTES
from ...comm.statistics import sharded_equilibrate_
from ...layout import Layout
from ...ops.equilibrate import check_equilibrate_args
from ...ops.newton_schulz import check_newton_schulz_args
from ..engine import MatrixOptimizer
from ..hyper import strict
from ..stages import Spectral, Statistic
from .muon import newton_schulz_stage


def mode_at(group: dict, step: int) -> str:
    """The equilibration mode in force at ``step``."""
    phase = group["phase"]
    return "row" if phase is not None and step >= phase else group["mode"]


class MuonEq(MatrixOptimizer):
    """MuonEq on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``)."""

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
        *,
        mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None,
        tp_mode: str = "gather",
        move_dtype: torch.dtype | None = None,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            mode=mode, exponent=exponent, phase=phase, ns_steps=ns_steps, coefficients=coefficients,
            ns_dtype=ns_dtype, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite, mesh=mesh, tp_mode=tp_mode, move_dtype=move_dtype,
                         bucket_bytes=bucket_bytes)

    def check_group(self, group: dict) -> None:
        check_newton_schulz_args(group["ns_steps"], group["coefficients"], group["ns_dtype"])
        check_equilibrate_args(group["mode"], group["exponent"], 1e-8)
        phase = group["phase"]
        if phase is not None:
            if not isinstance(phase, int) or isinstance(phase, bool) or phase < 0:
                raise ValueError(f"phase must be None or an integer >= 0, got {phase!r}")
            if group["mode"] != "rowcol":
                raise ValueError(f"phase applies only to mode='rowcol', got mode={group['mode']!r}")

    def stages(self, group: dict) -> list[Statistic | Spectral]:
        def equilibrate(xs: list[Tensor], layouts: list[Layout], states: list[dict], stats: CommStats) -> None:
            modes = [mode_at(group, int(s["step"])) for s in states]
            for mode in sorted(set(modes)):
                chosen = [i for i, m in enumerate(modes) if m == mode]
                sharded_equilibrate_([xs[i] for i in chosen], [layouts[i] for i in chosen], mode,
                                     group["exponent"], stats=stats)

        return [Statistic(equilibrate), newton_schulz_stage(group)]
