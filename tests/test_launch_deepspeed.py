"""``launch/train.py --deepspeed CONFIG``: real ``deepspeed`` launcher and ``torchrun`` runs (2 CPU ranks, gloo,
configs/zero2_reg.json) of a tiny model train with a finite, falling loss and agree; a checkpoint of the 2-rank
run resumes in one process at another ZeRO stage on the same losses; bad combinations exit early."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiproc import free_port, torchrun

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
CONFIG = ROOT / "configs" / "zero2_reg.json"  # micro 8 × accumulation 1: global batch 16 on 2 ranks
TINY = ["--deepspeed", str(CONFIG), "--steps", "8", "--warmup", "1", "--depth", "1", "--width", "32", "--heads", "2",
        "--seq-len", "32", "--eval-every", "4", "--eval-batches", "1", "--log-every", "4", "--threads", "1"]
ENV = {**os.environ, "LAUNCH_DS_NO_SHM": "1", "PYTHONPATH": str(ROOT)}  # no shm comm op JIT build (gloo only)


def _deepspeed(args):
    launcher = Path(sys.executable).parent / "deepspeed"
    return subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)


def _torchrun(args):
    return torchrun(TRAIN, 2, args, timeout=120, env=ENV, cwd=ROOT)


def _check(run, out: Path) -> dict:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    losses = [r["loss"] for r in log["train"]]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    f = log["final"]
    assert f["zero_stage"] == 2 and f["world"] == f["dp"] == 2 and f["skipped_steps"] == 0
    assert f["train_loss_last"] < f["train_loss_first"] and log["val"][-1]["loss"] < log["val"][0]["loss"]
    assert log["args"]["batch_size"] == 16 and log["args"]["optimizer"] == "reg"
    return log


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from launch.data import build_corpus
    return str(build_corpus(tmp_path_factory.mktemp("corpus"))["train"].parent)


@pytest.fixture(scope="module")
def launcher_log(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "run"
    return _check(_deepspeed([*TINY, "--data-dir", data_dir, "--out", str(out)]), out)


def test_deepspeed_launcher_trains(launcher_log):
    assert "deepspeed_config" in launcher_log


def test_torchrun_trains_the_same_run(data_dir, launcher_log, tmp_path):
    log = _check(_torchrun([*TINY, "--data-dir", data_dir, "--out", str(tmp_path / "run")]), tmp_path / "run")
    # same data, model, config and world: the same losses whichever launcher started the ranks
    assert [r["loss"] for r in log["train"]] == pytest.approx([r["loss"] for r in launcher_log["train"]], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "4"], "--batch-size 4 disagrees with --deepspeed"),  # one process: 8 × 1 × 1 = 8
    (["--tp", "2"], "--tp 2 with --deepspeed"),
    (["--lr", "0.1", "--optimizer", "muon"], "--optimizer, --lr with --deepspeed: the config's optimizer block"),
])
def test_bad_combinations_exit_before_training(extra, message, tmp_path, capsys):
    from launch.train import main
    with pytest.raises(SystemExit) as e:
        main([*TINY, *extra, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_batch_size_message_under_torchrun(tmp_path):
    run = _torchrun([*TINY, "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert run.returncode != 0
    assert "--batch-size 8 disagrees with --deepspeed" in run.stderr and "= 16" in run.stderr


def test_one_process_run(data_dir, tmp_path):
    """``python launch/train.py --deepspeed CONFIG`` (a subprocess: DeepSpeed's comm state stays out of pytest)."""
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, str(TRAIN), *TINY, "--steps", "3", "--data-dir", data_dir, "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["args"]["batch_size"] == 8 and all(math.isfinite(r["loss"]) for r in log["train"])


def test_a_two_rank_checkpoint_resumes_in_one_process_at_another_stage(data_dir, launcher_log, tmp_path):
    """--save-every 4 on 2 ranks (ZeRO 2, micro-batch 8), then ``--resume`` of its step-4 checkpoint in one
    process at ZeRO 1 with micro-batch 16 (the same global batch, so the same windows): steps 5-8 are
    the uninterrupted run's, within fp32 rounding (the sums over ranks are ordered otherwise)."""
    saved = tmp_path / "saved"
    log = _check(_torchrun([*TINY, "--save-every", "4", "--data-dir", data_dir, "--out", str(saved)]), saved)
    assert [r["loss"] for r in log["train"]] == [r["loss"] for r in launcher_log["train"]]  # saving changes nothing
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    config = {**json.loads(CONFIG.read_text()), "train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 1}}
    (tmp_path / "zero1.json").write_text(json.dumps(config))
    args = [*TINY, "--deepspeed", str(tmp_path / "zero1.json"), "--data-dir", data_dir, "--resume",
            str(saved / "checkpoints" / "step-000004"), "--out", str(tmp_path / "resumed")]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=120, env=env,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "resumed from" in run.stdout and "final checkpoint" in run.stdout
    resumed = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert resumed["resumed"] == [{"step": 4, "from": str(saved / "checkpoints" / "step-000004")}]
    assert [r["step"] for r in resumed["train"]] == list(range(1, 9))
    expected = [r["loss"] for r in launcher_log["train"]]
    assert [r["loss"] for r in resumed["train"]] == pytest.approx(expected, rel=1e-5)
    assert resumed["val"][-1]["loss"] == pytest.approx(launcher_log["val"][-1]["loss"], rel=1e-5)
    assert resumed["final"]["zero_stage"] == 1 and resumed["final"]["world"] == 1


def test_deepspeed_own_optimizer_types_write_no_checkpoint_and_refuse_save_every(tmp_path, capsys):
    from launch.train import main
    config = {**json.loads(CONFIG.read_text()), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    (tmp_path / "adamw.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--deepspeed", str(tmp_path / "adamw.json"), "--save-every", "2", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "optimizer type 'AdamW' is DeepSpeed's own (use --no-save)" in capsys.readouterr().err
