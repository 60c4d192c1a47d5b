"""Whole-matrix ownership across ranks: longest-processing-time first.

Matrices are taken in decreasing cost (ties by index) and each goes to the least-loaded rank so
far (ties by rank) among its candidates (default: every rank): deterministic, so every rank
computes the same plan.
"""


def plan_owners(costs: list[int], ranks: int, candidates: list[list[int]] | None = None,
                start: list[int] | None = None) -> list[int]:
    """The owner rank of every matrix, given its cost, the ranks allowed to own it (default: all)
    and the ranks' loads before it (default: 0)."""
    load = list(start) if start is not None else [0] * ranks
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        allowed = candidates[i] if candidates is not None else range(ranks)
        rank = min(allowed, key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def imbalance(costs: list[int], owners: list[int], ranks: int) -> float:
    """Busiest rank's cost over the mean cost, minus one (0.0: perfectly balanced)."""
    load = [0] * ranks
    for cost, owner in zip(costs, owners):
        load[owner] += cost
    mean = sum(load) / ranks
    return max(load) / mean - 1.0 if mean else 0.0
