"""reg_dist's REG, Muon and MuonEq as megatron-core emerging optimizers.

``registry_entries()`` gives one ``EmergingOptimizerEntry`` per name in ``NAMES``; ``reg_dist.megatron.register()``
puts them into ``megatron.core.optimizer.emerging_optimizers._EMERGING_OPTIMIZERS``, after which
``get_megatron_optimizer(OptimizerConfig(optimizer="reg"), model_chunks)`` builds them. Megatron's
emerging-optimizer path then

* tags ``linear_qkv`` weights ``is_qkv`` with their ``qkv_split_shapes`` and routes embeddings, the
  output layer and every non-2-D parameter to its own Adam (AdamW when Apex/TE are absent), through the
  entry's ``default_param_overrides``;
* calls ``config_to_kwargs(config, model_chunks, pg_collection)``, which here attaches the TP layouts
  (``reg_dist.integrations.megatron.layouts.attach_layouts``: ``tensor_model_parallel`` / ``partition_dim``,
  QKV split per query group unless ``reg_split_qkv`` is False) and reads the hyper-parameters;
* builds the optimizer from its parameter groups and wraps it in ``FP32Optimizer`` (or
  ``Float16OptimizerWithFloat16Params`` for bf16, which swaps in fp32 main copies: ``register()``'s
  hook then rebuilds ours over them, ``rebuild_over_main_params``), whose ``prepare_grads`` points
  ``p.grad`` at the DDP's ``p.main_grad`` (already averaged over data parallelism) before every step.

Hyper-parameters: ``lr`` and ``weight_decay`` are Megatron's (its scheduler rewrites each group's ``lr``
and ``weight_decay`` every iteration); the rest (``Settings``) are read from, in order, attributes of
the same name set on the ``OptimizerConfig`` (``reg_dist.megatron.optimizer_config``), Megatron's
global arguments (``--reg-p`` … parsed with ``reg_dist.megatron.extra_args_provider``), then the defaults.

With Megatron's distributed optimizer (``OptimizerConfig.use_distributed_optimizer`` and a DDP built
with ``use_distributed_optimizer=True``), ``build_distributed`` (which ``reg_dist.megatron.register()``
routes our names to) wraps ``DistOptAdapter`` in Megatron's own ``DistributedOptimizer``. Each DP rank
then holds the fp32 main shards of its range of every grad-buffer bucket: a flat element range
``[s, e)`` of a parameter's local (TP) shard that may cut rows anywhere, or nothing. The adapter gives
``inner`` (REG, Muon or MuonEq, with AdamW for Megatron's Adam groups) one piece per model parameter
on every rank, with ``reg_layout = Layout(TP layout's m × n, rows, cols, flat=(s, e), fused=QKV blocks,
groups=(("tp_dp", tensor × data parallel group),))`` (``("dp", …)`` for a replicated weight): REG
reduces its row/column sums over that group, Muon/MuonEq move the pieces to one owner per matrix.
Expert-parallel parameters (MoE experts) get a second ``RegDistributedOptimizer`` over the expert-data-parallel
group and the DDP's expert buffers, as Megatron builds for its Adam, chained with the dense one in a ``FlatChain``
(their groups ``(("dp", expert-DP group),)``; expert TP > 1 is refused). Megatron-FSDP and several
distributed-optimizer instances (``num_distributed_optimizer_instances``) are refused. Each group's parameters
take the algorithm reg_dist's routing gives them, as under DDP. Its checkpoints
hold reg_dist's state in model space (``RegDistributedOptimizer``): in ``torch_dist`` Megatron reshards it to
another TP × PP × DP layout as it does the weights; in ``torch`` DP rank 0 writes it per TP × PP rank (same
layout, any DP degree); another optimizer's is refused.

Megatron's layer-wise optimizer (what its ``validate_args`` makes of ``--use-distributed-optimizer`` for any
optimizer but adam and sgd; ``--reg-distributed-optimizer layer-wise``) is ``RegLayerWiseOptimizer``
(``layer_wise_optimizer_class``): each DP rank steps whole (TP-local) matrices, ours rebuilt over them,
beside a flat ``RegDistributedOptimizer`` for Megatron's Adam groups (``flat_distributed``), in a
``LayerWiseChain`` (``chain_layer_wise``). Its checkpoints are Megatron's layer-wise format (same layout).

Muon/MuonEq always orthogonalise each TP-split matrix whole (``tp_mode="gather"``): reg_dist's
``tp_mode="blockwise"`` applies to DTensor parameters only, not to the ``reg_layout`` pieces used here.
"""

import copy
import dataclasses
import functools
import logging
import math
import sys
import typing
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ...layout import LAYOUT_ATTR, Layout
from ...optim import registry
from ...optim.engine import MatrixOptimizer
from ...optim.adamw import init_adamw_state
from ...optim.routing import ADAMW, ParamInfo, route
from ..flat_partition import element_layout, laid, piece_layout, step_pieces
from .layouts import attach_layouts, megatron_layout

# Megatron --optimizer name → reg_dist optimizer. Our Muon is "reg_muon": Megatron's own "muon" stays.
logger = logging.getLogger("reg_dist")

NAMES: dict[str, type[MatrixOptimizer]] = {e.megatron: e.cls for e in registry.ALGORITHMS.values()}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Each algorithm hyper-parameter's Megatron flag (argparse dest); one the table does not name gets
# ``reg_<name>``. The step's common ones (lr, weight_decay) are Megatron's own; AdamW's are Megatron's Adam's.
FLAGS = {"momentum": "reg_momentum", "nesterov": "reg_nesterov", "rms": "reg_rms", "scale": "reg_scale",
         "p": "reg_p", "iters": "reg_iters", "eps": "reg_eps", "ns_steps": "reg_ns_steps",
         "coefficients": "reg_ns_coefficients", "ns_dtype": "reg_ns_dtype", "ns_method": "reg_ns_method",
         "mode": "muoneq_mode", "phase": "muoneq_phase", "exponent": "muoneq_exponent"}
MEGATRON_OWN = ("lr", "weight_decay", "adamw_betas", "adamw_eps", "nonfinite")


