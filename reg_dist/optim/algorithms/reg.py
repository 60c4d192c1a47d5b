"""REG: momentum, then RACS row-and-column scaling (arXiv 2510.03691), then the RMS scale.

    U = racs(N; p, iters, eps)        one statistic stage, ``iters`` packed reductions (``comm.statistics``)
    U = ρ·√(mn)·U / ||U||_F           scale="rms" (default): AdamW's lr and wd carry over; ||U||_F² is
                                      summed by the last scaling pass and handed to the engine, or, for
                                      a matrix whose rows are whole on each rank (finite p, no tol or
                                      stats_beta), reduced with the last statistics as Σ_j c_j² Σ_i r_i² x_ij²

Variants (keyword-only; ALGORITHMS.md §1's definition above is ``exponent=-0.5``):
    exponent    x_ij ← (r_i + eps)^e · x_ij · (c_j + eps)^e: −1 (default: full normalisation per side, which
                beat −½ across seeds in pretraining and fine-tuning, docs/study.md), −½ (one symmetric Ruiz
                step); a checkpoint written before the default changed resumes with −½
    tol         > 0: iterate up to ``iters`` times, stopping for a matrix once its non-zero row norms
                agree within ``tol`` (max/min − 1) and its column norms too; the steps each matrix took
                are ``REG.balance_steps()``
    stats       "momentum" (default): the first iteration's statistics are N's; "gradient": the raw
                gradient G's (N is still what is scaled)
    stats_beta  > 0: the first iteration's reduced sums of |·|^p are an exponential moving average over
                steps, a ← β·a + (1 − β)·s (as the RACS of Gong et al., arXiv 2502.07752, a different
                optimizer of the same name, averages its row/column statistics), kept as state
                ``stats_average`` (m + K·n values, whole on every rank holding a piece of the matrix)
"""

import math

from ...comm.statistics import sharded_racs_
from ...layout import Layout
from ...ops.racs import check_racs_args
from ..engine import MatrixOptimizer, check_number
from ..hyper import Hyper
from ..stages import Statistic

STATS = ("momentum", "gradient")
AVERAGE = "stats_average"


class REG(MatrixOptimizer):
    """REG on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``):
    ``p`` the norm of the row/column statistics (2, or inf for max), ``iters`` RACS iterations, ``eps``;
    the variants ``exponent``, ``tol``, ``stats``, ``stats_beta`` (see the module docstring)."""

    algorithm = "reg"
    hyper = (Hyper("p", 2.0, float), Hyper("iters", 1, int), Hyper("eps", 1e-8, float))
    keyword_hyper = (Hyper("exponent", -1.0, float), Hyper("tol", 0.0, float), Hyper("stats", "momentum", str),
                     Hyper("stats_beta", 0.0, float))
    default_scale = "rms"
    legacy_hyper = {"exponent": -0.5}  # the default before the study (docs/study.md) made it -1

    def check_group(self, group: dict) -> None:
        check_racs_args(group["p"], group["iters"], group["eps"], group["exponent"])
        check_number("tol", group["tol"], 0.0)
        if group["stats"] not in STATS:
            raise ValueError(f"stats must be one of {STATS}, got {group['stats']!r}")
        check_number("stats_beta", group["stats_beta"], 0.0, 1.0, high_open=True)

    def vector_state(self, group: dict, layout: Layout) -> dict[str, int]:
        (m, n), k = layout.shape, len(layout.block_shapes)
        return {AVERAGE: m + k * n} if group["algorithm"] == self.algorithm and group["stats_beta"] > 0 else {}

    def local_statistics(self, group: dict) -> bool:
        """Not with ``tol`` (every rank judges the balance from all the norms) or ``stats_beta`` (the
        average is kept whole)."""
        return group["algorithm"] != self.algorithm or (group["tol"] == 0 and group["stats_beta"] == 0)

    def balance_steps(self) -> dict[str, list[int]]:
        """The balancing steps each fused matrix of every REG parameter took at its last step (with ``tol``)."""
        return {name: self.state[p]["balance_steps"] for g in self.param_groups if g["algorithm"] == self.algorithm
                for p, name in zip(g["params"], g["param_names"]) if "balance_steps" in self.state.get(p, {})}

    @classmethod
    def stages(cls, group: dict) -> list[Statistic]:
        p, iters, eps, squares = group["p"], group["iters"], group["eps"], group["scale"] == "rms"
        exponent, tol, beta = group["exponent"], group["tol"], group["stats_beta"]
        fold = squares and p != math.inf and tol == 0 and beta == 0  # the RMS norm rides on the last reduction

        def run(xs, layouts, states, stats, partials, agree=None):
            averages = [s[AVERAGE] for s in states] if beta > 0 else None
            out, steps = sharded_racs_(xs, layouts, p, iters, eps, stats, squares, partials, exponent, tol, averages,
                                       beta, fold, agree)
            if tol > 0:
                for state, n in zip(states, steps):
                    state["balance_steps"] = n.tolist()
            return out

        return [Statistic(run, passes=iters, p=p, source=group["stats"], fold=fold)]
