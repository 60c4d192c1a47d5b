"""What the native loop (``launch.loop``) and the DeepSpeed job (``launch.deepspeed_job``) share: the
learning-rate schedule, the evaluation, the progress line, the log file."""

import json
import math
import os
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