def flag_dest(hyper: str) -> str:
    """The argparse dest of an algorithm hyper-parameter's Megatron flag."""
    return FLAGS.get(hyper, f"reg_{hyper}")


def hyper_flags() -> dict[str, tuple[registry.Hyper, list[str]]]:
    """Every algorithm hyper-parameter with a Megatron flag: dest → (hyper-parameter, the Megatron
    names of the optimizers that take it), from the registry."""
    out: dict[str, tuple[registry.Hyper, list[str]]] = {}
    for entry in registry.ALGORITHMS.values():
        for name, hyper in registry.schema(entry.name).items():
            if name not in MEGATRON_OWN:
                out.setdefault(flag_dest(name), (hyper, []))[1].append(entry.megatron)
    return out


_FIXED = [("reg_momentum", float, 0.95), ("reg_nesterov", bool, True), ("reg_rms", float, 0.2),
          ("reg_scale", str | None, None), ("reg_p", float, 2.0), ("reg_iters", int, 1), ("reg_eps", float, 1e-8),
          ("reg_ns_steps", int, 5), ("reg_ns_coefficients", str | None, None), ("reg_ns_dtype", str, "bf16"),
          ("reg_ns_method", str | None, None),
          ("muoneq_mode", str, "row"), ("muoneq_phase", int | None, None), ("muoneq_exponent", float | None, None)]
# reg_dist's hyper-parameters beyond Megatron's ``lr`` / ``weight_decay`` (field = argparse dest): the
# fixed ones above (None: the algorithm's default), one ``reg_<name>`` per other registry hyper-parameter
# (None: each algorithm's default), and how the matrices are laid out.
Settings = dataclasses.make_dataclass("Settings", [
    *[(dest, kind, dataclasses.field(default=default)) for dest, kind, default in _FIXED],
    *[(dest, typing.Any, dataclasses.field(default=None)) for dest in hyper_flags()
      if dest not in {d for d, _, _ in _FIXED}],
    ("reg_move_dtype", str | None, dataclasses.field(default=None)),  # None: the Newton–Schulz dtype
    ("reg_split_qkv", bool, dataclasses.field(default=True)),
    ("reg_tp_mode", str, dataclasses.field(default="gather")),  # "blockwise": each TP block its own matrix
])


def _megatron_global_args():
    """Megatron's parsed arguments where ``megatron.training`` has set them (never imports it)."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None


def settings_from(config: Any = None, args: Any = None):
    """``Settings`` from attributes of ``config``, else of ``args`` (default: Megatron's global
    arguments), else the defaults."""
    args = _megatron_global_args() if args is None else args
    values = {}
    for f in dataclasses.fields(Settings):
        for source in (config, args):
            if source is not None and hasattr(source, f.name):
                values[f.name] = getattr(source, f.name)
                break
    return Settings(**values)


def optimizer_kwargs(name: str, settings, lr: float, weight_decay: float) -> dict:
    """The constructor keyword arguments of ``NAMES[name]`` (raises KeyError on an unknown name): every
    hyper-parameter of its registry schema whose flag is set (None leaves the algorithm's default)."""
    cls = NAMES[name]
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay)
    for hyper in registry.schema(cls.algorithm):
        value = getattr(settings, flag_dest(hyper), None) if hyper not in MEGATRON_OWN else None
        if value is not None:
            kwargs[hyper] = DTYPES[value] if hyper == "ns_dtype" and value in DTYPES else value
    if registry.is_spectral(cls.algorithm) and settings.reg_move_dtype is not None:
        kwargs["move_dtype"] = DTYPES[settings.reg_move_dtype]
    for dtype_flag in ("reg_ns_dtype", "reg_move_dtype"):
        value = getattr(settings, dtype_flag)
        if value is not None and value not in DTYPES:
            raise ValueError(f"{dtype_flag} must be one of {tuple(DTYPES)}, got {value!r}")
    return kwargs


def blockwise(settings) -> bool:
    """Whether ``--reg-tp-mode blockwise`` makes each TP block its own matrix (logged: the update then
    depends on the TP degree)."""
    if settings.reg_tp_mode == "blockwise":
        logger.warning("reg_dist --reg-tp-mode blockwise: each tensor-parallel block is its own matrix, so the "
                       "update changes with the TP degree")
        return True
    return False


def check_settings(name: str, settings: Settings) -> None:
    """Raise ValueError with the optimizer's own message if ``settings`` are invalid for ``name``:
    the optimizer is built once on a throw-away 2 × 2 matrix (no layout, so no collectives)."""
    kwargs = optimizer_kwargs(name, settings, lr=0.0, weight_decay=0.0)
    NAMES[name]([("w", torch.zeros(2, 2))], **kwargs)
    if kwargs.get("stats_beta", 0.0) > 0:
        raise ValueError(f"--{flag_dest('stats_beta').replace('_', '-')} > 0 keeps a running average of every matrix's "
                         f"row and column statistics, which reg_dist's Megatron checkpoints do not hold: use it with "
                         f"launch/train.py, FSDP2 or DeepSpeed")


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _init_state(opt, config=None) -> None:
    """Make every parameter's state (Megatron's checkpoint formats need it before the first step)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if group["algorithm"] == ADAMW:
                if not opt.state[p]:
                    init_adamw_state(p, opt.state[p])
            else:
                opt.matrix_state(p, group)


class _Builder:
    """The entry's ``optimizer_cls``: ``NAMES[name]`` on Megatron's parameter groups, each given its
    parameters' names (for the routing table and the cross-rank agreement check)."""

    def __init__(self, name: str) -> None:
        self.name, self.cls = name, NAMES[name]
        self.__name__ = self.__qualname__ = f"megatron_{self.cls.__name__}"

    def __call__(self, param_groups: list[dict], *, param_names: dict[int, str], **kwargs: Any):
        groups = []
        for group in param_groups:
            params = list(group["params"])
            names = [param_names.get(id(p), f"unnamed{i}") for i, p in enumerate(params)]
            groups.append({**group, "params": params, "param_names": names})
        optimizer = self.cls(groups, **kwargs)
        optimizer.megatron_kwargs = kwargs  # for rebuild
        return tag_groups(optimizer)

    def __repr__(self) -> str:
        return f"reg_dist {self.cls.__name__} for megatron ({self.name!r})"


