"""REG: momentum, then RACS row-and-column scaling (arXiv 2510.03691), then the RMS scale.

    U = racs(N; p, iters, eps)        one statistic stage, ``iters`` packed reductions (``comm.statistics``)
    U = ρ·√(mn)·U / ||U||_F           scale="rms" (default): AdamW's lr and wd carry over; ||U||_F² is
                                      summed by the last scaling pass and handed to the engine
"""

from ...comm.statistics import sharded_racs_
from ...ops.racs import check_racs_args
from ..engine import MatrixOptimizer
from ..hyper import Hyper
from ..stages import Statistic


class REG(MatrixOptimizer):
    """REG on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``):
    ``p`` the norm of the row/column statistics (2, or inf for max), ``iters`` RACS iterations, ``eps``."""

    algorithm = "reg"
    hyper = (Hyper("p", 2.0, float), Hyper("iters", 1, int), Hyper("eps", 1e-8, float))
    default_scale = "rms"

    def check_group(self, group: dict) -> None:
        check_racs_args(group["p"], group["iters"], group["eps"])

    @classmethod
    def stages(cls, group: dict) -> list[Statistic]:
        p, iters, eps, squares = group["p"], group["iters"], group["eps"], group["scale"] == "rms"
        return [Statistic(lambda xs, layouts, states, stats, partials: sharded_racs_(xs, layouts, p, iters, eps, stats,
                                                                                     squares, partials),
                          passes=iters, p=p)]
