"""The training entry point's pieces: the stdlib corpus, its loader, a short end-to-end run; the multi-rank
launch (bad input, real torchrun runs with dp = 2 and tp = 2 against one process, checkpoints and resume)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from launch.data import ByteWindows, build_corpus, split_of, stdlib_files
from launch.model import GPT, GPTConfig
from launch.train import all_reduce_mean_, complete_checkpoints, main, parse_args, read_model
from multiproc import run_ranks, torchrun
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


def _torchrun(nproc: int, args: list[str], *options: str) -> subprocess.CompletedProcess:
    return torchrun(TRAIN, nproc, args, *options)


def _main_on_ranks(world: int, argv: list[str]) -> list:
    """``main(argv)`` on ``world`` ranks forked from this (warm) process, with torchrun's environment:
    each rank's returned log (rank 0) or {}; ``("exit", code)`` for a rank that exited."""
    def rank_main(rank, world):
        try:
            return main(argv)
        except SystemExit as e:
            return ("exit", e.code)

    return run_ranks(world, rank_main, init_group=False)


def _final_model(run: Path) -> dict:
    """The model of the run's newest complete checkpoint, as full tensors (whatever dp × tp wrote it)."""
    return read_model(complete_checkpoints(run)[-1])


def _assert_same_model(got: dict, want: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert set(got) == set(want)
    for name in want:
        if rtol == atol == 0.0:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


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


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """Checkpoints at step 3 of one-process runs with REG, Muon and AdamW: {optimizer: checkpoint dir}."""
    root = tmp_path_factory.mktemp("saved")
    for optimizer in ("reg", "muon", "adamw"):
        _single(corpus, root / optimizer, "--optimizer", optimizer, "--save-every", "3", "--steps", "3")
    return {optimizer: root / optimizer / "checkpoints" / "step-000003" for optimizer in ("reg", "muon", "adamw")}


def _truncate(path: Path) -> None:
    file = next(f for f in path.iterdir() if f.suffix == ".distcp")
    file.write_bytes(file.read_bytes()[:100])


def _rewrite_meta(ckpt: Path, **changes) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(changes)
    (ckpt / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


BAD_CHECKPOINTS = {  # name: (optimizer of the checkpoint, of the run, damage, exit code, message)
    "another_optimizer": ("reg", "muon", lambda c, s: None, 2,
                          "the checkpoint has optimizer reg, this run muon (a checkpoint of another optimizer)"),
    "state_of_another_optimizer": ("reg", "reg", lambda c, s: (shutil.rmtree(c / "optimizer"),
                                                             shutil.copytree(s["muon"] / "optimizer", c / "optimizer")),
                                   1, "is of Muon, not REG"),
    "adamw_state_for_reg": ("reg", "reg", lambda c, s: (shutil.rmtree(c / "optimizer"),
                                                      shutil.copytree(s["adamw"] / "optimizer", c / "optimizer")),
                            1, "holds torch.optim.AdamW's state, not REG's"),
    "reg_state_for_adamw": ("adamw", "adamw", lambda c, s: (shutil.rmtree(c / "optimizer"),
                                                          shutil.copytree(s["reg"] / "optimizer", c / "optimizer")),
                            1, "holds reg_dist's (REG, Muon or MuonEq) state, not AdamW's"),
    "truncated_model": ("reg", "reg", lambda c, s: _truncate(c / "model"), 1,
                        "model/ is unreadable (truncated or corrupt)"),
    "truncated_optimizer": ("muon", "muon", lambda c, s: _truncate(c / "optimizer"), 1,
                            "is unreadable (truncated or corrupt)"),
    "no_optimizer_metadata": ("reg", "reg", lambda c, s: (c / "optimizer" / ".metadata").unlink(), 2,
                              "incomplete checkpoint, no optimizer/.metadata"),
    "corrupt_meta": ("reg", "reg", lambda c, s: (c / "meta.json").write_text("{not json"), 2,
                     "corrupt checkpoint, cannot read meta.json"),
    "old_per_rank_format": ("reg", "reg", lambda c, s: _rewrite_meta(c, format=None), 2,
                            "a checkpoint in the per-rank rank{r}.pt format of an earlier train.py"),
    "other_model": ("reg", "reg", lambda c, s: _rewrite_meta(c, model={"depth": 2}), 2, "the checkpoint has model"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_exits_with_a_message_before_training(case, saved, corpus, tmp_path, capsys):
    written_by, optimizer, damage, code, message = BAD_CHECKPOINTS[case]
    ckpt = tmp_path / "checkpoints" / "step-000003"
    shutil.copytree(saved[written_by], ckpt)
    damage(ckpt, saved)
    with pytest.raises(SystemExit) as e:
        _single(corpus, tmp_path / "resumed", "--optimizer", optimizer, "--resume", str(ckpt))
    out, err = capsys.readouterr()
    assert e.value.code == code and message in err, err[-2000:]
    assert "| loss" not in out and not (tmp_path / "resumed").exists()  # no step, nothing written


def test_missing_checkpoint_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--resume", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "no checkpoint there" in capsys.readouterr().err


def test_truncated_checkpoint_fails_on_every_rank_before_training(saved, corpus, tmp_path):
    ckpt = tmp_path / "step-000003"
    shutil.copytree(saved["reg"], ckpt)
    _truncate(ckpt / "model")
    outcome = _main_on_ranks(2, [*TINY, "--data-dir", str(corpus["train"].parent), "--out", str(tmp_path / "b"),
                                 "--resume", str(ckpt)])
    assert outcome == [("exit", 1), ("exit", 1)]
    assert not (tmp_path / "b").exists()


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
    want, got = _final_model(tmp_path / "single"), _final_model(tmp_path / "dp2")
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
    _assert_same_model(_final_model(tmp_path / "resumed"), _final_model(tmp_path / "whole"))


@pytest.mark.parametrize("optimizer,layout", [("muoneq", "--dp"), ("reg", "--tp"), ("adamw", "--tp")])
def test_resumed_two_rank_run_ends_where_the_uninterrupted_run_ends(optimizer, layout, corpus, tmp_path):
    common = [*TINY, *CLIPPED, "--optimizer", optimizer, layout, "2", "--save-every", "3", "--data-dir",
              str(corpus["train"].parent)]
    whole = _main_on_ranks(2, [*common, "--out", str(tmp_path / "whole")])[0]
    ckpt = tmp_path / "whole" / "checkpoints" / "step-000003"
    assert sorted(f.name for f in ckpt.iterdir()) == ["meta.json", "model", "optimizer"]
    assert sorted(f.name for f in (ckpt / "model").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = _main_on_ranks(2, [*common, "--out", str(tmp_path / "resumed"), "--resume", str(ckpt)])
    assert resumed[1] == {}  # only rank 0 logs
    assert [r["loss"] for r in resumed[0]["train"]] == [r["loss"] for r in whole["train"]]
    _assert_same_model(_final_model(tmp_path / "resumed"), _final_model(tmp_path / "whole"))  # bit for bit


# tolerance of the final parameters resumed at dp = 1 and at tp = 2 against the uninterrupted dp = 2 run: the
# data order is the same, the sums over dp and tp are not (fp32 rounding); Muon at tp > 1 moves its matrices to
# their owners in bf16 (and orthogonalizes in bf16 at any layout): its trajectory is the layout's own
# Muon's bf16 Newton–Schulz turns the fp32-rounding differences of the dp-averaged gradients (~1e-8) into an
# occasional flipped bf16 rounding of one update element (lr·scale·2^-8 ≈ 4e-6 here), at dp 1 as at tp 2
CROSS_LAYOUT = {"reg": ((1e-5, 1e-8), (1e-5, 1e-8)), "muon": ((1e-5, 2e-4), (1e-5, 2e-4)),
                "adamw": ((1e-5, 1e-8), (1e-5, 1e-8))}


@pytest.mark.parametrize("optimizer", list(CROSS_LAYOUT))
def test_checkpoint_of_a_dp2_run_resumes_at_dp1_and_at_tp2(optimizer, corpus, tmp_path):
    common = [*TINY, *CLIPPED, "--optimizer", optimizer, "--save-every", "3", "--data-dir",
              str(corpus["train"].parent)]
    whole = _main_on_ranks(2, [*common, "--dp", "2", "--out", str(tmp_path / "whole")])[0]
    ckpt = tmp_path / "whole" / "checkpoints" / "step-000003"
    at_dp1 = main([*common, "--out", str(tmp_path / "dp1"), "--resume", str(ckpt)])
    at_tp2 = _main_on_ranks(2, [*common, "--tp", "2", "--out", str(tmp_path / "tp2"), "--resume", str(ckpt)])[0]
    assert (at_dp1["final"]["world"], at_tp2["final"]["dp"], at_tp2["final"]["tp"]) == (1, 1, 2)
    want = _final_model(tmp_path / "whole")
    for log, run, (rtol, atol) in zip((at_dp1, at_tp2), ("dp1", "tp2"), CROSS_LAYOUT[optimizer]):
        assert log["resumed"] == [{"step": 3, "from": str(ckpt)}]
        _assert_same_losses(whole, log)
        _assert_same_model(_final_model(tmp_path / run), want, rtol=rtol, atol=atol)


def test_newest_complete_checkpoint_is_picked_by_itself_and_the_last_k_are_kept(corpus, tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--save-every", "1", "--keep", "2", "--data-dir", str(corpus["train"].parent), "--out", str(run)]
    whole = main(argv)
    root = run / "checkpoints"
    assert sorted(d.name for d in root.iterdir()) == ["step-000005", "step-000006"]
    want = _final_model(run)
    # as if the job had died writing step 6's checkpoint (its directory not yet renamed, no meta.json), and a
    # step-7 directory had no completion marker: the rerun, resuming by itself, picks step 5
    (root / "step-000006" / "meta.json").unlink()
    (root / "step-000006").rename(root / ".step-000006.tmp")
    shutil.copytree(root / "step-000005", root / "step-000007")
    (root / "step-000007" / "meta.json").unlink()
    again = main(argv)
    assert again["resumed"] == [{"step": 5, "from": str(root / "step-000005")}]
    assert [r["loss"] for r in again["train"]] == [r["loss"] for r in whole["train"]]
    _assert_same_model(_final_model(run), want)
    assert sorted(d.name for d in root.iterdir()) == ["step-000005", "step-000006", "step-000007"]
    # the same command once more: the run is complete, nothing is trained
    done = main(argv)
    assert done["resumed"][-1]["step"] == 6 and done["final"]["tokens"] == 0
    _assert_same_model(_final_model(run), want)


def test_rank_killed_mid_step_is_restarted_by_torchrun_and_ends_where_the_uninterrupted_run_ends(corpus, tmp_path):
    """torchrun --max-restarts=1: rank 0 kills itself (SIGKILL) in step 5, after the checkpoint of step 4; the
    restarted job resumes from it by itself and ends bit for bit where an uninterrupted run ends. (Rank 0: its
    peer, whose next collective fails, leaves at once through launch.exits; the agent, seeing both dead in one
    poll, names the failure of the lowest local rank.)"""
    common = [*TINY, *CLIPPED, "--save-every", "2", "--data-dir", str(corpus["train"].parent)]
    run = _torchrun(2, [*common, "--die-at-step", "5", "--die-rank", "0", "--out", str(tmp_path / "run")],
                    "--max-restarts=1")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "exitcode: -9" in run.stderr  # the agent saw rank 0 killed, and restarted the job
    assert run.stdout.count("step 0/6") == 1 and run.stdout.count("done: train loss") == 1
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["resumed"] == [{"step": 4, "from": str(tmp_path / "run" / "checkpoints" / "step-000004")}]
    whole = _main_on_ranks(2, [*common, "--out", str(tmp_path / "whole")])[0]
    assert [r["loss"] for r in log["train"]] == [r["loss"] for r in whole["train"]]
    _assert_same_model(_final_model(tmp_path / "run"), _final_model(tmp_path / "whole"))


def test_a_torchrun_restart_continues_from_the_newest_checkpoint_of_its_run_whatever_resume_says(
        corpus, tmp_path, monkeypatch):
    whole = _single(corpus, tmp_path / "whole", "--save-every", "3")
    run = tmp_path / "run"
    argv = [*TINY, "--save-every", "2", "--data-dir", str(corpus["train"].parent), "--out", str(run),
            "--resume", str(tmp_path / "whole" / "checkpoints" / "step-000003")]
    main(argv)  # the first attempt: from the other run's step 3, checkpoints at steps 4 and 6
    shutil.rmtree(run / "checkpoints" / "step-000006")  # as if it had died in step 5
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = main(argv)
    assert [r["step"] for r in again["resumed"]] == [3, 4] and again["resumed"][1]["from"] == str(
        run / "checkpoints" / "step-000004")
    assert [r["loss"] for r in again["train"]] == [r["loss"] for r in whole["train"]]
    _assert_same_model(_final_model(run), _final_model(tmp_path / "whole"))
