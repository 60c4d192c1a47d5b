"""The optimizer step on a GPU: REG against torch's fused AdamW as a fraction of the HBM bandwidth limit,
reg_dist.Muon against torch.optim.Muon, and Newton–Schulz TFLOP/s against the bf16 dense peak.

Two matrix sets, each of ``--layers`` blocks of ``step_time.MATRIX_SHAPES`` (qkv w×3w, proj w×w, fc w×f,
fc_proj f×w): GPT-2 small (w 768, f 3072: step_time.py's 16 matrices at 4 blocks) and a 7B-like width
(w 4096, f 11008: 157M parameters a block), where the element-wise steps are bound by memory bandwidth.
Every optimizer gets its own copy of the parameters and the same fixed random gradients, in fp32 and
in bf16 (gradients and optimizer state then bf16 too). Contenders are stepped round-robin in one process,
each step ended by ``torch.cuda.synchronize`` (``step_time.interleaved``); the median of ``--steps``
rounds after ``--warmup`` is reported as a ratio to the group's anchor:

  (a) torch.optim.AdamW(fused=True) (anchor), reg_dist.REG (default; p=inf; iters=2). Beside each, the
      fraction of the bandwidth limit: the bytes per element the exact step cannot avoid moving (AdamW:
      read W, G, m, v and write W, m, v, 7 elements; REG: one pass for the momentum and the first row and
      column sums (read G, M, write M), one read of G and M per further pass (the further sums of
      ``iters`` > 1 and the norm of the scaled matrix), and the update (read G, M, W, write W):
      7 + 2·iters elements) × elements / time, over the bandwidth of a large device-to-device copy
      measured in the same run (bytes read + written).
  (b) torch.optim.Muon (ns_steps=5, match_rms_adamw) (anchor), reg_dist.Muon (default) and
      reg_dist.Muon(ns_method="gram").
  (c) reg_dist's Newton–Schulz (5 steps, Jordan's coefficients, bf16) of each shape's stack of
      ``--layers`` matrices, "standard" and "gram": its matrix-product FLOPs counted from the shapes
      (``torch.utils.flop_counter``; "standard" on m ≤ n: 5·(4m²n + 2m³)) over the median time, against
      the rate of a large bf16 matrix product measured in the same run.

Run:  python benchmarks/gpu_step.py [--device cuda] [--steps N] [--warmup N] [--layers N]
      python benchmarks/gpu_step.py --device cpu --quick      (a smoke run of seconds, tiny shapes)
Results: benchmarks/results/gpu_step.json (``--out``; gpu_step_quick.json with ``--quick``).
"""

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import reg_dist
from reg_dist.ops.newton_schulz import orthogonalize
from step_time import ANCHOR, LR, MATRIX_SHAPES, NS_STEPS, WD, D, cpu_model, interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETS = {"gpt2-small": (768, 3072), "7b-like": (4096, 11008)}  # width w, feed-forward f
QUICK_SETS = {"gpt2-small": (64, 256), "7b-like": (96, 258)}
MUON_ANCHOR = "torch.optim.Muon"


def scaled(width: int, ffn: int) -> tuple[tuple[int, int], ...]:
    """``MATRIX_SHAPES`` with step_time's width D read as ``width`` and its 4·D as ``ffn``."""
    size = {D: width, 3 * D: 3 * width, 4 * D: ffn}
    return tuple((size[m], size[n]) for m, n in MATRIX_SHAPES)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each fn, round-robin (``step_time.interleaved``), every call synchronised."""
    def synced(fn):
        return lambda: (fn(), sync(device))

    sync(device)
    times = interleaved({n: synced(f) for n, f in fns.items()}, steps, warmup)
    return {n: statistics.median(ts) for n, ts in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int, steps: int) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed({"copy": lambda: dst.copy_(src)}, device, steps, 3)["copy"]
    return 2 * nbytes / (ms / 1e3)


def matmul_peak(device: torch.device, size: int, steps: int) -> float:
    """FLOP/s of a ``size``³ bf16 matrix product (random operands)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    ms = timed({"mm": lambda: torch.mm(a, b, out=out)}, device, steps, 3)["mm"]
    return 2 * size**3 / (ms / 1e3)


