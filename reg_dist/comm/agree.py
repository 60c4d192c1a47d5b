"""Which ranks share a step: they must agree on the parameters, and skip a non-finite step together
(``all_agree``, or an ``Agreement`` riding on the step's first statistics all-reduce)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import CommStats, count


def agreement_group(routes: list[tuple[str, tuple[int, ...], str]], peers: set[int]) -> dist.ProcessGroup | None:
    """The ranks that hold this rank's parameters, as a group (None: the world), checked.

    One ``all_gather_object`` of every rank's routes (names, logical shapes, algorithms) and of
    ``peers``, the ranks it shares collectives with (its layouts' and mesh's groups). Ranks with the
    same routes are one pipeline stage (without pipeline parallelism: every rank, the world); each
    stage gets a group of its own (``new_group``: every rank makes all of them, in one order). A rank
    whose peer routes other parameters fails on every rank alike: the packed collectives would pair
    up different matrices (or hang)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (routes, sorted(peers)))
    for rank, (theirs, their_peers) in enumerate(everyone):
        for peer in their_peers:
            other = everyone[peer][0]
            if other != theirs:
                i = next((i for i, (a, b) in enumerate(zip(theirs, other)) if a != b), min(len(theirs), len(other)))
                raise ValueError(f"ranks disagree on the parameters: entry {i} is "
                                 f"{theirs[i] if i < len(theirs) else 'nothing'} on rank {rank} but "
                                 f"{other[i] if i < len(other) else 'nothing'} on rank {peer}")
    stages: dict[tuple, list[int]] = {}
    for rank, (theirs, _) in enumerate(everyone):
        stages.setdefault(tuple(theirs), []).append(rank)
    if len(stages) == 1:
        return None
    groups = [dist.new_group(ranks) for ranks in stages.values()]
    return groups[list(stages).index(tuple(routes))]


def all_agree(ok: bool, group: dist.ProcessGroup | None, stats: CommStats | None) -> bool:
    """Whether ``ok`` holds on every rank of ``group`` (None: the world): one MIN all-reduce, counted
    as ``"world"``."""
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    count(stats, "world", flag, "all_reduce", group)
    return bool(flag.item())


# The most matrix elements a rank may step for the agreement to ride on the statistics: storing the
# momentum in a pass of its own (read G, M; write M: 12 bytes per fp32 element) then costs at most
# 2²⁶ · 12 B / 3.35 TB/s ≈ 0.24 ms of HBM time (H100), about an all-reduce's latency across nodes
# (0.2–0.4 ms from 64 to 16,384 ranks, ``reg_dist.scale.timing``); with more elements per rank the
# separate all-reduce is the cheaper of the two.
RIDE_ELEMENTS = 1 << 26


class NonFiniteStep(Exception):
    """Some rank sharing the step holds a non-finite gradient: raised on every one of them alike."""


@dataclass
class Agreement:
    """The non-finite agreement carried by a statistics reduction instead of an all-reduce of its own:
    ``bad`` (this rank holds a non-finite gradient) is one more entry, summed (or maxed) beside the
    statistics over each group of the reduction, whose groups reach every rank sharing the step
    (``comm.statistics.carries_agreement``)."""

    bad: bool

    def entry(self, like: Tensor) -> Tensor:
        """The entry to reduce: ``(1,)``, 1 where this rank's gradients are not finite, in ``like``'s dtype."""
        return torch.tensor([float(self.bad)], dtype=like.dtype, device=like.device)

    def settle(self, entry: Tensor) -> None:
        """Raise ``NonFiniteStep`` where the reduced ``entry`` says any rank's gradients were not finite."""
        if entry.item() > 0:
            raise NonFiniteStep
