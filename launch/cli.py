"""The command line of ``launch/train.py``: its flags and their checks, and the optimizers and their own
hyper-parameter flags (``MATRIX_OPTIMIZERS``, ``OPTIMIZERS``, ``OPTIMIZER_FLAGS``), read from reg_dist's
registry: every algorithm there is an ``--optimizer`` choice, and every hyper-parameter of theirs a flag
(refused for an optimizer that has no such hyper-parameter). The loop (``launch.loop.build_optimizer``)
and the DeepSpeed checks read them from here."""

import argparse
import math
import os
import time
import typing
from pathlib import Path
from typing import NamedTuple

import torch

from launch.checkpoints import CHECKPOINTS, find_checkpoint, find_init
from launch.data import DEFAULT_CACHE, DOMAINS
from launch.deepspeed_job import check_args as check_deepspeed_args
from launch.model import GPTConfig
from launch.ranks import is_rank0, world_env
from reg_dist.ops.newton_schulz import NS_METHODS
from reg_dist.optim import registry

DESCRIPTION = ("Train the byte-level GPT of ``launch.model`` on a corpus of ``launch.data`` (``--data stdlib``,\n"
               "Python sources; ``pydoc``, English reference text), on one rank or many (data × tensor parallel).")
# ---- the optimizers and their own flags: the one place that names them ---------------------------
MATRIX_OPTIMIZERS = {name: entry.cls for name, entry in registry.ALGORITHMS.items()}
OPTIMIZERS = (*MATRIX_OPTIMIZERS, "adamw")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
OWN_FLAGS = ("lr", "weight_decay", "adamw_betas", "adamw_eps", "nonfinite", "nesterov")  # flags of the job's own


class Flag(NamedTuple):
    """An optimizer's own hyper-parameter flag. Its argparse default is None: the optimizer's own
    default (``default``, shown by --help) applies unless the flag is given."""
    keyword: str                   # the optimizer's keyword argument
    applies: tuple[str, ...]       # the optimizers it applies to (given to another: refused)
    default: object                # the optimizer's default, for --help
    help: str
    type: type = float
    check: str = ""                # "unit": in [0, 1); "positive": finite and > 0; "count": >= 1
    choices: tuple | None = None


def _flag(keyword: str, help: str, **kw) -> Flag:
    """The flag of registry hyper-parameter ``keyword``: the optimizers that have it, and its default."""
    takers = tuple(n for n in MATRIX_OPTIMIZERS if keyword in registry.schema(n))
    hyper = registry.schema(takers[0])[keyword]
    defaults = {n: registry.schema(n)[keyword].default for n in takers}
    default = next((k for k, v in DTYPES.items() if v == hyper.default), hyper.default)
    if len(set(map(repr, defaults.values()))) > 1:
        default = ", ".join(f"{n} {d}" for n, d in defaults.items())
    base = [t for t in typing.get_args(hyper.type) if t is not type(None)] or [hyper.type]  # X | None: X
    kind = {int: int, str: str, torch.dtype: str}.get(base[0], float)
    choices = tuple(DTYPES) if hyper.type is torch.dtype else None
    return Flag(keyword, takers, default, f"{'/'.join(takers)}: {help}", **{"type": kind, "choices": choices, **kw})


# the flags of the job (named here), then one per other hyper-parameter of the registry (--<name>)
OPTIMIZER_FLAGS = {
    "momentum": _flag("momentum", "momentum of the matrix update", check="unit"),
    "rms": _flag("rms", "update RMS, matched to AdamW's", check="positive"),
    "reg_p": _flag("p", "the RACS norm exponent p", check="positive"),
    "reg_iters": _flag("iters", "RACS iterations (with --tol: at most)", check="count"),
    "tol": _flag("tol", "iterate RACS until the row and column norms agree within this (max/min - 1); 0: exactly "
                        "--reg-iters times"),
    "stats": _flag("stats", "what RACS's first statistics are of", choices=("momentum", "gradient")),
    "stats_beta": _flag("stats_beta", "running average of RACS's statistics over steps (0: this step's)", check="unit"),
    "exponent": _flag("exponent", "the scaling's power per side (-0.5: a symmetric Ruiz step; -1: full normalisation)"),
    "ns_steps": _flag("ns_steps", "Newton-Schulz steps", check="count"),
    "ns_method": _flag("ns_method", "Newton-Schulz iteration ('gram': on X X^T)", choices=NS_METHODS),
    "muoneq_mode": _flag("mode", "the equilibration before Newton-Schulz", choices=("row", "col", "rowcol")),
}
OPTIMIZER_FLAGS.update({
    keyword: _flag(keyword, keyword.replace("_", " "))
    for keyword in dict.fromkeys(k for n in MATRIX_OPTIMIZERS for k in registry.schema(n))
    if keyword not in OWN_FLAGS and keyword not in {f.keyword for f in OPTIMIZER_FLAGS.values()}})
