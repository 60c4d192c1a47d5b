"""The native training job of ``launch/train.py``: the model (tensor-parallel when --tp > 1), the
optimizer (REG/Muon/MuonEq with their native data parallelism, or AdamW), the loop, evaluations,
checkpoints and the log (``run``)."""

import argparse
import math
import os
import signal
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from launch.checkpoints import reason, load_checkpoint, prepare_run_dir, read_model, save_checkpoint
from launch.cli import MATRIX_OPTIMIZERS
from launch.data import ByteWindows
from launch.job import Clock, done_line, evaluate, lr_factor, saves_at, write_json
from launch.model import GPT
from launch.ranks import Parallel, all_reduce_mean_, die, prepare_rank, world_env
from launch.tensor_parallel import clip_grad_norm, local, parallelize
from reg_dist.optim.routing import module_param_info


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    mesh: DeviceMesh | None = None, betas: tuple[float, float] = (0.9, 0.95),
                    matrix_embeddings: bool = False, **hyper) -> torch.optim.Optimizer:
    """REG/Muon/MuonEq on the model (hidden matrices; the rest to their internal AdamW; with
    ``matrix_embeddings`` the embeddings and the tied output head too) with their keyword arguments
    ``hyper``, and ``mesh=`` (native data parallelism) under torchrun; or plain AdamW (TP shards in a
    group of their own)."""
    if name == "adamw":
        params = list(model.parameters())
        groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                              [p for p in params if not isinstance(p, DTensor)]) if g]
        return torch.optim.AdamW([{"params": g} for g in groups], lr=lr, betas=betas,
                                 weight_decay=weight_decay, fused=True)
    cls = MATRIX_OPTIMIZERS[name]
    params: nn.Module | list[dict] = model
    if matrix_embeddings:
        pairs = module_param_info(model)
        params = [{"params": [t for t, i in pairs if i.embedding == embedding],
                   "param_names": [i.names[0] for t, i in pairs if i.embedding == embedding],
                   "param_infos": [i for t, i in pairs if i.embedding == embedding],
                   **({"algorithm": cls.algorithm} if embedding else {})} for embedding in (False, True)]
    return cls(params, lr=lr, weight_decay=weight_decay, mesh=mesh, **{"adamw_betas": betas, **hyper})


def routing_text(opt: torch.optim.Optimizer, model: nn.Module) -> str:
    if hasattr(opt, "routing_table"):
        return opt.routing_table()
    lines = [f"{name:<40} {str(list(p.shape)):<18} adamw" for name, p in model.named_parameters()]
    return "\n".join([f"every parameter goes to torch.optim.AdamW ({model.num_params():,} elements):", *lines])


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` (``launch.cli.parse_args``) say; returns what ``log.json`` holds (on rank 0; {} elsewhere)."""
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
            error = f"--init {args.init}: cannot read its model: {reason(e)}"
        if error := par.first_error(error):
            die(error)
    model = model.to(par.device)
    num_params = model.num_params()
    if args.tp > 1:
        parallelize(model, par.mesh["tp"])
    opt = build_optimizer(args.optimizer, model, args.lr, args.weight_decay, par.mesh, tuple(args.betas),
                          args.matrix_embeddings, **args.hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.warmup, args.steps))
    params = list(model.parameters())
    routing = routing_text(opt, model)
    first = 1
    # "resume": the mode used (auto, none, or the PATH given; auto after a torchrun restart), "resumed_from": the
    # checkpoint it found (None: started afresh)
    logged_args = {k: v for k, v in vars(args).items() if k not in ("model", "meta", "continuing", "resume_mode")}
    logged_args.update(resume=args.resume_mode, resumed_from=None if args.resume is None else str(args.resume))
    log = {"args": logged_args,
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
    final = prepare_run_dir(args, first, par, say)  # the last checkpoint written
    log_path = args.out / "log.json"
    tokens_per_step = args.batch_size * args.seq_len
    clock = Clock(first, tokens_per_step)

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
        clock.add(dt)
        record["tokens_per_s"] = tokens_per_step / dt
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = validate(step)
            if par.rank0:
                write_json(log_path, log)
        if saves_at(step, args):
            final = save_checkpoint(args.out, step, model, opt, sched, train_data, log, args, par)
            say(f"checkpoint {final}", flush=True)
        clock.report(step, args, record, val_loss, log["val"], say)

    if par.rank0:  # the only rank with the whole log (a resumed run's earlier steps come from its checkpoint)
        clock.summary(log, args, val_loss, skipped_steps=getattr(opt, "skipped_steps", 0), world=args.world,
                      dp=args.dp, tp=args.tp)
        write_json(log_path, log)
        print(done_line(log, log_path, final, "--no-save"), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return log if par.rank0 else {}
