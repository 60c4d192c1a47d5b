"""The training entry point's pieces: the stdlib corpus, its loader, a short end-to-end run; the multi-rank
launch (bad input, real torchrun runs with dp = 2 and tp = 2 against one process, checkpoints and resume)."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from launch.data import ByteWindows, build_corpus, split_of, stdlib_files
from launch.model import GPT, GPTConfig
from launch.train import all_reduce_mean_, main, parse_args
from multiproc import run_ranks
from reg_dist import REG


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_split_is_by_file_and_leaves_out_installed_packages():
    files = stdlib_files()
    assert not any("site-packages" in rel for rel, _ in files)
    splits = {split_of(rel) for rel, _ in files}
    assert splits == {"train", "val"}
    val = [rel for rel, _ in files if split_of(rel) == "val"]
    assert 0.02 < len(val) / len(files) < 0.1


def test_corpus_is_built_once_and_reused(corpus, tmp_path):
    again = build_corpus(corpus["train"].parent)
    assert again == corpus
    assert corpus["train"].stat().st_size > 10 * corpus["val"].stat().st_size > 0


def test_windows_are_shifted_by_one_byte(corpus):
    x, y = ByteWindows(corpus["train"], seq_len=32, batch_size=4, seed=1).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_rank_shards_together_equal_the_single_rank_batch(corpus):
    whole = ByteWindows(corpus["train"], 16, 6, seed=3).next_batch()[0]
    parts = [ByteWindows(corpus["train"], 16, 3, seed=3, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("optimizer", ["reg", "muon", "muoneq", "adamw"])
def test_short_training_run_writes_its_log(optimizer, corpus, tmp_path):
    log = main(["--optimizer", optimizer, "--steps", "4", "--depth", "1", "--width", "32", "--heads", "2",
                "--seq-len", "32", "--batch-size", "4", "--warmup", "1", "--eval-every", "2", "--eval-batches", "1",
                "--data-dir", str(corpus["train"].parent), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["final"]["steps"] == 4 and len(saved["train"]) == 4
    assert [v["step"] for v in saved["val"]] == [0, 2, 4]
    assert log["final"]["val_loss"] == saved["final"]["val_loss"]


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--width", "30", "--heads", "4"])
    assert e.value.code == 2
    assert "divisible by heads" in capsys.readouterr().err


# ---- the multi-rank entry point: bad input, torchrun runs, checkpoints ----------------------------

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"
TINY = ["--steps", "6", "--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--warmup", "1", "--eval-every", "3", "--eval-batches", "1", "--log-every", "3", "--threads", "1"]
CLIPPED = ["--clip", "0.05"]  # below every gradient norm of these runs: clipping acts on every step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master-port={_free_port()}", "--master-addr=127.0.0.1", str(TRAIN), *args],
                          capture_output=True, text=True, timeout=240)


def _main_on_ranks(world: int, argv: list[str]) -> list:
    """``main(argv)`` on ``world`` ranks forked from this (warm) process, with torchrun's environment:
    each rank's returned log (rank 0) or {}; ``("exit", code)`` for a rank that exited."""
    def rank_main(rank, world):
        try:
            return main(argv)
        except SystemExit as e:
            return ("exit", e.code)

    return run_ranks(world, rank_main, init_group=False)


def _final_model(run: Path, rank: int = 0) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / f"rank{rank}.pt", weights_only=True)["model"]


def _single(corpus, out, *extra) -> dict:
    return main([*TINY, *extra, "--data-dir", str(corpus["train"].parent), "--out", str(out)])


def _assert_same_losses(log_a: dict, log_b: dict) -> None:
    a, b = [r["loss"] for r in log_a["train"]], [r["loss"] for r in log_b["train"]]
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.tensor([v["loss"] for v in log_a["val"]]),
                               torch.tensor([v["loss"] for v in log_b["val"]]), rtol=0, atol=2e-5)


def _assert_falls(log: dict) -> None:
    losses = [r["loss"] for r in log["train"]]
    assert all(math.isfinite(x) for x in losses)
    assert log["val"][-1]["loss"] < log["val"][0]["loss"] - 0.05, log["val"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_tp_must_divide_the_heads(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tp", "3", "--heads", "4", "--width", "48"])
    assert e.value.code == 2
    assert "--tp 3 must divide --heads = 4" in capsys.readouterr().err


def test_one_process_cannot_be_two_tp_ranks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tp", "2"])
    assert e.value.code == 2
    assert "world size 1" in capsys.readouterr().err


def test_global_batch_must_split_over_dp(corpus):
    outcome = _main_on_ranks(2, ["--batch-size", "3", "--data-dir", str(corpus["train"].parent)])
    assert outcome == [("exit", 2), ("exit", 2)]


def test_world_other_than_dp_times_tp_fails_on_every_rank_before_training(tmp_path):
    run = _torchrun(2, [*TINY, "--dp", "1", "--tp", "1", "--out", str(tmp_path / "run")])
    assert run.returncode != 0
    message = "world size 2 (torchrun --nproc_per_node × nodes) must equal --dp × --tp = 1 × 1 = 1"
    assert run.stderr.count(message) == 1, run.stderr[-3000:]  # printed by rank 0 only
    assert "step 1/" not in run.stdout and not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten_without_overwrite(tmp_path, capsys):
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert parse_args([*TINY, "--out", str(tmp_path), "--overwrite"]).overwrite


def test_missing_corrupt_or_foreign_checkpoints_fail_before_training(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--resume", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "no checkpoint there" in capsys.readouterr().err

    _single(corpus, tmp_path / "run", "--save-every", "3", "--steps", "3", "--warmup", "1")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "dp": 2, "world": 2}))
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data-dir", str(corpus["train"].parent), "--resume", str(ckpt)])
    assert e.value.code == 2 and "resume at another world size is issue 8's DCP work" in capsys.readouterr().err

    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data-dir", str(corpus["train"].parent), "--resume", str(tmp_path / "run")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"corrupt checkpoint {ckpt / 'rank0.pt'}" in err and "step 4/" not in err


