"""``launch/train.py --deepspeed CONFIG``: the same training job through ``reg_dist.deepspeed.initialize``.

    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_reg.json     # CPU too (gloo)
    torchrun --standalone --nproc_per_node=2 launch/train.py --deepspeed configs/zero2_reg.json

The DeepSpeed JSON config decides the optimizer (``"REG"``, ``"MuonEq"``, ``"reg_dist.Muon"``, or any
DeepSpeed type), its lr and weight decay, the ZeRO stage, precision, gradient clipping and, when it
has a ``"scheduler"`` block, the schedule; without one, train.py's warm-up + cosine (--warmup,
--steps) is passed as the engine's scheduler. --optimizer, --lr, --weight-decay and --clip are then
not used. The batch is the config's: every rank runs ``train_micro_batch_size_per_gpu`` windows per
micro-step, ``gradient_accumulation_steps`` micro-steps per optimizer step (--steps counts optimizer
steps), so the global batch is micro × accumulation × world; a --batch-size that differs is an
error. Data parallel only (dp = world; --tp > 1 is an error).

Checkpoints and resuming work as in the native mode (--save-every N, the last step unless --no-save,
--keep, --resume auto|none|PATH, the default run directory ``runs/deepspeed-OPTIMIZER``), with
``OUT/checkpoints/step-NNNNNN/`` holding ``deepspeed/`` (``reg_dist.deepspeed.save_checkpoint``: every
rank's pieces of the fp32 master weights and of reg_dist's optimizer state, the engine's step counters
and lr scheduler), rank 0's ``train.pt`` (the step, the data stream's position, which is global, and
the log) and ``meta.json``, written last. So a run resumes at another world size or ZeRO stage too
(another config), on the same batches where micro-batch × world is the same (every micro-step draws
micro × world windows). A config of DeepSpeed's own optimizer types, or fp16, writes no checkpoint
(said at the end; --save-every and --resume PATH are refused).

``LAUNCH_DS_NO_SHM=1`` skips DeepSpeed's shared-memory comm op (JIT-built, 40-60 s uncached, on
every CPU ``init_distributed``; gloo is all training needs): the tests set it.
"""

import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.checkpoints import (DEEPSPEED_DIR, DEEPSPEED_FORMAT, reason, begin_checkpoint, commit_checkpoint,
                                prepare_run_dir)
from launch.data import ByteWindows
from launch.job import Clock, done_line, evaluate, lr_factor, saves_at, write_json
from launch.model import GPT
from launch.ranks import Parallel, die, prepare_rank, world_env
from reg_dist.optim import registry

TRAIN_FILE = "train.pt"


def config_batch(config: dict, world: int) -> tuple[int, int, int]:
    """(micro-batch per rank, accumulation steps, global batch) of a DeepSpeed config at ``world`` ranks,
    completed from any two of them as DeepSpeed does; ValueError if they disagree or are missing."""
    micro = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas),
                       ("train_batch_size", total)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if micro is None and total is None:
        raise ValueError("the config names neither train_micro_batch_size_per_gpu nor train_batch_size")
    if micro is None:
        gas = gas or 1
        if total % (gas * world):
            raise ValueError(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {gas} × "
                             f"world {world}")
        micro = total // (gas * world)
    elif gas is None:
        if total is None:
            gas = 1
        elif total % (micro * world):
            raise ValueError(f"train_batch_size {total} is not divisible by train_micro_batch_size_per_gpu {micro} "
                             f"× world {world}")
        else:
            gas = total // (micro * world)
    if total is not None and total != micro * gas * world:
        raise ValueError(f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} × "
                         f"gradient_accumulation_steps {gas} × world {world} = {micro * gas * world}")
    return micro, gas, micro * gas * world


