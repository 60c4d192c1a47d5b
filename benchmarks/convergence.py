"""The convergence and fine-tuning study: REG vs AdamW vs Muon vs MuonEq on real text, every run a
``launch/train.py`` run (one process, one thread, the same model, data order and token budget).

  1. Pretraining on the stdlib domain (Python sources): AdamW, Muon, MuonEq-R (row equilibration),
     MuonEq-RC (row and column) and REG, each at every lr of the sweep (seed 0), and at one lr more
     beyond the grid where its best is at an end; then each at its best lr (lowest final
     validation loss) with the other seeds. Reported: final validation loss,
     mean ± spread (max − min) / 2 over the seeds at the best lr. The seed sets the initialisation
     and the data order, the same for every optimizer.
  2. Fine-tuning on the pydoc domain (English reference text): the seed-0 AdamW pretraining run at
     its best lr is the base; AdamW, Muon, MuonEq-R and REG fine-tune its checkpoint at every lr of
     the fine-tuning sweep (extended likewise), then at their best lr with the other seeds. Every matrix optimizer
     scales its update to AdamW's RMS (``--rms``, 0.2), so one lr grid serves all. Reported: the
     pydoc validation loss, and the stdlib validation loss after fine-tuning (forgetting: its rise
     over the base's). REG's best setting (below) too, where it is a variant; then AdamW, Muon and
     REG's best setting at ``HOT`` (3) × their best lr, where a fine-tuning degradation would show first.
  1b. REG's variants (``VARIANTS``: balancing iterated to a tolerance, the gradient's statistics,
     statistics averaged over steps, the exponent −1, the embeddings and head on REG too), swept as
     stage 1 with the first seed; the other seeds for the best of them. REG's best setting: the lower
     mean over the seeds of REG and that variant.
  3. Longer and wider: AdamW, Muon, MuonEq-R and REG's best setting at their stage-1 best lr, the first
     seed, with 4× the steps (``long``) and with the wider model (``wide``; width 256, 3.3M parameters).
     These are queued right after stage 1 and run beside the others.

Runs go to ``--runs`` (one directory each, reused when a rerun asks for the same command: the study
resumes); results to ``--results``: ``convergence.json`` (every run's curves and finals, the tables)
and the plots ``convergence_pretrain.png``, ``convergence_lr.png``, ``convergence_finetune.png``,
``convergence_scaled.png``.

Run:  .venv/bin/python benchmarks/convergence.py [--quick] [--workers 2]
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: train.py arguments of the optimizer
PRETRAIN = {"adamw": ["--optimizer", "adamw"], "muon": ["--optimizer", "muon"],
            "muoneq-r": ["--optimizer", "muoneq", "--muoneq-mode", "row"],
            "muoneq-rc": ["--optimizer", "muoneq", "--muoneq-mode", "rowcol"],
            "reg": ["--optimizer", "reg", "--exponent", "-0.5"]}  # ALGORITHMS.md §1: REG's default before the study
FINETUNE = {name: PRETRAIN[name] for name in ("adamw", "muon", "muoneq-r", "reg")}
BASE = "adamw"  # the optimizer the fine-tuning base is pretrained with
# REG's variants (``reg_dist.REG``'s keyword-only hyper-parameters, and the embeddings on REG too)
VARIANTS = {"reg-balanced": ["--optimizer", "reg", "--reg-iters", "10", "--tol", "0.05", "--exponent", "-0.5"],
            "reg-gradient": ["--optimizer", "reg", "--stats", "gradient", "--exponent", "-0.5"],
            "reg-averaged": ["--optimizer", "reg", "--stats-beta", "0.95", "--exponent", "-0.5"],
            "reg-exponent1": ["--optimizer", "reg", "--exponent", "-1"],  # REG's default since the study
            "reg-embeddings": ["--optimizer", "reg", "--matrix-embeddings", "--exponent", "-0.5"]}
SCALED = ("adamw", "muon", "muoneq-r")  # besides the best REG setting, at the longer run and the wider model
HOT = 3  # the fine-tuning lr multiple of each one's best at which a fine-tuning degradation would show first

# the study's scale: the full one (<= 2 h on 2 cores) and --quick (a smoke test, <= 3 min)
SCALES = {
    "full": {"model": ["--depth", "4", "--width", "128", "--heads", "4", "--seq-len", "128", "--batch-size", "16"],
             "pretrain": ["--steps", "500", "--warmup", "25", "--eval-every", "50", "--eval-batches", "8"],
             "finetune": ["--steps", "200", "--warmup", "10", "--eval-every", "25", "--eval-batches", "8"],
             "pretrain_lrs": [1e-3, 3e-3, 1e-2], "finetune_lrs": [3e-4, 1e-3, 3e-3], "seeds": [0, 1],
             "long": ["--steps", "2000", "--warmup", "100", "--eval-every", "200", "--eval-batches", "8"],
             "wide": ["--depth", "4", "--width", "256", "--heads", "4", "--seq-len", "128", "--batch-size", "16"]},
    "quick": {"model": ["--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "8"],
              "pretrain": ["--steps", "30", "--warmup", "3", "--eval-every", "10", "--eval-batches", "2"],
              "finetune": ["--steps", "12", "--warmup", "2", "--eval-every", "4", "--eval-batches", "2"],
              "pretrain_lrs": [3e-3, 1e-2, 3e-2], "finetune_lrs": [1e-3, 3e-3, 1e-2], "seeds": [0, 1],
              "long": ["--steps", "60", "--warmup", "6", "--eval-every", "20", "--eval-batches", "2"],
              "wide": ["--depth", "1", "--width", "64", "--heads", "2", "--seq-len", "32", "--batch-size", "8"]},
}
COMMON = ["--threads", "1", "--weight-decay", "0.1", "--clip", "1.0", "--log-every", "1000000"]


def train_run(run_dir: str, argv: list[str]) -> dict:
    """One ``launch/train.py`` run in this worker (its output to ``run_dir``/stdout.txt); its log.

    A run directory whose ``command.json`` (written last) holds the same arguments is reused."""
    from launch.train import main
    run_dir = Path(run_dir)
    command = run_dir / "command.json"
    if command.is_file() and json.loads(command.read_text()) == argv and (run_dir / "log.json").is_file():
        return {**json.loads((run_dir / "log.json").read_text()), "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with open(run_dir / "stdout.txt", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        log = main([*argv, "--out", str(run_dir), "--overwrite"])
    command.write_text(json.dumps(argv))
    return log


class Study:
    """Runs a stage's runs on a pool of one-thread workers and keeps every run's log."""

    def __init__(self, scale: dict, runs: Path, workers: int, data_dir: Path) -> None:
        self.scale, self.runs, self.data_dir = scale, runs, data_dir
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.logs: dict[str, dict] = {}

    def run(self, specs: dict[str, list[str]]) -> None:
        """``specs``: run name → train.py arguments; every run of the stage at once."""
        self.collect(self.submit(specs))

    def submit(self, specs: dict[str, list[str]]) -> dict:
        """Queue the runs of ``specs`` (run name → train.py arguments) without waiting: their futures."""
        return {name: self.pool.submit(train_run, str(self.runs / name),
                                       [*COMMON, "--data-dir", str(self.data_dir), *argv])
                for name, argv in specs.items()}

    def collect(self, futures: dict) -> None:
        """Wait for the runs of ``futures`` (``submit``'s) and keep their logs."""
        for name, future in futures.items():
            self.logs[name] = log = future.result()
            final = log["final"]
            print(f"  {name:<36} val {final['val_loss']:.4f}  ({final['train_s']:.0f} s, "
                  f"{final['tokens_per_s']:,.0f} tok/s)", flush=True)


def name_of(stage: str, opt: str, lr: float, seed: int) -> str:
    return f"{stage}-{opt}-lr{lr:g}-s{seed}"


def best_lr(logs: dict, stage: str, opt: str, lrs: list[float], seed: int) -> float:
    """The lr of the lowest final validation loss (a non-finite loss never wins)."""
    def loss(lr: float) -> float:
        value = logs[name_of(stage, opt, lr, seed)]["final"]["val_loss"]
        return value if math.isfinite(value) else math.inf
    return min(lrs, key=loss)


def at_edge(lr: float, lrs: list[float]) -> bool:
    """Whether the best lr is the sweep's lowest or highest: the optimum may lie outside it."""
    return lr in (min(lrs), max(lrs))


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max − min) / 2."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def sweep(study: Study, stage: str, opts: dict, lrs: list[float], spec, seeded: bool = True) -> tuple[dict, dict]:
    """Every optimizer at every lr of ``lrs`` (the first seed); where its best is an end of the grid, at
    one lr more beyond it (the grid's own ratio); then (``seeded``) the other seeds at its best lr. Returns
    ``({opt: lrs it ran}, {opt: best lr})``; ``spec(opt, lr, seed)`` gives a run's arguments."""
    seed0, others = study.scale["seeds"][0], study.scale["seeds"][1:]
    study.run({name_of(stage, o, lr, seed0): spec(o, lr, seed0) for o in opts for lr in lrs})
    ratio = lrs[1] / lrs[0]
    beyond = {}
    for o in opts:
        best = best_lr(study.logs, stage, o, lrs, seed0)
        if at_edge(best, lrs):
            beyond[o] = float(f"{best * ratio if best == max(lrs) else best / ratio:.3g}")
    if beyond:
        print(f"{stage}: one lr beyond the grid where the best is at its end: {beyond}", flush=True)
        study.run({name_of(stage, o, lr, seed0): spec(o, lr, seed0) for o, lr in beyond.items()})
    ran = {o: sorted([*lrs, *([beyond[o]] if o in beyond else [])]) for o in opts}
    best = {o: best_lr(study.logs, stage, o, ran[o], seed0) for o in opts}
    if seeded:
        print(f"{stage}: the other seeds at the best lr", flush=True)
        study.run({name_of(stage, o, best[o], seed): spec(o, best[o], seed) for o in opts for seed in others})
    return ran, best


