"""The optimizers: one step engine (``engine``) over the stages of each algorithm (``algorithms/``),
the registry that names them, AdamW for the rest, routing and scaling."""

from .algorithms.muon import Muon
from .algorithms.muoneq import MuonEq
from .algorithms.normuon import NorMuon
from .algorithms.reg import REG
from .engine import MatrixOptimizer
from .registry import ALGORITHMS
from .routing import Route

__all__ = ["ALGORITHMS", "REG", "MatrixOptimizer", "Muon", "MuonEq", "NorMuon", "Route"]