# --flag (as an argument name): (keyword of the optimizer, the optimizers it applies to)
HYPER_PARAMETERS = {name: (flag.keyword, flag.applies) for name, flag in OPTIMIZER_FLAGS.items()}

RUNS = Path(__file__).resolve().parents[1] / "runs"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose messages (help, usage, errors) only rank 0 prints; every rank exits."""

    def _print_message(self, message: str, file=None) -> None:
        if is_rank0():
            super()._print_message(message, file)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, once: ``(default: X)`` is added unless the help
    already states one (a switch's is ``off``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "(default" in text or default is argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction)):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) if default else "none"
        else:
            shown = "none" if default is None else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=DESCRIPTION, formatter_class=HelpFormatter,
               epilog="The full description (parallelism, checkpoints, resuming) is launch/train.py's docstring.")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="reg",
                   help="the optimizer: one of reg_dist's (hidden matrices; the rest to their internal AdamW), "
                        "or torch's AdamW for everything")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (every parameter group)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (every parameter group)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW's betas (--optimizer adamw, and the AdamW inside REG/Muon/MuonEq)")
    for name, flag in OPTIMIZER_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=flag.type, choices=flag.choices, default=None,
                       help=f"{flag.help} (default: {flag.default})")
    p.add_argument("--matrix-embeddings", action="store_true",
                   help="the embeddings and the tied output head to the matrix optimizer too (by default AdamW "
                        "updates them, the hybrid the REG paper recommends)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (windows per step), split over dp (default: 16; with --deepspeed: the config's)")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per training window (the model's context)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks of the model")
    p.add_argument("--width", type=int, default=128, help="the model's hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block; must divide --width")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=1.0,
                   help="max global norm of the raw (dp-averaged) gradients; 0 disables")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and of the data order")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads per rank (default: torch's choice in one process; "
                        "cores / local ranks under torchrun)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks (default: world size / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks; must divide --heads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo under torchrun) or cuda (one GPU per local rank, nccl)")
    p.add_argument("--save-every", type=int, default=0,
                   help="steps between checkpoints under OUT/checkpoints; the last step is always saved "
                        "(unless --no-save); 0: only the last step")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write no checkpoint, not even the final one (a rerun then cannot resume)")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints kept (the newest); 0 keeps all")
    p.add_argument("--resume", default="auto", metavar="PATH|auto|none",
                   help="checkpoint directory, or run directory (its newest complete checkpoint), to continue "
                        "from; auto: --out's newest complete checkpoint if it has one (so a rerun with the same "
                        "--out continues, and a finished one trains nothing); none: start afresh")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out (starting afresh: its checkpoints are deleted)")
    # test only: this rank (default: the last) kills itself (SIGKILL) in step N on torchrun's first attempt
    p.add_argument("--die-at-step", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--die-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", type=Path, default=None, metavar="CONFIG",
                   help="train through reg_dist.deepspeed.initialize with this DeepSpeed JSON config "
                        "(see launch/deepspeed_job.py)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    p.add_argument("--data", choices=DOMAINS, default="stdlib",
                   help="the domain trained and validated on: stdlib (Python sources) or pydoc (English "
                        "reference text)")
    p.add_argument("--eval-also", choices=DOMAINS, action="append", default=[], metavar="DOMAIN",
                   help="also validate on this domain at every evaluation (repeatable; e.g. forgetting after "
                        "fine-tuning)")
    p.add_argument("--init", type=Path, default=None, metavar="PATH",
                   help="start from the model weights of this checkpoint (or run directory: its newest) with a fresh "
                        "optimizer, schedule and data stream: fine-tuning. The model must match; ignored on resume")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE, help="cache of the corpus token files")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory: log.json and checkpoints/ (default: runs/OPTIMIZER, with --deepspeed "
                        "runs/deepspeed-OPTIMIZER, so that rerunning the same command resumes; with --resume PATH: "
                        "the checkpoint's run directory)")
    args = p.parse_args(argv)
    counts = [name for name, flag in OPTIMIZER_FLAGS.items() if flag.check == "count"]
    for name in ("steps", "batch_size", "seq_len", "depth", "width", "heads", "eval_every", "eval_batches", "log_every",
                 "threads", "dp", "tp", *counts):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("save_every", "keep"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.save_every and not args.save:
        p.error(f"--save-every {args.save_every} with --no-save: choose one")
    for name in ("lr", "weight_decay", "clip"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.warmup <= args.steps:
        p.error(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    try:
        args.model = GPTConfig(depth=args.depth, width=args.width, heads=args.heads, seq_len=args.seq_len)
    except ValueError as e:
        p.error(str(e))
    if args.deepspeed is not None:
        check_deepspeed_args(p, args, decided=("optimizer", "lr", "weight_decay", "clip", "betas", *OPTIMIZER_FLAGS))
        if args.init is not None or args.eval_also or args.matrix_embeddings:
            p.error("--init, --eval-also and --matrix-embeddings are not supported with --deepspeed yet")
    else:
        if args.matrix_embeddings and args.optimizer not in MATRIX_OPTIMIZERS:
            p.error(f"--matrix-embeddings applies to --optimizer {' or '.join(MATRIX_OPTIMIZERS)}, "
                    f"not {args.optimizer}")
        check_hyper_parameters(p, args)
        args.batch_size = 16 if args.batch_size is None else args.batch_size
    check_parallel(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and world_env()["local_world"] > torch.cuda.device_count():
        p.error(f"{world_env()['local_world']} local ranks but {torch.cuda.device_count()} CUDA device(s)")
    if args.out is None and args.resume in ("auto", "none"):  # the default run directory: runs/OPTIMIZER
        args.out = RUNS / (args.optimizer if args.deepspeed is None else f"deepspeed-{args.optimizer}")
    path, args.meta = find_checkpoint(p, args)  # a torchrun restart turns --resume into auto
    args.resume_mode, args.resume = args.resume, path
    args.init = find_init(p, args) if args.init is not None and args.resume is None else None
    run_dir_of_checkpoint = None
    if args.resume is not None and args.resume.parent.name == CHECKPOINTS:
        run_dir_of_checkpoint = args.resume.parent.parent
    if args.out is None:
        args.out = run_dir_of_checkpoint or RUNS / f"{args.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.continuing = run_dir_of_checkpoint is not None and args.out.resolve() == run_dir_of_checkpoint.resolve()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0  # torchrun restarted this job
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.overwrite or args.continuing or restarted):
        p.error(f"--out {args.out} exists and is not empty: pass --overwrite to write into it "
                f"(or choose another run directory)")
    return args


def check_hyper_parameters(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The optimizer's own flags: in range, and given only to an optimizer they apply to; sets
    ``args.hyper`` (the optimizer's keyword arguments beyond lr and weight decay)."""
    in_unit = {"--betas": args.betas, **{f"--{name.replace('_', '-')}": [getattr(args, name)]
                                         for name, flag in OPTIMIZER_FLAGS.items() if flag.check == "unit"}}
    positive = {f"--{name.replace('_', '-')}": getattr(args, name)
                for name, flag in OPTIMIZER_FLAGS.items() if flag.check == "positive"}
    for flag, values in in_unit.items():
        if not all(v is None or (math.isfinite(v) and 0 <= v < 1) for v in values):
            p.error(f"{flag} must be in [0, 1), got {' '.join(map(str, values))}")
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"{flag} must be a finite number > 0, got {value}")
    args.hyper = {}
    for name, flag in OPTIMIZER_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.optimizer not in flag.applies:
            p.error(f"--{name.replace('_', '-')} applies to --optimizer {' or '.join(flag.applies)}, "
                    f"not {args.optimizer}")
        args.hyper[flag.keyword] = DTYPES[value] if flag.choices == tuple(DTYPES) else value
    if args.optimizer in MATRIX_OPTIMIZERS:
        check_with_the_optimizer(p, args)