def test_averaging_the_gradients_before_the_native_step_changes_nothing():
    """The clipping path under dp: gradients all-reduced (averaged) here, then ``opt.step()`` averages
    the identical copies again; for dp = 2 the parameters are bit for bit those of the plain step."""
    cfg = GPTConfig(depth=1, width=32, heads=2, seq_len=16)
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))

    def body(rank, world):
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
        after = []
        for pre_average in (False, True):
            torch.manual_seed(0)
            model = GPT(cfg)
            opt = REG(model, mesh=mesh, lr=0.02)
            for _ in range(2):
                x = tokens[rank * 2:(rank + 1) * 2]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
                if pre_average:
                    all_reduce_mean_([p.grad for p in model.parameters()], mesh.get_group("dp"), world)
                opt.step()
            after.append({k: v.clone() for k, v in model.state_dict().items()})
        return all(torch.equal(after[0][k], after[1][k]) for k in after[0])

    assert run_ranks(2, body) == [True, True]


def test_torchrun_data_parallel_run_equals_the_single_process_run(corpus, tmp_path):
    single = _single(corpus, tmp_path / "single", *CLIPPED, "--save-every", "6")
    run = _torchrun(2, [*TINY, *CLIPPED, "--dp", "2", "--save-every", "6", "--data-dir", str(corpus["train"].parent),
                        "--out", str(tmp_path / "dp2")])
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("done: train loss") == 1 and "world 2 = dp 2 × tp 1" in run.stdout  # rank 0 prints
    log = json.loads((tmp_path / "dp2" / "log.json").read_text())
    _assert_falls(log)
    _assert_same_losses(single, log)
    assert [r["grad_norm"] > 0.05 for r in log["train"]] == [True] * 6  # clipped on every step
    want, got = _final_model(tmp_path / "single"), _final_model(tmp_path / "dp2", rank=1)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_torchrun_tensor_parallel_run_equals_the_single_process_run(corpus, tmp_path):
    single = _single(corpus, tmp_path / "single", *CLIPPED, "--optimizer", "muon")
    run = _torchrun(2, [*TINY, *CLIPPED, "--optimizer", "muon", "--tp", "2", "--data-dir",
                        str(corpus["train"].parent), "--out", str(tmp_path / "tp2")])
    assert run.returncode == 0, run.stderr[-4000:]
    assert "world 2 = dp 1 × tp 2" in run.stdout
    log = json.loads((tmp_path / "tp2" / "log.json").read_text())
    _assert_falls(log)
    _assert_same_losses(single, log)


def test_resumed_run_ends_where_the_uninterrupted_run_ends(corpus, tmp_path):
    whole = _single(corpus, tmp_path / "whole", "--save-every", "3")
    resumed = main([*TINY, "--save-every", "3", "--data-dir", str(corpus["train"].parent), "--out",
                    str(tmp_path / "resumed"), "--resume", str(tmp_path / "whole" / "checkpoints" / "step-000003")])
    assert resumed["resumed"] == [{"step": 3, "from": str(tmp_path / "whole" / "checkpoints" / "step-000003")}]
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in whole["train"]]
    want, got = _final_model(tmp_path / "whole"), _final_model(tmp_path / "resumed")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("optimizer,layout", [("muoneq", "--dp"), ("reg", "--tp"), ("adamw", "--tp")])
def test_resumed_two_rank_run_ends_where_the_uninterrupted_run_ends(optimizer, layout, corpus, tmp_path):
    common = [*TINY, *CLIPPED, "--optimizer", optimizer, layout, "2", "--save-every", "3", "--data-dir",
              str(corpus["train"].parent)]
    whole = _main_on_ranks(2, [*common, "--out", str(tmp_path / "whole")])[0]
    ckpt = tmp_path / "whole" / "checkpoints" / "step-000003"
    assert sorted(f.name for f in ckpt.iterdir()) == ["meta.json", "rank0.pt", "rank1.pt"]
    resumed = _main_on_ranks(2, [*common, "--out", str(tmp_path / "resumed"), "--resume", str(ckpt)])
    assert resumed[1] == {}  # only rank 0 logs
    assert [r["loss"] for r in resumed[0]["train"]] == [r["loss"] for r in whole["train"]]
    for rank in range(2):  # each rank's tensors (TP: its shards); native mode: state on owners only
        want, got = _final_model(tmp_path / "whole", rank), _final_model(tmp_path / "resumed", rank)
        assert all(torch.equal(got[k], want[k]) for k in want)