def tensors(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Seeded parameters and gradients of ``shapes``."""
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda std: [torch.randn(s, generator=gen, device=device).mul_(std).to(dtype) for s in shapes]  # noqa: E731
    return make(0.02), make(1e-2)


def optimizers(group: str, params: list[Tensor], grads: list[Tensor]) -> dict[str, torch.optim.Optimizer]:
    """Each contender of ``group`` ("reg" or "muon") over its own copy of ``params``, ``.grad`` the shared
    ``grads`` (never written by a step)."""
    def copy():
        out = [p.clone().requires_grad_() for p in params]
        for p, g in zip(out, grads):
            p.grad = g
        return out

    def ours(cls, **kw):
        return cls([{"params": copy(), "algorithm": cls.algorithm}], lr=LR, weight_decay=WD, **kw)

    if group == "reg":
        return {ANCHOR: torch.optim.AdamW(copy(), lr=LR, weight_decay=WD, fused=True),
                "REG": ours(reg_dist.REG), "REG p=inf": ours(reg_dist.REG, p=float("inf")),
                "REG iters=2": ours(reg_dist.REG, iters=2)}
    return {MUON_ANCHOR: torch.optim.Muon(copy(), lr=LR, weight_decay=WD, ns_steps=NS_STEPS,
                                          adjust_lr_fn="match_rms_adamw"),
            "Muon": ours(reg_dist.Muon, ns_steps=NS_STEPS),
            "Muon gram": ours(reg_dist.Muon, ns_steps=NS_STEPS, ns_method="gram")}


def floor_bytes(name: str, itemsize: int) -> int | None:
    """Bytes per element the exact step must move (see the module docstring); None for the Muon family."""
    if name == ANCHOR:
        return 7 * itemsize
    if name.startswith("REG"):
        return (7 + 2 * (2 if "iters=2" in name else 1)) * itemsize
    return None


def step_rows(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, args: argparse.Namespace,
              bandwidth: float) -> dict[str, dict]:
    """(a) and (b) on one set of shapes in one dtype."""
    params, grads = tensors(shapes, dtype, device)
    numel = sum(p.numel() for p in params)
    rows = {}
    for group, anchor in (("reg", ANCHOR), ("muon", MUON_ANCHOR)):
        opts = optimizers(group, params, grads)
        ms = timed({n: o.step for n, o in opts.items()}, device, args.steps, args.warmup)
        for n, t in ms.items():
            per = floor_bytes(n, dtype.itemsize)
            rows[n] = {"median_ms": t, "ratio": t / ms[anchor], "anchor": anchor, "floor_bytes_per_element": per,
                       "of_bandwidth": None if per is None else per * numel / (t / 1e3) / bandwidth}
        del opts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def newton_schulz_rows(shapes: list[tuple[int, int]], layers: int, device: torch.device, args: argparse.Namespace,
                       peak: float) -> dict[str, dict]:
    """(c): each distinct shape's stack of ``layers`` matrices, both methods."""
    gen = torch.Generator(device=device).manual_seed(2)
    rows = {}
    for m, n in dict.fromkeys(shapes):
        x = torch.randn(layers, m, n, generator=gen, device=device)
        calls = {method: (lambda method=method: orthogonalize(x, NS_STEPS, "jordan", torch.bfloat16, method))
                 for method in ("standard", "gram")}
        ms = timed(calls, device, args.steps, args.warmup)
        for method, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            flops = counter.get_total_flops()
            rows[f"{m}x{n} {method}"] = {"shape": [layers, m, n], "method": method, "median_ms": ms[method],
                                         "flops": flops, "tflops": flops / (ms[method] / 1e3) / 1e12,
                                         "of_peak": flops / (ms[method] / 1e3) / peak}
    return rows


def tables(result: dict) -> str:
    lines = []
    for name, s in result["sets"].items():
        title = f"{s['matrices']} matrices of {name} ({s['params'] / 1e6:.1f}M)"
        for anchor, extra in ((ANCHOR, " | % of bandwidth limit (B/elt)"), (MUON_ANCHOR, "")):
            lines += ["", f"| {title} | dtype | step ms | × {anchor}{extra} |", "|---" * (4 + bool(extra)) + "|"]
            for dtype, rows in s["steps"].items():
                for n, r in rows.items():
                    if r["anchor"] != anchor:
                        continue
                    limit = (f" | {100 * r['of_bandwidth']:.0f} ({r['floor_bytes_per_element']})"
                             if r["of_bandwidth"] is not None else "")
                    lines.append(f"| {n} | {dtype} | {r['median_ms']:.3f} | {r['ratio']:.2f}{limit} |")
        lines += ["", f"| Newton–Schulz, {name} (stack × m × n) | method | ms | GFLOP | TFLOP/s | % of bf16 peak |",
                  "|---" * 6 + "|"]
        for r in s["newton_schulz"].values():
            lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['method']} | {r['median_ms']:.3f} | "
                         f"{r['flops'] / 1e9:.4g} | {r['tflops']:.4g} | {100 * r['of_peak']:.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--steps", type=int, help="timed rounds (default 20; 2 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (default 3; 1 with --quick)")
    ap.add_argument("--layers", type=int, help="blocks per set (default 4 for gpt2-small, 2 for 7b-like)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 1 block, small copy and product")
    ap.add_argument("--out", type=Path, help="JSON (default benchmarks/results/gpu_step.json, "
                                             "gpu_step_quick.json with --quick)")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.steps < 1 or args.warmup < 0 or (args.layers is not None and args.layers < 1):
        ap.error("--steps and --layers must be >= 1 and --warmup >= 0")
    results = Path(__file__).parent / "results"
    args.out = args.out or results / ("gpu_step_quick.json" if args.quick else "gpu_step.json")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); try --device cpu --quick")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*Muon.*")  # torch.optim.Muon's notes on its own scaling
    start, device = time.perf_counter(), args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"
    print(f"torch {torch.__version__}, {name}; median of {args.steps} rounds after {args.warmup} warm-up", flush=True)
    bandwidth = copy_bandwidth(device, (8 << 20) if args.quick else (4 << 30), args.steps)
    peak = matmul_peak(device, 256 if args.quick else 8192, args.steps)
    print(f"device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + written); bf16 {peak / 1e12:.1f} TFLOP/s "
          "(measured)", flush=True)
    result = {"command": shlex.join(sys.orig_argv), "torch": torch.__version__, "device": name,
              "steps": args.steps, "warmup": args.warmup, "copy_bytes_per_s": bandwidth, "bf16_flops_per_s": peak,
              "sets": {}}
    for set_name, (width, ffn) in (QUICK_SETS if args.quick else SETS).items():
        layers = args.layers or (1 if args.quick else 4 if set_name == "gpt2-small" else 2)
        shapes = list(scaled(width, ffn)) * layers
        result["sets"][set_name] = {
            "shapes": [list(s) for s in scaled(width, ffn)], "layers": layers, "matrices": len(shapes),
            "params": sum(m * n for m, n in shapes),
            "steps": {d: step_rows(shapes, dtype, device, args, bandwidth) for d, dtype in DTYPES.items()},
            "newton_schulz": newton_schulz_rows(shapes, layers, device, args, peak)}
    result["elapsed_s"] = time.perf_counter() - start
    print(tables(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\ntotal {result['elapsed_s']:.0f} s\nwrote {args.out}")


if __name__ == "__main__":
    main()
