"""``--optimizer reg`` (and ``reg_muon``, ``muoneq``) for Megatron-LM / megatron-core.

    import reg_dist.megatron as rm
    rm.register()                                   # adds our entries to megatron-core's registry
    args = rm.parse_and_validate_args(my_provider)  # Megatron's, with our flags (and yours), then
    pretrain(pretrain_cfg_container_from_args(args), ...)  # see launch/pretrain_gpt.py

``register()`` puts ``reg`` (REG), ``reg_muon`` (reg_dist's Muon; Megatron's own ``muon`` stays) and
``muoneq`` (MuonEq) into ``megatron.core.optimizer.emerging_optimizers._EMERGING_OPTIMIZERS``, so that
``get_megatron_optimizer(OptimizerConfig(optimizer="reg"), model_chunks)`` builds them: hidden 2-D
weights take ours (with tensor-parallel layouts, ``linear_qkv`` split into q, k and v per query group),
embeddings, the output layer and every non-2-D parameter take Megatron's Adam. See
``reg_dist.integrations.megatron.optimizer``. It does not need the ``emerging-optimizers`` package.

``extra_args_provider(parser)`` adds ``reg``, ``reg_muon``, ``muoneq`` to ``--optimizer``'s choices and
the flags below; bad values and combinations stop the parse with an argparse error naming them.
``--use-distributed-optimizer`` runs ours on Megatron's flat ``DistributedOptimizer`` (see
``reg_dist.integrations.megatron.optimizer.build_distributed``), or with ``--reg-distributed-optimizer
layer-wise`` on its ``LayerWiseDistributedOptimizer`` (``layer_wise_optimizer_class``): Megatron's
``validate_args`` makes every optimizer but adam and sgd the layer-wise one, which
``parse_and_validate_args`` undoes for ours unless asked for.

On Python 3.11 importing this module aliases ``typing.override`` to ``typing_extensions.override``
(``megatron.training`` uses it), if ``typing`` lacks it.
"""

import argparse
import dataclasses
import functools
import typing

from .layouts import GROUPED_EXPERTS
from .optimizer import (DTYPES, NAMES, Settings, build_distributed, chain_layer_wise, check_settings, flat_distributed,
                        hyper_flags, layer_wise_optimizer_class, rebuild_over_main_params, registry_entries,
                        settings_from, uses_distributed_optimizer)
from ...ops.equilibrate import MODES
from ...ops.newton_schulz import COEFFICIENTS, NS_METHODS
from ...optim.scaling import SCALES

if not hasattr(typing, "override"):  # Python < 3.12: megatron.training does `from typing import override`
    import typing_extensions

    typing.override = typing_extensions.override

__all__ = ["NAMES", "Settings", "register", "extra_args_provider", "with_args", "optimizer_config", "check_args",
           "parse_and_validate_args", "keep_distributed_optimizer", "extend_megatron_arguments"]

_DEFAULTS = Settings()


