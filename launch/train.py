"""Train the byte-level GPT of ``launch.model`` on a corpus of ``launch.data`` (``--data stdlib``,
Python sources; ``pydoc``, English reference text), on one rank or many (data × tensor parallel).

    python launch/train.py                                  # one process: REG with the defaults
    python launch/train.py --optimizer muon --steps 50 --out runs/muon
    python launch/train.py --optimizer reg --data pydoc --init runs/adamw --eval-also stdlib  # fine-tune
    torchrun --standalone --nproc_per_node=2 launch/train.py              # dp = 2 (what `make train` runs)
    torchrun --standalone --nproc_per_node=4 launch/train.py --dp 2 --tp 2
    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_reg.json   # DeepSpeed: launch/deepspeed_job.py

Prints (rank 0 only) the optimizer's routing table, then a progress line every --log-every steps,
and writes ``log.json`` (args, per-step train loss / lr / tokens per second, validation losses,
final numbers) to the run directory --out, rewritten atomically at every evaluation and at the end.
The learning rate warms up linearly for --warmup steps, then follows a cosine down to 10% at the
last step. Each optimizer's own hyper-parameters have flags (``--betas``; ``--momentum``, ``--rms``
for REG/Muon/MuonEq; ``--reg-p``, ``--reg-iters``; ``--ns-steps``; ``--muoneq-mode``); a flag given
to an optimizer it does not apply to is refused. ``--init CHECKPOINT`` starts from another run's
model weights (the same model) with a fresh optimizer, schedule and data stream: fine-tuning;
``--eval-also DOMAIN`` validates on a second domain too (``val_also`` in the log: forgetting).

Parallelism. Under torchrun the world (gloo on the CPU; nccl with ``--device cuda``) is a
``(dp, tp)`` mesh, ``dp × tp = world`` (``--dp`` defaults to world / ``--tp``). Each dp rank reads
its own ``batch_size / dp`` rows of every global batch of ``--batch-size`` windows (the union is
the single-process batch); the tp ranks of one dp rank read the same rows. With ``tp > 1`` each
block's attention (``qkv`` column-parallel on whole heads, ``proj`` row-parallel) and MLP (``fc``
column-, ``proj`` row-parallel) are DTensors on ``mesh["tp"]``; the ``qkv`` rows are first
permuted to the head-major order, so the model computes the single-process function. REG, Muon
and MuonEq are built with ``mesh=`` (their native data parallelism: ``opt.step()`` itself
averages the gradients over dp, owners alone keep state); ``--optimizer adamw`` gets the
gradients all-reduced (averaged) over dp here and steps ``torch.optim.AdamW`` on every rank.
The reported train loss and validation loss are averages over dp, equal to the single-process ones.

Gradient clipping (``--clip``) is by the global norm of the dp-averaged gradient, as in one
process. With dp > 1 the gradients are all-reduced (SUM, ÷ dp) over dp first, so that every rank
holds the averaged gradient; its norm (shards of TP tensors summed over tp, replicated tensors
counted once) gives the clip coefficient, applied on every rank. ``opt.step()`` of the native mode
then reduce-scatters dp identical copies and divides by dp: it gets the same averaged values back,
bit for bit where the sum of dp copies is exact (dp = 2: x + x and ÷ 2 are; gloo also gives back
x exactly for dp = 4), within one rounding (≤ 1 ulp) otherwise (dp = 3 on gloo); see
tests/test_launch.py. The price is one extra all-reduce of the gradients per step, paid only when
clipping under dp > 1.

Checkpoints. ``--save-every N`` writes ``OUT/checkpoints/step-NNNNNN/`` (and at the last step) in
``torch.distributed.checkpoint`` (DCP) form, every rank writing only what it holds: ``model/`` (the
model's tensors, TP shards as DTensors, replicated tensors once; the ``train`` state: step,
scheduler, the data stream's position; each rank's RNG state; rank 0's log) and ``optimizer/``
(``reg_dist.checkpoint`` for REG/Muon/MuonEq: its state as rectangles of each parameter's logical
tensor, whatever rank owns it; DCP's optimizer state dict for AdamW), then ``meta.json``, the
completion marker, written last. It is written as ``.step-NNNNNN.tmp`` and renamed once complete,
so a checkpoint cut short (a rank lost mid-save) is never picked: the newest ``step-N`` with its
``meta.json`` is. ``--keep K`` (default 3; 0: all) keeps the newest K. The ``qkv`` weights (and
their optimizer state) are saved in the head-major row order every tp > 1 holds, permuted on the
way in and out at tp = 1, so that a checkpoint is one logical model at any tp; ``read_model(dir)``
gives it as plain full tensors in one process. Every rank writes into the same directory (several
nodes would need a shared file system).

Resuming. ``--resume auto`` (the default) continues from --out's newest complete checkpoint when
it has one, so a job rerun with the same command (or restarted by ``torchrun --max-restarts=R``:
pass --out) picks up where it stopped, losing at most the steps since the last checkpoint; a
rerun of a finished run (its checkpoint at --steps) trains nothing. ``--resume PATH`` names a
checkpoint directory or a run directory (its newest complete checkpoint); ``--resume none`` starts
afresh (into a non-empty --out only with --overwrite, which deletes its checkpoints). A torchrun
restart (``TORCHELASTIC_RESTART_COUNT`` > 0) continues from --out's newest complete checkpoint
whatever --resume says. Resuming in its own run directory from an older checkpoint deletes the
later ones (a trajectory abandoned: never to be picked by a later auto-resume). The model,
optimizer, batch size and sequence length must match; dp and tp need not. The data position is
global: every dp rank draws the whole global batch of windows from one generator (the same state
on every rank) and keeps its rows, so the global batch sequence does not depend on dp and a resume
at another dp × tp trains on exactly the batches the uninterrupted run would have. At the same
dp × tp the continued run is bit for bit the uninterrupted one; at another it differs only as the
layouts themselves differ (the order of the sums over dp and tp: ~1e-7 relative for REG and AdamW;
Muon and MuonEq's default bf16 Newton–Schulz, and their bf16 owner moves at tp > 1, make that
~1e-4–1e-3). The RNG state (nothing draws from it in training: no dropout) is each rank's own at the
same layout, else that of the saved rank at the same (dp, tp) coordinates modulo the saved sizes.
Without --out a resumed run writes into the checkpoint's run directory; a new --out that exists
and is not empty is refused unless --overwrite (a torchrun restart may write into its own --out).
Under torchrun the process group is made on the agent's store with a prefix of its own per attempt
(``attempt_store``): torch 2.13 keeps one store across restarts and adds none, and a restarted rank
could otherwise read the dead attempt's addresses.

Every invalid input (arguments, world size, checkpoint) exits non-zero with one message (printed by
rank 0) before any training step.
"""

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.constants import default_pg_timeout  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

