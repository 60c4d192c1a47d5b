"""Momentum in sum form, with the Nesterov look-ahead.

    M ← μ·M + G
    N ← G + μ·M   (nesterov)   |   N ← M
"""

import torch
from torch import Tensor

from ..ops import fused


def momentum_into_(grads: list[Tensor], bufs: list[Tensor], outs: list[Tensor], mu: float, nesterov: bool) -> None:
    """Update every buffer in place and write its N into the matching ``outs`` tensor (same shape)."""
    for g, buf, out in zip(grads, bufs, outs):
        if fused.momentum_into_(g, buf, out, mu, nesterov):
            continue
        torch.add(g, buf, alpha=mu, out=buf)
        if nesterov:
            torch.add(g, buf, alpha=mu, out=out)
        else:
            out.copy_(buf)
