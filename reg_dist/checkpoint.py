"""Optimizer checkpoints in ``torch.distributed.checkpoint`` (DCP) form, loadable into any layout.

Every state tensor of a parameter (momentum, AdamW's moments) is saved under
``"{name}/{key}"`` as the rank's pieces of the parameter's *logical* 2-D tensor:

    a 1-D tensor (n,) → (1, n);  (m, n) → (m, n);  an expert stack (E, m, n) → (E·m, n);
    a conv kernel (out, in, *k) → (out, in·Πk)

so whatever holds it (one process, FSDP2 row shards, TP blocks, the native mode's whole-matrix
owners and flat AdamW slices) writes rectangles of the same global tensor, and DCP reshards on
load: a checkpoint from (dp, tp) = (4, 1) loads at (2, 2), under FSDP2, or in one process.
Step counts are saved per parameter, the hyper-parameters and ``skipped_steps`` as objects.
Whole-matrix ownership is an in-memory arrangement, never the format.

A parameter with no state yet (saved before its first step, or one that never got a gradient) has
no tensors in the checkpoint, only its name in the hyper-parameters' ``param_names``; loading leaves
it without state. So a checkpoint always loads back into the optimizer that wrote it.

Loading reads into fresh tensors and swaps them in only when every key was found with its shape:
a checkpoint of another optimizer, with missing or extra parameters or other shapes raises a
``ValueError`` naming the difference and leaves the optimizer as it was.
"""

import io
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.utils import find_state_dict_object
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .layout import LAYOUT_ATTR, Layout, storage_shape
from .ops.stats import acc_dtype
from .optim.engine import MatrixOptimizer
from .optim.routing import ADAMW

MATRIX_KEYS = ("momentum_buffer",)
ADAMW_KEYS = ("exp_avg", "exp_avg_sq")
META = "reg_dist_meta"


def holding(p: Tensor, part: slice | None = None) -> Layout:
    """The elements of ``p``'s logical 2-D tensor this rank's copy of ``p`` holds (``part``: only
    that slice of its local flattening, as the native mode's flat AdamW shards)."""
    local = p.to_local() if isinstance(p, DTensor) else p
    shape = tuple(p.shape)
    m, n = storage_shape(shape)
    if not isinstance(p, DTensor):
        rows, cols = (0, m), (0, n)
    else:
        size, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if p.ndim <= 1:
            start = offset[0] if p.ndim else 0
            rows, cols = (0, 1), (start, start + math.prod(size))
        elif p.ndim == 2:
            rows, cols = (offset[0], offset[0] + size[0]), (offset[1], offset[1] + size[1])
        elif any(offset[1:]) or tuple(size[1:]) != shape[1:]:
            raise ValueError(f"a DTensor of shape {list(shape)} split along {p.placements} has no "
                             f"rectangular pieces in its logical {m}×{n} form")
        else:
            per = m // shape[0]  # logical rows per index of dim 0
            rows, cols = (offset[0] * per, (offset[0] + size[0]) * per), (0, n)
    flat = (part.start, part.stop) if part is not None else None
    if flat is None and local.numel() != (rows[1] - rows[0]) * (cols[1] - cols[0]):
        raise ValueError(f"local tensor of {local.numel()} elements is not the {rows}×{cols} block of {m}×{n}")
    return Layout((m, n), rows, cols, flat=flat)


class Pieces:
    """A rank's rectangles of a logical 2-D tensor (none where it holds nothing: every rank must
    name every key), in the protocol DCP uses for DTensor (``__create_write_items__``,
    ``__create_chunk_list__``, ``__get_tensor_shard__``): unlike a ShardedTensor it needs no global
    view, so building one is local and any holdings work."""

    def __init__(self, shape: tuple[int, int], x: Tensor | None = None, layout: Layout | None = None) -> None:
        self.global_size = torch.Size(shape)
        self.views = {} if x is None else {torch.Size([r.row, r.col]): v for v, r in layout.pieces(x.reshape(-1))}

    def __create_write_items__(self, fqn: str, obj: "Pieces") -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, view.size()),
                                                      properties=TensorProperties.create_from_tensor(view),
                                                      size=self.global_size))
                for offsets, view in self.views.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets, view.size()) for offsets, view in self.views.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        return self.views[index.offset]