def check_args(p, args, decided: tuple[str, ...]) -> None:
    """train.py's argument checks for --deepspeed (``p.error`` on any failure; ``decided``: the
    optimizer's flags, as argument names, that the config decides instead): loads the config into
    ``args.ds_config``; sets ``args.micro_batch``, ``args.grad_accum``, ``args.batch_size`` (global),
    ``args.optimizer`` (the config's), ``args.no_checkpoint`` (why this config cannot be checkpointed, or
    None; then ``args.save`` off)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        args.ds_config = json.loads(Path(args.deepspeed).read_text())
    except (OSError, ValueError) as e:
        p.error(f"--deepspeed {args.deepspeed}: cannot read the JSON config: {e}")
    if not isinstance(args.ds_config, dict):
        p.error(f"--deepspeed {args.deepspeed}: the config must be a JSON object")
    if args.tp != 1:
        p.error(f"--tp {args.tp} with --deepspeed: DeepSpeed runs data parallel only (drop --tp)")
    if args.dp not in (None, world):
        p.error(f"--dp {args.dp} with --deepspeed: dp is the world size {world}")
    overridden = [f"--{name.replace('_', '-')}" for name in decided if getattr(args, name) != p.get_default(name)]
    if overridden:
        p.error(f"{', '.join(overridden)} with --deepspeed: the config's optimizer block and "
                f"gradient_clipping decide them; set them in {args.deepspeed}")
    try:
        args.micro_batch, args.grad_accum, total = config_batch(args.ds_config, world)
    except ValueError as e:
        p.error(f"--deepspeed {args.deepspeed}: {e}")
    if args.batch_size is not None and args.batch_size != total:
        p.error(f"--batch-size {args.batch_size} disagrees with --deepspeed {args.deepspeed}: the global batch is "
                f"train_micro_batch_size_per_gpu {args.micro_batch} × gradient_accumulation_steps {args.grad_accum} "
                f"× world {world} = {total} (drop --batch-size or pass {total})")
    args.batch_size = total
    kind = ((args.ds_config.get("optimizer") or {}).get("type") or "none")
    entry = registry.DEEPSPEED_TYPES.get(str(kind).lower())  # the JSON type → the registry's name ("reg_dist.Muon" → muon)
    args.optimizer = entry.name if entry is not None else str(kind).lower()
    args.no_checkpoint = None
    fp16 = (args.ds_config.get("fp16") or {}).get("enabled", False)
    if entry is None or fp16:  # reg_dist.deepspeed.save_checkpoint takes neither
        args.no_checkpoint = (f"optimizer type {kind!r} is DeepSpeed's own" if entry is None else
                              "fp16: its loss scaler's state is not carried")
        if args.save_every or args.resume not in ("auto", "none"):
            p.error(f"--save-every / --resume with --deepspeed {args.deepspeed}: checkpoints in this mode are "
                    f"reg_dist.deepspeed.save_checkpoint's, and {args.no_checkpoint} (use --no-save)")
        args.save = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_checkpoint(engine, step: int, data: ByteWindows, log: dict, args, par: Parallel) -> Path:
    """``OUT/checkpoints/step-NNNNNN/`` of the DeepSpeed job (collective; see the module docstring)."""
    import reg_dist.deepspeed as rds

    tmp = begin_checkpoint(args.out, step, par)
    rds.save_checkpoint(engine, tmp / DEEPSPEED_DIR)
    if par.rank0:
        torch.save({"step": step, "data": data.generator.get_state(), "log": json.dumps(log, default=str)},
                   tmp / TRAIN_FILE)
    meta = {"format": DEEPSPEED_FORMAT, "zero_stage": engine.zero_optimization_stage(),
            "deepspeed_config": str(args.deepspeed)}
    return commit_checkpoint(args.out, step, meta, args, par)


def load_checkpoint(engine, path: Path, data: ByteWindows, par: Parallel) -> tuple[int, dict]:
    """Restore ``save_checkpoint``'s ``path`` (collective), saved at any world size and ZeRO stage; returns
    (its step, its log). A bad checkpoint exits every rank with one message."""
    import reg_dist.deepspeed as rds

    error = train = None
    try:
        train = torch.load(path / TRAIN_FILE, weights_only=True)
        rds.load_checkpoint(engine, path / DEEPSPEED_DIR)
    except Exception as e:  # noqa: BLE001 — any failure to read it is a bad checkpoint
        error = f"cannot load checkpoint {path}: {reason(e)}"
    if error := par.first_error(error):
        die(error)
    if engine.global_steps != train["step"]:
        die(f"checkpoint {path}: step {train['step']} in {TRAIN_FILE}, {engine.global_steps} in {DEEPSPEED_DIR}/")
    data.generator.set_state(train["data"])
    return int(train["step"]), json.loads(train["log"])


def skip_shm_build_if_asked() -> None:
    """With ``LAUNCH_DS_NO_SHM=1``: no JIT build of DeepSpeed's shared-memory comm op (gloo needs none)."""
    if os.environ.get("LAUNCH_DS_NO_SHM") == "1":
        import deepspeed.comm.torch  # noqa: F401  (deepspeed.comm's attribute `torch` is torch itself)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def run(args) -> dict:
    """The training job of ``launch.train.main`` on a DeepSpeed engine; returns the log (rank 0) or {}."""
    skip_shm_build_if_asked()
    import reg_dist.deepspeed as rds

    par = Parallel(args)  # the gloo/nccl group and dp mesh under a launcher (none in one process)
    if not dist.is_initialized():  # one process: DeepSpeed still wants a process group and LOCAL_RANK
        for var in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(var, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    paths = prepare_rank(args, par, world_env())[args.data]
    micro, gas = args.micro_batch, args.grad_accum
    train_data = ByteWindows(paths["train"], args.seq_len, micro, seed=args.seed, rank=par.dp_rank,
                             world_size=args.dp)
    val_data = ByteWindows(paths["val"], args.seq_len, micro, rank=par.dp_rank, world_size=args.dp)
    model = GPT(args.model)
    num_params = model.num_params()
    scheduler = None
    if "scheduler" not in args.ds_config:
        factor = lr_factor(args.warmup, args.steps)
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731
    engine, _, _, _ = rds.initialize(model=model, model_parameters=model.parameters(), config=args.ds_config,
                                     lr_scheduler=scheduler)
    device = engine.device
    val_batches = [(x.to(device), y.to(device)) for x, y in val_data.eval_batches(args.eval_batches)]
    stage = engine.zero_optimization_stage()
    say = print if par.rank0 else (lambda *a, **k: None)
    say(f"model: {num_params:,} parameters {asdict(args.model)}")
    say(f"deepspeed {args.deepspeed}: optimizer {args.optimizer}, ZeRO stage {stage}, world {args.world}; "
        f"global batch {args.batch_size} = micro {micro} × accumulation {gas} × dp {args.dp}, × {args.seq_len} "
        f"bytes; threads {torch.get_num_threads()} per rank", flush=True)

    logged_args = {k: v for k, v in vars(args).items()
                   if k not in ("model", "meta", "continuing", "ds_config", "resume_mode")}
    logged_args.update(resume=args.resume_mode, resumed_from=None if args.resume is None else str(args.resume))
    log = {"args": logged_args, "deepspeed_config": args.ds_config, "model": asdict(args.model), "params": num_params,
           "corpus": {k: str(v) for k, v in paths.items()}, "train": [], "val": []}
    first = 1
    if args.resume is not None:
        done, saved = load_checkpoint(engine, args.resume, train_data, par)
        first = done + 1
        log["train"] = [r for r in saved.get("train", []) if r["step"] <= done]
        log["val"] = [v for v in saved.get("val", []) if v["step"] <= done]
        log["resumed"] = saved.get("resumed", []) + [{"step": done, "from": str(args.resume)}]
    final = prepare_run_dir(args, first, par, say)  # the last checkpoint written
    log_path = args.out / "log.json"
    tokens_per_step = args.batch_size * args.seq_len
    clock = Clock(first, tokens_per_step)
    if first == 1:
        val_loss = evaluate(engine, val_batches, par)
        log["val"].append({"step": 0, "loss": val_loss})
        say(f"step 0/{args.steps} | val {val_loss:.4f}", flush=True)
    else:
        val_loss = log["val"][-1]["loss"] if log["val"] else math.nan
    for step in range(first, args.steps + 1):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        losses = []
        for _ in range(gas):
            x, y = train_data.next_batch()
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(engine(x).flatten(0, 1).float(), y.flatten())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        record = {"step": step, "loss": par.mean_over_dp(sum(losses) / gas), "lr": lr}
        log["train"].append(record)
        if not math.isfinite(record["loss"]):
            if par.rank0:
                write_json(log_path, log)
            die(f"non-finite training loss {record['loss']} at step {step}; log in {log_path}")
        dt = time.perf_counter() - t0
        clock.add(dt)
        record["tokens_per_s"] = tokens_per_step / dt
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(engine, val_batches, par)
            log["val"].append({"step": step, "loss": val_loss})
            if par.rank0:
                write_json(log_path, log)
        if saves_at(step, args):
            final = save_checkpoint(engine, step, train_data, log, args, par)
            say(f"checkpoint {final}", flush=True)
        clock.report(step, args, record, val_loss, log["val"], say)

    clock.summary(log, args, val_loss, skipped_steps=engine.skipped_steps, world=args.world, dp=args.dp, tp=1,
                  zero_stage=stage)
    if par.rank0:
        write_json(log_path, log)
        unsaved = "--no-save" if args.no_checkpoint is None else args.no_checkpoint
        print(done_line(log, log_path, final, unsaved), flush=True)
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    return log if par.rank0 else {}
