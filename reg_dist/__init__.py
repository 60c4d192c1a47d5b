"""reg_dist: REG (row-and-column scaling), Muon and MuonEq for sharded large-model training."""

from . import ops
from .distributed import REG
from .optim import Muon, MuonEq

__all__ = ["REG", "Muon", "MuonEq", "ops"]
__version__ = "0.1.0"
