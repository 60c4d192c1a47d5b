"""Optimizer step time and peak step memory on GPT-2-small shapes, against torch's fused AdamW.

Every parameter gets a fixed, seeded random gradient (shared, read-only, by all contenders) and every
optimizer its own copy of the parameters. The contenders of a set are stepped round-robin in one
process (one step of each per round, the starting one rotating every round), so machine noise hits
them alike; the first ``--warmup`` rounds are dropped and the median of the next ``--steps`` is
reported, as a ratio to ``torch.optim.AdamW(fused=True)`` (the anchor), at each ``--threads`` count.

Two sets:
  matrices  the 4·``--matrix-layers`` block matrices (default 4 blocks: 16 matrices, 28.3M params;
            qkv 768×2304, proj 768×768, fc 768×3072, fc_proj 3072×768), every optimizer on all of them
  model     ``--layers`` blocks (default 12) with their LayerNorms, wte, ln_f (123.6M params); the
            reg_dist optimizers route wte and the norms to their AdamW, which is torch's fused kernel
            (``reg_dist.optim.adamw``), so torch.optim.Muon is paired with AdamW(fused=True) on the
            same tensors, and every AdamW part runs the anchor's kernel

Contenders: AdamW(fused) (anchor), AdamW(foreach), torch.optim.Muon (ns_steps=5, match_rms_adamw),
REG (default, p=inf, iters=2, and the default with the fused kernels off), Muon, MuonEq, NorMuon
(reg_dist defaults).

Peak memory: the most bytes the step holds above what was allocated when it began, from
``torch.profiler``'s allocator events (``profile_memory=True``, "Total Allocated" over one extra
step after the timed ones, at the first thread count); allocations inside reg_dist's fused C++
kernels (a few column vectors) are not seen. State: the optimizer-state bytes once stepped.

Run:  .venv/bin/python benchmarks/step_time.py [--threads 1 2] [--steps N] [--warmup N] [--quick]
Results: benchmarks/results/step_time.json (``--out``); docs/benchmarks.md's table is printed from it.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import reg_dist

D, VOCAB, LAYERS, MATRIX_LAYERS = 768, 50257, 12, 4
MATRIX_SHAPES = ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))  # qkv, attn proj, fc, fc proj
LR, WD, NS_STEPS = 1e-3, 0.1, 5
ANCHOR = "AdamW(fused)"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        # nn.Linear(in, out).weight is (out, in): these weights are exactly MATRIX_SHAPES
        self.qkv, self.attn_proj, self.fc, self.fc_proj = (nn.Linear(n, m, bias=False) for m, n in MATRIX_SHAPES)


def gpt2_small(layers: int, whole: bool) -> nn.Module:
    """The parameter set, seeded: ``layers`` blocks, with wte, the norms and ln_f when ``whole``, else
    their matrices alone."""
    torch.manual_seed(0)
    model = nn.Module()
    model.h = nn.ModuleList(Block() for _ in range(layers))
    if whole:
        model.wte, model.ln_f = nn.Embedding(VOCAB, D), nn.LayerNorm(D)
    else:
        for block in model.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    return model


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(p.shape, generator=gen).mul_(1e-2) for n, p in model.named_parameters()}


def twin(model: nn.Module, grads: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose parameters' ``.grad`` are the shared ``grads`` (never written by a step)."""
    copy = deepcopy(model)
    for n, p in copy.named_parameters():
        p.grad = grads[n]
    return copy


def hidden(model: nn.Module) -> list[Tensor]:
    return [p for block in model.h for p in (block.qkv.weight, block.attn_proj.weight, block.fc.weight,
                                             block.fc_proj.weight)]


class Together:
    """Several optimizers stepped as one (torch.optim.Muon on the matrices, AdamW on the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts
        self.state = {k: v for o in opts for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.opts:
            o.step()
        self.state = {k: v for o in self.opts for k, v in o.state.items()}


class Unfused:
    """An optimizer stepped with reg_dist's fused kernels off (``REG_DIST_FUSED=0``): today's torch ops."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.state = opt, opt.state

    def step(self) -> None:
        reg_dist.ops.fused.set_enabled(False)
        try:
            self.opt.step()
        finally:
            reg_dist.ops.fused.set_enabled(True)


