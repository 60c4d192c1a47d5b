"""Train the byte-level GPT of ``launch.model`` on the stdlib corpus of ``launch.data``, on one rank
or many (data × tensor parallel).

    python launch/train.py                                  # one process: REG with the defaults
    python launch/train.py --optimizer muon --steps 50 --out runs/muon
    torchrun --standalone --nproc_per_node=2 launch/train.py              # dp = 2 (what `make train` runs)
    torchrun --standalone --nproc_per_node=4 launch/train.py --dp 2 --tp 2

Prints (rank 0 only) the optimizer's routing table, then a progress line every --log-every steps,
and writes ``log.json`` (args, per-step train loss / lr / tokens per second, validation losses,
final numbers) to the run directory --out, rewritten atomically at every evaluation and at the end.
The learning rate warms up linearly for --warmup steps, then follows a cosine down to 10% at the
last step.

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

Checkpoints. ``--save-every N`` writes ``OUT/checkpoints/step-NNNNNN/`` (and at the last step):
``rank{r}.pt`` per rank (its model tensors, TP shards as local tensors; its optimizer state, which
the native mode keeps on owners only; scheduler; data position; step; rank 0 also the log) and
``meta.json`` (world, dp, tp, step, model, optimizer, batch), then points ``OUT/checkpoints/latest``
at it. ``--resume PATH`` (a checkpoint directory, or a run directory: its latest checkpoint)
continues the run exactly; it needs the same dp × tp, model, optimizer, batch size and sequence
length. Without --out a resumed run writes into the checkpoint's run directory; a new --out that
exists and is not empty is refused unless --overwrite.

Every invalid input (arguments, world size, checkpoint) exits non-zero with one message (printed by
rank 0) before any training step.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

from launch.data import DEFAULT_CACHE, ByteWindows, build_corpus  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402
from reg_dist import REG, Muon, MuonEq  # noqa: E402

MATRIX_OPTIMIZERS = {"reg": REG, "muon": Muon, "muoneq": MuonEq}
OPTIMIZERS = (*MATRIX_OPTIMIZERS, "adamw")
RUNS = Path(__file__).resolve().parents[1] / "runs"
FINAL_LR_FRACTION = 0.1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
# what a checkpoint must match to be resumed (besides the world layout)
RESUME_MUST_MATCH = ("optimizer", "model", "batch_size", "seq_len")


def world_env() -> dict[str, int]:
    """Rank, world size, local rank and local world size as torchrun sets them (one process: 0, 1, 0, 1)."""
    return {key: int(os.environ.get(var, default)) for key, var, default in (
        ("rank", "RANK", 0), ("world", "WORLD_SIZE", 1), ("local_rank", "LOCAL_RANK", 0),
        ("local_world", "LOCAL_WORLD_SIZE", 1))}


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
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (windows per step), split over dp")
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
    p.add_argument("--resume", type=Path, default=None,
                   help="checkpoint directory, or run directory (its latest checkpoint), to continue from")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE, help="cache of the corpus token files")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/OPTIMIZER-TIMESTAMP; resuming: the checkpoint's)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "depth", "width", "heads", "eval_every", "eval_batches", "log_every",
                 "threads", "dp", "tp"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.save_every < 0:
        p.error(f"--save-every must be >= 0, got {args.save_every}")
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
    check_parallel(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and world_env()["local_world"] > torch.cuda.device_count():
        p.error(f"{world_env()['local_world']} local ranks but {torch.cuda.device_count()} CUDA device(s)")
    args.meta = None
    if args.resume is not None:
        args.resume, args.meta = find_checkpoint(p, args)
    run_dir_of_checkpoint = None
    if args.resume is not None and args.resume.parent.name == CHECKPOINTS:
        run_dir_of_checkpoint = args.resume.parent.parent
    if args.out is None:
        args.out = run_dir_of_checkpoint or RUNS / f"{args.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    continuing = run_dir_of_checkpoint is not None and args.out.resolve() == run_dir_of_checkpoint.resolve()
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.overwrite or continuing):
        p.error(f"--out {args.out} exists and is not empty: pass --overwrite to write into it "
                f"(or choose another run directory)")
    return args


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


def find_checkpoint(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, dict]:
    """The checkpoint directory ``--resume`` names (a run directory: its latest) and its meta, checked."""
    path = args.resume
    latest = path / CHECKPOINTS / LATEST
    if not (path / META).is_file() and latest.is_file():
        path = path / CHECKPOINTS / latest.read_text().strip()
    if not (path / META).is_file():
        p.error(f"--resume {args.resume}: no checkpoint there (expected a checkpoint directory with {META}, "
                f"or a run directory with {CHECKPOINTS}/{LATEST})")
    try:
        meta = json.loads((path / META).read_text())
        step, world, dp, tp = (int(meta[k]) for k in ("step", "world", "dp", "tp"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--resume {path}: corrupt checkpoint, cannot read {META}: {e!r}")
    if (world, dp, tp) != (args.world, args.dp, args.tp):
        p.error(f"--resume {path} was written by world {world} = dp {dp} × tp {tp}; this run is world {args.world} = "
                f"dp {args.dp} × tp {args.tp}: resume with the same dp × tp (resume at another world size is "
                f"issue 8's DCP work)")
    ours = run_identity(args)
    for key in RESUME_MUST_MATCH:
        if meta.get(key) != ours[key]:
            p.error(f"--resume {path}: the checkpoint has {key} {meta.get(key)}, this run {ours[key]}")
    if step >= args.steps:
        p.error(f"--resume {path} is at step {step}, already at or past --steps {args.steps}")
    missing = [r for r in range(world) if not (path / f"rank{r}.pt").is_file()]
    if missing:
        p.error(f"--resume {path}: incomplete checkpoint, no file for rank(s) {missing}")
    return path, meta


def run_identity(args: argparse.Namespace) -> dict:
    return {"world": args.world, "dp": args.dp, "tp": args.tp, "optimizer": args.optimizer,
            "model": asdict(args.model), "batch_size": args.batch_size, "seq_len": args.seq_len}


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
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo", device_id=(
                self.device if args.device == "cuda" else None))
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
                    mesh: DeviceMesh | None = None) -> torch.optim.Optimizer:
    """REG/Muon/MuonEq on the model (hidden matrices; the rest to their internal AdamW), with
    ``mesh=`` (native data parallelism) under torchrun; or plain AdamW (TP shards in a group of their own)."""
    if name == "adamw":
        params = list(model.parameters())
        groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                              [p for p in params if not isinstance(p, DTensor)]) if g]
        return torch.optim.AdamW([{"params": g} for g in groups], lr=lr, betas=(0.9, 0.95),
                                 weight_decay=weight_decay, fused=True)
    return MATRIX_OPTIMIZERS[name](model, lr=lr, weight_decay=weight_decay, mesh=mesh)


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
def _to_local(obj):
    """``obj`` with every DTensor replaced by its local shard (what a per-rank file holds)."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def save_checkpoint(out: Path, step: int, model: nn.Module, opt, sched, data: ByteWindows, log: dict,
                    args: argparse.Namespace, par: Parallel) -> Path:
    """``out/checkpoints/step-NNNNNN/`` with ``rank{r}.pt`` per rank and ``meta.json``; then ``latest``."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"
    if par.rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    state = {"step": step, "model": _to_local(model.state_dict()), "optimizer": _to_local(opt.state_dict()),
             "scheduler": sched.state_dict(), "data": data.generator.get_state(), "rng": torch.get_rng_state()}
    if par.rank0:
        state["log"] = json.dumps(log, default=str)
    torch.save(state, tmp / f"rank{par.rank}.pt")
    par.barrier()
    if par.rank0:
        write_json(tmp / META, {**run_identity(args), "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text(root / LATEST, final.name + "\n")
    par.barrier()
    return final


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, opt, sched, data: ByteWindows, par: Parallel) -> tuple[int, dict]:
    """Restore this rank's part of the checkpoint at ``path``; returns (step, rank 0's log or {}).
    Every rank learns of any rank's failure and all exit before training."""
    step, log, error = 0, {}, None
    file = path / f"rank{par.rank}.pt"
    try:
        ck = torch.load(file, map_location=par.device, weights_only=True)
        missing = {"step", "model", "optimizer", "scheduler", "data"} - set(ck)
        if missing:
            raise ValueError(f"missing entries {sorted(missing)}")
        own = model.state_dict()
        if set(own) != set(ck["model"]):
            raise ValueError(f"model tensors differ: {sorted(set(own) ^ set(ck['model']))[:6]}")
        for name, value in own.items():
            saved = ck["model"][name]
            if local(value).shape != saved.shape:
                raise ValueError(f"{name} has shape {list(saved.shape)}, the model {list(local(value).shape)}")
        with torch.no_grad():
            for name, value in own.items():
                local(value).copy_(ck["model"][name])
        opt.load_state_dict(ck["optimizer"])
        for p, st in opt.state.items():  # state of a TP shard back to a DTensor like its parameter
            if isinstance(p, DTensor):
                for k, v in st.items():
                    if isinstance(v, Tensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape \
                            and v.ndim > 0:
                        st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                   shape=p.shape, stride=p.stride())
        sched.load_state_dict(ck["scheduler"])
        data.generator.set_state(ck["data"])
        if "rng" in ck:
            torch.set_rng_state(ck["rng"])
        step = int(ck["step"])
        if par.rank0:
            log = json.loads(ck["log"])
    except Exception as e:  # noqa: BLE001 — any failure to read or apply it is a corrupt checkpoint
        error = f"corrupt checkpoint {file}: {type(e).__name__}: {e}"
    error = par.first_error(error)
    if error:
        die(error)
    return step, log


