"""The training entry point's fine-tuning pieces: the pydoc domain, ``--init`` from a pretrained
checkpoint, validation on a second domain, and each optimizer's own hyper-parameter flags."""

import json
import shutil

import pytest

from launch.data import build_corpus, pydoc_topics, split_of
from launch.loop import build_optimizer
from launch.model import GPT, GPTConfig
from launch.train import complete_checkpoints, main, parse_args

TINY = ["--steps", "4", "--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--log-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for domain in ("stdlib", "pydoc"):
        build_corpus(root, domain=domain)
    return root


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A 4-step stdlib run with AdamW and its checkpoint at step 4: the run directory."""
    run = tmp_path_factory.mktemp("pretrained")
    main([*TINY, "--optimizer", "adamw", "--save-every", "4", "--data-dir", str(data_dir), "--out", str(run),
          "--overwrite"])
    return run


def _run(data_dir, out, *extra) -> dict:
    return main([*TINY, *extra, "--data-dir", str(data_dir), "--out", str(out)])


def test_pydoc_domain_is_split_by_topic_and_its_validation_text_is_never_trained_on(data_dir):
    paths = build_corpus(data_dir, domain="pydoc")
    train, val = paths["train"].read_bytes(), paths["val"].read_bytes()
    held_out = [text for name, text in pydoc_topics() if split_of(name) == "val"]
    assert held_out and len(val) == sum(len(t) + 1 for t in held_out)
    assert all(text[:200] not in train for text in held_out)
    assert train.count(b"\0") + val.count(b"\0") == len(pydoc_topics())


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown data domain 'wiki'"):
        build_corpus(tmp_path, domain="wiki")


def test_fine_tuning_starts_from_the_pretrained_weights(data_dir, pretrained, tmp_path):
    log = _run(data_dir, tmp_path / "ft", "--optimizer", "reg", "--data", "pydoc", "--eval-also", "stdlib",
               "--init", str(pretrained), "--steps", "2", "--eval-every", "1")
    pre_log = json.loads((pretrained / "log.json").read_text())
    # step 0 of the fine-tuning run validates the base model: on stdlib it is the base's last validation
    assert log["val_also"]["stdlib"][0] == {"step": 0, "loss": pre_log["val"][-1]["loss"]}
    assert [v["step"] for v in log["val"]] == [0, 1, 2] and log["val"][0]["loss"] != pre_log["val"][-1]["loss"]
    assert log["args"]["init"] == complete_checkpoints(pretrained)[-1]
    fresh = _run(data_dir, tmp_path / "fresh", "--optimizer", "reg", "--data", "pydoc", "--steps", "2")
    assert fresh["val"][0]["loss"] > log["val"][0]["loss"] + 0.1  # an untrained model is worse on text


def test_init_with_another_model_is_refused_before_training(data_dir, pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(data_dir, tmp_path / "ft", "--width", "64", "--init", str(pretrained))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "the checkpoint's model is" in err and "| loss" not in out


def test_init_from_nothing_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "--init" in (err := capsys.readouterr().err) and "no checkpoint there" in err


def test_init_from_a_truncated_checkpoint_exits_with_a_message_before_training(data_dir, pretrained, tmp_path, capsys):
    ckpt = tmp_path / "step-000004"
    shutil.copytree(complete_checkpoints(pretrained)[-1], ckpt)
    file = next(f for f in (ckpt / "model").iterdir() if f.suffix == ".distcp")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        _run(data_dir, tmp_path / "ft", "--init", str(ckpt))
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "cannot read its model" in err and "| loss" not in out


def test_resuming_on_another_domain_is_refused(data_dir, pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(data_dir, tmp_path / "r", "--optimizer", "adamw", "--data", "pydoc", "--steps", "8",
             "--resume", str(pretrained))
    assert e.value.code == 2 and "the checkpoint has data stdlib, this run pydoc" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, flags, keyword, value", [
    ("reg", ["--reg-p", "3", "--reg-iters", "2"], "p", 3.0),
    ("reg", ["--reg-iters", "4", "--tol", "0.1", "--stats", "gradient", "--stats-beta", "0.9", "--exponent", "-1"],
     "stats_beta", 0.9),
    ("muon", ["--ns-steps", "3", "--rms", "0.3"], "ns_steps", 3),
    ("muoneq", ["--muoneq-mode", "rowcol", "--momentum", "0.9"], "mode", "rowcol"),
    ("normuon", ["--beta2", "0.9", "--ns-dtype", "float32"], "beta2", 0.9),  # every registry algorithm and its flags
])
def test_hyper_parameter_flags_reach_the_optimizer(optimizer, flags, keyword, value, data_dir, tmp_path):
    log = _run(data_dir, tmp_path / optimizer, "--optimizer", optimizer, *flags, "--betas", "0.8", "0.9",
               "--steps", "1")
    args = log["args"]
    assert args["hyper"][keyword] == value and tuple(args["betas"]) == (0.8, 0.9)
    assert log["final"]["steps"] == 1


@pytest.mark.parametrize("optimizer", ["muon", "muoneq", "normuon"])
def test_ns_method_flag_reaches_the_newton_schulz_optimizers(optimizer):
    assert parse_args([*TINY, "--optimizer", optimizer, "--ns-method", "gram"]).hyper["ns_method"] == "gram"


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adamw", "--reg-p", "3"], "--reg-p applies to --optimizer reg, not adamw"),
    (["--optimizer", "reg", "--ns-steps", "3"], "--ns-steps applies to --optimizer muon or muoneq or normuon, not reg"),
    (["--optimizer", "reg", "--beta2", "0.9"], "--beta2 applies to --optimizer normuon, not reg"),
    (["--optimizer", "muon", "--muoneq-mode", "row"], "--muoneq-mode applies to --optimizer muoneq, not muon"),
    (["--optimizer", "muon", "--ns-method", "fast"], "argument --ns-method: invalid choice: 'fast'"),
    (["--optimizer", "reg", "--ns-method", "gram"],
     "--ns-method applies to --optimizer muon or muoneq or normuon, not reg"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--betas", "0.9", "1.0"], "--betas must be in [0, 1)"),
    (["--rms", "0"], "--rms must be a finite number > 0"),
    (["--reg-iters", "0"], "--reg-iters must be >= 1"),
    (["--data", "wiki"], "invalid choice: 'wiki'"),
    (["--optimizer", "muon", "--scale", "unit"], "--scale: scale must be one of"),  # the optimizer's own checks
    (["--optimizer", "muon", "--coefficients", "newton"], "--coefficients: coefficients must be one of"),
    (["--optimizer", "normuon", "--beta2", "1.5"], "--beta2: beta2 must be a finite number in [0.0, 1.0)"),
    (["--optimizer", "normuon", "--eps", "-1"], "--eps: eps must be a finite number >= 0.0"),
    (["--optimizer", "reg", "--stats-beta", "1"], "--stats-beta must be in [0, 1)"),
    (["--optimizer", "reg", "--exponent", "0.5"], "--exponent: exponent must be a finite number < 0"),
    (["--optimizer", "reg", "--stats", "adam"], "argument --stats: invalid choice: 'adam'"),
    (["--optimizer", "adamw", "--matrix-embeddings"], "--matrix-embeddings applies to --optimizer reg or"),
])
def test_bad_hyper_parameters_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_matrix_embeddings_puts_the_embeddings_and_the_tied_head_on_the_matrix_optimizer():
    model = GPT(GPTConfig(depth=1, width=32, heads=2, seq_len=32))
    default = {r.name: r.algorithm for r in build_optimizer("reg", model, 0.01, 0.0).routes}
    routes = {r.name: (r.algorithm, r.reason) for r in build_optimizer("reg", model, 0.01, 0.0,
                                                                        matrix_embeddings=True).routes}
    embeddings = [name for name in routes if "wte" in name or "wpe" in name]
    assert len(embeddings) == 2 and any("lm_head" in name for name in embeddings)  # the head is tied to wte
    assert all(default[name] == "adamw" and routes[name] == ("reg", "group says reg") for name in embeddings)
    assert {name: algorithm for name, (algorithm, _) in routes.items() if name not in embeddings} == \
        {name: algorithm for name, algorithm in default.items() if name not in embeddings}