def contenders(matrices_only: bool) -> dict[str, Callable[[nn.Module], object]]:
    def torch_muon(m):
        muon = torch.optim.Muon(hidden(m), lr=LR, weight_decay=WD, ns_steps=NS_STEPS, adjust_lr_fn="match_rms_adamw")
        if matrices_only:
            return muon
        rest = [p for p in m.parameters() if all(p is not q for q in hidden(m))]
        return Together(muon, torch.optim.AdamW(rest, lr=LR, weight_decay=WD, fused=True))

    def ours(cls, **kw):
        if matrices_only:  # every tensor is a hidden matrix: say so rather than route by shape
            return lambda m: cls([{"params": hidden(m), "algorithm": cls.algorithm}], lr=LR, weight_decay=WD, **kw)
        return lambda m: cls(m, lr=LR, weight_decay=WD, **kw)

    return {
        ANCHOR: lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, fused=True),
        "AdamW(foreach)": lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD, foreach=True),
        "torch.optim.Muon": torch_muon,
        "REG": ours(reg_dist.REG),
        "REG unfused": lambda m: Unfused(ours(reg_dist.REG)(m)),
        "REG p=inf": ours(reg_dist.REG, p=float("inf")),
        "REG iters=2": ours(reg_dist.REG, iters=2),
        "Muon": ours(reg_dist.Muon, ns_steps=NS_STEPS),
        "MuonEq": ours(reg_dist.MuonEq, ns_steps=NS_STEPS),
        "NorMuon": ours(reg_dist.NorMuon, ns_steps=NS_STEPS),
    }


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of each of ``steps`` calls of every fn after ``warmup`` rounds, round-robin."""
    names, times = list(fns), defaultdict(list)
    for r in range(warmup + steps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {n: times[n] for n in names}


def peak_step_bytes(step: Callable[[], object]) -> int:
    """The most bytes held above the start during one call of ``step`` (torch.profiler allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def run_set(name: str, model: nn.Module, args: argparse.Namespace) -> dict:
    grads = grads_of(model)
    opts = {n: make(twin(model, grads)) for n, make in contenders(name == "matrices").items()}
    rows: dict[str, dict] = {n: {"by_threads": {}} for n in opts}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = interleaved({n: o.step for n, o in opts.items()}, args.steps, args.warmup)
        anchor = statistics.median(times[ANCHOR])
        for n, ts in times.items():
            rows[n]["by_threads"][str(threads)] = {"median_ms": statistics.median(ts),
                                                   "ratio": statistics.median(ts) / anchor, "times_ms": ts}
    torch.set_num_threads(args.threads[0])
    for n, o in opts.items():
        rows[n]["state_bytes"] = state_bytes(o)
        rows[n]["peak_step_bytes"] = peak_step_bytes(o.step)
    return {"params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "rows": rows}


def table(title: str, result: dict, threads: list[int]) -> str:
    head = "| " + title + " | " + " | ".join(f"{t} thread{'s' * (t > 1)}: ms | × {ANCHOR}" for t in threads)
    head += " | state MiB | peak step MiB |"
    lines = [head, "|---" * (1 + 2 * len(threads) + 2) + "|"]
    for n, r in result["rows"].items():
        cells = [f"{r['by_threads'][str(t)]['median_ms']:.1f} | {r['by_threads'][str(t)]['ratio']:.2f}" for t in threads]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {r['state_bytes'] / 2**20:.0f} | "
                     f"{r['peak_step_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


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
    ap.add_argument("--steps", type=int, help="timed rounds per thread count (default 7; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"blocks of the model set (default {LAYERS})")
    ap.add_argument("--matrix-layers", type=int, default=MATRIX_LAYERS,
                    help=f"blocks whose matrices form the matrices set (default {MATRIX_LAYERS})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 block each, 1 thread, 1 timed round")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_time.json")
    args = ap.parse_args()
    if (args.steps is not None and args.steps < 1) or args.warmup < 0 or min(args.threads) < 1:
        ap.error("--steps and --threads must be >= 1 and --warmup >= 0")
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 7)
    if args.quick:
        args.layers, args.matrix_layers, args.threads, args.warmup = 1, 1, [1], min(args.warmup, 1)
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*Muon.*")  # torch.optim.Muon's notes on its own scaling
    start = time.perf_counter()
    print(f"torch {torch.__version__}, cpu ({cpu_model()}), threads {args.threads}; median of {args.steps} "
          f"rounds after {args.warmup} warm-up; fused REG kernels {'on' if reg_dist.ops.fused.enabled() else 'off'}")
    sets: dict[str, dict] = {}
    for name, model in (("matrices", gpt2_small(args.matrix_layers, False)), ("model", gpt2_small(args.layers, True))):
        sets[name] = run_set(name, model, args)
        title = (f"{sets[name]['tensors']} block matrices ({sets[name]['params'] / 1e6:.1f}M)" if name == "matrices"
                 else f"whole model, {args.layers} blocks ({sets[name]['params'] / 1e6:.1f}M)")
        sets[name]["title"] = title
        print("\n" + table(title, sets[name], args.threads), flush=True)
        write(args, sets, time.perf_counter() - start)  # after each set, so a long run keeps what it has
    print(f"\ntotal {time.perf_counter() - start:.0f} s\nwrote {args.out}")


def write(args: argparse.Namespace, sets: dict, elapsed: float) -> None:
    result = {
        "command": shlex.join(sys.orig_argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": {"processor": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "steps": args.steps, "warmup": args.warmup, "fused_kernels": reg_dist.ops.fused.enabled(),
        "sets": sets, "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
