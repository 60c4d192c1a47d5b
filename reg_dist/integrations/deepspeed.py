"""DeepSpeed: REG, MuonEq and reg_dist's Muon named in the JSON config, under ZeRO stages 0 to 3.

    "optimizer": {"type": "REG", "params": {"lr": 1e-3, "weight_decay": 0.1}}

(also ``"MuonEq"``, and ``"reg_dist.Muon"``, so that DeepSpeed's own ``"Muon"`` stays reachable;
types are read case-insensitively, as DeepSpeed reads its own) then ``reg_dist.deepspeed.initialize``
in place of ``deepspeed.initialize``: the same arguments and return value; or ``register()`` once, and
``deepspeed.initialize`` itself does it for every caller (the Hugging Face Trainer, Accelerate). Any
other optimizer type, or none, goes to DeepSpeed's own ``deepspeed.initialize`` untouched. ``params``
are the optimizer's keyword arguments (dtypes by name: ``"ns_dtype": "float32"``); an unknown key is an
error that lists the valid ones. A reg_dist optimizer given as ``optimizer=`` (what
``accelerator.prepare`` passes) is built the same way from its own param groups and constructor
arguments (``client_optimizer``).

How it is wired. DeepSpeed gets a client optimizer, ``RegDistAdapter``, whose param groups are the
user's: DeepSpeed flattens and partitions them as for any optimizer, and keeps calling its ``step`` /
``state_dict`` / ``load_state_dict``, clipping gradients and scheduling ``lr`` on its groups. Once
the engine is built the adapter reads DeepSpeed's own bookkeeping and builds reg_dist's optimizer
(``inner``) over per-parameter views of this rank's flat fp32 partitions:

    ZeRO 0   DeepSpeed all-reduces whole gradients: ``inner`` steps the parameters themselves.
    ZeRO 1/2 param group i's partition P_i (``single_partition_of_fp32_groups[i]``) holds elements
             [r·S, (r+1)·S) of the group's flat buffer (S = ``partition_size[i]``, r the rank in
             ``real_dp_process_group[i]``), in which parameter p starts at its
             ``round_robin_bit16_offsets[i]`` entry (alignment padding included): p's view is the
             overlap, a slice of P_i that may cut rows anywhere or be empty.
    ZeRO 3   every parameter is split on its own: rank r holds elements [r·P, min((r+1)·P, numel))
             of p (P = ``p.partition_numel()``), stored one after another in sub-group s's partition
             (``fp32_partitioned_groups_flat[s]``); p is a placeholder, its shape is ``ds_shape``.

Each view carries ``reg_layout = Layout(p's logical m × n, flat=(first, end) element of p, groups=
(("dp", the partition's process group),))`` (an expert stack or a ``mark_fused`` weight as its fused
matrices): REG reduces its row/column statistics over the dp group on the pieces themselves (no
gather); Muon and MuonEq move them to one owner per matrix and back. Every rank passes every
parameter (empty where it holds none of it) in DeepSpeed's order, so the collectives pair up.
Embeddings, the output head and parameters of fewer than 2 dims go to AdamW (reg_dist's routing,
read from the model), or wherever a param group's ``"algorithm"`` says.

DeepSpeed steps one partition at a time (``_optimizer_step``) with its gradient on ``P.grad``,
already reduced, averaged over the dp ranks and the accumulated micro-batches, and clipped: the
adapter points each view's ``.grad`` at its slice and steps that partition's matrices and AdamW
parameters once. So gradient accumulation and ``gradient_clipping`` (on the raw gradients, before
the transform) are DeepSpeed's, and the transform runs once per optimizer step. (DeepSpeed 0.19.8
clips at 1.0 unless ``"gradient_clipping"`` says otherwise.)

Precision: fp32 at every stage; bf16 at stages 1 (bf16 gradient accumulation), 2 and 3, and fp16
at stages 1, 2 and 3, with fp32 master partitions. Under fp16 DeepSpeed's loss scaler checks the
scaled gradients for overflow and skips the step before ours is called (``engine.skipped_steps``
counts them; reg_dist's state is untouched), else divides the partition's gradient by the scale
(a power of 2: exact) before the step. ``"offload_optimizer": {"device": "cpu"}``: the fp32
partitions and their ``.grad`` are DeepSpeed's CPU tensors, stepped as above
(``zero_force_ds_cpu_optimizer`` set false), also with ZeRO-3 CPU ``offload_param``. Not yet: fp16
or bf16 at stage 0, bf16 with fp32 gradient accumulation at stage 1 (DeepSpeed's BF16_Optimizer),
NVMe or partial optimizer offload, MoE groups, DeepSpeed's elastic and universal checkpoints.
``engine.save_checkpoint`` / ``load_checkpoint`` save and restore reg_dist's state at the same stage
and world size; ``deepspeed_checkpoint`` resumes at another. Every stage views a parameter by the
one rule of ``layout.shape``, with the model's module types (a conv kernel ``out × in·k``, an expert
stack as its experts).
"""

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
from torch import Tensor
from torch.optim import Optimizer