def per_lr(study: Study, stage: str, opt: str, lrs: list[float]) -> dict[str, float]:
    """``{lr: final validation loss}`` of the first seed's runs."""
    seed0 = study.scale["seeds"][0]
    return {f"{lr:g}": study.logs[name_of(stage, opt, lr, seed0)]["final"]["val_loss"] for lr in lrs}


def pretrain_spec(study: Study, args_of: dict[str, list[str]], model: list[str] | None = None,
                  schedule: list[str] | None = None):
    """``spec(opt, lr, seed)``: a stdlib pretraining run's arguments (the scale's model and schedule unless
    given); the fine-tuning base keeps its last checkpoint, the other runs write none."""
    s = study.scale
    model, schedule = model or s["model"], schedule or s["pretrain"]

    def spec(opt: str, lr: float, seed: int) -> list[str]:
        steps = schedule[schedule.index("--steps") + 1]
        save = ["--save-every", steps, "--keep", "1"] if opt == BASE and schedule is s["pretrain"] else ["--no-save"]
        return [*model, *schedule, "--data", "stdlib", *args_of[opt], "--lr", f"{lr:g}", "--seed", str(seed), *save]

    return spec


def pretrain_table(study: Study, opts, ran: dict, best: dict) -> dict:
    """Each optimizer's best lr, its final validation loss over the seeds there, and its loss per lr."""
    table = {}
    for o in opts:
        finals = [study.logs[name_of("pre", o, best[o], seed)]["final"]["val_loss"] for seed in study.scale["seeds"]]
        mean, spread = mean_spread(finals)
        table[o] = {"best_lr": best[o], "best_lr_at_grid_edge": at_edge(best[o], ran[o]),
                    "val_loss_mean": mean, "val_loss_spread": spread, "val_loss_per_seed": finals,
                    "val_loss_per_lr": per_lr(study, "pre", o, ran[o])}
    return table


