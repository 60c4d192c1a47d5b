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
``nn.Conv*`` weight, or any tensor of 4 or more dims) as 1 × (out × in·Πk), and a Hugging Face
``Conv1D`` weight, stored in × out, as its transpose out × in (``ParamInfo.transposed``).

Only a module shows embeddings, tied weights and conv kernels by type: ``parse_params`` warns when
a matrix is routed by name and shape alone. The last ``nn.Linear`` of a module, when routed to the
matrix algorithm, gets a hint in the table: an output head with an unlisted name looks like it.
"""

import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..layout import FUSED_ATTR, LAYOUT_ATTR
from ..layout import matrix_view as shape_view
from .hyper import user_stacklevel

logger = logging.getLogger("reg_dist")

ADAMW = "adamw"
HEAD_MODULES = frozenset({"lm_head", "output", "output_layer", "head", "classifier", "score"})
EMBED_COMPONENTS = frozenset({"wte", "wpe"})
LAST_LAYER_HINT = "last layer: if it is the output head, use algorithm='adamw'"


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
    """What a parameter's source says about it: every name it goes by and the module types owning it.

    ``transposed``: a weight stored in × out (Hugging Face ``Conv1D``) that a matrix algorithm sees
    as its transpose (``as_matrix``, ``as_param``); ``last_layer``: the weight of a module's last
    ``nn.Linear`` (or ``Conv1D``)."""

    names: tuple[str, ...]
    embedding: bool = False
    conv: bool = False
    transposed: bool = False
    last_layer: bool = False


def is_hf_conv1d(module: nn.Module) -> bool:
    """A ``transformers`` ``Conv1D`` (GPT-2 style, weight in × out), recognised without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def module_param_info(module: nn.Module, transposed: bool = False) -> list[tuple[Tensor, ParamInfo]]:
    """Trainable parameters of ``module`` (tied ones once), each with all its names and owner types.

    With ``transposed``, the weight of a ``Conv1D`` (plain or a DTensor, not an integration's flat
    piece: DeepSpeed steps those as stored) is marked transposed."""
    found: dict[int, tuple[Tensor, list[str], dict[str, bool]]] = {}
    last = None
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        conv1d = is_hf_conv1d(mod)
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            t, names, flags = found.setdefault(id(p), (p, [], dict(embedding=False, conv=False, transposed=False)))
            if full not in names:
                names.append(full)
            flags["embedding"] |= isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
            flags["conv"] |= isinstance(mod, nn.modules.conv._ConvNd)
            whole = p.ndim == 2 and not hasattr(p, LAYOUT_ATTR) and not hasattr(p, FUSED_ATTR)  # plain or DTensor
            flags["transposed"] |= transposed and conv1d and p_name == "weight" and whole
            if p_name == "weight" and (conv1d or isinstance(mod, nn.Linear)):
                last = id(p)
    return [(t, ParamInfo(tuple(names), **flags, last_layer=id(t) == last)) for t, names, flags in found.values()]