from ..layout import Layout, whole_layout
from ..optim import registry
from ..optim.engine import MatrixOptimizer
from ..optim.routing import ADAMW, ParamInfo, module_param_info, route
from .flat_partition import element_layout, laid, piece_layout, step_pieces

logger = logging.getLogger("reg_dist")

_DEEPSPEED_INITIALIZE = deepspeed.initialize  # DeepSpeed's own: register() replaces the attribute, never this
OPTIMIZERS = registry.DEEPSPEED_TYPES  # JSON type (lower-cased) → the registry's entry
CONSTRUCTOR_ONLY = ("nonfinite", "move_dtype")  # optimizer arguments that are not per-group hyper-parameters
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def reg_dist_type(config: dict | None) -> str | None:
    """The lower-cased optimizer type of a DeepSpeed config if it is one of reg_dist's, else None."""
    block = (config or {}).get("optimizer")
    kind = block.get("type") if isinstance(block, dict) else None
    return kind.lower() if isinstance(kind, str) and kind.lower() in OPTIMIZERS else None


def valid_params(kind: str) -> tuple[str, ...]:
    """The keys a config's ``"params"`` may hold for optimizer type ``kind``."""
    name = OPTIMIZERS[kind].name
    return (*registry.schema(name), *(("move_dtype",) if registry.is_spectral(name) else ()))