def rebuild_over_main_params(optimizer) -> None:
    """Under bf16 Megatron's ``Float16OptimizerWithFloat16Params`` swaps each bf16 parameter in our
    optimizer's groups for its fp32 main copy after we built it: rebuild ours over them (``rebuild``)."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        ours = getattr(wrapper, "optimizer", None)
        if isinstance(ours, tuple(NAMES.values())) and hasattr(wrapper, "fp32_from_float16_groups"):
            rebuild(wrapper, {id(p): n for g in ours.param_groups for p, n in zip(g["params"], g["param_names"])})


def rebuild(wrapper, names: dict[int, str]) -> None:
    """Rebuild ours (``wrapper.optimizer``, collective like the first build) over the tensors now in its
    groups, named by ``names`` (id → name): a wrapper narrowed them (the layer-wise optimizer) or swapped bf16
    parameters for fp32 main copies (``float16_groups`` → ``fp32_from_float16_groups``), which take their
    parameter's name and layout."""
    ours, laid_out = wrapper.optimizer, []
    for models, mains in zip(getattr(wrapper, "float16_groups", ()), getattr(wrapper, "fp32_from_float16_groups", ())):
        for p, main in zip(models, mains):
            names.setdefault(id(main), names.get(id(p)))  # named already where ``names`` came from the groups
            if hasattr(p, LAYOUT_ATTR):
                setattr(main, LAYOUT_ATTR, getattr(p, LAYOUT_ATTR))
                laid_out.append(main)
    groups = [{**g, "param_names": [names[id(p)] for p in g["params"]]} for g in ours.param_groups]
    wrapper.optimizer = tag_groups(type(ours)(groups, **ours.megatron_kwargs))
    wrapper.optimizer.megatron_kwargs = ours.megatron_kwargs
    for main in laid_out:  # read by the build only: Megatron's --ckpt-format torch pickles the main copies
        delattr(main, LAYOUT_ATTR)


def tag_groups(optimizer: MatrixOptimizer) -> MatrixOptimizer:
    """Set each group's ``optimizer`` to its algorithm. Megatron's ``load_state_dict`` pairs saved groups with
    the current ones by its identifier keys (``max_lr``, ``wd_mult``, ``optimizer``, …); ours splits each
    Megatron group by algorithm (AdamW-routed parameters apart), groups those keys alone would not tell
    apart: one would then load the other's (``doesn't match the size of optimizer's group``)."""
    for group in optimizer.param_groups:
        group["optimizer"] = group["algorithm"]
    return optimizer


def uses_distributed_optimizer(config, model_chunks) -> bool:
    """Whether Megatron's (flat) distributed optimizer is asked for, by the config or the DDP."""
    return bool(config.use_distributed_optimizer) or any(
        getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks)


def _config_to_kwargs(name: str):
    def config_to_kwargs(config, model_chunks, pg_collection=None) -> dict:
        if uses_distributed_optimizer(config, model_chunks) and not config.use_layer_wise_distributed_optimizer:
            raise ValueError(f"--optimizer {name} with the distributed optimizer is built by the hook "
                             f"reg_dist.megatron.register() installs: call it before get_megatron_optimizer")
        settings = settings_from(config)
        by_block = blockwise(settings)
        for chunk in model_chunks:
            attach_layouts(chunk, split_qkv=settings.reg_split_qkv, blockwise=by_block)
        names = {id(p): _strip(n) for chunk in model_chunks for n, p in chunk.named_parameters()}
        kwargs = optimizer_kwargs(name, settings, lr=config.lr, weight_decay=config.weight_decay)
        return {**kwargs, "param_names": names}

    return config_to_kwargs