def pretrain(study: Study) -> dict:
    """Stage 1: every optimizer's lr sweep on stdlib, then the other seeds at its best lr."""
    print("pretraining: lr sweep", flush=True)
    ran, best = sweep(study, "pre", PRETRAIN, study.scale["pretrain_lrs"], pretrain_spec(study, PRETRAIN))
    return pretrain_table(study, PRETRAIN, ran, best)


def variants(study: Study) -> dict:
    """Stage 1b: REG's variants (``VARIANTS``) swept as stage 1's optimizers (the first seed); the other
    seeds for the best of them only (the lowest first-seed loss). Its table row, as ``pretrain_table``'s;
    the others' hold the first seed alone (spread 0)."""
    print("pretraining REG's variants: lr sweep", flush=True)
    spec = pretrain_spec(study, VARIANTS)
    ran, best = sweep(study, "pre", VARIANTS, study.scale["pretrain_lrs"], spec, seeded=False)
    seed0, others = study.scale["seeds"][0], study.scale["seeds"][1:]
    top = min(VARIANTS, key=lambda o: study.logs[name_of("pre", o, best[o], seed0)]["final"]["val_loss"])
    print(f"pre: the other seeds of the best variant, {top}", flush=True)
    study.run({name_of("pre", top, best[top], seed): spec(top, best[top], seed) for seed in others})
    table = pretrain_table(study, [top], ran, best)
    for o in VARIANTS:
        if o != top:
            loss = study.logs[name_of("pre", o, best[o], seed0)]["final"]["val_loss"]
            table[o] = {"best_lr": best[o], "best_lr_at_grid_edge": at_edge(best[o], ran[o]), "val_loss_mean": loss,
                        "val_loss_spread": 0.0, "val_loss_per_seed": [loss],
                        "val_loss_per_lr": per_lr(study, "pre", o, ran[o])}
    return {o: table[o] for o in VARIANTS}


