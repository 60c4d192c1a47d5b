"""Checkpoints of ``launch/train.py``'s native job in DCP form (``save_checkpoint``, ``load_checkpoint``,
``read_model``) and the checks of ``--resume`` and ``--init`` (``find_checkpoint``, ``find_init``);
the layout of a checkpoint directory is described in ``launch/train.py``."""

import argparse
import io
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from launch.data import ByteWindows
from launch.model import GPT
from launch.ranks import Parallel, die
from launch.tensor_parallel import local
from reg_dist import checkpoint as reg_checkpoint

CHECKPOINTS = "checkpoints"
META = "meta.json"
# what a checkpoint must match to be resumed (besides the world layout)
RESUME_MUST_MATCH = ("optimizer", "model", "batch_size", "seq_len", "data")


def find_init(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The checkpoint ``--init`` names (a checkpoint directory, or a run directory's newest complete one),
    checked to hold this model."""
    path = named_checkpoint(p, "--init", args.init)
    meta = read_meta(p, "--init", path)
    if meta.get("format") == DEEPSPEED_FORMAT:
        p.error(f"--init {path}: a --deepspeed checkpoint; --init takes the native mode's")
    if meta.get("model") != asdict(args.model):
        p.error(f"--init {path}: the checkpoint's model is {meta.get('model')}, this run's {asdict(args.model)}")
    if not (path / MODEL_DIR / ".metadata").is_file():
        p.error(f"--init {path}: incomplete checkpoint, no {MODEL_DIR}/.metadata")
    return path


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
    fmt, parts = (DEEPSPEED_FORMAT, (DEEPSPEED_DIR,)) if args.deepspeed is not None else \
        (CHECKPOINT_FORMAT, (MODEL_DIR, OPTIMIZER_DIR))
    other = {CHECKPOINT_FORMAT: "the native mode's: resume it without --deepspeed",
             DEEPSPEED_FORMAT: "a --deepspeed run's: resume it with --deepspeed"}
    if meta.get("format") in other and meta.get("format") != fmt:
        p.error(f"--resume {path}: the checkpoint is {other[meta['format']]}")
    if meta.get("format") != fmt:
        p.error(f"--resume {path}: a checkpoint in {meta.get('format', 'the per-rank rank{r}.pt format')} of an "
                f"earlier train.py, not {fmt}: it cannot be resumed")
    ours = run_identity(args)
    # --resume auto found it in --out: the way out when that run is not this one
    hint = (f" (--resume auto: --out {args.out} holds another run's checkpoints; pass another --out, or "
            f"--resume none --overwrite to start afresh there)" if args.resume == "auto" else "")
    for key in RESUME_MUST_MATCH:
        if meta.get(key) != ours[key]:
            p.error(f"--resume {path}: the checkpoint has {key} {meta.get(key)}, this run {ours[key]}"
                    + (" (a checkpoint of another optimizer)" if key == "optimizer" else "") + hint)
    step = meta["step"]
    if step > args.steps or (step == args.steps and args.resume != "auto"):
        p.error(f"--resume {path} is at step {step}, already at or past --steps {args.steps}{hint}")
    for part in parts:
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


CHECKPOINT_FORMAT = "dcp-1"
DEEPSPEED_FORMAT = "deepspeed-dcp-1"  # --deepspeed: reg_dist.deepspeed.save_checkpoint's DCP directory and train.pt
DEEPSPEED_DIR = "deepspeed"
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
            m = p.shape[0]
            # per element; or a vector of one value per row, then (REG's averaged statistics) per column
            if value.shape != p.shape and not (value.ndim == 1 and value.shape[0] >= m):
                raise ValueError(f"optimizer state {key!r} of {name} has shape {list(value.shape)}, neither the "
                                 f"parameter's {list(p.shape)} nor a vector of one value per row first: its rows "
                                 f"cannot be reordered")
            index = (torch.argsort(order) if inverse else order).to(value.device)
            swapped.append((state, key, value))
            state[key] = value[index] if value.shape == p.shape else torch.cat((value[:m][index], value[m:]))
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


def prepare_run_dir(args: argparse.Namespace, first: int, par: Parallel, say) -> Path | None:
    """Say where the run starts (at step ``first``) and make --out (collective); returns the last
    checkpoint written so far (the resumed one when nothing is left to train, else None). A run afresh
    in --out deletes its checkpoints (none of another run may be picked); a run continuing there
    deletes what a run that died mid-save left and the checkpoints after ``first - 1`` (an abandoned
    trajectory)."""
    if args.resume is not None:
        say(f"resumed from {args.resume} at step {first - 1}", flush=True)
    if first > args.steps:
        say(f"nothing to train: {args.resume} is the run's last step (--steps {args.steps}); pass another --out, "
            f"or --resume none --overwrite to start afresh in {args.out}", flush=True)
    done = first - 1
    if par.rank0:
        args.out.mkdir(parents=True, exist_ok=True)
        ckpts = args.out / CHECKPOINTS
        if not args.continuing:
            shutil.rmtree(ckpts, ignore_errors=True)
        else:
            for left in ckpts.glob(".step-*"):
                shutil.rmtree(left, ignore_errors=True)
            for later in complete_checkpoints(args.out):
                if int(STEP_DIR.fullmatch(later.name).group(1)) > done:
                    shutil.rmtree(later, ignore_errors=True)
    par.barrier()
    return args.resume if args.resume is not None and first > args.steps else None


def begin_checkpoint(out: Path, step: int, par: Parallel) -> Path:
    """The fresh ``out/checkpoints/.step-NNNNNN.tmp`` a checkpoint is written into (collective)."""
    tmp = out / CHECKPOINTS / f".step-{step:06d}.tmp"
    if par.rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    return tmp


def commit_checkpoint(out: Path, step: int, meta: dict, args: argparse.Namespace, par: Parallel) -> Path:
    """Complete ``begin_checkpoint``'s directory (collective, once every rank has written): its ``meta.json``
    last, then renamed to ``out/checkpoints/step-NNNNNN``; the newest ``--keep`` complete ones are kept."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"
    par.barrier()
    if par.rank0:
        meta = {**run_identity(args), "step": step, **meta, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
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


def save_checkpoint(out: Path, step: int, model: nn.Module, opt, sched, data: ByteWindows, log: dict,
                    args: argparse.Namespace, par: Parallel) -> Path:
    """``out/checkpoints/step-NNNNNN/`` (collective): written as ``.step-NNNNNN.tmp``, completed by its
    ``meta.json``, then renamed; the newest ``--keep`` complete checkpoints are kept."""
    tmp = begin_checkpoint(out, step, par)
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
    return commit_checkpoint(out, step, {"format": CHECKPOINT_FORMAT, "qkv_rows": "head-major"}, args, par)


def reason(e: BaseException) -> str:
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
            raise ValueError(f"{MODEL_DIR}/ is unreadable (truncated or corrupt): {reason(e)}") from e
        if int(train["step"]) != int(meta["step"]):
            raise ValueError(f"step {train['step']} in the checkpoint, {meta['step']} in its {META}")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 — any failure to read it is a bad checkpoint
        error = f"cannot load checkpoint {path}: {reason(e)}"
    if error := par.first_error(error):
        die(error)
    try:
        load_optimizer(opt, model, rows, path / OPTIMIZER_DIR)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        error = f"cannot load the optimizer state of checkpoint {path}: {reason(e)}"
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
