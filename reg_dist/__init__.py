"""reg_dist: REG (row-and-column scaling), Muon and MuonEq for sharded large-model training."""

from . import ops
from .distributed import REG, Muon, MuonEq, mark_fused
from . import checkpoint  # after .distributed: it imports .distributed.layout and .optim, never the package

__all__ = ["REG", "Muon", "MuonEq", "checkpoint", "mark_fused", "ops"]
__version__ = "0.1.0"