from launch.data import DEFAULT_CACHE, DOMAINS, ByteWindows, build_corpus  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402
from reg_dist import REG, Muon, MuonEq  # noqa: E402
from reg_dist import checkpoint as reg_checkpoint  # noqa: E402

MATRIX_OPTIMIZERS = {"reg": REG, "muon": Muon, "muoneq": MuonEq}
OPTIMIZERS = (*MATRIX_OPTIMIZERS, "adamw")
RUNS = Path(__file__).resolve().parents[1] / "runs"
FINAL_LR_FRACTION = 0.1
BAR = 20  # characters of the progress bar
CHECKPOINTS = "checkpoints"
META = "meta.json"
# what a checkpoint must match to be resumed (besides the world layout)
RESUME_MUST_MATCH = ("optimizer", "model", "batch_size", "seq_len", "data")
# --flag: (keyword of the optimizer, the optimizers it applies to); None leaves the optimizer's default
HYPER_PARAMETERS = {
    "momentum": ("momentum", ("reg", "muon", "muoneq")),
    "rms": ("rms", ("reg", "muon", "muoneq")),
    "reg_p": ("p", ("reg",)),
    "reg_iters": ("iters", ("reg",)),
    "ns_steps": ("ns_steps", ("muon", "muoneq")),
    "muoneq_mode": ("mode", ("muoneq",)),
}