def parse_params(params: Any) -> tuple[list[dict], dict[int, ParamInfo]]:
    """``params`` (a module, tensors, ``(name, tensor)`` pairs, or dict groups of any of these) as
    torch-style groups (``"params"``: a list of tensors or pairs; the user's other keys kept) and the
    ``ParamInfo`` by ``id`` of every tensor that came with its module (``last_layer``: the last
    ``nn.Linear`` over all of them).

    Warns once when tensors of 2 or more dims came without their module and go to the matrix
    algorithm by name and shape alone (their group names no ``algorithm``, and none gives
    ``param_names``, as an integration that names its parameters does)."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs, dicts, or an nn.Module")
    infos: dict[int, ParamInfo] = {}

    def listed(ps: Any) -> list:
        if isinstance(ps, nn.Module):
            pairs = module_param_info(ps, transposed=True)
            infos.update((id(t), info) for t, info in pairs)
            return [(info.names[0], t) for t, info in pairs]
        return [ps] if isinstance(ps, Tensor) else list(ps)

    if isinstance(params, nn.Module):
        groups = [{"params": listed(params)}]
    else:
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        dicts = all(isinstance(g, dict) for g in items)
        groups = [{**g, "params": listed(g["params"])} for g in items] if dicts else [{"params": items}]
    for i in [i for i, info in infos.items() if info.last_layer][:-1]:  # one last layer over all modules
        infos[i] = replace(infos[i], last_layer=False)
    unseen, index = [], 0  # index: the name base.add_param_group gives a plain tensor (param<i>)
    for g in groups:
        for item in g["params"]:
            name, t = (item[0], item[1]) if isinstance(item, tuple) else (f"param{index}", item)
            index += 1
            if g.get("algorithm") is not None or "param_names" in g or not isinstance(t, Tensor) or id(t) in infos:
                continue
            if route(t, ParamInfo((name,)), None, "matrix").algorithm == "matrix":
                unseen.append(f"{name} {list(t.shape)}")
    if unseen:
        shown = ", ".join(unseen[:20]) + (f" and {len(unseen) - 20} more" if len(unseen) > 20 else "")
        warnings.warn(
            f"{len(unseen)} parameter(s) of 2 or more dims came without their module and go to the matrix "
            f"algorithm by name and shape alone: {shown}. An embedding, a weight tied to one, a conv kernel or "
            f"an output head among them is not recognised this way. Pass the module itself (e.g. REG(model), "
            f'or {{"params": model, ...}} groups), or put embeddings and the head in an algorithm="adamw" group.',
            UserWarning, stacklevel=user_stacklevel())
    return groups, infos


def _is_embedding_name(name: str) -> bool:
    return any("embed" in part or part in EMBED_COMPONENTS for part in name.split("."))


def _is_head_name(name: str) -> bool:
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return owner.rsplit(".", 1)[-1] in HEAD_MODULES


def matrix_view(p: Tensor, info: ParamInfo) -> tuple[int, int, int]:
    """``(count, m, n)``: how a matrix algorithm sees ``p`` (``layout.matrix_view``; a transposed weight
    as its transpose)."""
    shape = tuple(p.shape)
    return shape_view(shape[::-1] if info.transposed else shape, info.conv)


def as_matrix(t: Tensor, info: ParamInfo | None) -> Tensor:
    """``t`` (a parameter, its gradient or momentum) as the ``(count, m, n)`` matrices a matrix
    algorithm sees, a view: a transposed weight transposed, a conv kernel as out × in·Πk."""
    if info is not None and info.transposed:
        return t.mT.unsqueeze(0)
    return t.view(matrix_view(t, info or ParamInfo(("",))))


def as_param(x: Tensor, p: Tensor, info: ParamInfo | None) -> Tensor:
    """The inverse of ``as_matrix``: ``p``'s ``(count, m, n)`` matrices ``x`` as a view of ``p``'s shape."""
    if info is not None and info.transposed:
        return x.view(x.shape[-2:]).mT
    return x.view(p.shape)


def route(p: Tensor, info: ParamInfo, requested: str | None, matrix_algorithm: str) -> Route:
    """The route of ``p``: ``requested`` is the algorithm its group names (None: the default rule)."""
    name = " = ".join(info.names)
    layout = getattr(p, LAYOUT_ATTR, None)  # an integration's: a piece of a logical m × n
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
        return Route(name, shape, requested, "group says " + requested + _notes(info, False), view)
    if len(shape) < 2:
        return Route(name, shape, ADAMW, f"{p.ndim}-D")
    if info.embedding or any(_is_embedding_name(n) for n in info.names):
        tied = len(info.names) > 1
        return Route(name, shape, ADAMW, "embedding (tied)" if tied else "embedding")
    if any(_is_head_name(n) for n in info.names):
        return Route(name, shape, ADAMW, "output head")
    view = (1, *shape) if layout is not None else matrix_view(p, info)
    reason = "conv kernel" if p.ndim > 3 or info.conv else ("expert stack" if p.ndim == 3 else "matrix")
    return Route(name, shape, matrix_algorithm, reason + _notes(info, True), view)


def _notes(info: ParamInfo, hint: bool) -> str:
    notes = [note for note, on in (("Conv1D, transposed", info.transposed), (LAST_LAYER_HINT, hint and info.last_layer))
             if on]
    return f" ({'; '.join(notes)})" if notes else ""


def format_table(routes: list[Route]) -> str:
    head = f"{'parameter':<40} {'shape':<18} {'algorithm':<9} {'matrices':<18} why"
    lines = [head, "-" * len(head)] + [r.row() for r in routes]
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.algorithm] = counts.get(r.algorithm, 0) + math.prod(r.shape)
    lines.append("elements: " + ", ".join(f"{a} {n:,}" for a, n in sorted(counts.items())))
    return "\n".join(lines)
