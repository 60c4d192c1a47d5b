"""The optimizers: one shared step (``base``) over the ``ops`` transforms, AdamW for the rest."""

from .base import MatrixOptimizer
from .muon import Muon
from .muoneq import MuonEq
from .reg import REG
from .routing import Route

__all__ = ["REG", "MatrixOptimizer", "Muon", "MuonEq", "Route"]
