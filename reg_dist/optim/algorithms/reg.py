"""REG: momentum, then RACS row-and-column scaling (arXiv 2510.03691), then the RMS scale.

    U = racs(N; p, iters, eps)        one statistic stage per iteration (``comm.statistics.sharded_racs_``)
    U = ρ·√(mn)·U / ||U||_F           scale="rms" (default): AdamW's lr and wd carry over
"""

from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ...comm.native import BUCKET_BYTES
from ...comm.statistics import sharded_racs_
from ...ops.racs import check_racs_args
from ..engine import MatrixOptimizer
from ..hyper import strict
from ..stages import Statistic


class REG(MatrixOptimizer):
    """REG on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``)."""

    algorithm = "reg"

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
        p: float = 2.0,
        iters: int = 1,
        eps: float = 1e-8,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        nonfinite: str = "skip",
        *,
        mesh: DeviceMesh | dict[str, dist.ProcessGroup] | None = None,
        tp_mode: str = "gather",
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            p=p, iters=iters, eps=eps, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite, mesh=mesh, tp_mode=tp_mode, bucket_bytes=bucket_bytes)

    def check_group(self, group: dict) -> None:
        check_racs_args(group["p"], group["iters"], group["eps"])

    def stages(self, group: dict) -> list[Statistic]:
        p, iters, eps = group["p"], group["iters"], group["eps"]
        return [Statistic(lambda xs, layouts, states, stats: sharded_racs_(xs, layouts, p, iters, eps, stats),
                          passes=iters)]