def world_env() -> dict[str, int]:
    """Rank, world size, local rank and local world size as torchrun sets them (one process: 0, 1, 0, 1)."""
    return {key: int(os.environ.get(var, default)) for key, var, default in (
        ("rank", "RANK", 0), ("world", "WORLD_SIZE", 1), ("local_rank", "LOCAL_RANK", 0),
        ("local_world", "LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))}  # LOCAL_SIZE: the deepspeed launcher's


def is_rank0() -> bool:
    return (dist.get_rank() if dist.is_initialized() else world_env()["rank"]) == 0


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose messages (help, usage, errors) only rank 0 prints; every rank exits."""

    def _print_message(self, message: str, file=None) -> None:
        if is_rank0():
            super()._print_message(message, file)


def die(message: str, code: int = 1):
    """Exit every rank with ``code``; rank 0 prints ``message``. (Every rank must call it.)"""
    if is_rank0():
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="reg")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (every parameter group)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW's betas (--optimizer adamw, and the AdamW inside REG/Muon/MuonEq)")
    p.add_argument("--momentum", type=float, default=None, help="REG/Muon/MuonEq momentum (default 0.95)")
    p.add_argument("--rms", type=float, default=None,
                   help="REG/Muon/MuonEq update RMS, matched to AdamW's (default 0.2)")
    p.add_argument("--reg-p", type=float, default=None, help="REG: the RACS norm exponent p (default 2)")
    p.add_argument("--reg-iters", type=int, default=None, help="REG: RACS iterations (default 1)")
    p.add_argument("--ns-steps", type=int, default=None, help="Muon/MuonEq: Newton-Schulz steps (default 5)")
    p.add_argument("--muoneq-mode", choices=("row", "col", "rowcol"), default=None,
                   help="MuonEq: the equilibration before Newton-Schulz (default row)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (windows per step), split over dp (default 16; with --deepspeed: the config's)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=1.0,
                   help="max global norm of the raw (dp-averaged) gradients; 0 disables")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads per rank (default: torch's choice in one process; "
                        "cores / local ranks under torchrun)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks (default: world size / --tp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks; must divide --heads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo under torchrun) or cuda (one GPU per local rank, nccl)")
    p.add_argument("--save-every", type=int, default=0,
                   help="steps between checkpoints under OUT/checkpoints (and at the last step); 0 disables")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints kept (the newest); 0 keeps all")
    p.add_argument("--resume", default="auto", metavar="PATH|auto|none",
                   help="checkpoint directory, or run directory (its newest complete checkpoint), to continue "
                        "from; auto: --out's newest complete checkpoint if it has one; none: start afresh")
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
                   help="run directory (default: runs/OPTIMIZER-TIMESTAMP; resuming: the checkpoint's)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "depth", "width", "heads", "eval_every", "eval_batches", "log_every",
                 "threads", "dp", "tp", "reg_iters", "ns_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("save_every", "keep"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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
        from launch.deepspeed_job import check_args
        check_args(p, args)
        if args.init is not None or args.eval_also:
            p.error("--init and --eval-also are not supported with --deepspeed yet")
    else:
        check_hyper_parameters(p, args)
        args.batch_size = 16 if args.batch_size is None else args.batch_size
    check_parallel(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and world_env()["local_world"] > torch.cuda.device_count():
        p.error(f"{world_env()['local_world']} local ranks but {torch.cuda.device_count()} CUDA device(s)")
    args.resume, args.meta = find_checkpoint(p, args) if args.deepspeed is None else (None, None)
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
    in_unit = {"--betas": args.betas, "--momentum": [args.momentum]}
    positive = {"--rms": args.rms, "--reg-p": args.reg_p}
    for flag, values in in_unit.items():
        if not all(v is None or (math.isfinite(v) and 0 <= v < 1) for v in values):
            p.error(f"{flag} must be in [0, 1), got {' '.join(map(str, values))}")
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"{flag} must be a finite number > 0, got {value}")
    args.hyper = {}
    for flag, (keyword, applies) in HYPER_PARAMETERS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if args.optimizer not in applies:
            p.error(f"--{flag.replace('_', '-')} applies to --optimizer {' or '.join(applies)}, not {args.optimizer}")
        args.hyper[keyword] = value


def find_init(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The checkpoint ``--init`` names (a checkpoint directory, or a run directory's newest complete one),
    checked to hold this model."""
    path = named_checkpoint(p, "--init", args.init)
    meta = read_meta(p, "--init", path)
    if meta.get("model") != asdict(args.model):
        p.error(f"--init {path}: the checkpoint's model is {meta.get('model')}, this run's {asdict(args.model)}")
    if not (path / MODEL_DIR / ".metadata").is_file():
        p.error(f"--init {path}: incomplete checkpoint, no {MODEL_DIR}/.metadata")
    return path


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


def find_checkpoint(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    """The checkpoint ``--resume`` names and its meta, checked: a checkpoint directory, or a run
    directory (its newest complete checkpoint); ``auto``: the newest complete one of --out, if any."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if restarted and args.out is not None and complete_checkpoints(args.out):
        args.resume = "auto"  # a torchrun restart continues this job from its own newest checkpoint
    if args.resume == "none":
        return None, None
    if args.resume == "auto":
        found = complete_checkpoints(args.out) if args.out is not None else []
        if not found:
            return None, None
        path = found[-1]
    else:
        path = named_checkpoint(p, "--resume", Path(args.resume))
    meta = read_meta(p, "--resume", path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        p.error(f"--resume {path}: a checkpoint in {meta.get('format', 'the per-rank rank{r}.pt format')} of an "
                f"earlier train.py, not {CHECKPOINT_FORMAT}: it cannot be resumed")
    ours = run_identity(args)
    for key in RESUME_MUST_MATCH:
        if meta.get(key) != ours[key]:
            p.error(f"--resume {path}: the checkpoint has {key} {meta.get(key)}, this run {ours[key]}"
                    + (" (a checkpoint of another optimizer)" if key == "optimizer" else ""))
    step = meta["step"]
    if step > args.steps or (step == args.steps and args.resume != "auto"):
        p.error(f"--resume {path} is at step {step}, already at or past --steps {args.steps}")
    for part in (MODEL_DIR, OPTIMIZER_DIR):
        if not (path / part / ".metadata").is_file():
            p.error(f"--resume {path}: incomplete checkpoint, no {part}/.metadata")
    return path, meta


def named_checkpoint(p: argparse.ArgumentParser, flag: str, path: Path) -> Path:
    """``path`` if it is a checkpoint directory, else the run directory ``path``'s newest complete one."""
    if (path / META).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        p.error(f"{flag} {path}: no checkpoint there (expected a checkpoint directory with {META}, "
                f"or a run directory with a complete {CHECKPOINTS}/step-N)")
    return found[-1]


def read_meta(p: argparse.ArgumentParser, flag: str, path: Path) -> dict:
    """The checkpoint's ``meta.json``, its step and layout checked to be integers."""
    try:
        meta = json.loads((path / META).read_text())
        meta.update({k: int(meta[k]) for k in ("step", "world", "dp", "tp")})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        p.error(f"{flag} {path}: corrupt checkpoint, cannot read {META}: {e!r}")
    return meta


def run_identity(args: argparse.Namespace) -> dict:
    return {"world": args.world, "dp": args.dp, "tp": args.tp, "optimizer": args.optimizer,
            "model": asdict(args.model), "batch_size": args.batch_size, "seq_len": args.seq_len, "data": args.data}


# ---- parallelism ------------------------------------------------------------------------------
def parallelize(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Tensor parallelism over ``tp_mesh`` for every block: attention (``qkv`` column-parallel with
    whole heads per rank, ``proj`` row-parallel) and MLP (``fc`` column-, ``proj`` row-parallel).

    The ``qkv`` rows are first permuted to the head-major order, so that each rank's contiguous
    block of rows holds the q, k and v of its own heads; the function computed does not change.
    """
    tp = tp_mesh.size()
    for block in model.blocks:
        attn = block.attn
        with torch.no_grad():
            attn.qkv.weight.copy_(attn.qkv.weight[attn.head_major_order()])
        attn.head_major, attn.heads = True, attn.heads // tp
        parallelize_module(block, tp_mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_mean_(tensors: list[Tensor], group, size: int) -> None:
    """``tensors`` (local shards) ← their mean over ``group``: one flat all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(size)
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


def clip_grad_norm(params: list[Tensor], max_norm: float, tp_group) -> float:
    """``nn.utils.clip_grad_norm_`` for a model whose TP tensors are DTensors: the global norm sums the
    squares of the shards over tp and counts a replicated tensor once; every grad × min(1, max/(norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if tp_group is None and not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(params, max_norm).item()
    sq = torch.zeros(2, dtype=torch.float32, device=local(grads[0]).device)  # [replicated, sharded over tp]
    for g in grads:
        sharded = isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements)
        sq[int(sharded)] += torch.linalg.vector_norm(local(g), dtype=torch.float32) ** 2
    if tp_group is not None:
        dist.all_reduce(sq[1:], group=tp_group)
    norm = sq.sum().sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return norm.item()


def attempt_store(env: dict[str, int]) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix of its own for this attempt (None: ``env://``).

    The agent keeps one store for all its restarts and ``env://`` adds no per-attempt prefix (torch
    2.13), so without one the ranks of a restarted job can read the addresses of the attempt before,
    whose ranks are dead, and fail to connect (seen with gloo: "connectFullMesh ... Connection refused")."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env["world"],
                           is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"/launch.train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


# arguments a rank may hold on its own (its node's paths and threads; rank 0's --out is broadcast)
NODE_LOCAL_ARGS = ("local_rank", "threads", "data_dir", "out", "resume", "meta", "init", "continuing", "overwrite",
                   "log_every", "die_at_step", "die_rank")


def check_same_run(args: argparse.Namespace) -> None:
    """Exit every rank, naming the argument and the ranks, unless all ranks (every node's torchrun)
    parsed the same run arguments; collective, before the mesh (another --dp or --tp would hang it)."""
    ours = {k: repr(v) for k, v in vars(args).items() if k not in NODE_LOCAL_ARGS}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, ours)
    differ = []
    for key in dict.fromkeys(k for theirs in every for k in theirs):
        ranks: dict[str, list[int]] = {}
        for rank, theirs in enumerate(every):
            ranks.setdefault(theirs.get(key, "(none)"), []).append(rank)
        if len(ranks) > 1:
            differ.append(f"--{key.replace('_', '-')} is " + ", ".join(
                f"{value} on ranks {r[:8]}{' …' if len(r) > 8 else ''}" for value, r in ranks.items()))
    if differ:
        die("the ranks (nodes) were started with different arguments: " + "; ".join(differ))


class Parallel:
    """The process group and mesh (or none, in one process) and the collectives the loop needs."""

    def __init__(self, args: argparse.Namespace) -> None:
        env = world_env()
        self.world, self.dp, self.tp = args.world, args.dp, args.tp
        if args.device == "cuda":
            torch.cuda.set_device(env["local_rank"])
            self.device = torch.device("cuda", env["local_rank"])
        else:
            self.device = torch.device("cpu")
        self.mesh = self.dp_group = self.tp_group = None
        self.rank = self.dp_rank = 0
        if self.world > 1:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo", store=attempt_store(env),
                                    rank=env["rank"], world_size=self.world,
                                    device_id=self.device if args.device == "cuda" else None)
            check_same_run(args)
            self.mesh = init_device_mesh(args.device, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
            self.rank = dist.get_rank()
            self.dp_rank = self.mesh.get_local_rank("dp")
            self.dp_group = self.mesh.get_group("dp") if self.dp > 1 else None
            self.tp_group = self.mesh.get_group("tp") if self.tp > 1 else None
        self.rank0 = self.rank == 0

    def mean_over_dp(self, value: float) -> float:
        if self.dp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return t.item() / self.dp

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error message, if any rank has one (every rank learns it)."""
        if self.world == 1:
            return error
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


# ---- optimizer, schedule, evaluation ------------------------------------------------------
def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    mesh: DeviceMesh | None = None, betas: tuple[float, float] = (0.9, 0.95),
                    **hyper) -> torch.optim.Optimizer:
    """REG/Muon/MuonEq on the model (hidden matrices; the rest to their internal AdamW) with their
    keyword arguments ``hyper``, and ``mesh=`` (native data parallelism) under torchrun; or plain AdamW
    (TP shards in a group of their own)."""
    if name == "adamw":
        params = list(model.parameters())
        groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                              [p for p in params if not isinstance(p, DTensor)]) if g]
        return torch.optim.AdamW([{"params": g} for g in groups], lr=lr, betas=betas,
                                 weight_decay=weight_decay, fused=True)
    return MATRIX_OPTIMIZERS[name](model, lr=lr, weight_decay=weight_decay, mesh=mesh,
                                   **{"adamw_betas": betas, **hyper})


def routing_text(opt: torch.optim.Optimizer, model: nn.Module) -> str:
    if hasattr(opt, "routing_table"):
        return opt.routing_table()
    lines = [f"{name:<40} {str(list(p.shape)):<18} adamw" for name, p in model.named_parameters()]
    return "\n".join([f"every parameter goes to torch.optim.AdamW ({model.num_params():,} elements):", *lines])


def lr_factor(warmup: int, steps: int):
    """Multiplier of the peak lr at step i (0-based): linear warm-up, then cosine to FINAL_LR_FRACTION."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, steps - 1 - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, par: Parallel) -> float:
    """Mean validation loss over this dp rank's windows, averaged over dp (every rank runs the forward)."""
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return par.mean_over_dp(sum(losses) / len(losses))


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


# ---- checkpoints --------------------------------------------------------------------------
CHECKPOINT_FORMAT = "dcp-1"
STEP_DIR = re.compile(r"step-(\d+)")
MODEL_DIR, OPTIMIZER_DIR = "model", "optimizer"
ADAMW_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first: the ``checkpoints/step-N``
    directories that hold their completion marker ``meta.json``. (A checkpoint is written as
    ``.step-N.tmp`` and renamed only once complete, so a cut-short one is never picked.)"""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := STEP_DIR.fullmatch(d.name)) and d.is_dir() and (d / META).is_file()]
    return [d for _, d in sorted(found)]


def checkpoint_rows(model: GPT) -> dict[str, Tensor]:
    """{name: row order} of the ``qkv`` weights this model holds in another row order than the
    checkpoint's. A checkpoint keeps every ``qkv`` weight (and its optimizer state) in the head-major
    order (see ``parallelize``), the order every tp > 1 holds, so that its rows are the same logical
    tensor at any tp; with tp = 1 the rows are permuted on the way in and out (exact: copies)."""
    return {f"blocks.{i}.attn.qkv.weight": block.attn.head_major_order()
            for i, block in enumerate(model.blocks) if not block.attn.head_major}


def _reorder_state(opt, params: dict[str, Tensor], rows: dict[str, Tensor], inverse: bool = False) -> list:
    """Put ``opt``'s state tensors of the ``rows`` parameters in checkpoint row order (``inverse``: back
    from it), as new tensors; returns ``[(state, key, old tensor)]`` to undo it."""
    swapped = []
    for name, order in rows.items():
        p = params[name]
        state = opt.state.get(p, {})
        for key, value in list(state.items()):
            if not isinstance(value, Tensor) or value.ndim == 0:
                continue
            if value.shape != p.shape:
                raise ValueError(f"optimizer state {key!r} of {name} has shape {list(value.shape)}, not the "
                                 f"parameter's {list(p.shape)}: its rows cannot be reordered")
            index = (torch.argsort(order) if inverse else order).to(value.device)
            swapped.append((state, key, value))
            state[key] = value[index]
    return swapped


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    if not isinstance(data, bytes):
        raise ValueError(f"expected a saved object, found {type(data).__name__}")
    return torch.load(io.BytesIO(data), weights_only=True)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _no_dist() -> bool:
    return not dist.is_initialized()


@contextmanager
def _quiet_in_one_process():
    """Without this DCP warns, in one process, that it assumes one process (reg_dist.checkpoint passes
    no ``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_optimizer(opt, model: nn.Module, rows: dict[str, Tensor], path: Path) -> None:
    """The optimizer's state in DCP form at ``path`` (collective): ``reg_dist.checkpoint`` for REG,
    Muon and MuonEq; torch's DCP optimizer state dict (keyed by parameter name) for AdamW."""
    swapped = _reorder_state(opt, dict(model.named_parameters()), rows)
    try:
        with _quiet_in_one_process():
            if isinstance(opt, torch.optim.AdamW):
                dcp.save(get_optimizer_state_dict(model, opt, options=ADAMW_OPTIONS), checkpoint_id=str(path),
                         no_dist=_no_dist())
            else:
                reg_checkpoint.save(opt, path)
    finally:
        for state, key, value in swapped:
            state[key] = value


def load_optimizer(opt, model: nn.Module, rows: dict[str, Tensor], path: Path) -> None:
    """Fill the optimizer's state from ``path``, written at any dp × tp (collective). REG/Muon/MuonEq
    keep their state as it was if the checkpoint is bad (``reg_dist.checkpoint``); torch's AdamW
    first gets zero state (DCP's ``get_optimizer_state_dict`` on a fresh optimizer)."""
    saved = _read_metadata(path)
    theirs = "reg_dist's (REG, Muon or MuonEq)" if reg_checkpoint.META in saved else "torch.optim.AdamW's"
    if isinstance(opt, torch.optim.AdamW) != (reg_checkpoint.META not in saved):
        raise ValueError(f"{path} holds {theirs} state, not {type(opt).__name__}'s")
    if isinstance(opt, torch.optim.AdamW):
        target = get_optimizer_state_dict(model, opt, options=ADAMW_OPTIONS)
        target = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in target.items()}
        with _quiet_in_one_process():
            dcp.load(target, checkpoint_id=str(path), no_dist=_no_dist())
        set_optimizer_state_dict(model, opt, target, options=ADAMW_OPTIONS)
    else:
        with _quiet_in_one_process():
            reg_checkpoint.load(opt, path)
    _reorder_state(opt, dict(model.named_parameters()), rows, inverse=True)


def save_checkpoint(out: Path, step: int, model: nn.Module, opt, sched, data: ByteWindows, log: dict,
                    args: argparse.Namespace, par: Parallel) -> Path:
    """``out/checkpoints/step-NNNNNN/`` (collective): written as ``.step-NNNNNN.tmp``, completed by its
    ``meta.json``, then renamed; the newest ``--keep`` complete checkpoints are kept."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"
    if par.rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    rows = checkpoint_rows(model)
    state = {f"model.{k}": v[rows[k]] if k in rows else v for k, v in model.state_dict().items()}
    # the same on every rank (one copy is written): the data stream's position is the global one
    state["train"] = _pack({"step": step, "scheduler": sched.state_dict(), "data": data.generator.get_state()})
    state[f"rng.{par.rank}"] = _pack(_rng_state(par.device))
    if par.rank0:
        state["log"] = json.dumps(log, default=str)
    with _quiet_in_one_process():
        dcp.save(state, checkpoint_id=str(tmp / MODEL_DIR), no_dist=_no_dist())
    save_optimizer(opt, model, rows, tmp / OPTIMIZER_DIR)
    par.barrier()
    if par.rank0:
        meta = {**run_identity(args), "step": step, "format": CHECKPOINT_FORMAT, "qkv_rows": "head-major",
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(tmp / META, "w") as f:  # the completion marker, written last
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        old = root / f".{final.name}.old"
        if final.exists():  # the same step again (a resumed run passing an existing checkpoint)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if args.keep:
            for stale in complete_checkpoints(out)[:-args.keep]:
                shutil.rmtree(stale, ignore_errors=True)
    par.barrier()
    return final


def _reason(e: BaseException) -> str:
    """``e`` in one line (DCP's CheckpointException carries every rank's traceback: its last line)."""
    if isinstance(e, CheckpointException):
        return next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), repr(e))
    return f"{type(e).__name__}: {e}"


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 — missing, truncated or not DCP at all
        raise ValueError(f"no readable DCP metadata in {path}: {type(e).__name__}: {e}") from e


def load_checkpoint(path: Path, meta: dict, model: nn.Module, opt, sched, data: ByteWindows,
                    par: Parallel) -> tuple[int, dict]:
    """Restore the checkpoint at ``path``, written at any dp × tp (collective); returns (step, rank 0's
    log or {}). Everything is read into fresh tensors first: a bad checkpoint exits every rank (one
    message) before the model is touched."""
    rows = checkpoint_rows(model)
    own = model.state_dict()
    saved_dp, saved_tp = int(meta["dp"]), int(meta["tp"])
    # RNG: a rank's own state at the same layout; otherwise that of the saved rank at the same
    # (dp, tp) coordinates modulo the saved sizes (nothing in training draws from it: no dropout)
    tp_rank = par.rank % par.tp
    source = par.rank if (saved_dp, saved_tp) == (par.dp, par.tp) else \
        (par.dp_rank % saved_dp) * saved_tp + tp_rank % saved_tp
    target: dict = {f"model.{k}": torch.empty_like(v) if k in rows else v.detach().clone() for k, v in own.items()}
    target.update({"train": b"", f"rng.{source}": b""})
    if par.rank0:
        target["log"] = ""
    train = rng = None
    error = None
    try:
        saved = _read_metadata(path / MODEL_DIR)
        missing = sorted(k[6:] for k in target if k.startswith("model.") and k not in saved)
        extra = sorted(k[6:] for k in saved if k.startswith("model.") and k not in target)
        if missing or extra:
            raise ValueError(f"model tensors differ: missing in the checkpoint {missing[:6]}, "
                             f"not in this model {extra[:6]}")
        for key, value in target.items():
            if key.startswith("model.") and tuple(saved[key].size) != tuple(value.shape):
                raise ValueError(f"{key[6:]} is {list(saved[key].size)} in the checkpoint, {list(value.shape)} here")
        try:
            with _quiet_in_one_process():
                dcp.load(target, checkpoint_id=str(path / MODEL_DIR), no_dist=_no_dist())
            train, rng = _unpack(target["train"]), _unpack(target[f"rng.{source}"])
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise ValueError(f"{MODEL_DIR}/ is unreadable (truncated or corrupt): {_reason(e)}") from e
        if int(train["step"]) != int(meta["step"]):
            raise ValueError(f"step {train['step']} in the checkpoint, {meta['step']} in its {META}")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 — any failure to read it is a bad checkpoint
        error = f"cannot load checkpoint {path}: {_reason(e)}"
    if error := par.first_error(error):
        die(error)
    try:
        load_optimizer(opt, model, rows, path / OPTIMIZER_DIR)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        error = f"cannot load the optimizer state of checkpoint {path}: {_reason(e)}"
    if error := par.first_error(error):
        die(error)
    with torch.no_grad():  # nothing below fails on a checkpoint that loaded
        for name, value in own.items():
            loaded = target[f"model.{name}"]
            if name in rows:
                value.index_copy_(0, rows[name].to(value.device), loaded)
            else:
                local(value).copy_(local(loaded))
    sched_state = train["scheduler"]
    n = len(opt.param_groups)
    if len(sched_state["base_lrs"]) != n:  # another grouping (AdamW: TP shards in a group of their own)
        sched_state = {**sched_state, "base_lrs": sched_state["base_lrs"][:1] * n,
                       "_last_lr": sched_state["_last_lr"][:1] * n, "lr_lambdas": [None] * n}
    sched.load_state_dict(sched_state)
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    data.generator.set_state(train["data"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and par.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], par.device)
    log = json.loads(target["log"]) if par.rank0 else {}
    return int(train["step"]), log


def read_model(path: str | Path) -> dict[str, Tensor]:
    """The model of the checkpoint directory ``path`` as full tensors in one process (any layout
    wrote it), ``qkv`` rows back in the model's own order: a ``GPT``'s ``load_state_dict`` takes it."""
    path = Path(path)
    meta = json.loads((path / META).read_text())
    saved = _read_metadata(path / MODEL_DIR)
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in saved.items()
             if k.startswith("model.")}
    with _quiet_in_one_process():
        dcp.load(state, checkpoint_id=str(path / MODEL_DIR), no_dist=True)
    cfg = meta["model"]
    model = {k[len("model."):]: v for k, v in state.items()}
    order = torch.arange(3 * cfg["width"]).view(3, cfg["heads"], -1).transpose(0, 1).flatten()
    for name in model:
        if name.endswith("attn.qkv.weight"):
            model[name] = torch.empty_like(model[name]).index_copy_(0, order, model[name])
    return model


# ---- the run ------------------------------------------------------------------------------
def progress(step: int, steps: int, record: dict, val_loss: float, val_step: int, tokens: int, n: int,
             seconds: float) -> str:
    """The progress line: a bar, loss, last validation, lr, tokens/s over the last ``n`` steps, ETA."""
    done = round(BAR * step / steps)
    return (f"[{'#' * done}{'.' * (BAR - done)}] {100 * step // steps:3d}% step {step}/{steps} | "
            f"loss {record['loss']:.4f} | val {val_loss:.4f} (@{val_step}) | "
            f"lr {record['lr']:.2e} | {tokens / seconds:,.0f} tok/s | ETA {duration((steps - step) * seconds / n)}")


def prepare_rank(args: argparse.Namespace, par: "Parallel", env: dict) -> dict[str, dict[str, Path]]:
    """Threads per rank, rank 0's run directory and seed everywhere, the corpora of --data and
    --eval-also built once (rank 0 first): ``{domain: {"train": path, "val": path}}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.world > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env["local_world"]))
    args.out = Path(par.broadcast(str(args.out)))  # a default name's timestamp: rank 0's
    torch.manual_seed(args.seed)
    domains = dict.fromkeys([args.data, *args.eval_also])
    if par.rank0:
        corpora = {d: build_corpus(args.data_dir, domain=d) for d in domains}
    par.barrier()
    if not par.rank0:
        corpora = {d: build_corpus(args.data_dir, domain=d) for d in domains}
    return corpora


