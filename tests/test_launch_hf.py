"""``launch/hf_trainer.py``, the example a user copies: under the ``deepspeed`` launcher on 2 CPU ranks
(gloo) with ``configs/hf_zero2_reg.json`` (REG named in the JSON, ``"auto"`` values) the Trainer trains
with reg_dist's REG and writes its checkpoints; a run resumed from its step-2 checkpoint (under
``torchrun``) logs the uninterrupted run's losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiproc import free_port, torchrun

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "hf_trainer.py"
TINY = ["--deepspeed", str(ROOT / "configs" / "hf_zero2_reg.json"), "--steps", "4", "--save-steps", "2",
        "--batch-size", "2", "--seq-len", "16"]
ENV = {**os.environ, "LAUNCH_DS_NO_SHM": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from launch.data import build_corpus
    return str(build_corpus(tmp_path_factory.mktemp("corpus"))["train"].parent)


def test_the_trainer_example_trains_reg_and_resumes_from_its_checkpoint(data_dir, tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    first = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPT), *TINY,
                            "--data-dir", data_dir, "--out", str(tmp_path / "a")], capture_output=True, text=True,
                           timeout=240, env=ENV, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "reg_dist.deepspeed: REG under ZeRO stage 2" in first.stdout + first.stderr
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = torchrun(SCRIPT, 2, [*TINY, "--data-dir", data_dir, "--out", str(tmp_path / "b"), "--resume",
                                   str(tmp_path / "a" / "checkpoint-2")], timeout=240, env=ENV, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    whole, rest = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(whole) == [1, 2, 3, 4] and whole[4] < whole[1]
    assert {s: rest[s] for s in (3, 4)} == pytest.approx({s: whole[s] for s in (3, 4)}, rel=1e-6)
