"""The one rule for how a parameter of any shape is seen as matrices, and its trivial layout.

A matrix algorithm sees a parameter as ``count`` matrices of ``m × n`` (``matrix_view``):

    (m, n)                        1 × (m × n)
    (E, m, n), not a conv kernel  E × (m × n)          stacked experts
    (out, in, *k), a conv kernel  1 × (out × in·Πk)    an ``nn.Conv*`` weight, or any tensor of ≥ 4 dims

and lays it out as one ``(count·m) × n`` parameter whose rows are the ``count`` fused matrices (or
the blocks ``mark_fused`` named). Checkpoints store every state tensor in the 2-D form of
``storage_shape`` (the format, fixed since the first release; see ``reg_dist.checkpoint``).
"""

import math

from torch import Tensor

from .rects import Layout, fused_rows

FUSED_ATTR = "reg_fused_rows"
LAYOUT_ATTR = "reg_layout"  # a Layout an integration (Megatron, DeepSpeed) attached to a plain local tensor


def matrix_view(shape: tuple[int, ...], conv: bool = False) -> tuple[int, int, int]:
    """``(count, m, n)``: how a matrix algorithm sees a parameter of ``shape`` (≥ 2 dims)."""
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 3 and not conv:
        return (shape[0], shape[1], shape[2])
    return (1, shape[0], math.prod(shape[1:]))


def storage_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D form a checkpoint stores every state tensor of a parameter of ``shape`` in:
    ``(n,) → (1, n)``, ``(m, n)`` as is, ``(E, m, n) → (E·m, n)``, ``(out, in, *k) → (out, in·Πk)``."""
    if len(shape) <= 1:
        return (1, math.prod(shape))
    if len(shape) == 3:
        return (shape[0] * shape[1], shape[2])
    return (shape[0], math.prod(shape[1:]))


def mark_fused(p: Tensor, sizes: tuple[int, ...], repeat: int = 1) -> Tensor:
    """Declare that the rows of the 2-D parameter ``p`` are ``repeat`` × the blocks ``sizes``, each a
    separate matrix (see ``rects.fused_rows``): a fused QKV ``(q, k, v)``, gate/up ``(f, f)``."""
    segments = fused_rows(tuple(sizes), repeat)
    if p.ndim != 2 or segments[-1][1] != p.shape[0]:
        raise ValueError(f"fused rows {tuple(sizes)} × {repeat} = {segments[-1][1]} rows do not match the "
                         f"parameter of shape {list(p.shape)}")
    setattr(p, FUSED_ATTR, segments)
    return p


def whole_layout(p: Tensor, view: tuple[int, int, int]) -> Layout:
    """The trivial layout: all of ``p`` on this process, no groups, seen as ``view`` = (count, m, n):
    ``(count·m) × n`` with a fused matrix per count, or the blocks ``mark_fused`` named."""
    count, m, n = view
    fused = fused_rows((m,) * count) if count > 1 else getattr(p, FUSED_ATTR, None)
    return Layout((count * m, n), (0, count * m), (0, n), fused=fused)
