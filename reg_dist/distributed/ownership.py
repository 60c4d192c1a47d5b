"""Whole-tensor ownership across data-parallel ranks: longest-processing-time first.

Tensors are taken in decreasing cost (ties by index) and each goes to the rank with the least
cost so far (ties by rank): deterministic, so every rank computes the same plan.
"""


def plan_owners(costs: list[int], ranks: int) -> list[int]:
    """The owner rank of every tensor, given its cost."""
    load = [0] * ranks
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
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
