"""Which algorithm updates which parameter, and how a matrix algorithm views it.

Default rule for a parameter whose group names no ``algorithm``:
  * fewer than 2 dims (biases, norms, scalars)            → adamw
  * an embedding (an ``nn.Embedding`` weight, or a name
    with an ``embed``/``wte``/``wpe`` component), or a
    tensor tied to one                                    → adamw
  * an output head (owning module named ``lm_head``,
    ``output``, ``output_layer``, ``head``, ``classifier``,
    ``score``)                                            → adamw
  * anything else                                         → the optimizer's matrix algorithm

A matrix parameter is viewed as ``count`` matrices of ``m × n``: a 2-D weight as 1 × (m × n), a
stacked expert tensor ``(E, m, n)`` as E × (m × n), a conv kernel ``(out, in, *k)`` (an
``nn.Conv*`` weight, or any tensor of 4 or more dims) as 1 × (out × in·Πk).
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger("reg_dist")

ADAMW = "adamw"
HEAD_MODULES = frozenset({"lm_head", "output", "output_layer", "head", "classifier", "score"})
EMBED_COMPONENTS = frozenset({"wte", "wpe"})


@dataclass(frozen=True)
class Route:
    """One row of the routing table."""

    name: str
    shape: tuple[int, ...]
    algorithm: str
    reason: str
    matrix: tuple[int, int, int] | None = None  # (count, m, n) for a matrix algorithm

    def row(self) -> str:
        view = "-" if self.matrix is None else "{}×({}×{})".format(*self.matrix)
        return f"{self.name:<40} {str(list(self.shape)):<18} {self.algorithm:<9} {view:<18} {self.reason}"


@dataclass(frozen=True)
class ParamInfo:
    """What a parameter's source says about it: every name it goes by and the module types owning it."""

    names: tuple[str, ...]
    embedding: bool = False
    conv: bool = False


def module_param_info(module: nn.Module) -> list[tuple[Tensor, ParamInfo]]:
    """Trainable parameters of ``module`` (tied ones once), each with all its names and owner types."""
    infos: dict[int, tuple[Tensor, list[str], bool, bool]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            t, names, emb, conv = infos.get(id(p), (p, [], False, False))
            if full not in names:
                names.append(full)
            emb = emb or isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
            conv = conv or isinstance(mod, nn.modules.conv._ConvNd)
            infos[id(p)] = (t, names, emb, conv)
    return [(t, ParamInfo(tuple(n), e, c)) for t, n, e, c in infos.values()]


def _is_embedding_name(name: str) -> bool:
    return any("embed" in part or part in EMBED_COMPONENTS for part in name.split("."))


def _is_head_name(name: str) -> bool:
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return owner.rsplit(".", 1)[-1] in HEAD_MODULES


def matrix_view(p: Tensor, info: ParamInfo) -> tuple[int, int, int]:
    """``(count, m, n)``: how a matrix algorithm sees ``p``."""
    if p.ndim == 2:
        return (1, p.shape[0], p.shape[1])
    if p.ndim == 3 and not info.conv:
        return (p.shape[0], p.shape[1], p.shape[2])
    return (1, p.shape[0], math.prod(p.shape[1:]))


def route(p: Tensor, info: ParamInfo, requested: str | None, matrix_algorithm: str) -> Route:
    """The route of ``p``: ``requested`` is the algorithm its group names (None: the default rule)."""
    name = " = ".join(info.names)
    layout = getattr(p, "reg_layout", None)  # reg_dist.distributed.dtensor.LAYOUT_ATTR: a piece of a logical m × n
    shape = tuple(layout.shape) if layout is not None else tuple(p.shape)  # matrix, whatever its local shape
    if requested == ADAMW:
        return Route(name, shape, ADAMW, "group says adamw")
    if requested is not None:
        if len(shape) < 2:
            raise ValueError(
                f"parameter {name} of shape {list(shape)} is in a group with algorithm={requested!r}, "
                f"which needs a matrix (2 or more dims); put it in an algorithm='adamw' group"
            )
        view = (1, *shape) if layout is not None else matrix_view(p, info)
        return Route(name, shape, requested, "group says " + requested, view)
    if len(shape) < 2:
        return Route(name, shape, ADAMW, f"{p.ndim}-D")
    if info.embedding or any(_is_embedding_name(n) for n in info.names):
        tied = len(info.names) > 1
        return Route(name, shape, ADAMW, "embedding (tied)" if tied else "embedding")
    if any(_is_head_name(n) for n in info.names):
        return Route(name, shape, ADAMW, "output head")
    view = (1, *shape) if layout is not None else matrix_view(p, info)
    reason = "conv kernel" if p.ndim > 3 or info.conv else ("expert stack" if p.ndim == 3 else "matrix")
    return Route(name, shape, matrix_algorithm, reason, view)


def format_table(routes: list[Route]) -> str:
    head = f"{'parameter':<40} {'shape':<18} {'algorithm':<9} {'matrices':<18} why"
    lines = [head, "-" * len(head)] + [r.row() for r in routes]
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.algorithm] = counts.get(r.algorithm, 0) + math.prod(r.shape)
    lines.append("elements: " + ", ".join(f"{a} {n:,}" for a, n in sorted(counts.items())))
    return "\n".join(lines)
