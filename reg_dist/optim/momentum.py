"""Momentum in sum form, with the Nesterov look-ahead.

    M ← μ·M + G
    N ← G + μ·M   (nesterov)   |   N ← M
"""

import torch
from torch import Tensor

from ..ops import fused


def momentum_into_(grads: list[Tensor], bufs: list[Tensor], outs: list[Tensor], mu: float, nesterov: bool,
                   commit: bool = True) -> None:
    """Write every buffer's N into the matching ``outs`` tensor (same shape), updating the buffer in
    place with ``commit`` (else leaving it for ``commit_momentum_``, once the step is known to go ahead)."""
    for g, buf, out in zip(grads, bufs, outs):
        if fused.momentum_into_(g, buf, out, mu, nesterov, commit=commit):
            continue
        m = torch.add(g, buf, alpha=mu, out=buf if commit else None)
        if nesterov:
            torch.add(g, m, alpha=mu, out=out)
        else:
            out.copy_(m)


def commit_momentum_(grads: list[Tensor], bufs: list[Tensor], mu: float) -> None:
    """``M ← G + μ·M`` in place: the buffers ``momentum_into_`` left as they were (the same rounding)."""
    for g, buf in zip(grads, bufs):
        torch.add(g, buf, alpha=mu, out=buf)
