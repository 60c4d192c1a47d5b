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
    runs, pre, ft = result["runs"], result["pretrain"], result["finetune"]
    # each optimizer at the 3 lrs of the grid (and one beyond it where its best was at an end), then a second seed
    sweeps = {"pre": [row["val_loss_per_lr"] for row in pre.values()],
              "ft": [row["pydoc_val_per_lr"] for name, row in ft.items() if name != "base"]}
    for stage, per_lr in sweeps.items():
        assert all(len(lrs) in (3, 4) for lrs in per_lr), per_lr
        assert sum(name.startswith(f"{stage}-") for name in runs) == sum(map(len, per_lr)) + len(per_lr)
    for name, run in runs.items():
        assert all(math.isfinite(x) for x in run["train_loss"]), name
        assert run["val"][-1]["loss"] < run["val"][0]["loss"], name
    for optimizer, row in pre.items():
        assert len(row["val_loss_per_seed"]) == 2 and math.isfinite(row["val_loss_mean"]), optimizer
        assert row["val_loss_per_lr"][f"{row['best_lr']:g}"] == min(row["val_loss_per_lr"].values())
    for optimizer in ("adamw", "muon", "muoneq-r", "reg"):
        assert ft[optimizer]["pydoc_val_mean"] < ft["base"]["pydoc_val"], optimizer


def test_quick_study_writes_its_tables_and_plots(study):
    tmp, done, result = study
    assert result["table"] in done.stdout and "| reg |" in result["table"]
    assert len(result["plots"]) == 3
    for plot in result["plots"]:
        assert (tmp / "results" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_of_the_study_reuses_its_finished_runs(study):
    tmp, _, result = study
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "runs").glob("*/log.json")}
    again = _study(tmp)
    assert len(stamps) == len(result["runs"]) and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result["table"] in again.stdout
