"""The owner moves in two hops (``reg_dist.comm.hops.TwoHop``), predicted: what each hop of an exchange
over P = (P/g) × g ranks moves, rank by rank, from its flows (source, destination, elements)."""

import torch
from torch import Tensor

INT = torch.int64


class Hop:
    """What one hop of an ``exchange`` moves, summed over its flows (plan ranks); ``peer(r)``: rank
    r's index in the hop's group (its inner group's index for a hop across, its own within a group)."""

    def __init__(self, p: int, node: Tensor, peers: int, peer) -> None:
        self.node, self.peer = node, peer
        z = lambda: torch.zeros(p, dtype=INT)  # noqa: E731
        self.buf, self.sent, self.recv, self.send_far, self.recv_far = z(), z(), z(), z(), z()
        self.talks = torch.zeros(2, p, peers, dtype=torch.bool)  # [sends to, receives from] × rank × peer index

    def add(self, src: Tensor, dst: Tensor, elements: Tensor) -> None:
        self.buf.index_add_(0, src, elements)
        i = ((elements > 0) & (src != dst)).nonzero().squeeze(1)
        src, dst, el = src[i], dst[i], elements[i]
        far = (self.node[src] != self.node[dst]).to(INT)
        self.sent.index_add_(0, src, el)
        self.recv.index_add_(0, dst, el)
        self.send_far.index_add_(0, src, el * far)
        self.recv_far.index_add_(0, dst, el * far)
        _, p, peers = self.talks.shape
        flat = self.talks.view(-1)
        flat.index_fill_(0, src * peers + self.peer(dst), True)
        flat.index_fill_(0, p * peers + dst * peers + self.peer(src), True)

    def peers(self) -> Tensor:
        """(p,) the larger of the ranks each rank sends to and receives from."""
        return self.talks.sum(2).max(0).values


def first_of_each(piece: Tensor, held: Tensor, dim: int) -> Tensor:
    """Along ``dim`` of the (groups, g) grids ``piece``/``held``: the elements of the distinct pieces."""
    order = piece.sort(dim=dim, stable=True)
    first = torch.ones_like(piece, dtype=torch.bool)
    if dim == 0:
        first[1:] = order.values[1:] != order.values[:-1]
    else:
        first[:, 1:] = order.values[:, 1:] != order.values[:, :-1]
    return (held.gather(dim, order.indices) * first).sum(dim)


def route(hops: list[Hop], owner: int, g: int, sent: Tensor, held: Tensor, piece: Tensor) -> None:
    """Add one matrix (or block) owned by plan rank ``owner`` to the four ``hops`` of its round (there: outer
    then inner; back: inner then outer, as ``TwoHop`` routes them): ``sent`` (p,) the elements each rank
    sends it, ``held`` (p,) the elements each rank gets back, ``piece`` (p,) the id of each rank's piece
    (equal ids: identical copies, which cross the owner's group once on the way back; −1: none)."""
    p = len(sent)
    idx = torch.arange(p, dtype=INT)
    groups, s = p // g, idx % g
    o = torch.full((g,), owner, dtype=INT)
    mids = (owner // g) * g + torch.arange(g, dtype=INT)
    hops[0].add(idx, (owner // g) * g + s, sent)
    hops[1].add(mids, o, sent.view(groups, g).sum(0))
    hops[2].add(o, mids, first_of_each(piece.view(groups, g), held.view(groups, g), 0))
    hops[3].add((owner // g) * g + s, idx, held)


def exchange(p: int, node: Tensor, g: int) -> list[Hop]:
    """The four hops of one round of moves over ``p`` plan ranks in groups of ``g`` (``node``: (p,) each
    rank's node): there across, then within the owner's group; back within it, then across."""
    outer, inner = (p // g, lambda r: r // g), (g, lambda r: r % g)  # a hop's peers, and each rank's index there
    return [Hop(p, node, *axis) for axis in (outer, inner, inner, outer)]


def hop_calls(name: str, p: int, g: int, hops: list[Hop], k: int = 0) -> list[tuple[str, int, int, str, Hop]]:
    """(group name, size, round ``k``, "there" | "back", hop) of ``exchange``'s hops, named as
    ``comm.hops.axis_groups`` counts them."""
    names = (f"{name}:across", f"{name}:group") if 1 < g < p else (name, name)
    sizes = (p // g, g)
    return [(names[a], sizes[a], k, phase, hop)
            for a, phase, hop in zip((0, 1, 1, 0), ("there", "there", "back", "back"), hops)]
