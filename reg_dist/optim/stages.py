"""The two kinds of stage an algorithm's transform is made of.

``Statistic(run, passes, cols, p, source, fold)``: needs the matrix only through sums along rows and columns (RACS,
equilibration, row normalisation). ``run(xs, layouts, states, stats, partials)`` transforms every parameter's
local elements ``xs[i]`` in place, reducing its partial sums over the groups of ``layouts[i]``
(``comm.statistics``): exact under any sharding, O(m + n) traffic, no gather. ``states[i]`` is the
parameter's state. It returns None, or (``comm.statistics.Squares``) the ``(K,)`` sums of squares of each
result's fused matrices when it had them from its last pass (the "rms" scale then needs no pass of its
own): local, or already reduced where ``fold`` says its last reduction carried them for the matrices
whose rows are whole on each rank (``comm.statistics.rows_local``: no norm reduction for those). A first
stage whose first reduction is the sums of ``|N|^p`` says so with ``p``: the engine then sums them in
its momentum pass where the fused kernel applies and hands them over as ``partials[i]`` (the local
``comm.statistics.partial_row_col``; None for the others, and for every parameter of a later stage);
with ``source="gradient"`` they are the raw gradient's, given for every parameter. A first stage's run also
takes a keyword ``agree`` (``comm.agree.Agreement``, given where the engine has the non-finite agreement
ride on it) for its first reduction, which settles it before anything else happens. ``passes`` (packed
reductions per step) and ``cols`` (whether column sums travel beside the row sums) describe that traffic
to the scale model.

``Spectral(fn, split)``: needs whole matrices (Newton–Schulz). ``fn`` maps a stack ``(B, m, n)`` to one of
the same shape (the stack is the plan's scratch: the engine may write the result into it); the engine runs it on each matrix's owner (``comm.owner``), which is this process when it
holds the matrix whole. ``split(x, wide, run)``, where given, is the same transform run on one block of
each matrix of a stack split over a few ranks (``comm.split``): rows of tall matrices, columns of wide
ones (``wide``), with the run's collectives (``comm.split.Run``: ``reduce``, ``polynomial``).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..comm.collectives import CommStats
from ..layout import Layout


@dataclass(frozen=True)
class Statistic:
    run: Callable[[list[Tensor], list[Layout], list[dict], CommStats, list[Tensor | None]], list[Tensor] | None]
    passes: int = 1
    cols: bool = True
    p: float | None = None
    source: str = "momentum"
    fold: bool = False


@dataclass(frozen=True)
class Spectral:
    fn: Callable[[Tensor], Tensor]
    split: Callable[[Tensor, bool, Any], Tensor] | None = None


def spectral(stages: list[Statistic | Spectral]) -> bool:
    """Whether ``stages`` move whole matrices to their owners (a ``Spectral`` stage)."""
    return any(isinstance(s, Spectral) for s in stages)


def scaled_on_owner(stages: list[Statistic | Spectral]) -> bool:
    """Whether the scale is applied on the owner, to whole matrices (the last stage is spectral);
    otherwise it is applied to the local pieces, ``"rms"`` after one packed norm reduction."""
    return isinstance(stages[-1], Spectral)
