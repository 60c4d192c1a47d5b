"""What the native loop (``launch.loop``) and the DeepSpeed job (``launch.deepspeed_job``) share: the
learning-rate schedule, the evaluation, the checkpoint steps, the progress line and its clock, the
final summary, the log file."""

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launch.ranks import Parallel

FINAL_LR_FRACTION = 0.1
BAR = 20  # characters of the progress bar


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


def progress(step: int, steps: int, record: dict, val_loss: float, val_step: int, tokens: int, n: int,
             seconds: float) -> str:
    """The progress line: a bar, loss, last validation, lr, tokens/s over the last ``n`` steps, ETA."""
    done = BAR * step // steps  # rounded down: the bar is full at the last step only
    return (f"[{'#' * done}{'.' * (BAR - done)}] {100 * step // steps:3d}% step {step}/{steps} | "
            f"loss {record['loss']:.4f} | val {val_loss:.4f} (@{val_step}) | "
            f"lr {record['lr']:.2e} | {tokens / seconds:,.0f} tok/s | ETA {duration((steps - step) * seconds / n)}")


def saves_at(step: int, args: argparse.Namespace) -> bool:
    """Whether a checkpoint follows ``step``: every ``--save-every`` steps and the last (not with --no-save)."""
    return bool(args.save and (step == args.steps or (args.save_every and step % args.save_every == 0)))


class Clock:
    """The run's clock from step ``first``: training seconds, and a progress line every ``--log-every`` steps
    with the tokens/s of the steps since the last one."""

    def __init__(self, first: int, tokens_per_step: int) -> None:
        self.start, self.first, self.tokens_per_step = time.perf_counter(), first, tokens_per_step
        self.train_s = self.interval_s = 0.0
        self.printed = first - 1  # the step of the last progress line

    def add(self, seconds: float) -> None:
        self.train_s += seconds
        self.interval_s += seconds

    def report(self, step: int, args: argparse.Namespace, record: dict, val_loss: float, val: list[dict],
               say: Callable[..., None]) -> None:
        """The progress line after ``step`` where one is due; ``val``: the validations so far (the last one's step)."""
        if step % args.log_every == 0 or step == args.steps:
            n = step - self.printed
            say(progress(step, args.steps, record, val_loss, val[-1]["step"], n * self.tokens_per_step, n,
                         self.interval_s), flush=True)
            self.interval_s, self.printed = 0.0, step

    def summary(self, log: dict, args: argparse.Namespace, val_loss: float, **extra) -> dict:
        """``log["final"]``: losses, validation, times and throughput of the steps run here, and ``extra``."""
        losses = [r["loss"] for r in log["train"]]
        last = losses[-min(10, len(losses)):]
        tokens = (args.steps - self.first + 1) * self.tokens_per_step
        log["final"] = {"steps": args.steps, "train_loss_first": losses[0], "train_loss_last": losses[-1],
                        "train_loss_last10_mean": sum(last) / len(last), "val_loss": val_loss,
                        "wall_s": time.perf_counter() - self.start, "train_s": self.train_s, "tokens": tokens,
                        "tokens_per_s": tokens / self.train_s if self.train_s else 0.0, **extra}
        return log["final"]


def done_line(log: dict, log_path: Path, final: Path | None, unsaved: str) -> str:
    """The run's last line: losses, wall time, throughput, the log and the final checkpoint (or why none)."""
    f = log["final"]
    return (f"done: train loss {f['train_loss_first']:.4f} -> {f['train_loss_last']:.4f} "
            f"(last-10 mean {f['train_loss_last10_mean']:.4f}), val {log['val'][0]['loss']:.4f} -> {f['val_loss']:.4f}, "
            f"{duration(f['wall_s'])} wall, {f['tokens_per_s']:,.0f} tok/s; log {log_path}; " +
            (f"final checkpoint {final} (a rerun with this --out resumes from it)" if final is not None
             else f"no checkpoint saved ({unsaved})"))