def register() -> None:
    """Add reg_dist's optimizers to megatron-core's emerging-optimizer registry, and hook its emerging-optimizer
    factory for them: under the distributed optimizer ``build_distributed`` builds them, under bf16 they are
    rebuilt over Megatron's fp32 main copies (``rebuild_over_main_params``). Idempotent."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    for name, entry in registry_entries().items():
        if name not in _EMERGING_OPTIMIZERS or not _is_ours(_EMERGING_OPTIMIZERS[name]):
            _EMERGING_OPTIMIZERS[name] = entry
    # Megatron refuses every emerging optimizer without the emerging-optimizers package; ours need it not.
    original = mcore_optimizer._get_megatron_emerging_optimizer
    if not getattr(original, "_reg_dist", False):
        @functools.wraps(original)
        def build(config, model_chunks, config_overrides=None, pg_collection=None):
            args = (config, model_chunks, config_overrides, pg_collection)
            if config.optimizer in NAMES and not config.use_layer_wise_distributed_optimizer \
                    and uses_distributed_optimizer(config, model_chunks):
                return build_distributed(config.optimizer, *args)
            if config.optimizer not in NAMES:
                return original(*args)
            # Megatron's factory, with our layer-wise optimizer in place of its own and, beside it, our flat one
            # in place of its Adam's DistributedOptimizer
            name, by_groups = config.optimizer, mcore_optimizer._get_megatron_optimizer_based_on_param_groups

            def flat_or_megatrons(config, model_chunks, param_groups, per_model_buffers=None, **rest):
                if config.use_distributed_optimizer and per_model_buffers is not None:
                    return flat_distributed(name, config, model_chunks, param_groups, per_model_buffers, pg_collection)
                return by_groups(config, model_chunks, param_groups, per_model_buffers, **rest)

            patched = {"HAVE_EMERGING_OPTIMIZERS": True, "LayerWiseDistributedOptimizer": layer_wise_optimizer_class(),
                       "_get_megatron_optimizer_based_on_param_groups": flat_or_megatrons}
            saved = {k: getattr(mcore_optimizer, k) for k in patched}
            vars(mcore_optimizer).update(patched)
            try:
                optimizer = original(*args)
            finally:
                vars(mcore_optimizer).update(saved)
            if config.use_layer_wise_distributed_optimizer:  # which rebuilds ours itself
                return chain_layer_wise(optimizer)
            rebuild_over_main_params(optimizer)
            return optimizer

        build._reg_dist = True
        mcore_optimizer._get_megatron_emerging_optimizer = build


def _is_ours(entry) -> bool:
    return type(entry.optimizer_cls).__module__ == "reg_dist.integrations.megatron.optimizer"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_FLAG_TYPES = {float: float, int: int}
_positive_int.__name__ = "positive int"
_non_negative_int.__name__ = "non-negative int"
_positive_float.__name__ = "positive float"


def _optimizer_action(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if "--optimizer" in action.option_strings:
            return action
    raise ValueError("reg_dist.megatron.extra_args_provider: the parser has no --optimizer option; "
                     "call it on Megatron's parser (megatron.training.arguments.parse_args does)")


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: ``--optimizer`` with every registry algorithm's Megatron name and
    their hyper-parameters' flags."""
    action = _optimizer_action(parser)
    if action.choices is not None:
        action.choices = list(action.choices) + [n for n in NAMES if n not in action.choices]
    if any("--reg-p" in a.option_strings for a in parser._actions):
        return parser  # already added
    d = _DEFAULTS
    g = parser.add_argument_group(title=f"reg_dist optimizers (--optimizer {', '.join(NAMES)})")
    g.add_argument("--reg-momentum", type=float, default=d.reg_momentum, help="Momentum of the matrix update.")
    g.add_argument("--reg-no-nesterov", dest="reg_nesterov", action="store_false",
                   help="Plain instead of Nesterov momentum.")
    g.add_argument("--reg-rms", type=_positive_float, default=d.reg_rms,
                   help="RMS of the matrix update (scale 'rms'; 'match_rms_adamw' for Muon/MuonEq).")
    g.add_argument("--reg-scale", choices=SCALES, default=d.reg_scale,
                   help="Update scale; default: 'rms' for reg, 'match_rms_adamw' for reg_muon/muoneq.")
    g.add_argument("--reg-p", type=float, default=d.reg_p, help="REG: the RACS exponent p.")
    g.add_argument("--reg-iters", type=_positive_int, default=d.reg_iters, help="REG: RACS iterations.")
    g.add_argument("--reg-eps", type=_positive_float, default=d.reg_eps, help="REG: RACS epsilon.")
    g.add_argument("--reg-ns-steps", type=_positive_int, default=d.reg_ns_steps,
                   help="reg_muon/muoneq: Newton-Schulz steps.")
    g.add_argument("--reg-ns-coefficients", choices=tuple(COEFFICIENTS), default=d.reg_ns_coefficients,
                   help="reg_muon/muoneq/normuon: Newton-Schulz coefficients (default: the optimizer's).")
    g.add_argument("--reg-ns-method", choices=NS_METHODS, default=d.reg_ns_method,
                   help="reg_muon/muoneq/normuon: Newton-Schulz iteration, 'gram' iterates on X X^T "
                        "(default: the optimizer's).")
    g.add_argument("--reg-ns-dtype", choices=tuple(DTYPES), default=d.reg_ns_dtype,
                   help="reg_muon/muoneq: Newton-Schulz matmul dtype.")
    g.add_argument("--reg-move-dtype", choices=tuple(DTYPES), default=d.reg_move_dtype,
                   help="reg_muon/muoneq: dtype of the pieces moved to each matrix's owner "
                        "(default: the Newton-Schulz dtype).")
    g.add_argument("--muoneq-mode", choices=MODES, default=d.muoneq_mode, help="muoneq: equilibration mode.")
    g.add_argument("--muoneq-phase", type=_non_negative_int, default=d.muoneq_phase,
                   help="muoneq with --muoneq-mode rowcol: steps of rowcol before switching to row.")
    g.add_argument("--muoneq-exponent", "--reg-exponent", dest="muoneq_exponent", type=float, default=d.muoneq_exponent,
                   help="The scaling's power: reg's RACS (default -1), muoneq's equilibration (default -0.5).")
    g.add_argument("--reg-tp-mode", choices=("gather", "blockwise"), default=d.reg_tp_mode,
                   help="gather: each tensor-parallel matrix whole, exactly (default); blockwise: each TP block "
                        "its own matrix, no TP traffic (the update then depends on the TP degree).")
    g.add_argument("--reg-distributed-optimizer", choices=("flat", "layer-wise"), default="flat",
                   help="With --use-distributed-optimizer: 'flat' (default), Megatron's DistributedOptimizer, each DP "
                        "rank a flat range of every bucket; 'layer-wise', Megatron's LayerWiseDistributedOptimizer, "
                        "each DP rank whole matrices.")
    g.add_argument("--no-reg-split-qkv", dest="reg_split_qkv", action="store_false",
                   help="Step the fused linear_qkv weight as one matrix instead of q, k, v per query group.")
    for dest, (hyper, takers) in hyper_flags().items():  # the registry's other hyper-parameters
        if dest not in {a.dest for a in parser._actions}:
            g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=_FLAG_TYPES.get(hyper.type, str),
                           default=None, help=f"{', '.join(takers)}: {hyper.name} (default {hyper.default}).")
    _validate_after_parse(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError if ``args`` choose one of our optimizers with invalid or unsupported settings."""
    name = getattr(args, "optimizer", None)
    if name not in NAMES:
        return
    if getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False):
        raise ValueError(f"--optimizer {name} does not support FSDP")
    if getattr(args, "fp16", False):
        raise ValueError(f"--optimizer {name} does not support --fp16 (Megatron's emerging optimizers do not); "
                         f"use --bf16")
    if getattr(args, "moe_grouped_gemm", False):
        raise ValueError(f"--optimizer {name} with --moe-grouped-gemm: " + (
            "megatron-core 0.19.2's --transformer-impl local ignores the flag and builds SequentialMLP experts, "
            "which reg_dist steps (each expert's linear_fc1 / linear_fc2 a matrix): drop it"
            if getattr(args, "transformer_impl", None) == "local" else
            f"{GROUPED_EXPERTS}; drop the flag for SequentialMLP experts"))
    if getattr(args, "save", None) or getattr(args, "load", None):
        _check_checkpoint_format(name, args)
    for dest, (_, takers) in hyper_flags().items():  # a flag unset by default, set for an optimizer without it
        if name not in takers and getattr(_DEFAULTS, dest) is None and getattr(args, dest, None) is not None:
            raise ValueError(f"--{dest.replace('_', '-')} applies only to --optimizer {', '.join(takers)}, not {name}")
    try:
        check_settings(name, settings_from(args=args))
    except ValueError as e:
        raise ValueError(f"--optimizer {name}: {e}") from None


def _check_checkpoint_format(name: str, args: argparse.Namespace) -> None:
    """Raise ValueError if Megatron cannot checkpoint ``name``'s per-row state (NorMuon's) in ``--ckpt-format``:
    Megatron's DDP and layer-wise optimizers map every ``torch_dist`` optimizer tensor to its parameter's shape;
    the flat distributed optimizer's ``torch`` files hold element-shaped state only."""
    fmt = getattr(args, "ckpt_format", None)
    flat = getattr(args, "use_distributed_optimizer", False) and getattr(args, "reg_distributed_optimizer",
                                                                         "flat") == "flat"
    expert_tp = getattr(args, "expert_tensor_parallel_size", None)
    if fmt == "torch" and flat and getattr(args, "num_experts", None) and expert_tp not in (
            None, getattr(args, "tensor_model_parallel_size", 1)):
        raise ValueError(f"--optimizer {name}: the flat distributed optimizer's --ckpt-format torch files hold one "
                         f"TP × PP × EP rank's state each, which needs --expert-tensor-parallel-size equal to "
                         f"--tensor-model-parallel-size; use --ckpt-format torch_dist")
    if not NAMES[name].row_state_keys:
        return
    if fmt == "torch_dist" and not flat:
        raise ValueError(f"--optimizer {name} keeps per-row state, which Megatron's torch_dist checkpoints of its DDP "
                         f"and layer-wise optimizers cannot hold: use --ckpt-format torch, or "
                         f"--use-distributed-optimizer with --reg-distributed-optimizer flat")
    if fmt == "torch" and flat:
        raise ValueError(f"--optimizer {name} keeps per-row state, which the flat distributed optimizer checkpoints "
                         f"in --ckpt-format torch_dist only")