class DistOptAdapter(Optimizer):
    """The torch optimizer Megatron's ``DistributedOptimizer`` wraps. Built on Megatron's param groups
    (the model parameters, from which it computes each rank's ranges), which it then swaps for this
    rank's fp32 main shards; ``bind(distopt)`` builds ``inner`` over one piece per model parameter
    (the main shard, or an empty tensor where this rank holds none; see the module docstring).
    ``step`` copies each group's ``lr`` and ``weight_decay`` (Megatron's scheduler sets them here)
    into ``inner``'s group and steps it; the shards' ``.grad`` is what Megatron set (the reduce-scattered
    DP average, clipped)."""

    def __init__(self, name: str, param_groups: list[dict], kwargs: dict, adam: dict,
                 param_names: dict[int, str], split_qkv: bool) -> None:
        super().__init__(param_groups, {"lr": kwargs["lr"], "weight_decay": kwargs["weight_decay"]})
        self.name, self.cls = name, NAMES[name]
        self._kwargs, self._adam, self._names, self._split_qkv = kwargs, adam, param_names, split_qkv
        self._models = [list(g["params"]) for g in self.param_groups]
        self.inner: MatrixOptimizer | None = None
        self._grads: list[tuple[Tensor, Tensor]] = []  # (inner's piece, the main shard Megatron gives .grad)

    def bind(self, distopt, split_over: tuple[tuple[str, dist.ProcessGroup], ...]) -> None:
        """Build ``inner`` over this rank's main shards of ``distopt`` (collective over ``split_over``): the
        groups whose ranks hold the rest of a tensor-parallel matrix: ``(("tp_dp", tensor × data group),)`` for
        dense weights, ``(("dp", expert-DP group),)`` for expert weights (expert TP 1)."""
        shards, self._grads, self.split_over = {}, [], split_over
        for models, mains in ((distopt.model_float16_groups, distopt.shard_fp32_from_float16_groups),
                              (distopt.model_fp32_groups, distopt.shard_fp32_groups)):
            for model_group, main_group in zip(models, mains):
                shards.update(zip(model_group, main_group))
        groups, self._pieces, self._sources = [], [], []
        for i, (group, models) in enumerate(zip(self.param_groups, self._models)):
            wanted = group.get("optimizer", self.name)  # Megatron's overrides mark the others "adam"
            if wanted not in (self.name, "adam"):
                raise ValueError(f"a Megatron parameter group asks for optimizer {wanted!r}; under the distributed "
                                 f"optimizer --optimizer {self.name} steps its own and 'adam' groups only")
            ours = wanted == self.name
            pieces = []
            for p in models:
                name = self._names.get(id(p), f"unnamed{len(pieces)}")
                if p in shards:  # a leaf alias of the main shard (a view of p where p is fp32)
                    held = distopt._get_model_param_range_map(p)["param"]
                    piece, flat = shards[p].detach(), (held.start, held.end)
                    self._grads.append((piece, shards[p]))
                else:
                    piece, flat = torch.empty(0, dtype=torch.float32, device=p.device), (0, 0)
                pieces.append((name, laid(piece, self._layout(p, name, flat, ours, distopt.data_parallel_group))))
            self._pieces.append([piece for _, piece in pieces])
            # our group: reg_dist's routing by name and logical shape, as under Megatron's DDP (an embedding
            # Megatron does not mark, like the position embeddings, takes AdamW), the same on every rank
            algorithms = [route(piece, ParamInfo((name,)), None, self.cls.algorithm).algorithm if ours else ADAMW
                          for name, piece in pieces]
            extra = {} if ours else {"adamw_betas": self._adam["betas"], "adamw_eps": self._adam["eps"]}
            for algorithm in dict.fromkeys(algorithms or [ADAMW]):
                groups.append({"params": [pc for pc, a in zip(pieces, algorithms) if a == algorithm],
                               "algorithm": algorithm, "lr": group["lr"], "weight_decay": group["weight_decay"],
                               **extra})
                self._sources.append(i)
        self.inner = self.cls(groups, **{k: v for k, v in self._kwargs.items() if k not in ("lr", "weight_decay")})

    def _layout(self, p: Tensor, name: str, flat: tuple[int, int], ours: bool, dp_group) -> Layout:
        """``p``'s TP layout cut to ``flat`` of its local shard (an AdamW parameter: its element layout),
        over ``split_over`` where TP splits it, else the data-parallel group."""
        if ours:  # attach_layouts' (with the layer's own TP group), else a replicated weight's
            base = getattr(p, LAYOUT_ATTR, None) or megatron_layout(p, name, split_qkv=self._split_qkv)
        else:
            base = element_layout(tuple(p.shape))
        return piece_layout(base, flat, self.split_over if base.groups else (("dp", dp_group),))

    def model_pieces(self) -> list[tuple[Tensor, Tensor]]:
        """Every model parameter with ``inner``'s piece of it, in one order on every rank."""
        return [(p, piece) for models, pieces in zip(self._models, self._pieces)
                for p, piece in zip(models, pieces, strict=True)]

    @torch.no_grad()
    def step(self, closure=None):
        if self.inner is None:
            raise RuntimeError("DistOptAdapter.step before bind(distopt): build it with reg_dist.megatron.register()")
        for sub, i in zip(self.inner.param_groups, self._sources, strict=True):
            sub["lr"], sub["weight_decay"] = self.param_groups[i]["lr"], self.param_groups[i]["weight_decay"]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step_pieces(self.inner, [(piece, shard.grad) for piece, shard in self._grads])
        return loss

    def state_dict(self) -> dict:
        if self.inner is not None:
            raise NotImplementedError(f"--optimizer {self.name} with --use-distributed-optimizer checkpoints through "
                                      f"Megatron's sharded state dict only: use --ckpt-format torch_dist")
        return super().state_dict()  # DistributedOptimizer's round trip while it swaps in the shards


def _init_adapter_state(opt, config=None) -> None:
    if opt.inner is not None:
        _init_state(opt.inner)


STEPS_KEY = "optimizer.reg_dist.steps"
EXPERT_STEPS_KEY = "optimizer.reg_dist.expert_steps"  # the expert-parallel instance's
OPTIMIZER_METADATA = "reg_dist_optimizer"  # the checkpoint's content metadata: which of ours saved it


def _model_space_key(state_key: str, param_key: str) -> str:
    return f"optimizer.reg_dist.{state_key}.{param_key}"


