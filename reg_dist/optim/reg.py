"""REG: momentum, then RACS row-and-column scaling (arXiv 2510.03691), then the RMS scale."""

from typing import Any

from torch import Tensor

from ..ops.racs import check_racs_args, racs_
from .base import MatrixOptimizer
from .hyper import strict


class REG(MatrixOptimizer):
    """REG on hidden matrices, AdamW on the rest (see ``routing``).

    ``U = racs(N; p, iters, eps)`` with ``N`` the (Nesterov) momentum; ``scale="rms"`` gives the
    update an RMS of ``rms`` so AdamW's lr and wd carry over.
    """

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
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, scale=scale, rms=rms,
            p=p, iters=iters, eps=eps, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        )
        super().__init__(params, defaults, nonfinite)

    def check_group(self, group: dict) -> None:
        check_racs_args(group["p"], group["iters"], group["eps"])

    def transform(self, x: Tensor, group: dict, tag: Any) -> Tensor:
        return racs_(x, group["p"], group["iters"], group["eps"])
