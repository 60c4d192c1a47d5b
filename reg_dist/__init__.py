"""reg_dist: REG (row-and-column scaling), Muon, MuonEq and NorMuon for sharded large-model training."""

from . import ops
from .layout import mark_fused
from .optim import REG, Muon, MuonEq, NorMuon
from . import checkpoint  # noqa: E402  (after optim, which it reads)

__all__ = ["REG", "Muon", "MuonEq", "NorMuon", "checkpoint", "mark_fused", "ops"]
__version__ = "0.1.0"
