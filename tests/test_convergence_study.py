"""``benchmarks/convergence.py --quick``: the whole study at smoke-test scale, as a user runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"


def _study(tmp: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(STUDY), "--quick", "--runs", str(tmp / "runs"),
                           "--results", str(tmp / "results")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    done = _study(tmp)
    return tmp, done, json.loads((tmp / "results" / "convergence_quick.json").read_text())


def test_quick_study_trains_every_run_to_a_lower_loss(study):
    _, _, result = study
    runs, pre, var, ft = result["runs"], result["pretrain"], result["variants"], result["finetune"]
    for name, run in runs.items():
        assert all(math.isfinite(x) for x in run["train_loss"]), name
        assert run["val"][-1]["loss"] < run["val"][0]["loss"], name
    for optimizer, row in {**pre, **var}.items():
        assert math.isfinite(row["val_loss_mean"]), optimizer
        assert row["val_loss_per_lr"][f"{row['best_lr']:g}"] == min(row["val_loss_per_lr"].values())
    for optimizer in ("adamw", "muon", "muoneq-r", "reg", result["reg_best"]):
        assert ft[optimizer]["pydoc_val_mean"] < ft["base"]["pydoc_val"], optimizer


def test_quick_study_sweeps_each_optimizer_then_seeds_it_at_its_best_lr(study):
    _, _, result = study
    runs, pre, var, ft = result["runs"], result["pretrain"], result["variants"], result["finetune"]
    # each at the 3 lrs of the grid (and one beyond it where its best was at an end), then a second seed: every
    # optimizer of stage 1 and of fine-tuning, and the best of REG's variants (the others keep the first seed)
    seeded = [name for name, row in var.items() if len(row["val_loss_per_seed"]) == 2]
    assert len(seeded) == 1
    assert all(len(row["val_loss_per_seed"]) == 1 for name, row in var.items() if name not in seeded)
    assert all(len(row["val_loss_per_seed"]) == 2 for row in pre.values())
    sweeps = {"pre": [row["val_loss_per_lr"] for row in (*pre.values(), *var.values())],
              "ft": [row["pydoc_val_per_lr"] for name, row in ft.items() if name != "base"]}
    hot = [row["hot"] for name, row in ft.items() if name != "base" and "hot" in row]
    for stage, per_lr in sweeps.items():
        assert all(len(lrs) in (3, 4) for lrs in per_lr), per_lr
    assert sum(name.startswith("pre-") for name in runs) == sum(map(len, sweeps["pre"])) + len(pre) + 1
    seeds_and_hot = len(sweeps["ft"]) + 2 * len(hot)
    assert sum(name.startswith("ft-") for name in runs) == sum(map(len, sweeps["ft"])) + seeds_and_hot
    assert result["reg_best"] in ("reg", *seeded) and len(hot) == 3


def test_quick_study_runs_the_best_reg_adamw_muon_and_muoneq_longer_and_wider(study):
    _, _, result = study
    names = {"adamw", "muon", "muoneq-r", result["reg_best"]}
    assert set(result["long"]) == set(result["wide"]) == names
    for stage in ("long", "wide"):
        assert sum(name.startswith(f"{stage}-") for name in result["runs"]) == len(names)
    long_run = next(r for name, r in result["runs"].items() if name.startswith("long-"))
    assert long_run["final"]["steps"] == 60


def test_quick_study_writes_its_tables_and_plots(study):
    tmp, done, result = study
    assert result["table"] in done.stdout and "| reg |" in result["table"]
    assert len(result["plots"]) == 4
    for plot in result["plots"]:
        assert (tmp / "results" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_of_the_study_reuses_its_finished_runs(study):
    tmp, _, result = study
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "runs").glob("*/log.json")}
    again = _study(tmp)
    assert len(stamps) == len(result["runs"]) and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result["table"] in again.stdout
