"""Train the byte-level GPT of ``launch.model`` on the stdlib corpus of ``launch.data`` (one process).

    python launch/train.py                                # REG with the defaults: a minute or two on 2 CPU cores
    python launch/train.py --optimizer muon --steps 50 --out runs/muon

Prints the optimizer's routing table, then a progress line every --log-every steps, and writes
``log.json`` (args, per-step train loss / lr / tokens per second, validation losses, final numbers)
to the run directory --out, rewritten atomically at every evaluation and at the end.
The learning rate warms up linearly for --warmup steps, then follows a cosine down to 10% at the last step.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.data import DEFAULT_CACHE, ByteWindows, build_corpus  # noqa: E402
from launch.model import GPT, GPTConfig  # noqa: E402
from reg_dist import REG, Muon, MuonEq  # noqa: E402

MATRIX_OPTIMIZERS = {"reg": REG, "muon": Muon, "muoneq": MuonEq}
OPTIMIZERS = (*MATRIX_OPTIMIZERS, "adamw")
RUNS = Path(__file__).resolve().parents[1] / "runs"
FINAL_LR_FRACTION = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="reg")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (every parameter group)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=1.0, help="max global norm of the raw gradients; 0 disables")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE, help="cache of the corpus token files")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/OPTIMIZER-TIMESTAMP)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "depth", "width", "heads", "eval_every", "eval_batches", "log_every",
                 "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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
    if args.out is None:
        args.out = RUNS / f"{args.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """REG/Muon/MuonEq on the model (hidden matrices; the rest to their internal AdamW), or plain AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                 fused=True)
    return MATRIX_OPTIMIZERS[name](model, lr=lr, weight_decay=weight_decay)


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
def evaluate(model: nn.Module, batches: list) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def main(argv: list[str] | None = None) -> dict:
    """Train as ``argv`` says; returns what ``log.json`` holds."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    paths = build_corpus(args.data_dir)
    train_data = ByteWindows(paths["train"], args.seq_len, args.batch_size, seed=args.seed)
    val_data = ByteWindows(paths["val"], args.seq_len, args.batch_size)
    val_batches = val_data.eval_batches(args.eval_batches)
    model = GPT(args.model)
    opt = build_optimizer(args.optimizer, model, args.lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.warmup, args.steps))
    routing = routing_text(opt, model)
    print(f"model: {model.num_params():,} parameters {asdict(args.model)}")
    print(f"corpus {paths['train'].parent}: train {len(train_data):,} bytes, val {len(val_data):,} bytes "
          f"(evaluated on {args.eval_batches}×{args.batch_size} windows); threads {torch.get_num_threads()}")
    print(f"optimizer {args.optimizer} routing:\n{routing}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.json"
    log = {"args": {k: v for k, v in vars(args).items() if k != "model"}, "model": asdict(args.model),
           "params": model.num_params(), "corpus": {k: str(v) for k, v in paths.items()}, "routing": routing,
           "train": [], "val": []}
    tokens_per_step = args.batch_size * args.seq_len
    start = time.perf_counter()
    train_s = interval_s = 0.0
    printed = 0  # the step of the last progress line
    val_loss = evaluate(model, val_batches)
    log["val"].append({"step": 0, "loss": val_loss})
    print(f"step 0/{args.steps} | val {val_loss:.4f}", flush=True)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = train_data.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        record = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}
        log["train"].append(record)
        if not math.isfinite(record["loss"]):
            write_json(log_path, log)
            sys.exit(f"non-finite training loss {record['loss']} at step {step}; log in {log_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            record["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        train_s += dt
        interval_s += dt
        record["tokens_per_s"] = tokens_per_step / dt
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val_batches)
            log["val"].append({"step": step, "loss": val_loss})
            write_json(log_path, log)
        if step % args.log_every == 0 or step == args.steps:
            n = step - printed
            print(f"step {step}/{args.steps} | loss {record['loss']:.4f} | val {val_loss:.4f} "
                  f"(@{log['val'][-1]['step']}) | lr {record['lr']:.2e} | {n * tokens_per_step / interval_s:,.0f} tok/s"
                  f" | ETA {duration((args.steps - step) * interval_s / n)}", flush=True)
            interval_s, printed = 0.0, step

    losses = [r["loss"] for r in log["train"]]
    last = losses[-min(10, len(losses)):]
    log["final"] = {"steps": args.steps, "train_loss_first": losses[0], "train_loss_last": losses[-1],
                    "train_loss_last10_mean": sum(last) / len(last), "val_loss": val_loss,
                    "wall_s": time.perf_counter() - start, "train_s": train_s,
                    "tokens": args.steps * tokens_per_step, "tokens_per_s": args.steps * tokens_per_step / train_s,
                    "skipped_steps": getattr(opt, "skipped_steps", 0)}
    write_json(log_path, log)
    f = log["final"]
    print(f"done: train loss {f['train_loss_first']:.4f} -> {f['train_loss_last']:.4f} "
          f"(last-10 mean {f['train_loss_last10_mean']:.4f}), val {log['val'][0]['loss']:.4f} -> {val_loss:.4f}, "
          f"{duration(f['wall_s'])} wall, {f['tokens_per_s']:,.0f} tok/s; log {log_path}", flush=True)
    return log


if __name__ == "__main__":
    main()