def _dtype(key: str, value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = value.removeprefix("torch.").lower() if isinstance(value, str) else None
    if name not in DTYPES:
        raise ValueError(f"optimizer param {key!r} must name a floating dtype ({', '.join(DTYPES)}), got {value!r}")
    return DTYPES[name]


def parse_params(kind: str, params: dict | None) -> dict:
    """The config's ``"params"`` as keyword arguments of the reg_dist optimizer (dtype names resolved)."""
    params = dict(params or {})
    valid = valid_params(kind)
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        raise ValueError(f"unknown optimizer param(s) {unknown} for type {kind!r}; valid: {', '.join(valid)}")
    for key in ("ns_dtype", "move_dtype"):
        if key in params:
            params[key] = _dtype(key, params[key])
    if isinstance(params.get("adamw_betas"), list):
        params["adamw_betas"] = tuple(params["adamw_betas"])
    return params


def group_defaults(kind: str) -> dict:
    """The per-group hyper-parameters of ``kind`` with their defaults."""
    return {n: h.default for n, h in registry.schema(OPTIMIZERS[kind].name).items() if n not in CONSTRUCTOR_ONLY}


@dataclass
class _Unit:
    """What DeepSpeed steps at once: one flat fp32 partition (ZeRO 1/2: a param group's, ZeRO 3: a
    sub-group's) or, at ZeRO 0, one param group of whole parameters."""

    group: int  # index of its DeepSpeed param group
    partition: Tensor | None  # the flat fp32 partition (None at ZeRO 0)
    pieces: list[tuple[Tensor, int]] = field(default_factory=list)  # (view, its start in the partition)
    inner: list[dict] = field(default_factory=list)  # its groups in ``inner`` (matrices, adamw)


class _Piece(NamedTuple):
    param: Tensor  # the model's parameter (a placeholder under ZeRO 3)
    shape: tuple[int, ...]  # its real shape
    view: Tensor | None  # this rank's elements of it, a 1-D view of the partition (None at ZeRO 0)
    at: int  # where the view starts in the partition
    flat: tuple[int, int]  # which elements of the parameter's row-major flattening it holds
    group: Any  # the process group whose ranks hold the rest of it


def _zero12_pieces(zero: Any, i: int) -> list[_Piece]:
    """ZeRO 1/2: param group ``i``'s parameters in DeepSpeed's order, each with the view of this
    rank's flat fp32 partition it overlaps (elements [r·S, (r+1)·S) of the group's flat buffer, where
    p starts at its ``round_robin_bit16_offsets`` entry), possibly empty."""
    part = zero.single_partition_of_fp32_groups[i]
    size, group = int(zero.partition_size[i]), zero.real_dp_process_group[i]
    start = dist.get_rank(group=group) * size
    end = start + size
    if part.numel() != size:
        raise RuntimeError(f"DeepSpeed partition {i} holds {part.numel()} elements, not its partition size {size}")
    offsets = {id(p): o for p, o in zip(zero.round_robin_bit16_groups[i], zero.round_robin_bit16_offsets[i])}
    base, pieces = part.detach(), []
    for p in zero.bit16_groups[i]:
        o, k = offsets[id(p)], p.numel()
        a, b = max(o, start), min(o + k, end)
        if a >= b:  # none of p here: an empty piece at its start (or end)
            first = 0 if o >= end else k
            pieces.append(_Piece(p, tuple(p.shape), base.narrow(0, 0, 0), 0, (first, first), group))
        else:
            pieces.append(_Piece(p, tuple(p.shape), base.narrow(0, a - start, b - a), a - start, (a - o, b - o), group))
    return pieces


def _zero3_pieces(zero: Any, s: int) -> list[_Piece]:
    """ZeRO 3: sub-group ``s``'s parameters (placeholders; real shape ``ds_shape``), each partitioned
    on its own: rank r holds elements [r·P, min((r+1)·P, numel)) of p (P = ``partition_numel()``),
    stored at p's offset (the sum of the earlier partitions, padding included) in the sub-group's
    flat fp32 partition."""
    part = zero.fp32_partitioned_groups_flat[s]
    group = zero.sub_group_process_groups[s]
    rank = dist.get_rank(group=group)
    base, pieces, offset = part.detach(), [], 0
    for p in zero.fp16_groups[s]:
        size, numel = int(p.partition_numel()), int(p.ds_numel)
        first = min(rank * size, numel)
        last = min(first + size, numel)
        pieces.append(_Piece(p, tuple(p.ds_shape), base.narrow(0, offset, last - first), offset, (first, last), group))
        offset += size
    if offset != part.numel():
        raise RuntimeError(f"DeepSpeed ZeRO-3 sub-group {s}: its parameters' partitions add up to {offset} "
                           f"elements, not {part.numel()}")
    return pieces


def _flat_layout(piece: _Piece, view: tuple[int, int, int] | None) -> Layout:
    """The flat Layout of ``piece`` in its parameter's logical m × n matrix (fused blocks for an
    expert stack or a ``mark_fused`` weight), over its dp group."""
    whole = whole_layout(piece.param, view) if view is not None else element_layout(piece.shape)
    return piece_layout(whole, piece.flat, (("dp", piece.group),))


class RegDistAdapter(Optimizer):
    """The client optimizer DeepSpeed wraps: its param groups are what DeepSpeed partitions; each step
    forwards to ``inner`` (reg_dist's REG, Muon or MuonEq) over per-parameter views of this rank's
    partitions (see the module docstring). ``bind(engine)`` builds ``inner`` (collective)."""

    def __init__(self, params: Any, kind: str, kwargs: dict, reroute: dict[int, ParamInfo] | None = None) -> None:
        self.kind = kind
        self._reroute = reroute or {}  # id(parameter) → its ParamInfo: routed here by the default rule (see bind)
        self.cls = OPTIMIZERS[kind].cls
        hyper = group_defaults(kind)
        self._hyper = tuple(hyper)
        self._ctor = {k: v for k, v in kwargs.items() if k in CONSTRUCTOR_ONLY}
        super().__init__(params, {**hyper, **{k: v for k, v in kwargs.items() if k not in CONSTRUCTOR_ONLY}})
        self.inner: MatrixOptimizer | None = None
        self.stage: int | None = None
        self._groups: list[dict] = []  # DeepSpeed's param groups, in order
        self._units: list[_Unit] = []
        self._unit_of: dict[int, int] = {}  # id(flat partition) → its unit

    @property
    def transformed(self) -> int:
        """Matrices transformed on this rank over all steps: for Muon and MuonEq at ZeRO 1-3, the ones it
        owns (summed over ranks: the matrices per step); for REG, and at ZeRO 0, every matrix on every
        rank (each rank scales its own elements of all of them)."""
        return self.inner.transformed if self.inner is not None else 0

    # ---- wiring ---------------------------------------------------------------------------
    def bind(self, engine: Any) -> None:
        """Build ``inner`` over this rank's share of every parameter, from DeepSpeed's bookkeeping."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if self.inner is not None:
            raise RuntimeError("RegDistAdapter.bind: already bound")
        stage, wrapper = engine.zero_optimization_stage(), engine.optimizer
        if getattr(engine, "has_moe_layers", False):
            raise NotImplementedError("reg_dist.deepspeed: MoE layers (expert data-parallel groups) are not "
                                      "supported yet")
        self._groups = list(self.param_groups)
        if stage == 0 and wrapper is self:
            units = [(k, None, [_Piece(p, tuple(p.shape), None, 0, (0, p.numel()), None) for p in g["params"]])
                     for k, g in enumerate(self._groups)]
        elif stage in (1, 2) and type(wrapper) is DeepSpeedZeroOptimizer:
            units = [(i, wrapper.single_partition_of_fp32_groups[i], _zero12_pieces(wrapper, i))
                     for i in range(len(wrapper.bit16_groups))]
        elif stage == 3 and type(wrapper) is DeepSpeedZeroOptimizer_Stage3:
            if wrapper.swap_optimizer or wrapper.params_in_nvme_and_cpu:
                raise NotImplementedError("reg_dist.deepspeed: ZeRO-3 NVMe offload is not supported yet; use "
                                          "\"device\": \"cpu\"")
            units = [(wrapper.sub_group_to_group_id[s], wrapper.fp32_partitioned_groups_flat[s],
                      _zero3_pieces(wrapper, s)) for s in range(len(wrapper.fp16_groups))]
        else:
            raise NotImplementedError(
                f"reg_dist.deepspeed supports ZeRO stage 0 (fp32) and stages 1, 2, 3 (DeepSpeedZeroOptimizer, "
                f"DeepSpeedZeroOptimizer_Stage3); this engine runs stage {stage} with {type(wrapper).__name__}")
        self.stage = stage
        infos = {id(t): info for t, info in module_param_info(engine.module)}
        names = {id(p): n for p, n in engine.param_names.items()}
        inner_groups: list[dict] = []
        for k, (g, partition, pieces) in enumerate(units):
            group = self._groups[g]
            requested = group.get("algorithm")
            if requested not in (None, self.cls.algorithm, ADAMW):
                raise ValueError(f"a parameter group asks for algorithm={requested!r}; {self.cls.__name__} takes "
                                 f"{self.cls.algorithm!r} or {ADAMW!r}")
            unit = _Unit(g, partition)
            subs: dict[str, tuple[list, list, list]] = {self.cls.algorithm: ([], [], []), ADAMW: ([], [], [])}
            for j, piece in enumerate(pieces):
                info = infos.get(id(piece.param), ParamInfo((names.get(id(piece.param), f"group{g}.param{j}"),)))
                asked = requested
                if id(piece.param) in self._reroute:  # a client optimizer's parameter its routing never saw whole
                    info, asked = self._reroute[id(piece.param)], None
                real = piece.param if piece.view is None else torch.empty(piece.shape, device="meta")
                r = route(real, info, asked, self.cls.algorithm)
                target = piece.param
                if piece.view is not None:
                    target = laid(piece.view, _flat_layout(piece, r.matrix))
                    unit.pieces.append((target, piece.at))
                ts, ns, infos_ = subs[r.algorithm]
                ts.append(target)
                ns.append(info.names[0])
                infos_.append(info)
            hyper = {key: group[key] for key in self._hyper if key in group}
            unit.inner = [{"params": list(zip(ns, ts)), "param_infos": infos_, "algorithm": alg, **hyper}
                          for alg, (ts, ns, infos_) in subs.items() if ts]
            inner_groups.extend(unit.inner)
            self._units.append(unit)
            if partition is not None:
                self._unit_of[id(partition)] = k
        self.inner = self.cls(inner_groups, **self._ctor)
        made = iter(self.inner.param_groups)  # one inner group per entry, in order
        for unit in self._units:
            unit.inner = [next(made) for _ in unit.inner]
        logger.info("reg_dist.deepspeed: %s under ZeRO stage %d, %d partition(s)", self.cls.__name__, stage,
                    len(self._units))

    # ---- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Step what DeepSpeed now shows in ``param_groups`` through ``inner``: every group at ZeRO 0;
        at ZeRO 1/2 the one group it swapped in, at ZeRO 3 the group holding the one sub-group's
        partition (the others are empty)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.inner is None:  # e.g. a DeepSpeed wrapper that steps once at construction to make optimizer state
            raise NotImplementedError("RegDistAdapter.step before bind(engine): build the engine with "
                                      "reg_dist.deepspeed.initialize (or deepspeed.initialize after "
                                      "reg_dist.deepspeed.register()), at ZeRO stage 0 (fp32) or 1, 2, 3 "
                                      "(fp32, bf16, fp16)")
        if self.stage == 0:
            chosen = list(self._units)
        else:
            chosen = [self._units[self._unit_of[id(p)]] for g in self.param_groups for p in g["params"]]
        subs, grads = [], []
        for unit in chosen:
            group = self._groups[unit.group]
            for sub in unit.inner:
                sub.update({key: group[key] for key in self._hyper if key in group})  # lr schedules and the like
                subs.append(sub)
            grad = unit.partition.grad if unit.partition is not None else None
            grads += [(view, grad.narrow(0, at, view.numel()) if grad is not None else None) for view, at in unit.pieces]
        step_pieces(self.inner, grads, subs)
        return loss

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """DeepSpeed's groups' hyper-parameters and reg_dist's state (momentum, step counts, AdamW moments)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "reg_dist": self.inner.state_dict() if self.inner is not None else None,
                "kind": self.kind, "stage": self.stage, "pieces": self._geometry()}

    def _geometry(self) -> list[int]:
        """How many elements this rank holds of each parameter ``inner`` steps, in order."""
        return [p.numel() for g in (self.inner.param_groups if self.inner else []) for p in g["params"]]

    def load_state_dict(self, state_dict: dict) -> None:
        if self.inner is None:
            raise RuntimeError("RegDistAdapter.load_state_dict before bind(engine)")
        if "reg_dist" not in state_dict:
            raise ValueError("not a reg_dist.deepspeed optimizer state (no 'reg_dist' entry)")
        if state_dict.get("kind") != self.kind:
            raise ValueError(f"the checkpoint holds {state_dict.get('kind')!r} optimizer state, this run is "
                             f"{self.kind!r}")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved)} parameter groups, this run {len(self.param_groups)}")
        if (state_dict.get("stage"), state_dict.get("pieces")) != (self.stage, self._geometry()):
            raise ValueError(f"the checkpoint's optimizer state was saved at ZeRO stage {state_dict.get('stage')} "
                             f"with other partitions than this run's (stage {self.stage}); engine.load_checkpoint "
                             f"resumes at the same stage and world size only: for another, save with "
                             f"reg_dist.deepspeed.save_checkpoint(engine, path) and load with its load_checkpoint")
        for group, old in zip(self.param_groups, saved):
            group.update({k: v for k, v in old.items() if k != "params"})
        self.inner.load_state_dict(state_dict["reg_dist"])