@functools.cache
def _distributed_optimizer_class() -> type:
    """``RegDistributedOptimizer``: Megatron's ``DistributedOptimizer`` over ``DistOptAdapter`` whose
    checkpoints hold reg_dist's state in model space (Megatron's own ``sharded_state_dict`` and
    ``load_state_dict`` assume Adam's ``exp_avg`` / ``exp_avg_sq`` per main shard)."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.optimizer import DistributedOptimizer

    class RegDistributedOptimizer(DistributedOptimizer):
        """``sharded_state_dict`` in model space, like Megatron's ``fully_reshardable`` format: every element-shaped
        state tensor of a parameter (momentum, AdamW moments, the fp32 main copy of a bf16 parameter) is gathered
        over the DP group into the parameter's local TP shard and saved as a ``ShardedTensor`` under the model
        parameter's own sharding (key ``optimizer.reg_dist.<state>.<parameter key>``), so Megatron reshards it
        to another TP, PP or DP degree as it does the weights; a load slices each rank's flat range back out.
        Per-row state (NorMuon's, whole on every holder) is one ``ShardedObject`` per parameter; the step count
        (one for every parameter) and ``skipped_steps`` one ``ShardedObject``. The checkpoint's content metadata
        names the optimizer (``reg_dist_optimizer``): another's checkpoint is refused before anything loads."""

        steps_key = STEPS_KEY

        @staticmethod
        def _flat(piece: Tensor) -> slice:
            """The elements of its parameter's local shard that ``piece`` holds."""
            return slice(*getattr(piece, LAYOUT_ATTR).flat)

        def _model_space(self, is_loading: bool) -> list[tuple[Tensor, dict[str, Tensor]]]:
            """Every model parameter with its element-shaped state, each of the parameter's local shape: empty
            when loading, else gathered over the DP group (one packed all-reduce of the zero-padded pieces)."""
            adapter = self.optimizer
            _init_state(adapter.inner)
            out, pieces = [], []
            pairs = adapter.model_pieces()
            for p, piece in pairs:
                state = adapter.inner.state[piece]
                tensors = {k: v for k, v in state.items()
                           if isinstance(v, Tensor) and k != "step" and k not in adapter.cls.row_state_keys}
                if p.dtype != piece.dtype:  # a bf16 parameter: the piece is (a view of) its fp32 main shard
                    tensors["fp32_param"] = piece
                out.append((p, {k: torch.empty(p.shape, dtype=v.dtype, device=v.device) for k, v in tensors.items()}))
                pieces.append(tensors)
            if is_loading:
                return out
            flat = torch.cat([torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
                              for _, full in out for t in full.values()]) if out else torch.zeros(0)
            at = 0
            for (_, full), held, (_, piece) in zip(out, pieces, pairs):
                where = self._flat(piece)
                for k, t in full.items():
                    flat[at + where.start:at + where.stop] = held[k].detach().reshape(-1)
                    at += t.numel()
            dist.all_reduce(flat, group=self.data_parallel_group)  # each element held by one DP rank
            at = 0
            for _, full in out:
                for t in full.values():
                    t.copy_(flat[at:at + t.numel()].view(t.shape))
                    at += t.numel()
            return out

        def _steps(self) -> dict:
            """The one step count of every parameter piece holding elements (checked equal over the world)
            and ``skipped_steps``."""
            inner = self.optimizer.inner
            pairs = self.optimizer.model_pieces()
            steps = [float(inner.state[piece]["step"]) for _, piece in pairs if piece.numel()]
            spread = torch.tensor([max(steps, default=-math.inf), -min(steps, default=math.inf)],
                                  dtype=torch.float64, device=pairs[0][1].device if pairs else "cpu")
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            high, low = float(spread[0]), -float(spread[1])
            if high != low:
                raise RuntimeError(f"--optimizer {self.optimizer.name}: the parameters' step counts differ ({low} to "
                                   f"{high}); a checkpoint keeps one")
            return {"step": max(high, 0.0), "skipped_steps": inner.skipped_steps}

        def _row_state(self, by_param: dict) -> dict:
            """Per-row state (``row_state_keys``) per parameter: one ``ShardedObject`` (placed in its layer stack
            as the parameter is) saved by the lowest global rank of the tensor × data group holding elements of
            the matrix."""
            adapter = self.optimizer
            keys = adapter.cls.row_state_keys
            if not keys:
                return {}
            pairs = adapter.model_pieces()
            world = dist.get_world_size()
            lowest = torch.tensor([dist.get_rank() if piece.numel() else world for _, piece in pairs],
                                  dtype=torch.float64, device=pairs[0][1].device if pairs else "cpu")
            for _, group in adapter.split_over:  # every rank holding a piece of the matrix
                dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=group)
            out = {}
            for i, ((p, piece), owner) in enumerate(zip(pairs, lowest.tolist())):
                state, sh = adapter.inner.state[piece], by_param[p]
                if isinstance(sh, ShardedTensorFactory):
                    sh = next(iter(nested_values(sh.build())))
                # a layer of a stack saved under one key (Megatron's layer axes prepended): its place in the stack
                stacked = (sh.global_shape[:sh.prepend_axis_num], sh.global_offset[:sh.prepend_axis_num]) \
                    if sh.prepend_axis_num else ((1,), (0,))
                for k in keys:
                    if k in state:
                        out[f"{i}.{k}"] = ShardedObject(_model_space_key(k, sh.key), state[k], *stacked,
                                                        replica_id=int(int(owner) != dist.get_rank()))
            return out

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None, **kwargs):
            name = self.optimizer.name
            _check_metadata(name, metadata, is_loading)
            if metadata is not None and not is_loading:
                metadata["distrib_optim_sharding_type"] = "fully_reshardable"  # model space: Megatron may reshard
            by_param = {sh.data: sh for sh in nested_values(
                extract_sharded_tensors_and_factories(model_sharded_state_dict)[0])}
            param_state = {}
            for i, (p, tensors) in enumerate(self._model_space(is_loading)):
                if p not in by_param:
                    raise ValueError(f"--optimizer {name}: a parameter is not in the model's sharded state dict "
                                     f"(build it with keep_vars=True)")
                sh = by_param[p]
                param_state[i] = {}
                for k, t in tensors.items():
                    fields = dict(key=_model_space_key(k, sh.key), data=t, replica_id=sh.replica_id)
                    if not isinstance(sh, ShardedTensorFactory):
                        fields["dtype"] = t.dtype
                    param_state[i][k] = replace(sh, **fields)
            steps = {"step": 0.0, "skipped_steps": 0} if is_loading else self._steps()
            return {"param_state": param_state, "row_state": self._row_state(by_param),
                    "steps": ShardedObject(self.steps_key, steps, (1,), (0,), replica_id=int(dist.get_rank() != 0))}

        def state_dict(self) -> dict:
            """The common part of a ``--ckpt-format torch`` checkpoint (DP rank 0's, not collective): the optimizer's
            name; ``save_parameter_state`` writes the state."""
            return {OPTIMIZER_METADATA: self.optimizer.name}

        def parameter_state(self) -> dict:
            """Every parameter's element-shaped state in model space (collective over the world), the step count
            and the optimizer's name: what ``load_state_dict`` takes at the same TP × PP layout, any DP degree."""
            if self.optimizer.cls.row_state_keys:
                raise NotImplementedError(f"--optimizer {self.optimizer.name} keeps per-row state: use --ckpt-format "
                                          f"torch_dist")
            return {"param_state": {i: tensors for i, (_, tensors) in enumerate(self._model_space(False))},
                    "row_state": {}, "steps": self._steps(), OPTIMIZER_METADATA: self.optimizer.name}

        def save_parameter_state(self, filename: str) -> None:
            """``--ckpt-format torch``: ``parameter_state()``, written by DP rank 0 (one file per TP × PP rank)."""
            state = self.parameter_state()
            if self.data_parallel_group.rank() == 0:
                torch.save(state, filename)

        def load_parameter_state(self, filename: str, *, update_legacy_format: bool = False) -> None:
            """Load ``save_parameter_state``'s file. megatron-core 0.19.2 names it from the tracker file, not from
            ``--ckpt-step``: a step other than the tracker's is refused (the model would load one iteration, the
            optimizer another)."""
            _check_ckpt_step(self.optimizer.name, filename)
            self.load_state_dict(torch.load(filename, weights_only=False))

        @torch.no_grad()
        def load_state_dict(self, state_dict: dict) -> None:
            """A sharded state dict's (``torch_dist``), a ``parameter_state()``, or a ``--ckpt-format torch``
            checkpoint's common part (``state_dict()``: only checked, the state follows in
            ``load_parameter_state``)."""
            if "param_state" not in state_dict or OPTIMIZER_METADATA in state_dict:
                _check_metadata(self.optimizer.name, state_dict, is_loading=True)
                if "param_state" not in state_dict:
                    return
            adapter = self.optimizer
            _init_state(adapter.inner)
            steps = state_dict["steps"]
            for i, (p, piece) in enumerate(adapter.model_pieces()):
                state, where = adapter.inner.state[piece], self._flat(piece)
                for k, t in state_dict["param_state"][i].items():
                    target = piece if k == "fp32_param" else state[k]
                    target.copy_(t.reshape(-1)[where].view(target.shape))
                for k in adapter.cls.row_state_keys:
                    if k in state:
                        state[k].copy_(state_dict["row_state"][f"{i}.{k}"])
                state["step"].fill_(steps["step"])
            adapter.inner.skipped_steps = steps["skipped_steps"]

    return RegDistributedOptimizer