def _validate_after_parse(parser: argparse.ArgumentParser) -> None:
    """Check our flags right after ``parser`` parses (argparse's own error: usage + message, exit 2)."""
    parse_known = parser.parse_known_args

    def parse_known_args(*a, **k):
        args, rest = parse_known(*a, **k)
        try:
            check_args(args)
        except ValueError as e:
            parser.error(str(e))
        if args.optimizer in NAMES:  # what validate_args will rewrite (see parse_and_validate_args)
            args.reg_use_distributed_optimizer = bool(getattr(args, "use_distributed_optimizer", False))
        return args, rest

    parser.parse_known_args = parse_known_args


def keep_distributed_optimizer(args: argparse.Namespace) -> argparse.Namespace:
    """Undo, for our optimizers with ``--reg-distributed-optimizer flat`` (the default), what Megatron's
    ``validate_args`` does to every optimizer but adam and sgd: ``--use-distributed-optimizer`` becomes its
    layer-wise optimizer; ``layer-wise`` keeps that."""
    if getattr(args, "reg_use_distributed_optimizer", False) and args.optimizer in NAMES \
            and args.reg_distributed_optimizer == "flat":
        args.use_distributed_optimizer, args.use_layer_wise_distributed_optimizer = True, False
    return args


def extend_megatron_arguments() -> None:
    """Make every parser ``megatron.training.arguments`` builds in this process take our flags (idempotent).
    ``pretrain`` parses ``sys.argv`` again without any ``extra_args_provider`` (``ft_integration.setup``,
    ``inprocess_restart``), which would refuse ``--optimizer reg``."""
    from megatron.training import arguments

    original = arguments.add_megatron_arguments
    if getattr(original, "_reg_dist", False):
        return

    @functools.wraps(original)
    def add_megatron_arguments(parser):
        return extra_args_provider(original(parser))

    add_megatron_arguments._reg_dist = True
    arguments.add_megatron_arguments = add_megatron_arguments


