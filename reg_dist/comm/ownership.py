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


def loads(costs: list[int], owners: list[int], ranks: int) -> list[int]:
    """Every rank's summed cost under ``owners``."""
    load = [0] * ranks
    for cost, owner in zip(costs, owners):
        load[owner] += cost
    return load


# What ``choose_replicas`` weighs on a rank: Newton–Schulz FLOPs, ~30 per unit of cost m·n·min(m, n)
# (five iterations of 4a²b + 2a³ on a square matrix), at half an H100's dense BF16 peak; elements received
# from other replica groups at one 400 Gb/s NIC per GPU, one network latency per peer group and hop (the
# figures of ``reg_dist.scale.cluster.H100``). The runtime knows no hardware: the scale model plans alike.
FLOPS_PER_COST = 30
NS_FLOPS_PER_S = 0.5 * 989e12
LINK_BYTES_PER_S = 50e9
LINK_LATENCY_S = 14e-6
REPLICAS = ("auto", "share", "repeat")


def choose_replicas(share_load: int, repeat_load: int, across: int, groups: int, move_bytes: int) -> str:
    """"share" (each matrix transformed once, results sent to the other replica groups) or "repeat"
    (every group transforms every matrix), whichever is predicted faster on the busiest rank: the
    busiest loads (cost units) under each plan, ``across`` the most elements one rank receives from or
    sends to other groups under "share", over ``groups`` replica groups (two hops, one latency per peer each)."""
    share = (share_load * FLOPS_PER_COST / NS_FLOPS_PER_S + across * move_bytes / LINK_BYTES_PER_S
             + 2 * (groups - 1) * LINK_LATENCY_S)
    return "share" if share < repeat_load * FLOPS_PER_COST / NS_FLOPS_PER_S else "repeat"