@functools.cache
def layer_wise_optimizer_class() -> type:
    """``RegLayerWiseOptimizer``: Megatron's ``LayerWiseDistributedOptimizer`` (what its ``validate_args`` makes of
    ``--use-distributed-optimizer`` for our optimizers; ``--reg-distributed-optimizer layer-wise``) over ours."""
    from megatron.core.optimizer import FP32Optimizer, LayerWiseDistributedOptimizer, MegatronOptimizer

    class NestedFP32Optimizer(FP32Optimizer):
        """``FP32Optimizer`` whose sharded state dict nests under ``"optimizer"`` as
        ``Float16OptimizerWithFloat16Params``' does: ``LayerWiseDistributedOptimizer.sharded_state_dict`` reads it
        there. Its plain ``state_dict`` (``--ckpt-format torch``) stays ``FP32Optimizer``'s."""

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
            return {"optimizer": super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)}

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict["optimizer"] if "optimizer" in state_dict else state_dict)

    class RegLayerWiseOptimizer(LayerWiseDistributedOptimizer):
        """Each DP rank steps the whole (TP-local) matrices its shard of Megatron's shard-aligned grad buffer holds,
        with the DP-averaged gradient DDP reduce-scattered there, and the weights are all-gathered after the step:
        no statistics traffic for REG, no owner moves for Muon / MuonEq beyond TP. Megatron narrows each group
        to this rank's matrices (and under bf16 swaps in fp32 main copies) after ours was built over all of
        them: ours is rebuilt over what is left (``rebuild``). megatron-core 0.19.2 chains an fp32 run's torch
        optimizers unwrapped (no ``prepare_grads``; the chain's config check then fails): each is wrapped in
        ``NestedFP32Optimizer`` here. The checkpoint's content metadata names the optimizer (``reg_dist_optimizer``)."""

        def __init__(self, optimizers, config, pg_collection=None, init_state_fn_list=None, model_chunks=None):
            names = {id(p): n for o in optimizers if isinstance(o, tuple(NAMES.values()))
                     for g in o.param_groups for p, n in zip(g["params"], g["param_names"])}
            super().__init__(optimizers, config, pg_collection, init_state_fn_list, model_chunks)
            for i, wrapper in enumerate(self.chained_optimizers):
                if not isinstance(wrapper, MegatronOptimizer):
                    init = init_state_fn_list[i] if init_state_fn_list else None
                    wrapper = self.chained_optimizers[i] = NestedFP32Optimizer(wrapper, config, init)
                if isinstance(wrapper.optimizer, tuple(NAMES.values())):
                    rebuild(wrapper, names)
            self.config, self.name = config, config.optimizer

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
            _check_metadata(self.name, kwargs.get("metadata"), is_loading)
            return super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)

    return RegLayerWiseOptimizer


def chain_layer_wise(optimizer):
    """Megatron's chain of the layer-wise optimizer and the flat one beside it (``ChainedOptimizer``) as a
    ``LayerWiseChain``, or ``optimizer`` itself where it is not such a chain."""
    from megatron.core.optimizer import ChainedOptimizer

    if type(optimizer) is not ChainedOptimizer or len(optimizer.chained_optimizers) < 2:
        return optimizer
    chain = _chain_classes()[0](optimizer.chained_optimizers)
    chain.name = optimizer.config.optimizer
    return chain


def _check_ckpt_step(name: str, filename: str) -> None:
    """Refuse ``--ckpt-step`` other than the tracker file's iteration: megatron-core 0.19.2 names the distributed
    optimizer's ``--ckpt-format torch`` file from the tracker file (the model would load one iteration, the
    optimizer another)."""
    step = getattr(_megatron_global_args(), "ckpt_step", None)
    if step is not None and f"iter_{step:07d}" not in str(filename):
        raise ValueError(f"--optimizer {name}: Megatron loads the distributed optimizer's --ckpt-format torch state "
                         f"from the tracker file's iteration ({filename}), not --ckpt-step {step}: use --ckpt-format "
                         f"torch_dist, or name iteration {step} in latest_checkpointed_iteration.txt")


