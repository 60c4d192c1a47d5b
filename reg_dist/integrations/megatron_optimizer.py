"""reg_dist's REG, Muon and MuonEq as megatron-core emerging optimizers.

``registry_entries()`` gives one ``EmergingOptimizerEntry`` per name in ``NAMES``; ``reg_dist.megatron.register()``
puts them into ``megatron.core.optimizer.emerging_optimizers._EMERGING_OPTIMIZERS``, after which
``get_megatron_optimizer(OptimizerConfig(optimizer="reg"), model_chunks)`` builds them. Megatron's
emerging-optimizer path then

* tags ``linear_qkv`` weights ``is_qkv`` with their ``qkv_split_shapes`` and routes embeddings, the
  output layer and every non-2-D parameter to its own Adam (AdamW when Apex/TE are absent), through the
  entry's ``default_param_overrides``;
* calls ``config_to_kwargs(config, model_chunks, pg_collection)``, which here attaches the TP layouts
  (``reg_dist.integrations.megatron.attach_layouts``: ``tensor_model_parallel`` / ``partition_dim``,
  QKV split per query group unless ``reg_split_qkv`` is False) and reads the hyper-parameters;
* builds the optimizer from its parameter groups and wraps it in ``FP32Optimizer`` (or
  ``Float16OptimizerWithFloat16Params`` for bf16), whose ``prepare_grads`` points ``p.grad`` at the
  DDP's ``p.main_grad`` (already averaged over data parallelism) before every step.

Hyper-parameters: ``lr`` and ``weight_decay`` are Megatron's (its scheduler rewrites each group's ``lr``
and ``weight_decay`` every iteration); the rest (``Settings``) are read from, in order, attributes of
the same name set on the ``OptimizerConfig`` (``reg_dist.megatron.optimizer_config``), Megatron's
global arguments (``--reg-p`` … parsed with ``reg_dist.megatron.extra_args_provider``), then the defaults.

Megatron's distributed optimizer (flat buffers; for emerging optimizers, its layer-wise variant) is
not supported yet: building with it raises. Muon/MuonEq always orthogonalise each TP-split matrix
whole (``tp_mode="gather"``): reg_dist's ``tp_mode="blockwise"`` applies to DTensor parameters only,
not to the ``reg_layout`` pieces used here.
"""

import dataclasses
import sys
from typing import Any

import torch
from torch import Tensor

from ..distributed import REG, Muon, MuonEq
from ..optim.adamw import init_adamw_state
from ..optim.routing import ADAMW
from .megatron import attach_layouts

# Megatron --optimizer name → reg_dist optimizer. Our Muon is "reg_muon": Megatron's own "muon" stays.
NAMES: dict[str, type] = {"reg": REG, "reg_muon": Muon, "muoneq": MuonEq}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclasses.dataclass
class Settings:
    """reg_dist's hyper-parameters beyond Megatron's ``lr`` / ``weight_decay`` (field = argparse dest)."""

    reg_momentum: float = 0.95
    reg_nesterov: bool = True
    reg_rms: float = 0.2
    reg_scale: str | None = None  # None: the algorithm's default ("rms" for REG, "match_rms_adamw" for Muon)
    reg_p: float = 2.0
    reg_iters: int = 1
    reg_eps: float = 1e-8
    reg_ns_steps: int = 5
    reg_ns_coefficients: str = "jordan"
    reg_ns_dtype: str = "bf16"
    reg_move_dtype: str = "bf16"
    muoneq_mode: str = "row"
    muoneq_phase: int | None = None
    muoneq_exponent: float = -0.5
    reg_split_qkv: bool = True


def _megatron_global_args():
    """Megatron's parsed arguments where ``megatron.training`` has set them (never imports it)."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None


def settings_from(config: Any = None, args: Any = None) -> Settings:
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


def optimizer_kwargs(name: str, settings: Settings, lr: float, weight_decay: float) -> dict:
    """The constructor keyword arguments of ``NAMES[name]`` (raises KeyError on an unknown name)."""
    cls = NAMES[name]
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay, momentum=settings.reg_momentum,
                                  nesterov=settings.reg_nesterov, rms=settings.reg_rms)
    if settings.reg_scale is not None:
        kwargs["scale"] = settings.reg_scale
    if cls is REG:
        kwargs.update(p=settings.reg_p, iters=settings.reg_iters, eps=settings.reg_eps)
        return kwargs
    for dtype_flag in ("reg_ns_dtype", "reg_move_dtype"):
        if getattr(settings, dtype_flag) not in DTYPES:
            raise ValueError(f"{dtype_flag} must be one of {tuple(DTYPES)}, got {getattr(settings, dtype_flag)!r}")
    kwargs.update(ns_steps=settings.reg_ns_steps, coefficients=settings.reg_ns_coefficients,
                  ns_dtype=DTYPES[settings.reg_ns_dtype],
                  move_dtype=DTYPES[settings.reg_move_dtype])
    if cls is MuonEq:
        kwargs.update(mode=settings.muoneq_mode, phase=settings.muoneq_phase, exponent=settings.muoneq_exponent)
    return kwargs


def check_settings(name: str, settings: Settings) -> None:
    """Raise ValueError with the optimizer's own message if ``settings`` are invalid for ``name``:
    the optimizer is built once on a throw-away 2 × 2 matrix (no layout, so no collectives)."""
    NAMES[name]([("w", torch.zeros(2, 2))], **optimizer_kwargs(name, settings, lr=0.0, weight_decay=0.0))


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
                opt.matrix_state(p)


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
        return self.cls(groups, **kwargs)

    def __repr__(self) -> str:
        return f"reg_dist {self.cls.__name__} for megatron ({self.name!r})"


def _config_to_kwargs(name: str):
    def config_to_kwargs(config, model_chunks, pg_collection=None) -> dict:
        uses_dist_opt = any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False)
                            for c in model_chunks)
        if config.use_layer_wise_distributed_optimizer or config.use_distributed_optimizer or uses_dist_opt:
            raise NotImplementedError(
                f"--optimizer {name}: Megatron's distributed optimizer (--use-distributed-optimizer, which "
                f"Megatron turns into its layer-wise optimizer for emerging optimizers) is not supported by "
                f"reg_dist yet; train with Megatron's DDP without it")
        settings = settings_from(config)
        for chunk in model_chunks:
            attach_layouts(chunk, split_qkv=settings.reg_split_qkv)
        names = {id(p): _strip(n) for chunk in model_chunks for n, p in chunk.named_parameters()}
        kwargs = optimizer_kwargs(name, settings, lr=config.lr, weight_decay=config.weight_decay)
        return {**kwargs, "param_names": names}

    return config_to_kwargs


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
        if isinstance(torch_opt, tuple(NAMES.values())):
            out += [p for g in torch_opt.param_groups if g["algorithm"] != ADAMW for p in g["params"]]
    return out
