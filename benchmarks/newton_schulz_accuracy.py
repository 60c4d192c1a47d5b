"""Newton–Schulz accuracy to the exact polar factor, and time per call, "standard" against "gram".

Accuracy: for each GPT-2-small matrix shape (768×2304, 768×768, 768×3072, 3072×768) and each spectrum
(singular values log-spaced over condition numbers 1e1, 1e3, 1e6 between random fp64 orthogonal
factors; a momentum-like matrix: 20 steps of β = 0.95 momentum over a rank-16 signal plus Gaussian
noise; and a nearly rank-deficient one, as a momentum early in training: rank 2 plus 1e-3 noise), the relative Frobenius distance ‖NS(X) − U Vᵀ‖ / ‖U Vᵀ‖ to the polar factor U Vᵀ of an fp64
SVD, for reg_dist's two methods × both coefficient sets × bf16 and fp32 at the default 5 steps, and
for ``torch.optim.Muon``'s own Newton–Schulz (Jordan, bf16).

Time, stepped round-robin in one process (the starting one rotating every round), medians over
``--repeats`` after one warm-up round, each as a ratio to torch's:
  - milliseconds per Newton–Schulz call (bf16, Jordan) on the momentum-like matrix of every shape,
    against ``torch.optim.Muon``'s own Newton–Schulz on the same matrix;
  - the optimizer step on the 48 hidden matrices of GPT-2 small (12 × the four shapes, seeded random
    gradients): ``reg_dist.Muon`` at its defaults and with each ``ns_method`` and ``coefficients``, against
    ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` (same lr, weight decay, momentum, 5 steps).

Run:  PYTHONPATH=$PWD .venv/bin/python benchmarks/newton_schulz_accuracy.py [--threads 1] [--repeats 9]
Results: benchmarks/results/newton_schulz_accuracy.json (``--out``).
"""

import argparse
import json
from copy import deepcopy as copy_module
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

import reg_dist
from reg_dist.ops.newton_schulz import NS_METHODS, newton_schulz

SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
SPECTRA = ("kappa=1e1", "kappa=1e3", "kappa=1e6", "momentum", "rank-2")
COEFFICIENTS = ("jordan", "polar_express")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_MUON = "torch.optim.Muon NS"
TORCH_STEP = "torch.optim.Muon"
LAYERS, LR, WD = 12, 0.02, 0.1


def matrix(shape: tuple[int, int], spectrum: str, seed: int) -> torch.Tensor:
    """An fp64 matrix of ``shape`` with the named spectrum (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if spectrum == "momentum":
        signal = torch.randn(m, 16, dtype=torch.float64, generator=g) @ torch.randn(16, n, dtype=torch.float64,
                                                                                   generator=g) / 4
        buf = torch.zeros(m, n, dtype=torch.float64)
        for _ in range(20):
            buf = 0.95 * buf + signal + torch.randn(m, n, dtype=torch.float64, generator=g)
        return buf
    if spectrum == "rank-2":
        return torch.randn(m, 2, dtype=torch.float64, generator=g) @ torch.randn(2, n, dtype=torch.float64, generator=g) \
            + 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=g)
    k = min(m, n)
    kappa = float(spectrum.removeprefix("kappa="))
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    return (u * torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64)) @ v.T


def polar(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """U Vᵀ of ``x`` (fp64 SVD) and x's condition number."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh, (s[0] / s[-1]).item()


def torch_muon_ns(x: torch.Tensor) -> torch.Tensor:
    return _zeropower_via_newtonschulz(x, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)


def distance(out: torch.Tensor, target: torch.Tensor) -> float:
    return ((out.double() - target).norm() / target.norm()).item()


def accuracy() -> list[dict]:
    rows = []
    for i, shape in enumerate(SHAPES):
        for j, spectrum in enumerate(SPECTRA):
            x = matrix(shape, spectrum, seed=10 * i + j)
            target, kappa = polar(x)
            x32 = x.float()
            row = {"shape": list(shape), "spectrum": spectrum, "kappa": kappa,
                   TORCH_MUON: distance(torch_muon_ns(x32), target)}
            for method in NS_METHODS:
                for coefficients in COEFFICIENTS:
                    for dname, dtype in DTYPES.items():
                        try:
                            out = newton_schulz(x32, 5, coefficients, dtype, method)
                        except ValueError:  # refused (gram, polar_express, bf16: unstable)
                            row[f"{method}/{coefficients}/{dname}"] = None
                            continue
                        row[f"{method}/{coefficients}/{dname}"] = distance(out, target)
            rows.append(row)
            print(f"  {shape} {spectrum}: done", flush=True)
    return rows


