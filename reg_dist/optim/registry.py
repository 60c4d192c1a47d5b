"""The one list of algorithms: name → optimizer class, its names in each framework, and its
hyper-parameter schema (read from the constructor: names, defaults, types).

The DeepSpeed JSON parser, the Megatron flags, ``launch/train.py``'s flags, checkpoints and the scale
model read this instead of lists of their own; adding an algorithm is one file and one entry here.
"""

import inspect
from dataclasses import dataclass
from typing import Any

from .algorithms.muon import Muon
from .algorithms.muoneq import MuonEq
from .algorithms.normuon import NorMuon
from .algorithms.reg import REG
from .engine import MatrixOptimizer
from .hyper import Hyper
from .stages import Spectral, Statistic, scaled_on_owner, spectral

ENGINE_KEYWORDS = ("mesh", "tp_mode", "move_dtype", "ns_split", "split_group_size", "owner_group_size",
                   "owner_replicas", "owner_overlap", "bucket_bytes")  # how it is laid out, not what it computes


@dataclass(frozen=True)
class Entry:
    """One algorithm: its class and the names DeepSpeed's JSON ``"type"`` and Megatron's ``--optimizer``
    give it (``name`` is the class's ``algorithm``, also ``launch/train.py``'s ``--optimizer``)."""

    cls: type[MatrixOptimizer]
    deepspeed: str
    megatron: str

    @property
    def name(self) -> str:
        return self.cls.algorithm


ALGORITHMS: dict[str, Entry] = {e.name: e for e in (
    Entry(REG, deepspeed="REG", megatron="reg"),
    Entry(Muon, deepspeed="reg_dist.Muon", megatron="reg_muon"),  # DeepSpeed's and Megatron's own "muon" stay theirs
    Entry(MuonEq, deepspeed="MuonEq", megatron="muoneq"),
    Entry(NorMuon, deepspeed="NorMuon", megatron="normuon"),
)}


# a DeepSpeed JSON "type" (read case-insensitively, as DeepSpeed reads its own): each algorithm's DeepSpeed
# name, and "reg_dist.<name>" for every algorithm
DEEPSPEED_TYPES: dict[str, Entry] = {
    **{e.deepspeed.lower(): e for e in ALGORITHMS.values()},
    **{f"reg_dist.{e.name}": e for e in ALGORITHMS.values()},
}


def get(name: str) -> Entry:
    """The entry of algorithm ``name`` ("reg", "muon", "muoneq", "normuon"), or a ValueError listing them."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; the algorithms are {tuple(ALGORITHMS)}")
    return ALGORITHMS[name]


def schema(name: str) -> dict[str, Hyper]:
    """The hyper-parameters of algorithm ``name`` in constructor order (``params`` and the engine's
    layout keywords left out; ``nonfinite`` included)."""
    signature = inspect.signature(get(name).cls.__init__)
    return {p.name: Hyper(p.name, p.default, p.annotation) for p in signature.parameters.values()
            if p.name not in ("self", "params", *ENGINE_KEYWORDS) and p.kind is not p.VAR_KEYWORD}


def stages(name: str, **hyper: Any) -> list[Statistic | Spectral]:
    """The stages of algorithm ``name`` with its defaults, ``hyper`` overriding those it has."""
    known = schema(name)
    group = {**{k: h.default for k, h in known.items()}, **{k: v for k, v in hyper.items() if k in known}}
    return get(name).cls.stages(group)


def is_spectral(name: str) -> bool:
    """Whether algorithm ``name`` orthogonalises whole matrices (owner moves) with its defaults."""
    return spectral(stages(name))


__all__ = ["ALGORITHMS", "DEEPSPEED_TYPES", "Entry", "Hyper", "Spectral", "Statistic", "get", "is_spectral",
           "scaled_on_owner", "schema", "spectral", "stages"]