STEP = Layout((1, 1), (0, 1), (0, 1))  # a step count: one element


def _lookup(state_dict: dict, index: MetadataIndex):
    obj = state_dict.get(index.fqn)
    return obj.__get_tensor_shard__(index) if isinstance(obj, Pieces) else find_state_dict_object(state_dict, index)


class SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        return _lookup(self.state_dict, index)


class LoadPlanner(DefaultLoadPlanner):
    meta: dict | None = None

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        pieces = {k: v for k, v in state_dict.items() if isinstance(v, Pieces)}
        super().set_up_planner(state_dict, metadata, is_coordinator)  # its meta-tensor pass drops Pieces
        state_dict.update(pieces)
        self.state_dict.update(pieces)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        return _lookup(self.state_dict, index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        if read_item.dest_index.fqn == META:  # saved as a BytesIO holding torch.save(meta)
            inner = torch.load(value, weights_only=False)
            inner.seek(0)
            self.meta = torch.load(inner, weights_only=False)
        else:
            super().load_bytes(read_item, value)


def _vectors(opt: MatrixOptimizer, group: dict, p: Tensor) -> dict[str, int]:
    return {} if group["algorithm"] == ADAMW else opt.vector_state(group, opt.layout(p))


def _keys(opt: MatrixOptimizer, group: dict, p: Tensor) -> tuple[str, ...]:
    return ADAMW_KEYS if group["algorithm"] == ADAMW else (*opt.state_keys, *_vectors(opt, group, p))


def _form(opt: MatrixOptimizer, group: dict, p: Tensor, key: str,
          part: slice | None) -> tuple[tuple[int, int], Layout]:
    """The stored 2-D shape of state ``key`` of ``p`` and the rectangle of it this rank holds: a
    parameter-shaped tensor as ``holding`` (an integration's piece as its ``reg_layout`` says); a
    vector (``vector_state``, kept whole by every rank holding a piece of the matrix) as a
    ``(length, 1)`` column."""
    vectors = _vectors(opt, group, p)
    if key in vectors:
        rows = vectors[key]
        return (rows, 1), Layout((rows, 1), (0, rows), (0, 1))
    laid = getattr(p, LAYOUT_ATTR, None)
    if laid is not None:  # an integration's piece of a parameter (a DeepSpeed flat partition's slice)
        return laid.shape, laid
    return storage_shape(tuple(p.shape)), holding(p, part)


def optimizer_state_dict(opt: MatrixOptimizer) -> dict:
    """This rank's part of ``opt``'s state in DCP form (see the module docstring)."""
    meta = io.BytesIO()
    torch.save({"optimizer": type(opt).__name__, "skipped_steps": opt.skipped_steps,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}, meta)
    sd: dict = {META: meta}
    for group in opt.param_groups:
        for p, name in zip(group["params"], group["param_names"]):
            state = opt.state.get(p)
            held, part = opt.holding(p)
            stepped = bool(state) and held
            sd[f"{name}/step"] = Pieces((1, 1), state["step"].float(), STEP) if stepped else Pieces((1, 1))
            for key in _keys(opt, group, p):
                shape, layout = _form(opt, group, p, key, part)
                value = state[key] if stepped else None
                local = value.to_local() if isinstance(value, DTensor) else value
                sd[f"{name}/{key}"] = Pieces(shape, local.contiguous(), layout) if stepped else Pieces(shape)
    return sd


def save(opt: MatrixOptimizer, path: str | Path) -> None:
    """Every rank writes its part of ``opt``'s state to the checkpoint directory ``path``."""
    dcp.save(optimizer_state_dict(opt), checkpoint_id=str(path), planner=SavePlanner())


def _read(target: dict, path: str | Path) -> dict:
    """``dcp.load`` of ``target`` (collective); the checkpoint's meta object."""
    planner = LoadPlanner()
    try:
        dcp.load(target, checkpoint_id=str(path), planner=planner)
    except CheckpointException as e:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt): {str(e).splitlines()[-1]}") from e
    return planner.meta or {}


