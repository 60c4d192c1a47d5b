"""Alpha–beta times of collectives (ring and tree, and the all-to-all of the owner moves).

For a group of p ranks over a link of per-step latency α and per-direction bandwidth β, n the
collective's full buffer in bytes, L the launch latency:

    all-reduce      ring  L + 2(p−1)·α + 2(p−1)/p · n/β        tree  L + 2⌈log₂p⌉·α + 2n/β
                    (the faster of the two, as NCCL picks)
    reduce-scatter, all-gather (ring)   L + (p−1)·α + (p−1)/p · n/β
    all-to-all      L + peers·α + max(bytes over NVLink / β_NVLink, bytes over the network / β_NIC)
                    per rank (off-rank bytes, the larger of sent and received; its peers are the
                    ranks it exchanges anything with, each costing one latency: NCCL's grouped
                    point-to-point calls are not modelled as overlapping)

The link: NVLink inside a node; a group spanning nodes runs at the network's latency and at
min(β_NVLink, k·β_NIC), k its ranks per node (a rail-optimised fabric, one NIC per GPU: a ring
that visits k GPUs of every node crosses each node boundary on k NICs at once).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .cluster import Cluster
from .parallel import Parallel
from .traffic import Call


@dataclass(frozen=True)
class Span:
    size: int  # ranks in one instance of the group
    nodes: int  # nodes one instance spans
    per_node: int  # its most ranks on one node


def span(group: str, par: Parallel, size: int | None = None) -> Span:
    """The first instance of the group ``group`` on ``par``'s ranks (pp-major, then dp, then tp): "world",
    "stage", "split{k}" (a split Newton–Schulz run of k consecutive ranks, ``comm.split``), or mesh dims
    joined by "×" ("dp", "tp", "dp×tp"; HSDP's "replicate", "shard"); an owner group's hops
    ``<name>:group`` (the first ``size`` ranks of ``<name>``) and ``<name>:across`` (every ``len/size``-th
    of them)."""
    base, _, hop = group.partition(":")
    if base == "world":
        ranks = list(range(par.world))
    elif base == "stage":
        ranks = list(range(par.stage_ranks))
    elif base.startswith("split"):
        ranks = list(range(int(base[len("split"):])))
    else:
        dims = set(base.split("×"))
        if par.hsdp and "dp" in dims:  # all of data parallelism: both of HSDP's dims
            dims = dims - {"dp"} | {"replicate", "shard"}

        def coords(r: int) -> dict[str, int]:
            d, t = divmod(r, par.tp)
            if par.hsdp:
                return {"replicate": d // par.shard, "shard": d % par.shard, "tp": t}
            return {"dp": d, "tp": t}

        if not dims <= set(coords(0)):
            raise ValueError(f"unknown group {group!r}")
        ranks = [r for r in range(par.stage_ranks) if all(v == 0 for k, v in coords(r).items() if k not in dims)]
    if hop == "group":
        ranks = ranks[:size]
    elif hop == "across":
        ranks = ranks[:: len(ranks) // size]
    elif hop:
        raise ValueError(f"unknown group {group!r}")
    per: dict[int, int] = {}
    for r in ranks:
        per[r // par.gpus_per_node] = per.get(r // par.gpus_per_node, 0) + 1
    return Span(len(ranks), len(per), max(per.values()))


def link(s: Span, cluster: Cluster) -> tuple[float, float]:
    """(α, β) of a group: NVLink inside one node, else the network at k NICs per node."""
    if s.nodes == 1:
        return cluster.nvlink_latency_s, cluster.nvlink_bytes_per_s
    return cluster.ib_latency_s, min(cluster.nvlink_bytes_per_s, s.per_node * cluster.ib_bytes_per_s)


def all_reduce(nbytes: float, s: Span, cluster: Cluster) -> tuple[float, str]:
    """Seconds of one all-reduce of ``nbytes``, and the algorithm ("ring" or "tree")."""
    p = s.size
    if p == 1 or nbytes == 0:
        return 0.0, "-"
    a, b = link(s, cluster)
    ring = cluster.launch_latency_s + 2 * (p - 1) * a + 2 * (p - 1) / p * nbytes / b
    tree = cluster.launch_latency_s + 2 * math.ceil(math.log2(p)) * a + 2 * nbytes / b
    return (ring, "ring") if ring <= tree else (tree, "tree")


def ring_collective(nbytes: float, s: Span, cluster: Cluster) -> float:
    """Seconds of one ring reduce-scatter or all-gather of a full buffer of ``nbytes``."""
    p = s.size
    if p == 1 or nbytes == 0:
        return 0.0
    a, b = link(s, cluster)
    return cluster.launch_latency_s + (p - 1) * a + (p - 1) / p * nbytes / b


def call_time(c: Call, par: Parallel, cluster: Cluster) -> tuple[Tensor, str]:
    """(R,) seconds each rank spends in the calls ``c`` (all of them), and the algorithm."""
    s = span(c.group, par, c.size)
    calls = c.calls.to(torch.float64)
    out = torch.zeros(len(calls), dtype=torch.float64)
    algo = "ring"
    if c.kind == "all_to_all":
        a = cluster.ib_latency_s if s.nodes > 1 else cluster.nvlink_latency_s
        near = torch.maximum(c.a2a["send_near"], c.a2a["recv_near"]).to(torch.float64)
        far = torch.maximum(c.a2a["send_far"], c.a2a["recv_far"]).to(torch.float64)
        out = calls * cluster.launch_latency_s + c.a2a["peers"] * a + torch.maximum(
            near / cluster.nvlink_bytes_per_s, far / cluster.ib_bytes_per_s)
        return out * (calls > 0), "pairwise"
    for value in torch.unique(torch.stack([c.calls, c.bytes]), dim=1).T.tolist():
        n, total = value
        if n == 0:
            continue
        if c.kind == "all_reduce":
            t, algo = all_reduce(total / n, s, cluster)
        else:
            t = ring_collective(total / n, s, cluster)
        out[(c.calls == n) & (c.bytes == total)] = n * t
    return out, algo
