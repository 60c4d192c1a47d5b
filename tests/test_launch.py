"""The training entry point's pieces: the stdlib corpus, its loader, and a short end-to-end run."""

import json

import pytest
import torch

from launch.data import ByteWindows, build_corpus, split_of, stdlib_files
from launch.train import main


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