def scaled(study: Study, best: dict[str, float], args_of: dict[str, list[str]]) -> dict:
    """The runs of stage 3 of the optimizers ``best`` (name → its best lr at the study's scale), queued:
    each at that lr, the first seed, ``long`` (the schedule, 4× the steps) and ``wide`` (the model)."""
    s, seed0 = study.scale, study.scale["seeds"][0]
    long = pretrain_spec(study, args_of, schedule=s["long"])
    wide = pretrain_spec(study, args_of, model=s["wide"])
    return study.submit({**{name_of("long", o, lr, seed0): long(o, lr, seed0) for o, lr in best.items()},
                         **{name_of("wide", o, lr, seed0): wide(o, lr, seed0) for o, lr in best.items()}})


def scaled_table(study: Study, best: dict[str, float], stage: str) -> dict:
    """``{opt: {lr, val_loss, vs_adamw}}`` of stage 3's ``stage`` ("long" or "wide") runs."""
    seed0 = study.scale["seeds"][0]
    loss = {o: study.logs[name_of(stage, o, lr, seed0)]["final"]["val_loss"] for o, lr in best.items()}
    return {o: {"lr": lr, "val_loss": loss[o], "vs_adamw": loss[o] - loss[BASE]} for o, lr in best.items()}


def finetune(study: Study, pre_table: dict, reg: str) -> dict:
    """Stage 2: fine-tune the AdamW base on pydoc: every optimizer's lr sweep (REG's best setting ``reg``
    too, where it is a variant), then the other seeds; then AdamW, Muon and ``reg`` at ``HOT`` × their best lr."""
    s = study.scale
    seed0 = s["seeds"][0]
    base_run = study.runs / name_of("pre", BASE, pre_table[BASE]["best_lr"], seed0)
    base = [*s["model"], *s["finetune"], "--data", "pydoc", "--eval-also", "stdlib", "--init", str(base_run)]
    opts = {**FINETUNE, reg: {**PRETRAIN, **VARIANTS}[reg]}

    def spec(opt: str, lr: float, seed: int) -> list[str]:
        return [*base, *opts[opt], "--lr", f"{lr:g}", "--seed", str(seed), "--no-save"]

    print(f"fine-tuning {base_run.name} on pydoc: lr sweep", flush=True)
    ran, best = sweep(study, "ft", opts, s["finetune_lrs"], spec)
    hot = {o: float(f"{best[o] * HOT:.3g}") for o in (BASE, "muon", reg)}
    print(f"fine-tuning at {HOT}x the best lr: {hot}", flush=True)
    study.run({name_of("ft", o, lr, seed): spec(o, lr, seed) for o, lr in hot.items() for seed in s["seeds"]})
    first = study.logs[name_of("ft", BASE, best[BASE], seed0)]
    base_pydoc, base_stdlib = first["val"][0]["loss"], first["val_also"]["stdlib"][0]["loss"]
    table = {"base": {"run": base_run.name, "pydoc_val": base_pydoc, "stdlib_val": base_stdlib}}

    def row(o: str, lr: float) -> dict:
        logs = [study.logs[name_of("ft", o, lr, seed)] for seed in s["seeds"]]
        pydoc = mean_spread([log["final"]["val_loss"] for log in logs])
        stdlib = mean_spread([log["val_also"]["stdlib"][-1]["loss"] for log in logs])
        return {"pydoc_val_mean": pydoc[0], "pydoc_val_spread": pydoc[1], "stdlib_val_mean": stdlib[0],
                "stdlib_val_spread": stdlib[1], "forgetting_mean": stdlib[0] - base_stdlib}

    for o in opts:
        table[o] = {"best_lr": best[o], "best_lr_at_grid_edge": at_edge(best[o], ran[o]), **row(o, best[o]),
                    "pydoc_val_per_lr": per_lr(study, "ft", o, ran[o])}
        if o in hot:
            table[o]["hot"] = {"lr": hot[o], **row(o, hot[o])}
    return table