def main(argv: list[str] | None = None) -> dict:
    """Train as ``argv`` says; returns what ``log.json`` holds (on rank 0; {} elsewhere)."""
    args = parse_args(argv)
    if args.deepspeed is not None:
        from launch.deepspeed_job import run
        return run(args)
    par = Parallel(args)
    env = world_env()
    corpora = prepare_rank(args, par, env)
    paths = corpora[args.data]
    per_rank = args.batch_size // args.dp
    train_data = ByteWindows(paths["train"], args.seq_len, per_rank, seed=args.seed, rank=par.dp_rank,
                             world_size=args.dp)
    val_batches = {domain: [(x.to(par.device), y.to(par.device)) for x, y in
                            ByteWindows(c["val"], args.seq_len, per_rank, rank=par.dp_rank, world_size=args.dp)
                            .eval_batches(args.eval_batches)] for domain, c in corpora.items()}
    model = GPT(args.model)
    if args.init is not None:  # fine-tuning: the weights of another run, everything else afresh
        error = None
        try:
            model.load_state_dict(read_model(args.init))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 — any failure to read it is a bad checkpoint
            error = f"--init {args.init}: cannot read its model: {_reason(e)}"
        if error := par.first_error(error):
            die(error)
    model = model.to(par.device)
    num_params = model.num_params()
    if args.tp > 1:
        parallelize(model, par.mesh["tp"])
    opt = build_optimizer(args.optimizer, model, args.lr, args.weight_decay, par.mesh, tuple(args.betas),
                          **args.hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.warmup, args.steps))
    params = list(model.parameters())
    routing = routing_text(opt, model)
    first = 1
    log = {"args": {k: v for k, v in vars(args).items() if k not in ("model", "meta", "continuing")},
           "model": asdict(args.model),
           "params": num_params, "corpus": {d: {k: str(v) for k, v in c.items()} for d, c in corpora.items()},
           "routing": routing, "train": [], "val": [], "val_also": {d: [] for d in args.eval_also}}
    if args.resume is not None:
        done, saved = load_checkpoint(args.resume, args.meta, model, opt, sched, train_data, par)
        first = done + 1
        if par.rank0:
            log["train"] = [r for r in saved.get("train", []) if r["step"] <= done]
            log["val"] = [v for v in saved.get("val", []) if v["step"] <= done]
            log["val_also"] = {d: [v for v in saved.get("val_also", {}).get(d, []) if v["step"] <= done]
                               for d in args.eval_also}
            log["resumed"] = saved.get("resumed", []) + [{"step": done, "from": str(args.resume)}]
    say = print if par.rank0 else (lambda *a, **k: None)
    say(f"model: {num_params:,} parameters {asdict(args.model)}")
    say(f"world {args.world} = dp {args.dp} × tp {args.tp} on {par.device}; global batch {args.batch_size} "
        f"({per_rank} per dp rank) × {args.seq_len} bytes; threads {torch.get_num_threads()} per rank")
    say(f"corpus {args.data} in {paths['train'].parent}: train {len(train_data):,} bytes, "
        f"val {paths['val'].stat().st_size:,} bytes (evaluated on {args.eval_batches}×{args.batch_size} windows" +
        "".join(f"; also on {d} val" for d in args.eval_also) + ")")
    if args.init is not None:
        say(f"model initialised from {args.init}")
    say(f"optimizer {args.optimizer} routing:\n{routing}", flush=True)
    if args.resume is not None:
        say(f"resumed from {args.resume} at step {first - 1}", flush=True)

    if par.rank0:
        args.out.mkdir(parents=True, exist_ok=True)
        ckpts = args.out / CHECKPOINTS
        if not args.continuing:  # a run afresh in this directory: no checkpoint of another run may be picked
            shutil.rmtree(ckpts, ignore_errors=True)
        else:  # what a run that died mid-save left behind, and the steps after the resumed one (abandoned)
            for left in ckpts.glob(".step-*"):
                shutil.rmtree(left, ignore_errors=True)
            for later in complete_checkpoints(args.out):
                if int(STEP_DIR.fullmatch(later.name).group(1)) > first - 1:
                    shutil.rmtree(later, ignore_errors=True)
    par.barrier()
    log_path = args.out / "log.json"
    tokens_per_step = args.batch_size * args.seq_len
    start = time.perf_counter()
    train_s = interval_s = 0.0
    printed = first - 1  # the step of the last progress line

    def validate(step: int) -> float:
        """Validation loss on --data (returned) and on each --eval-also domain, logged at ``step``."""
        for domain in args.eval_also:
            log["val_also"][domain].append({"step": step, "loss": evaluate(model, val_batches[domain], par)})
        loss = evaluate(model, val_batches[args.data], par)
        log["val"].append({"step": step, "loss": loss})
        return loss

    if first == 1:
        val_loss = validate(0)
        say(f"step 0/{args.steps} | val {val_loss:.4f}" +
            "".join(f" | {d} val {v[-1]['loss']:.4f}" for d, v in log["val_also"].items()), flush=True)
    else:  # the last validation loss before the checkpoint (rank 0 alone has the log; control flow is the same)
        val_loss = log["val"][-1]["loss"] if log["val"] else math.nan
    average_here = args.dp > 1 and (args.optimizer == "adamw" or args.clip > 0)
    for step in range(first, args.steps + 1):
        t0 = time.perf_counter()
        x, y = train_data.next_batch()
        x, y = x.to(par.device, non_blocking=True), y.to(par.device, non_blocking=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        record = {"step": step, "loss": par.mean_over_dp(loss.item()), "lr": sched.get_last_lr()[0]}
        log["train"].append(record)
        if not math.isfinite(record["loss"]):  # the dp mean: every rank agrees
            if par.rank0:
                write_json(log_path, log)
            die(f"non-finite training loss {record['loss']} at step {step}; log in {log_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == args.die_at_step and par.rank == args.die_rank % args.world \
                and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)  # test only: a rank lost mid-step (--die-at-step)
        if average_here:  # every rank then holds the dp-averaged gradient (see the module docstring)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean_([local(p.grad) for p in params], par.dp_group, args.dp)
        if args.clip:
            record["grad_norm"] = clip_grad_norm(params, args.clip, par.tp_group)
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        train_s += dt
        interval_s += dt
        record["tokens_per_s"] = tokens_per_step / dt
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = validate(step)
            if par.rank0:
                write_json(log_path, log)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            where = save_checkpoint(args.out, step, model, opt, sched, train_data, log, args, par)
            say(f"checkpoint {where}", flush=True)
        if step % args.log_every == 0 or step == args.steps:
            n = step - printed
            say(progress(step, args.steps, record, val_loss, log["val"][-1]["step"], n * tokens_per_step, n,
                         interval_s), flush=True)
            interval_s, printed = 0.0, step

    steps_here = args.steps - first + 1
    losses = [r["loss"] for r in log["train"]]
    last = losses[-min(10, len(losses)):]
    log["final"] = {"steps": args.steps, "train_loss_first": losses[0], "train_loss_last": losses[-1],
                    "train_loss_last10_mean": sum(last) / len(last), "val_loss": val_loss,
                    "wall_s": time.perf_counter() - start, "train_s": train_s,
                    "tokens": steps_here * tokens_per_step,
                    "tokens_per_s": steps_here * tokens_per_step / train_s if train_s else 0.0,
                    "skipped_steps": getattr(opt, "skipped_steps", 0), "world": args.world, "dp": args.dp,
                    "tp": args.tp}
    if par.rank0:
        write_json(log_path, log)
        f = log["final"]
        print(f"done: train loss {f['train_loss_first']:.4f} -> {f['train_loss_last']:.4f} "
              f"(last-10 mean {f['train_loss_last10_mean']:.4f}), val {log['val'][0]['loss']:.4f} -> {val_loss:.4f}, "
              f"{duration(f['wall_s'])} wall, {f['tokens_per_s']:,.0f} tok/s; log {log_path}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return log if par.rank0 else {}


if __name__ == "__main__":
    main()