def load(opt: MatrixOptimizer, path: str | Path) -> None:
    """Fill ``opt``'s state from the checkpoint at ``path``, whatever layout wrote it (parameters
    without state there are left without state here)."""
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise ValueError(f"no readable checkpoint at {path}: {e}") from e
    meta = _read({META: io.BytesIO()}, path) if META in saved else {}
    names = {name for g in opt.param_groups for name in g["param_names"]}
    stated = {key.rsplit("/", 1)[0] for key in saved if key != META and "/" in key}  # names with state there
    saved_names = stated | {name for g in meta.get("groups", []) for name in g.get("param_names", [])}
    if saved_names - names or names - saved_names:
        raise ValueError(f"checkpoint {path} has other parameters: missing here {sorted(saved_names - names)[:8]}, "
                         f"missing there {sorted(names - saved_names)[:8]}")
    fresh: dict[int, dict] = {}
    stateless: list[Tensor] = []
    target: dict = {}
    for group in opt.param_groups:
        for p, name in zip(group["params"], group["param_names"]):
            if name not in stated:
                stateless.append(p)
                continue
            held, part = opt.holding(p)
            for key in _keys(opt, group, p):
                shape, layout = _form(opt, group, p, key, part)
                if f"{name}/{key}" not in saved:
                    raise ValueError(f"checkpoint {path} has no {key!r} for parameter {name}: "
                                     f"saved by another optimizer or algorithm?")
                size = tuple(saved[f"{name}/{key}"].size)
                if size != shape:
                    raise ValueError(f"checkpoint {path}: {name}/{key} is {list(size)}, the parameter here "
                                     f"is {list(shape)} in its logical form")
            if not held:
                target[f"{name}/step"] = Pieces((1, 1))
                target.update({f"{name}/{key}": Pieces(_form(opt, group, p, key, part)[0])
                               for key in _keys(opt, group, p)})
                continue
            local = p.to_local() if isinstance(p, DTensor) else p
            state = {"step": torch.zeros((), dtype=torch.float32)}
            target[f"{name}/step"] = Pieces((1, 1), state["step"], STEP)
            for key in _keys(opt, group, p):
                shape, layout = _form(opt, group, p, key, part)
                vector = key in _vectors(opt, group, p)
                dtype = acc_dtype(local.dtype) if vector else local.dtype
                x = torch.zeros(layout.numel, dtype=dtype, device=local.device)
                target[f"{name}/{key}"] = Pieces(shape, x, layout)
                if vector or part is not None:
                    state[key] = x
                elif isinstance(p, DTensor):
                    state[key] = DTensor.from_local(x.view(local.shape), p.device_mesh, p.placements, run_check=False,
                                                    shape=p.shape, stride=p.stride())
                else:
                    state[key] = x.view(local.shape)
            fresh[id(p)] = state
    if target:
        _read(target, path)
    if meta.get("optimizer") != type(opt).__name__:
        raise ValueError(f"checkpoint {path} is of {meta.get('optimizer')}, not {type(opt).__name__}")
    if [g["param_names"] for g in meta["groups"]] != [g["param_names"] for g in opt.param_groups]:
        raise ValueError(f"checkpoint {path} groups its parameters otherwise than this optimizer")
    for group, saved_group in zip(opt.param_groups, meta["groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "param_names"})
        opt.fill_missing_hyper(group, set(saved_group))
    opt.skipped_steps = meta["skipped_steps"]
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in fresh:
                opt.state[p] = fresh[id(p)]
    for p in stateless:
        opt.state.pop(p, None)
