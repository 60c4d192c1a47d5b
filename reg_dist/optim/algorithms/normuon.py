"""NorMuon (arXiv 2510.05491): Muon, then a per-row (neuron-wise) second-moment normalisation.

    O   = newton_schulz(N)                               Muon's spectral stage (unscaled)
    v_i = β₂·v_i + (1 − β₂)·mean_j O_ij²                 a statistic stage: row sums of squares,
    O_ij ← O_ij / (√v_i + ε)                             reduced over the layout's groups
    U   = ρ·√(mn)·O / ||O||_F                            scale="rms" (default), the paper's 0.2·√(mn)/||Ô||_F

The paper's Algorithm 1 with this library's momentum (sum form, Nesterov by default, as Muon's);
``v`` (one float per logical row of the parameter, no bias correction) is kept by every rank that
holds a piece of the matrix, so the normalisation is exact on every layout.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from ...comm.collectives import CommStats
from ...comm.native import BUCKET_BYTES
from ...comm.statistics import row_col_stats, scale_local_
from ...layout import Layout
from ...ops.newton_schulz import check_newton_schulz_args
from ..engine import MatrixOptimizer, check_number
from ..hyper import strict
from ..stages import Spectral, Statistic
from .muon import newton_schulz_stage


class NorMuon(MatrixOptimizer):
    """NorMuon on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``)."""

    algorithm = "normuon"
    row_state_keys = ("row_second_moment",)

    @strict
    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        scale: str = "rms",
        rms: float = 0.2,
        beta2: float = 0.95,
        eps: float = 1e-8,
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
            beta2=beta2, eps=eps, ns_steps=ns_steps, coefficients=coefficients, ns_dtype=ns_dtype,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite, mesh=mesh, tp_mode=tp_mode, move_dtype=move_dtype,
                         bucket_bytes=bucket_bytes)

    def check_group(self, group: dict) -> None:
        check_newton_schulz_args(group["ns_steps"], group["coefficients"], group["ns_dtype"])
        check_number("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_number("eps", group["eps"], 0.0)
        if group["eps"] == 0:
            raise ValueError("eps must be > 0, got 0")

    def stages(self, group: dict) -> list[Spectral | Statistic]:
        beta2, eps = group["beta2"], group["eps"]

        def normalise_rows(xs: list[Tensor], layouts: list[Layout], states: list[dict], stats: CommStats) -> None:
            for x, lay, state, (r, _) in zip(xs, layouts, states, row_col_stats(xs, layouts, 2.0, stats, cols=False)):
                v = state["row_second_moment"]
                v.lerp_(r.div_(lay.shape[1]).to(v.dtype), 1.0 - beta2)
                scale_local_(x, lay, v.sqrt().add_(eps).reciprocal_().to(x.dtype), None)

        return [newton_schulz_stage(group), Statistic(normalise_rows, cols=False)]