# ---- the run ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Train as ``argv`` says; returns what ``log.json`` holds (on rank 0; {} elsewhere)."""
    args = parse_args(argv)
    par = Parallel(args)
    env = world_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.world > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env["local_world"]))
    args.out = Path(par.broadcast(str(args.out)))  # a default name's timestamp: rank 0's
    torch.manual_seed(args.seed)
    if par.rank0:
        paths = build_corpus(args.data_dir)
    par.barrier()
    if not par.rank0:
        paths = build_corpus(args.data_dir)
    per_rank = args.batch_size // args.dp
    train_data = ByteWindows(paths["train"], args.seq_len, per_rank, seed=args.seed, rank=par.dp_rank,
                             world_size=args.dp)
    val_data = ByteWindows(paths["val"], args.seq_len, per_rank, rank=par.dp_rank, world_size=args.dp)
    val_batches = [(x.to(par.device), y.to(par.device)) for x, y in val_data.eval_batches(args.eval_batches)]
    model = GPT(args.model).to(par.device)
    num_params = model.num_params()
    if args.tp > 1:
        parallelize(model, par.mesh["tp"])
    opt = build_optimizer(args.optimizer, model, args.lr, args.weight_decay, par.mesh)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.warmup, args.steps))
    params = list(model.parameters())
    routing = routing_text(opt, model)
    first = 1
    log = {"args": {k: v for k, v in vars(args).items() if k not in ("model", "meta")}, "model": asdict(args.model),
           "params": num_params, "corpus": {k: str(v) for k, v in paths.items()}, "routing": routing,
           "train": [], "val": []}
    if args.resume is not None:
        done, saved = load_checkpoint(args.resume, model, opt, sched, train_data, par)
        first = done + 1
        if par.rank0:
            log["train"] = [r for r in saved.get("train", []) if r["step"] <= done]
            log["val"] = [v for v in saved.get("val", []) if v["step"] <= done]
            log["resumed"] = saved.get("resumed", []) + [{"step": done, "from": str(args.resume)}]
    say = print if par.rank0 else (lambda *a, **k: None)
    say(f"model: {num_params:,} parameters {asdict(args.model)}")
    say(f"world {args.world} = dp {args.dp} × tp {args.tp} on {par.device}; global batch {args.batch_size} "
        f"({per_rank} per dp rank) × {args.seq_len} bytes; threads {torch.get_num_threads()} per rank")
    say(f"corpus {paths['train'].parent}: train {len(train_data):,} bytes, val {len(val_data):,} bytes "
        f"(evaluated on {args.eval_batches}×{args.batch_size} windows)")
    say(f"optimizer {args.optimizer} routing:\n{routing}", flush=True)
    if args.resume is not None:
        say(f"resumed from {args.resume} at step {first - 1}", flush=True)

    if par.rank0:
        args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.json"
    tokens_per_step = args.batch_size * args.seq_len
    start = time.perf_counter()
    train_s = interval_s = 0.0
    printed = first - 1  # the step of the last progress line
    if first == 1:
        val_loss = evaluate(model, val_batches, par)
        log["val"].append({"step": 0, "loss": val_loss})
        say(f"step 0/{args.steps} | val {val_loss:.4f}", flush=True)
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
            val_loss = evaluate(model, val_batches, par)
            log["val"].append({"step": step, "loss": val_loss})
            if par.rank0:
                write_json(log_path, log)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            where = save_checkpoint(args.out, step, model, opt, sched, train_data, log, args, par)
            say(f"checkpoint {where}", flush=True)
        if step % args.log_every == 0 or step == args.steps:
            n = step - printed
            say(f"step {step}/{args.steps} | loss {record['loss']:.4f} | val {val_loss:.4f} "
                f"(@{log['val'][-1]['step']}) | lr {record['lr']:.2e} | {n * tokens_per_step / interval_s:,.0f} tok/s"
                f" | ETA {duration((args.steps - step) * interval_s / n)}", flush=True)
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