def check_with_the_optimizer(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The optimizer's own checks of every hyper-parameter (``--scale``, ``--coefficients``,
    ``--eps``, ...), run now on one 2 × 2 matrix so that a bad value is a usage error, not a
    traceback after the model is built; the message names the flag."""
    probe = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        MATRIX_OPTIMIZERS[args.optimizer]([{"params": [probe], "algorithm": MATRIX_OPTIMIZERS[args.optimizer].algorithm}], lr=args.lr,
                                          weight_decay=args.weight_decay, **args.hyper)
    except (ValueError, TypeError) as e:
        flags = [f"--{name.replace('_', '-')}" for name, flag in OPTIMIZER_FLAGS.items()
                 if getattr(args, name) is not None and str(e).startswith(flag.keyword)]
        p.error(f"{' '.join(flags) or '--optimizer ' + args.optimizer}: {e}")


def check_parallel(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.dp``, ``args.tp`` against the world size (torchrun's) and the model; sets ``args.world``."""
    for what, n in (("--heads", args.heads), ("--width", args.width), ("4 × --width (the MLP)", 4 * args.width)):
        if n % args.tp:
            p.error(f"--tp {args.tp} must divide {what} = {n}")
    world = args.world = world_env()["world"]
    launch = "torchrun --nproc_per_node × nodes" if world > 1 else "one process: launch with torchrun for more"
    if args.dp is None:
        if world % args.tp:
            p.error(f"world size {world} ({launch}) is not divisible by --tp {args.tp}")
        args.dp = world // args.tp
    if args.dp * args.tp != world:
        p.error(f"world size {world} ({launch}) must equal --dp × --tp = {args.dp} × {args.tp} = {args.dp * args.tp}")
    if args.batch_size % args.dp:
        p.error(f"--batch-size {args.batch_size} (the global batch) must be divisible by dp = {args.dp}")
