"""Muon: momentum, then Newton–Schulz orthogonalisation, then the Moonlight scale.

    U = newton_schulz(N; ns_steps, coefficients, ns_dtype, ns_method)   one spectral stage: each matrix
                                                             whole on its owner, same shapes batched
    U = ρ·√max(m, n)·U                                       scale="match_rms_adamw" (default)
"""

import torch

from ...ops.newton_schulz import check_newton_schulz_args, iterate, orthogonalize
from ..engine import MatrixOptimizer
from ..hyper import Hyper
from ..stages import Spectral

NEWTON_SCHULZ = (Hyper("ns_steps", 5, int), Hyper("coefficients", "jordan", str),
                 Hyper("ns_dtype", torch.bfloat16, torch.dtype))  # Muon's, MuonEq's and NorMuon's
NS_METHOD = (Hyper("ns_method", "standard", str),)  # theirs too, keyword-only (added after the others)


def newton_schulz_stage(group: dict) -> Spectral:
    """The Newton–Schulz stage of ``group``'s settings (Muon, MuonEq, NorMuon)."""
    steps, coefficients, dtype, method = (group[k] for k in ("ns_steps", "coefficients", "ns_dtype", "ns_method"))
    check_newton_schulz_args(steps, coefficients, dtype, method)
    return Spectral(lambda x: orthogonalize(x, steps, coefficients, dtype, method),
                    lambda x, wide, run: iterate(x, steps, coefficients, dtype, method, wide=wide, reduce=run.reduce,
                                                 polynomial=run.polynomial))


class Muon(MatrixOptimizer):
    """Muon on hidden matrices, AdamW on the rest (see ``routing``), on every layout (see ``engine``):
    ``ns_steps`` Newton–Schulz iterations with the ``coefficients`` ("jordan", "polar_express") in
    ``ns_dtype`` by ``ns_method`` ("standard", or "gram": on X Xᵀ, see ``ops.newton_schulz``);
    same-shape matrices go through one batched call."""

    algorithm = "muon"
    hyper = NEWTON_SCHULZ
    keyword_hyper = NS_METHOD
    moves = True

    def check_group(self, group: dict) -> None:
        newton_schulz_stage(group)

    @classmethod
    def stages(cls, group: dict) -> list[Spectral]:
        return [newton_schulz_stage(group)]
