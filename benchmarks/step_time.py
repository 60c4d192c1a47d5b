"""Optimizer step time and state size on a GPT-2-small-shaped parameter set (no forward pass).

Every parameter gets a fixed, seeded random gradient and every optimizer its own copy of the
parameters and gradients. The contenders of a comparison are stepped round-robin in one process
(one step of each per round, the starting one rotating every round), so machine noise hits them
alike; the first ``--warmup`` rounds are dropped and the median of the next ``--steps`` is reported.

  1. full set (12 blocks of 4 bias-free Linear weights and 2 LayerNorms, wte, ln_f; 123.6M params):
     reg_dist REG, Muon, MuonEq versus torch.optim.AdamW(foreach=True) (the reference) and
     AdamW(fused=True)
  2. the 48 hidden matrices only: reg_dist Muon versus torch.optim.Muon (ns_steps=5, bf16
     Newton–Schulz, match_rms_adamw), and reg_dist.ops.newton_schulz called one matrix at a time
     versus once per shape on the stacked (B, m, n) batch
  3. optimizer-state bytes of every optimizer once it has stepped, and the ratio to the reference

Run:  .venv/bin/python benchmarks/step_time.py [--steps N] [--warmup N] [--threads T] [--device cuda] [--quick]
Results: benchmarks/results/step_time.json (``--out``).
"""

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import reg_dist
from reg_dist.ops import newton_schulz

D, VOCAB, LAYERS = 768, 50257, 12
MATRIX_SHAPES = ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))  # qkv, attn proj, fc, fc proj
LR, WD, NS_STEPS = 1e-3, 0.1, 5
FULL_REF, MATRIX_REF, NS_REF = "AdamW(foreach)", "torch.optim.Muon", "NS per-matrix"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        # nn.Linear(in, out).weight is (out, in): these weights are exactly MATRIX_SHAPES
        self.qkv, self.attn_proj, self.fc, self.fc_proj = (nn.Linear(n, m, bias=False) for m, n in MATRIX_SHAPES)


def gpt2_small(layers: int, device: torch.device) -> nn.Module:
    """The parameter set, every parameter with a seeded random ``.grad``."""
    torch.manual_seed(0)
    model = nn.Module()
    model.wte = nn.Embedding(VOCAB, D)
    model.h = nn.ModuleList(Block() for _ in range(layers))
    model.ln_f = nn.LayerNorm(D)
    model.to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p).mul_(1e-2)
    return model


def clone_module(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)  # deepcopy does not copy .grad
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    return twin


def clone_params(params: list[Tensor]) -> list[nn.Parameter]:
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    return twins


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int, device: torch.device) -> dict:
    """Milliseconds of each of ``steps`` calls of every fn after ``warmup`` rounds, round-robin."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names, times = list(fns), defaultdict(list)
    for r in range(warmup + steps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {n: times[n] for n in names}


def summarize(times: dict, ref: str, opts: dict) -> dict:
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = {n: {"median_ms": med[n], "ratio": med[n] / med[ref], "times_ms": times[n]} for n in times}
    ref_state = state_bytes(opts[ref]) if ref in opts else None
    for n, opt in opts.items():
        rows[n]["state_bytes"] = state_bytes(opt)
        rows[n]["state_ratio"] = rows[n]["state_bytes"] / ref_state if ref_state else None
    return rows


def print_table(title: str, rows: dict, ref: str) -> None:
    has_state = all("state_bytes" in r for r in rows.values())
    head = f"{'':<20} {'median ms':>10} {'x ' + ref:>22}" + (f" {'state MiB':>10} {'x state':>8}" if has_state else "")
    print(f"\n{title}\n{head}")
    for n, r in rows.items():
        state = f" {r['state_bytes'] / 2**20:10.1f} {r['state_ratio']:8.2f}" if has_state else ""
        print(f"{n:<20} {r['median_ms']:10.1f} {r['ratio']:22.2f}{state}")


def full_set(model: nn.Module, args: argparse.Namespace) -> dict:
    makers = {
        "REG": lambda m: reg_dist.REG(m, lr=LR, weight_decay=WD),
        "Muon": lambda m: reg_dist.Muon(m, lr=LR, weight_decay=WD, ns_steps=NS_STEPS),
        "MuonEq": lambda m: reg_dist.MuonEq(m, lr=LR, weight_decay=WD, ns_steps=NS_STEPS),
        FULL_REF: lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, foreach=True),
        "AdamW(fused)": lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, fused=True),
    }
    opts = {n: make(clone_module(model)) for n, make in makers.items()}
    times = interleaved({n: o.step for n, o in opts.items()}, args.steps, args.warmup, args.device)
    return summarize(times, FULL_REF, opts)


def hidden_matrices(model: nn.Module, args: argparse.Namespace) -> dict:
    mats = [p for block in model.h for p in block.parameters() if p.ndim == 2]
    opts = {
        "reg_dist.Muon": reg_dist.Muon(clone_params(mats), lr=LR, weight_decay=WD, ns_steps=NS_STEPS),
        MATRIX_REF: torch.optim.Muon(clone_params(mats), lr=LR, weight_decay=WD, ns_steps=NS_STEPS,
                                     adjust_lr_fn="match_rms_adamw"),
    }
    grads = [p.grad for p in mats]
    by_shape = defaultdict(list)
    for g in grads:
        by_shape[g.shape].append(g)
    stacks = [torch.stack(gs) for gs in by_shape.values()]
    fns = {n: o.step for n, o in opts.items()}
    fns[NS_REF] = lambda: [newton_schulz(g, NS_STEPS) for g in grads]
    fns["NS batched"] = lambda: [newton_schulz(x, NS_STEPS) for x in stacks]
    times = interleaved(fns, args.steps, args.warmup, args.device)
    return {
        "matrices": len(mats),
        "optimizers": summarize({n: times[n] for n in opts}, MATRIX_REF, opts),
        "newton_schulz": summarize({n: times[n] for n in (NS_REF, "NS batched")}, NS_REF, {}),
    }


def cpu_model() -> str:
    """``platform.processor()``, or the model name from /proc/cpuinfo where that is empty (Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return platform.processor() or (names[0] if names else "")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="timed rounds (default 3; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 block, 1 timed round")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_time.json")
    args = ap.parse_args()
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    args.device = torch.device(args.device)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    args.layers = 1 if args.quick else LAYERS
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = gpt2_small(args.layers, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; {args.layers} blocks, "
          f"{n_params / 1e6:.1f}M params; median of {args.steps} rounds after {args.warmup} warm-up")
    full = full_set(model, args)
    print_table("Full parameter set (step time, optimizer state)", full, FULL_REF)
    hidden = hidden_matrices(model, args)
    print_table(f"{hidden['matrices']} hidden matrices only", hidden["optimizers"], MATRIX_REF)
    print_table(f"Newton–Schulz ({NS_STEPS} steps, bf16) on the same matrices", hidden["newton_schulz"], NS_REF)
    elapsed = time.perf_counter() - start
    print(f"\ntotal {elapsed:.0f} s")
    result = {
        "command": shlex.join(sys.orig_argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "layers": args.layers, "params": n_params, "steps": args.steps, "warmup": args.warmup,
        "full_set": full, "hidden_matrices": hidden, "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
