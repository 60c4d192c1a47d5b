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
    runs = result["runs"]
    # 5 optimizers × 3 lrs + 5 second seeds; 4 × 3 fine-tuning lrs + 4 second seeds
    assert sum(name.startswith("pre-") for name in runs) == 20 and sum(name.startswith("ft-") for name in runs) == 16
    for name, run in runs.items():
        assert all(math.isfinite(x) for x in run["train_loss"]), name
        assert run["val"][-1]["loss"] < run["val"][0]["loss"], name
    for optimizer, row in result["pretrain"].items():
        assert len(row["val_loss_per_seed"]) == 2 and math.isfinite(row["val_loss_mean"]), optimizer
    base = result["finetune"]["base"]
    for optimizer in ("adamw", "muon", "muoneq-r", "reg"):
        assert result["finetune"][optimizer]["pydoc_val_mean"] < base["pydoc_val"], optimizer


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
    assert len(stamps) == 36 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result["table"] in again.stdout