@functools.cache
def _chain_classes() -> tuple[type, type]:
    """``LayerWiseChain`` and ``FlatChain``: Megatron's ``ChainedOptimizer`` over ours, with their checkpoints."""
    from megatron.core.optimizer import ChainedOptimizer

    class RegChain(ChainedOptimizer):
        """Its checkpoints name the model-space sharding (``distrib_optim_sharding_type = "fully_reshardable"``,
        which the flat ``RegDistributedOptimizer`` writes) before the chain reads it: Megatron's ``ChainedOptimizer``
        prefixes its children's keys (``chained_<i>.``) by that sharding type, so a save would otherwise prefix
        them and the load, reading the type the child wrote, not. ``--ckpt-format torch`` files hold every
        child's state: a flat one's ``parameter_state()``, another's state dict."""

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
            metadata = kwargs.get("metadata")
            if metadata is not None and not is_loading:
                metadata["distrib_optim_sharding_type"] = "fully_reshardable"
            return super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)

        def _save_chain(self, filename: str, write: bool) -> None:
            """Every child's state (collective), written to ``filename`` where ``write``."""
            chain = [o.parameter_state() if hasattr(o, "parameter_state") else o.state_dict()
                     for o in self.chained_optimizers]
            if write:
                torch.save({OPTIMIZER_METADATA: self.name, "chain": chain}, filename)

        def _load_chain(self, filename: str) -> None:
            state = torch.load(filename, weights_only=False)
            _check_metadata(self.name, state if isinstance(state, dict) else {}, is_loading=True)
            for o, sd in zip(self.chained_optimizers, state["chain"], strict=True):
                o.load_state_dict(sd)

    class LayerWiseChain(RegChain):
        """The layer-wise optimizer and the flat one beside it."""

        def state_dict(self) -> dict:
            """What ``--ckpt-format torch`` puts beside the model: the name (the state goes to
            ``save_state_dict_to_file``'s files, which Megatron loads instead)."""
            return {OPTIMIZER_METADATA: self.name}

        def save_state_dict_to_file(self, filename: str) -> None:
            """``--ckpt-format torch`` (one file per rank): the layer-wise optimizer's state dict and the flat
            one's ``parameter_state()`` (collective)."""
            self._save_chain(filename, write=True)

        def load_state_dict_from_file(self, filename: str) -> None:
            self._load_chain(filename)

    class FlatChain(RegChain):
        """The flat optimizer of the dense parameters and the one of the expert-parallel parameters (over the
        expert-DP group). Megatron's ``--ckpt-format torch`` writes one file per TP × PP × EP rank: each holds both
        children's ``parameter_state()``, written by expert-DP rank 0 (the dense state, gathered over the dense
        DP group, is the same on every EP rank); this needs the expert-TP group to be the TP group (else the
        ranks of one file hold different expert blocks)."""

        def save_parameter_state(self, filename: str) -> None:
            expert = self.chained_optimizers[-1]
            if set(dist.get_process_group_ranks(expert.expert_tp_group)) != \
                    set(dist.get_process_group_ranks(expert.tp_group)):
                raise ValueError(f"--optimizer {self.name}: the distributed optimizer's --ckpt-format torch files "
                                 f"with experts need --expert-tensor-parallel-size equal to "
                                 f"--tensor-model-parallel-size; use --ckpt-format torch_dist")
            self._save_chain(filename, write=expert.data_parallel_group.rank() == 0)

        def load_parameter_state(self, filename: str, *, update_legacy_format: bool = False) -> None:
            _check_ckpt_step(self.name, filename)
            self._load_chain(filename)

    return LayerWiseChain, FlatChain


def _check_metadata(name: str, metadata: dict | None, is_loading: bool) -> None:
    """Name ``name`` in a checkpoint's content ``metadata`` when saving; when loading, refuse one that names
    another optimizer (or none: not reg_dist's) before anything loads."""
    if metadata is None:
        return
    if not is_loading:
        metadata[OPTIMIZER_METADATA] = name
        return
    saved = metadata.get(OPTIMIZER_METADATA)
    if saved != name:
        raise ValueError(f"--optimizer {name} cannot load this checkpoint's optimizer state: it was saved by "
                         + (f"--optimizer {saved}" if saved else "an optimizer other than reg_dist's (its metadata "
                            "names none, e.g. Megatron's adam)")
                         + "; pass --no-load-optim (or --finetune) to load the weights alone")


def build_distributed(name: str, config, model_chunks, config_overrides=None, pg_collection=None):
    """``get_megatron_optimizer`` for our ``name`` under Megatron's distributed optimizer: Megatron's
    ``DistributedOptimizer`` over ``DistOptAdapter`` (dense parameters), in a ``ChainedOptimizer``."""
    from megatron.core.optimizer import ChainedOptimizer, _get_param_groups_and_buffers, get_standard_config_overrides
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS, _get_qkv_split_shapes

    if config.fp16:
        raise ValueError(f"--optimizer {name} does not support --fp16; use --bf16")
    if not all(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks):
        raise ValueError(f"--optimizer {name} with use_distributed_optimizer: wrap every model chunk in Megatron's "
                         f"DistributedDataParallel with DistributedDataParallelConfig(use_distributed_optimizer=True)")
    ddp_config = model_chunks[0].ddp_config
    if ddp_config.use_megatron_fsdp or ddp_config.num_distributed_optimizer_instances != 1:
        raise NotImplementedError(f"--optimizer {name}: Megatron-FSDP and several distributed-optimizer instances "
                                  f"are not supported")
    if config.overlap_param_gather_with_optimizer_step or config.optimizer_cpu_offload:
        raise NotImplementedError(f"--optimizer {name}: overlap_param_gather_with_optimizer_step and optimizer CPU "
                                  f"offload are not supported with the distributed optimizer")
    settings = settings_from(config)
    by_block = blockwise(settings)
    for chunk in model_chunks:  # what Megatron's emerging-optimizer path tags: QKV blocks per query group
        for param_name, p in chunk.named_parameters():
            if "linear_qkv.weight" in param_name and p.ndim == 2:
                split = _get_qkv_split_shapes(chunk.config)
                if p.shape[0] % sum(split) == 0:
                    p.is_qkv, p.qkv_split_shapes = True, split
        attach_layouts(chunk, split_qkv=settings.reg_split_qkv, blockwise=by_block)
    overrides = dict(config_overrides if config_overrides is not None else get_standard_config_overrides(config))
    overrides.update(copy.deepcopy(_EMERGING_OPTIMIZERS[name].default_param_overrides))
    chain = []
    for expert, buffer_name in ((False, "buffers"), (True, "expert_parallel_buffers")):  # as get_megatron_optimizer
        groups, buffers = _get_param_groups_and_buffers(model_chunks, model_chunk_offset=0, config=config,
                                                        config_overrides=overrides, buffer_name=buffer_name,
                                                        filter_fn=lambda g, e=expert: g["is_expert_parallel"] == e)
        if groups or not expert:
            chain.append(flat_distributed(name, config, model_chunks, groups, buffers, pg_collection, expert))
    if len(chain) == 1:
        return ChainedOptimizer(chain)
    flat_chain = _chain_classes()[1](chain)
    flat_chain.name = name
    return flat_chain