def markdown(pre: dict, var: dict, ft: dict, long: dict, wide: dict, scale: dict) -> str:
    """The result tables: pretraining (with REG's variants), fine-tuning, at HOT × the best lr, longer, wider."""
    rows = {**pre, **var}
    best_pre = min(rows, key=lambda o: rows[o]["val_loss_mean"])

    def spread(r: dict) -> str:
        return f" ± {r['val_loss_spread']:.4f}" if len(r["val_loss_per_seed"]) > 1 else " (seed 0)"

    lines = ["| pretraining (stdlib) | best lr | final val loss (mean ± spread) | vs AdamW |", "|---|---|---|---|"]
    for o, r in rows.items():
        edge = " (grid edge)" if r["best_lr_at_grid_edge"] else ""
        mark = " **best**" if o == best_pre else ""
        lines.append(f"| {o}{mark} | {r['best_lr']:g}{edge} | {r['val_loss_mean']:.4f}{spread(r)} | "
                     f"{r['val_loss_mean'] - pre['adamw']['val_loss_mean']:+.4f} |")
    b = ft["base"]
    lines += ["", f"| fine-tuning (pydoc), base {b['run']}: pydoc val {b['pydoc_val']:.4f}, stdlib val "
              f"{b['stdlib_val']:.4f} | lr | pydoc val loss | stdlib val loss after | forgetting |",
              "|---|---|---|---|---|"]
    for o, r in ft.items():
        if o == "base":
            continue
        edge = " (grid edge)" if r["best_lr_at_grid_edge"] else ""
        hot = [(f"{o} at {HOT}× its best", f"{r['hot']['lr']:g}", r["hot"])] if "hot" in r else []
        for label, lr, x in [(o, f"{r['best_lr']:g}{edge}", r), *hot]:
            lines.append(f"| {label} | {lr} | {x['pydoc_val_mean']:.4f} ± {x['pydoc_val_spread']:.4f} | "
                         f"{x['stdlib_val_mean']:.4f} ± {x['stdlib_val_spread']:.4f} | {x['forgetting_mean']:+.4f} |")
    steps, width = (scale[k][scale[k].index(flag) + 1] for k, flag in (("long", "--steps"), ("wide", "--width")))
    for title, table in ((f"longer ({steps} steps), the stage-1 best lr, seed 0", long),
                         (f"wider (width {width}), the stage-1 best lr, seed 0", wide)):
        lines += ["", f"| {title} | lr | final val loss | vs AdamW |", "|---|---|---|---|"]
        lines += [f"| {o} | {r['lr']:g} | {r['val_loss']:.4f} | {r['vs_adamw']:+.4f} |" for o, r in table.items()]
    return "\n".join(lines)


