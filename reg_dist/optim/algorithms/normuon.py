"""NorMuon (arXiv 2510.05491): Muon, then a per-row (neuron-wise) second-moment normalisation.

    O   = newton_schulz(N)                               Muon's spectral stage (unscaled)
    v_i = β₂·v_i + (1 − β₂)·mean_j O_ij²                 a statistic stage: row sums of squares,
    O_ij ← O_ij / (√v_i + ε)                             reduced over the layout's groups
    U   = ρ·√(mn)·O / ||O||_F                            scale="rms" (default), the paper's 0.2·√(mn)/||Ô||_F

The paper's Algorithm 1 with this library's momentum (sum form, Nesterov by default, as Muon's);
``v`` (one float per logical row of the parameter, no bias correction) is kept by every rank that
holds a piece of the matrix, so the normalisation is exact on every layout.
"""

from torch import Tensor

from ...comm.collectives import CommStats
from ...comm.statistics import row_col_stats, scale_local_
from ...layout import Layout
from ..engine import MatrixOptimizer, check_number
from ..hyper import Hyper
from ..stages import Spectral, Statistic
from .muon import NEWTON_SCHULZ, NS_METHOD, newton_schulz_stage


class NorMuon(MatrixOptimizer):
    """NorMuon on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``):
    Muon's Newton–Schulz, then each row divided by the root of its second moment (``beta2``, ``eps``)."""

    algorithm = "normuon"
    hyper = (Hyper("beta2", 0.95, float), Hyper("eps", 1e-8, float), *NEWTON_SCHULZ)
    default_scale = "rms"
    keyword_hyper = NS_METHOD
    moves = True
    row_state_keys = ("row_second_moment",)

    def check_group(self, group: dict) -> None:
        newton_schulz_stage(group)
        check_number("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_number("eps", group["eps"], 0.0)
        if group["eps"] == 0:
            raise ValueError("eps must be > 0, got 0")

    @classmethod
    def stages(cls, group: dict) -> list[Spectral | Statistic]:
        beta2, eps = group["beta2"], group["eps"]

        def normalise_rows(xs: list[Tensor], layouts: list[Layout], states: list[dict], stats: CommStats,
                           partials: list[Tensor | None]) -> None:  # after Newton–Schulz: never given any
            for x, lay, state, (r, _) in zip(xs, layouts, states, row_col_stats(xs, layouts, 2.0, stats, cols=False)):
                v = state["row_second_moment"]
                v.lerp_(r.div_(lay.shape[1]).to(v.dtype), 1.0 - beta2)
                scale_local_(x, lay, v.sqrt().add_(eps).reciprocal_().to(x.dtype), None)

        return [newton_schulz_stage(group), Statistic(normalise_rows, cols=False)]