def _config_of(args: Any, config: Any, config_params: Any) -> tuple[dict | None, str]:
    """The DeepSpeed config a call would use, loaded, and where it came from (as deepspeed.initialize)."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    if config is None and config_params is not None:
        config, where = config_params, "config_params"
    else:
        where = "config"
    for attr in ("deepspeed_config", "deepscale_config"):
        if getattr(args, attr, None) is not None and config is None:
            config, where = getattr(args, attr), "args." + attr
    return (load_ds_config(config) if config is not None else None), where


def _precision(config: dict) -> str:
    """"fp16", "bf16" or "fp32": the model precision a DeepSpeed config asks for."""
    for key, name in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        if isinstance(config.get(key), dict) and config[key].get("enabled", False):
            return name
    return "fp32"


def client_optimizer(optimizer: MatrixOptimizer) -> tuple[str, dict, list[dict], dict[int, ParamInfo]]:
    """A reg_dist optimizer given to ``deepspeed.initialize`` as ``optimizer=``: its JSON type, its
    constructor arguments, its param groups, the same dicts (each names its ``"algorithm"``, so the
    routing is the same; a scheduler built on the optimizer keeps driving their ``lr``), and the
    parameters to route again by their real shape: built on ``deepspeed.zero.Init``'s placeholders
    it routed their empty 1-D shapes to AdamW; those of a group that did not ask for AdamW are routed
    by the default rule on ``ds_shape`` with what the optimizer read of them (``param_info``)."""
    entry = registry.ALGORITHMS.get(getattr(type(optimizer), "algorithm", None))
    if entry is None or type(optimizer) is not entry.cls:
        raise NotImplementedError(f"reg_dist.deepspeed takes the registry's optimizers as optimizer= "
                                  f"({', '.join(e.cls.__name__ for e in registry.ALGORITHMS.values())}), "
                                  f"not {type(optimizer).__name__}")
    if optimizer.native_imbalance is not None:
        raise ValueError(f"this {type(optimizer).__name__} was built with mesh= (reg_dist's own data parallelism); "
                         f"under DeepSpeed build it without mesh=, DeepSpeed does the data parallelism")
    if optimizer.state:
        raise ValueError(f"this {type(optimizer).__name__} has stepped already; DeepSpeed needs a fresh one "
                         f"(resume its state with engine.load_checkpoint)")
    asked = {r.name.split(" = ")[0] for r in optimizer.routes if r.reason == f"group says {ADAMW}"}
    reroute = {id(p): optimizer.param_info(p) for g in optimizer.param_groups
               for p, name in zip(g["params"], g["param_names"]) if hasattr(p, "ds_shape") and name not in asked}
    ctor = {"nonfinite": optimizer.nonfinite}
    if entry.cls.moves and optimizer.move_dtype is not None:
        ctor["move_dtype"] = optimizer.move_dtype
    return entry.deepspeed.lower(), ctor, optimizer.param_groups, reroute


def register() -> None:
    """Make ``deepspeed.initialize``, whoever calls it, this module's ``initialize``: reg_dist's
    optimizers named in the JSON or given as ``optimizer=``. The Hugging Face Trainer (through
    Accelerate) and Accelerate look it up as ``deepspeed.initialize`` at each call (neither imports it by
    name), so patching that attribute reaches them. Idempotent; ``initialize`` always calls DeepSpeed's own."""
    deepspeed.initialize = initialize


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=TORCH_DISTRIBUTED_DEFAULT_PORT, mpu=None, dist_init_required=None, collate_fn=None,
               config=None, mesh_param=None, config_params=None):
    """``deepspeed.initialize`` (same arguments, same ``(engine, optimizer, dataloader, lr_scheduler)``),
    where a config optimizer of type ``"REG"``, ``"MuonEq"``, ``"reg_dist.Muon"``, ``"NorMuon"`` or
    ``"reg_dist.<name>"``, or a reg_dist optimizer given as ``optimizer=``, builds reg_dist's optimizer
    on DeepSpeed's ZeRO partitions (see the module docstring); anything else is exactly DeepSpeed's own
    ``deepspeed.initialize`` (kept at import, so this works before and after ``register()``)."""
    passthrough = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
                       mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                       mesh_param=mesh_param, config_params=config_params)
    try:
        loaded, where = _config_of(args, config, config_params)
    except Exception:  # let deepspeed report its own config errors
        return _DEEPSPEED_INITIALIZE(**passthrough)
    kind = reg_dist_type(loaded)
    client = isinstance(optimizer, MatrixOptimizer)
    if loaded is None or (kind is None and not client):
        return _DEEPSPEED_INITIALIZE(**passthrough)

    if optimizer is not None and "optimizer" in loaded:
        raise ValueError(f"the DeepSpeed config names optimizer {loaded['optimizer'].get('type')!r} and "
                         f"optimizer= is given too; give one of them")
    reroute = None
    if client:
        kind, kwargs, model_parameters, reroute = client_optimizer(optimizer)
    else:
        kwargs = parse_params(kind, loaded["optimizer"].get("params"))
    stage = int((loaded.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    precision = _precision(loaded)
    if precision != "fp32" and stage == 0:
        raise NotImplementedError(f"reg_dist.deepspeed: {precision} at ZeRO stage 0 is not supported yet "
                                  f"(fp32 at every stage; bf16 and fp16 at stages 1, 2, 3)")
    accumulate = str((loaded.get("data_types") or {}).get("grad_accum_dtype", "")).removeprefix("torch.").lower()
    if precision == "bf16" and stage == 1 and accumulate in ("fp32", "float32", "float"):
        raise NotImplementedError("reg_dist.deepspeed: bf16 with fp32 gradient accumulation at ZeRO stage 1 "
                                  "(DeepSpeed's BF16_Optimizer) is not supported yet; use stage 2")

    offload = (loaded.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() not in ("none", "cpu") or float(offload.get("ratio", 1.0)) != 1.0:
        raise NotImplementedError(f"reg_dist.deepspeed: offload_optimizer {offload} is not supported yet (DeepSpeed "
                                  f"steps NVMe and partial offload with its DeepSpeedCPUAdam only); use "
                                  f"\"offload_optimizer\": {{\"device\": \"cpu\"}}")

    new_config = copy.copy(loaded)
    new_config.pop("optimizer", None)
    new_config["zero_allow_untested_optimizer"] = True  # DeepSpeed's gate for any client optimizer under ZeRO
    new_config["zero_force_ds_cpu_optimizer"] = False  # under CPU offload reg_dist steps the CPU partitions itself
    if where.startswith("args."):
        args = copy.copy(args)
        for attr in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, attr):
                setattr(args, attr, None)

    def build(params):
        return RegDistAdapter(params, kind, kwargs, reroute)

    out = _DEEPSPEED_INITIALIZE(**{**passthrough, "args": args, "optimizer": build, "config": new_config,
                                   "model_parameters": model_parameters, "config_params": None})
    engine = out[0]
    adapter = engine.basic_optimizer
    if not isinstance(adapter, RegDistAdapter):
        raise RuntimeError(f"deepspeed.initialize did not keep reg_dist's optimizer ({type(adapter).__name__})")
    adapter.bind(engine)
    return out