def plot(study: Study, pre: dict, ft: dict, scaled_best: dict, results: Path, prefix: str) -> list[Path]:
    """Validation curves at the best lr (seed 0), the lr sweeps, the fine-tuning trade-off, the longer and
    wider runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = study.scale["seeds"][0]
    paths = [results / f"{prefix}_{what}.png" for what in ("pretrain", "lr", "finetune", "scaled")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o, r in pre.items():
        log = study.logs[name_of("pre", o, r["best_lr"], seed0)]
        ax.plot([v["step"] for v in log["val"]], [v["loss"] for v in log["val"]], marker=".",
                label=f"{o} (lr {r['best_lr']:g})")
    ax.set(xlabel="step", ylabel="validation loss (stdlib, nats/byte)", title="Pretraining, best lr, seed 0")
    lows = [v["loss"] for o, r in pre.items() for v in study.logs[name_of("pre", o, r["best_lr"], seed0)]["val"][1:]]
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(paths[0], dpi=110), plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, table, key, title in ((axes[0], pre, "val_loss_per_lr", "pretraining (stdlib val)"),
                                  (axes[1], {o: r for o, r in ft.items() if o != "base"}, "pydoc_val_per_lr",
                                   "fine-tuning (pydoc val)")):
        lrs = sorted({float(lr) for r in table.values() for lr in r[key]})
        for o, r in table.items():
            ax.plot(*zip(*sorted((float(lr), loss) for lr, loss in r[key].items())), marker="o", label=o)
        ax.set(xscale="log", xlabel="peak lr", ylabel="final validation loss", title=title)
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(paths[1], dpi=110), plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for o, r in ft.items():
        if o == "base":
            continue
        log = study.logs[name_of("ft", o, r["best_lr"], seed0)]
        axes[0].plot([v["step"] for v in log["val"]], [v["loss"] for v in log["val"]], marker=".", label=o)
        axes[1].plot([v["step"] for v in log["val_also"]["stdlib"]], [v["loss"] for v in log["val_also"]["stdlib"]],
                     marker=".", label=o)
    axes[0].set(xlabel="fine-tuning step", ylabel="validation loss", title="pydoc (the fine-tuning domain)")
    axes[1].set(xlabel="fine-tuning step", ylabel="validation loss", title="stdlib (forgetting)")
    for ax in axes:
        ax.legend(), ax.grid(alpha=0.3)
    fig.suptitle(f"Fine-tuning the AdamW base, best lr each, seed {seed0}")
    fig.tight_layout(), fig.savefig(paths[2], dpi=110), plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, stage, title in ((axes[0], "long", "longer run (stdlib val)"), (axes[1], "wide", "wider model (stdlib val)")):
        for o, lr in scaled_best.items():
            log = study.logs[name_of(stage, o, lr, seed0)]
            ax.plot([v["step"] for v in log["val"]], [v["loss"] for v in log["val"]], marker=".",
                    label=f"{o} (lr {lr:g})")
        lows = [v["loss"] for o, lr in scaled_best.items()
                for v in study.logs[name_of(stage, o, lr, seed0)]["val"][1:]]
        ax.set(xlabel="step", ylabel="validation loss", title=title, ylim=(min(lows) - 0.05, min(lows) + 1.5))
        ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(paths[3], dpi=110), plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smoke-test scale (<= 3 min)")
    p.add_argument("--workers", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--runs", type=Path, default=None, help="run directories (default runs/convergence[-quick])")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "cache", help="corpus cache")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    scale_name = "quick" if args.quick else "full"
    prefix = "convergence" + ("_quick" if args.quick else "")
    runs = args.runs or ROOT / "runs" / prefix.replace("_", "-")
    args.results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = Study(SCALES[scale_name], runs, args.workers, args.data_dir)
    try:
        pre = pretrain(study)
        early = scaled(study, {o: pre[o]["best_lr"] for o in SCALED}, PRETRAIN)  # queued now, collected at the end
        var = variants(study)
        candidates = {o: r for o, r in {"reg": pre["reg"], **var}.items() if len(r["val_loss_per_seed"]) > 1}
        reg = min(candidates, key=lambda o: candidates[o]["val_loss_mean"])  # REG's best setting, over the seeds
        print(f"REG's best setting: {reg}", flush=True)
        scaled_best = {**{o: pre[o]["best_lr"] for o in SCALED}, reg: candidates[reg]["best_lr"]}
        late = scaled(study, {reg: candidates[reg]["best_lr"]}, {**PRETRAIN, **VARIANTS})
        ft = finetune(study, pre, reg)
        print("the longer and wider runs", flush=True)
        study.collect(early), study.collect(late)
    finally:
        study.pool.shutdown(cancel_futures=True)
    wall = time.perf_counter() - start
    long, wide = (scaled_table(study, scaled_best, stage) for stage in ("long", "wide"))
    table = markdown(pre, var, ft, long, wide, study.scale)
    print(f"\n{table}\n")
    plots = plot(study, pre, ft, scaled_best, args.results, prefix)
    result = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
              "scale": scale_name, "config": SCALES[scale_name], "common": COMMON, "workers": args.workers,
              "cpus": os.cpu_count(), "wall_s": wall,
              "runs_reused": sum(log.get("reused", False) for log in study.logs.values()),
              "runs_train_s": sum(log["final"]["train_s"] for log in study.logs.values()),
              "pretrain": pre, "variants": var, "reg_best": reg, "finetune": ft, "long": long, "wide": wide,
              "table": table,
              "plots": [str(path.relative_to(args.results)) for path in plots],
              "runs": {name: {"args": log["args"], "final": log["final"], "val": log["val"],
                              "val_also": log.get("val_also", {}),
                              "train_loss": [r["loss"] for r in log["train"]]}
                       for name, log in study.logs.items()}}
    out = args.results / f"{prefix}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} and {', '.join(str(path) for path in plots)} ({wall / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