def parse_and_validate_args(*providers, args_defaults: dict | None = None) -> argparse.Namespace:
    """Megatron's ``parse_and_validate_args`` (parse, ``validate_args``, set the global arguments) with
    our flags (in every Megatron parser from now on: ``extend_megatron_arguments``) and then each of
    ``providers``, keeping the flat distributed optimizer for ours (``keep_distributed_optimizer``)."""
    from megatron.training.arguments import parse_and_validate_args as megatron_parse

    extend_megatron_arguments()
    return keep_distributed_optimizer(megatron_parse(with_args(*providers), args_defaults=args_defaults or {}))


def with_args(*providers):
    """One ``extra_args_provider`` running ours, then each of ``providers`` (a user's own) in order."""

    def provider(parser):
        parser = extra_args_provider(parser)
        for extra in providers:
            if extra is not None:
                parser = extra(parser)
        return parser

    return provider


def optimizer_config(args=None, **overrides):
    """Megatron's ``OptimizerConfig`` from ``args`` (a Namespace; fields it lacks keep their defaults)
    and ``overrides``, carrying our ``Settings`` as attributes (read first by the registry entries)."""
    from megatron.core.optimizer import OptimizerConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimizerConfig) if hasattr(args, f.name)}
    ours = {k: overrides.pop(k) for k in list(overrides) if k in Settings.__dataclass_fields__}
    config = OptimizerConfig(**{**values, **overrides})
    settings = dataclasses.replace(settings_from(args=args if args is not None else Settings()), **ours)
    for f in dataclasses.fields(Settings):
        setattr(config, f.name, getattr(settings, f.name))
    return config