def round_robin(calls: dict, repeats: int, ref: str) -> dict:
    """Median ms of each call and its ratio to ``ref``'s, stepped in turn (the first round dropped)."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            calls[name]()
            if r:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times[ref])
    return {**{f"{n} ms": 1e3 * statistics.median(times[n]) for n in names},
            **{f"{n} ×": statistics.median(times[n]) / base for n in names}}


def timing(repeats: int) -> list[dict]:
    rows = []
    for i, shape in enumerate(SHAPES):
        x = matrix(shape, "momentum", seed=10 * i + 3).float()
        calls = {TORCH_MUON: lambda: torch_muon_ns(x),
                 **{m: (lambda m=m: newton_schulz(x, 5, "jordan", torch.bfloat16, m)) for m in NS_METHODS}}
        rows.append({"shape": list(shape), **round_robin(calls, repeats, TORCH_MUON)})
    return rows


def step_timing(repeats: int) -> dict:
    """One optimizer step on the 48 GPT-2-small hidden matrices, each optimizer on its own copy."""
    torch.manual_seed(0)
    # nn.Linear(in, out).weight is (out, in): these weights are exactly SHAPES
    model = nn.ModuleList(nn.Linear(n, m, bias=False) for _ in range(LAYERS) for m, n in SHAPES)
    grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]

    def copy() -> nn.Module:
        twin = copy_module(model)
        for p, g in zip(twin.parameters(), grads):
            p.grad = g.clone()
        return twin

    opts = {TORCH_STEP: torch.optim.Muon(copy().parameters(), lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw"),
            "reg_dist.Muon (default)": reg_dist.Muon(copy(), lr=LR, weight_decay=WD),
            **{f"reg_dist.Muon {m}/{c}": reg_dist.Muon(copy(), lr=LR, weight_decay=WD, ns_method=m, coefficients=c)
               for c in COEFFICIENTS for m in NS_METHODS if (m, c) != ("gram", "polar_express")}}  # refused in bf16
    return round_robin({name: opt.step for name, opt in opts.items()}, repeats, TORCH_STEP)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(acc: list[dict], tim: list[dict], step: dict) -> None:
    columns = [TORCH_MUON] + [f"{m}/{c}/{d}" for c in COEFFICIENTS for m in NS_METHODS for d in DTYPES]
    columns = [c for c in columns if all(r[c] is not None for r in acc)]  # refused combinations left out
    rows = [[f"{r['shape'][0]}×{r['shape'][1]}", r["spectrum"], f"{r['kappa']:.1e}", *(f"{r[c]:.3f}" for c in columns)]
            for r in acc]
    rows.append(["mean", "", "", *(f"{statistics.mean(r[c] for r in acc):.3f}" for c in columns)])
    print_table("‖NS(X) − U Vᵀ‖_F / ‖U Vᵀ‖_F (5 steps)", ["shape", "spectrum", "κ", *columns], rows)
    names = [TORCH_MUON, *NS_METHODS]
    print_table("ms per call (bf16, jordan, 5 steps) and × torch.optim.Muon's Newton–Schulz", ["shape", *names],
                [[f"{r['shape'][0]}×{r['shape'][1]}", *(f"{r[f'{n} ms']:.1f} ({r[f'{n} ×']:.2f}×)" for n in names)]
                 for r in tim])
    print_table(f"optimizer step on the {LAYERS * len(SHAPES)} GPT-2-small hidden matrices",
                ["optimizer", "step (ms)", "× torch.optim.Muon"],
                [[name, f"{step[name + ' ms']:.0f}", f"{step[name + ' ×']:.2f}"]
                 for name in (k.removesuffix(" ms") for k in step if k.endswith(" ms"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "newton_schulz_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    acc = accuracy()
    tim = timing(args.repeats)
    step = step_timing(args.repeats)
    print_tables(acc, tim, step)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                                    "accuracy": acc, "time": tim, "step": step}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