def flat_distributed(name: str, config, model_chunks, groups: list[dict], buffers: dict, pg_collection=None,
                     expert: bool = False):
    """Megatron's ``DistributedOptimizer`` (``RegDistributedOptimizer``) over ``DistOptAdapter`` for ``NAMES[name]``
    on Megatron's parameter ``groups`` (those marked ``optimizer="adam"`` step with AdamW) held in the DDP grad
    ``buffers`` (``{chunk index: [buffer, …]}``). Under the layer-wise optimizer it takes the groups Megatron
    would give its own Adam's ``DistributedOptimizer`` (whose checkpoints, in megatron-core 0.19.2 without Apex
    or Transformer Engine, do not load). ``expert``: the expert-parallel groups in the DDP's expert buffers, over
    the expert-data-parallel group, as ``get_megatron_optimizer`` builds Adam's second instance: each expert
    matrix's flat shards lie on its expert-DP ranks (expert TP 1; more is refused)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import ConstantGradScaler
    from megatron.core.process_groups_config import ProcessGroupCollection

    settings = settings_from(config)
    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(pg_collection, model_chunks,
                                                                    use_gloo_process_groups=pg_collection is None)
    names = {id(p): _strip(n) for chunk in model_chunks for n, p in chunk.named_parameters()}
    kwargs = optimizer_kwargs(name, settings, lr=config.lr, weight_decay=config.weight_decay)
    adam = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps}
    adapter = DistOptAdapter(name, groups, kwargs, adam, names, settings.reg_split_qkv)
    scaler = ConstantGradScaler(config.loss_scale) if config.loss_scale else None
    dp, dp_gloo, mp = (("intra_expt_dp_group", "intra_expt_dp_group_gloo", "expt_tp_pp_with_egtp_remat_group")
                       if expert else ("intra_dp_cp_group", "intra_dp_cp_group_gloo", "mp_group"))
    distopt = _distributed_optimizer_class()(
        adapter, config, scaler, _init_adapter_state, model_chunks=model_chunks, per_model_buffers=buffers,
        data_parallel_group=pgs[dp], data_parallel_group_gloo=pgs[dp_gloo], data_parallel_group_idx=dist.get_rank(
            pgs[mp]), distributed_optimizer_instance_id=0)
    distopt.grad_stats_parallel_group = pgs["intra_dist_opt_group"]
    if pg_collection is not None:
        tp, expert_tp = pg_collection.tp, getattr(pg_collection, "expt_tp", pg_collection.tp)
    else:
        tp, expert_tp = (parallel_state.get_tensor_model_parallel_group(),
                         parallel_state.get_expert_tensor_parallel_group())
    distopt.tp_group, distopt.expert_tp_group = tp, expert_tp
    if expert:
        if dist.get_world_size(expert_tp) > 1:
            raise NotImplementedError(f"--optimizer {name}: --expert-tensor-parallel-size > 1 is not supported with "
                                      f"the flat distributed optimizer (Muon's owner moves need one process group "
                                      f"over expert-TP × expert-DP, which megatron-core 0.19.2 does not build); use "
                                      f"--reg-distributed-optimizer layer-wise or Megatron's DDP")
        distopt.steps_key = EXPERT_STEPS_KEY
        adapter.bind(distopt, (("dp", pgs[dp]),))
    else:
        adapter.bind(distopt, (("tp_dp", _tp_dp_group(tp, pgs[dp], pg_collection)),))
    return distopt


def _tp_dp_group(tp: dist.ProcessGroup, dp: dist.ProcessGroup, pg_collection=None) -> dist.ProcessGroup:
    """Megatron's tensor × data (× context) parallel group, checked to be exactly ``tp`` × ``dp``."""
    from megatron.core import parallel_state

    group = getattr(pg_collection, "tp_dp_cp", None) if pg_collection is not None else \
        parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    ranks = set(dist.get_process_group_ranks(group))
    if len(ranks) != dist.get_world_size(tp) * dist.get_world_size(dp) or not (
            set(dist.get_process_group_ranks(tp)) | set(dist.get_process_group_ranks(dp))) <= ranks:
        raise ValueError("Megatron's tensor-and-data-parallel group is not the TP group × the distributed "
                         "optimizer's data-parallel group")
    return group


def registry_entries() -> dict:
    """``{name: EmergingOptimizerEntry}`` for every name in ``NAMES``."""
    from megatron.core.optimizer.emerging_optimizers import EmergingOptimizerEntry

    return {name: EmergingOptimizerEntry(optimizer_cls=_Builder(name), init_state_fn=_init_state,
                                         config_to_kwargs=_config_to_kwargs(name))
            for name in NAMES}


def local_matrices(optimizer) -> list[Tensor]:
    """The parameters a (possibly Megatron-wrapped) optimizer steps with reg_dist's matrix algorithm."""
    inner = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    out = []
    for o in inner:
        torch_opt = getattr(o, "optimizer", o)
        torch_opt = getattr(torch_opt, "inner", torch_opt)  # DistOptAdapter
        if isinstance(torch_opt, tuple(NAMES.values())):
            out += [p for g in torch_opt.param_groups if g["algorithm"] != ADAMW for p in g["params"]]
    return out
