"""MuonEq: momentum, then row/column equilibration (arXiv 2603.28254), then Newton–Schulz.

    N = equilibrate(N; mode, exponent)   a statistic stage: only the equilibrated pieces travel
    U = newton_schulz(N)                 Muon's spectral stage, then Muon's scale

With ``mode="rowcol"`` and ``phase=P``, steps 0 … P−1 use "rowcol" and steps P, P+1, … use "row".
No statistics carry across steps.
"""

from torch import Tensor

from ...comm.agree import Agreement
from ...comm.collectives import CommStats
from ...comm.statistics import sharded_equilibrate_
from ...layout import Layout
from ...ops.equilibrate import check_equilibrate_args
from ..engine import MatrixOptimizer
from ..hyper import Hyper
from ..stages import Spectral, Statistic
from .muon import NEWTON_SCHULZ, NS_METHOD, newton_schulz_stage


def mode_at(group: dict, step: int) -> str:
    """The equilibration mode in force at ``step``."""
    phase = group["phase"]
    return "row" if phase is not None and step >= phase else group["mode"]


class MuonEq(MatrixOptimizer):
    """MuonEq on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``):
    equilibration ``mode`` ("row", "col", "rowcol") with ``exponent``, ``phase`` (rowcol, then row), then
    Muon's Newton–Schulz."""

    algorithm = "muoneq"
    hyper = (Hyper("mode", "row", str), Hyper("exponent", -0.5, float), Hyper("phase", None, int | None),
             *NEWTON_SCHULZ)
    keyword_hyper = NS_METHOD
    moves = True

    def check_group(self, group: dict) -> None:
        newton_schulz_stage(group)
        check_equilibrate_args(group["mode"], group["exponent"], 1e-8)
        phase = group["phase"]
        if phase is not None:
            if not isinstance(phase, int) or isinstance(phase, bool) or phase < 0:
                raise ValueError(f"phase must be None or an integer >= 0, got {phase!r}")
            if group["mode"] != "rowcol":
                raise ValueError(f"phase applies only to mode='rowcol', got mode={group['mode']!r}")

    @classmethod
    def stages(cls, group: dict) -> list[Statistic | Spectral]:
        def equilibrate(xs: list[Tensor], layouts: list[Layout], states: list[dict], stats: CommStats,
                        partials: list[Tensor | None], agree: Agreement | None = None) -> None:
            modes = [mode_at(group, int(s["step"])) for s in states]
            for k, mode in enumerate(sorted(set(modes))):
                chosen = [i for i, m in enumerate(modes) if m == mode]
                sharded_equilibrate_([xs[i] for i in chosen], [layouts[i] for i in chosen], mode,
                                     group["exponent"], stats=stats, partials=[partials[i] for i in chosen],
                                     agree=agree if k == 0 else None)

        return [Statistic(equilibrate, p=2.0), newton_schulz_stage(group)]
