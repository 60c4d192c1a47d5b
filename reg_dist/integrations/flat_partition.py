"""Flat partitions as pieces of logical matrices: what DeepSpeed ZeRO 1-3 and Megatron's distributed
optimizer share.

Both frameworks hand the optimizer one flat fp32 buffer per rank (or per group) holding a contiguous
range of each parameter's row-major elements, cut anywhere (mid-row, or empty). A *piece* is the 1-D
view of that buffer holding parameter p's elements ``[first, end)``; its layout is p's logical layout
(a tensor-parallel shard, fused QKV or expert blocks, or the whole matrix) cut to that flat range,
over the process group whose ranks hold the rest (``piece_layout``). reg_dist's optimizer is built
once over the pieces (every rank passes every parameter, empty pieces included, in one order, so the
collectives pair up) and stepped on the gradients the framework reduced into its buffer
(``step_pieces``). Each framework module keeps only what reads its own bookkeeping.
"""

import math

import torch.distributed as dist
from torch import Tensor

from ..layout import LAYOUT_ATTR, Layout
from ..optim.engine import MatrixOptimizer


def element_layout(shape: tuple[int, ...]) -> Layout:
    """The layout of a parameter AdamW steps: ``shape[0] × the rest`` (``1 × n`` below 2 dims). AdamW is
    element-wise, so any 2-D form does; one is given so that every rank routes the same shapes."""
    m, n = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return Layout((m, n), (0, m), (0, n))


def piece_layout(base: Layout, flat: tuple[int, int], groups: tuple[tuple[str, dist.ProcessGroup], ...]) -> Layout:
    """``base`` (a parameter's local block of its logical matrix) cut to the elements ``flat`` of the
    block's row-major order, split over ``groups``."""
    return Layout(base.shape, base.rows, base.cols, flat=flat, groups=groups, fused=base.fused)


def laid(piece: Tensor, layout: Layout) -> Tensor:
    """``piece`` carrying ``layout`` (read by the engine as an integration's layout)."""
    setattr(piece, LAYOUT_ATTR, layout)
    return piece


def step_pieces(inner: MatrixOptimizer, grads: list[tuple[Tensor, Tensor | None]],
                groups: list[dict] | None = None) -> None:
    """One step of ``inner`` on the pieces' gradients ``(piece, its slice of the framework's reduced
    gradient)``: only ``groups`` of its param groups where given (the others are stepped by later
    calls); the pieces' ``.grad`` is cleared afterwards."""
    every = inner.param_groups
    for piece, grad in grads:
        piece.grad = grad
    if groups is not None:
        inner.param_groups = groups
    try:
        inner.step()
    finally:
        inner.param_groups = every
        for piece, _ in grads:
            piece.grad = None
