"""The entry points' edges: the exit helper (``launch.exits``), ``launch/train.py --help``, the end of the
main job (a final checkpoint by default, the rerun that resumes, the progress bar, the resume mode in
``log.json``), the module split of train.py (no import cycle), and ``launch/pretrain_gpt.py`` started as
a script with ``--help``."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import cli
from launch.job import progress
from launch.train import complete_checkpoints, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TINY = ["--steps", "6", "--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--warmup", "1", "--eval-every", "3", "--eval-batches", "1", "--log-every", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from launch.data import build_corpus
    return str(build_corpus(tmp_path_factory.mktemp("corpus"))["train"].parent)


# ---- launch.exits: leave with os._exit, keep the exit code ------------------------------------------------------

def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with the repository root importable, stdout/stderr captured (pipes:
    block-buffered, so anything not flushed before ``os._exit`` would be lost)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_a_job_that_returns_exits_0_with_its_output_and_logs_flushed():
    run = _python("""
        import atexit, logging, sys
        from launch.exits import run_and_exit
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        atexit.register(lambda: print("atexit ran"))
        def main():
            print("last line, no newline", end="")   # buffered: only a flush writes it
            sys.stderr.write("to stderr, unflushed")
            logging.getLogger("job").info("logged")
            return {"a": "log"}                        # a returned log (not an int): exit 0
        run_and_exit(main)
        print("never reached")
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "last line, no newlineatexit ran\n"  # the atexit handlers run, then the flush
    assert "to stderr, unflushed" in run.stderr and "INFO:job:logged" in run.stderr
    assert "never reached" not in run.stdout


@pytest.mark.parametrize("body, code, message", [
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),   # a failing rank: traceback, exit 1
    ("sys.exit(3)", 3, ""),
    ("sys.exit('bad input')", 1, "bad input"),
    ("return 4", 4, ""),
])
def test_a_failing_job_exits_non_zero_through_the_helper(body, code, message):
    run = _python(f"""
        import sys
        from launch.exits import run_and_exit
        def main():
            print("started")
            {body}
        run_and_exit(main)
    """)
    assert run.returncode == code and run.stdout == "started\n" and message in run.stderr, run.stderr


@pytest.mark.parametrize("rank, waits", [("0", False), ("1", True)])
def test_a_failing_rank_other_than_0_leaves_rank_0_time_to_report_first(rank, waits):
    run = _python(f"""
        import os, sys, time
        os.environ["RANK"] = "{rank}"
        import launch.exits as exits
        exits.FAILURE_GRACE_S = 1.0
        start = time.monotonic()
        exits.atexit.register(lambda: print(f"waited {{time.monotonic() - start:.2f}}"))
        def main():
            sys.exit(2)
        exits.run_and_exit(main)
    """)
    assert run.returncode == 2
    assert (float(run.stdout.split()[-1]) >= 1.0) == waits, run.stdout


def test_a_gloo_rank_that_raises_after_collectives_exits_1_with_its_traceback():
    run = _python("""
        import torch, torch.distributed as dist
        from launch.exits import run_and_exit
        def main():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            t = torch.ones(4)
            dist.all_reduce(t)
            print("reduced", t.sum().item(), flush=False)
            raise ValueError("rank failed after a collective")
        run_and_exit(main)
    """)
    assert run.returncode == 1 and run.stdout == "reduced 4.0\n"
    assert "ValueError: rank failed after a collective" in run.stderr and "Traceback" in run.stderr


# ---- launch/train.py --help --------------------------------------------------------------------------------------

def _help_entries(text: str) -> dict[str, str]:
    """{invocation: help text} of every option in argparse's help output (wrapped lines joined)."""
    entries, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line):
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current is not None and line.startswith("   ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_option_of_train_py_has_help_and_shows_its_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert len(entries) > 30
    for invocation, text in entries.items():
        if invocation.startswith("-h"):
            continue
        assert text.strip(), f"{invocation} has no help"
        assert text.count("(default") == 1, f"{invocation}: {text}"
    shown = {inv.split()[0]: text for inv, text in entries.items()}
    for option, default in [("--optimizer", "reg"), ("--steps", "400"), ("--weight-decay", "0.1"),
                            ("--seq-len", "128"), ("--depth", "4"), ("--width", "128"), ("--heads", "4"),
                            ("--seed", "0"), ("--momentum", "0.95"), ("--rms", "0.2"), ("--ns-steps", "5"),
                            ("--muoneq-mode", "row"), ("--betas", "0.9 0.95"), ("--resume", "auto"),
                            ("--save-every", "0"), ("--no-save", "off"), ("--overwrite", "off")]:
        assert f"(default: {default})" in shown[option], (option, shown[option])
    assert "runs/OPTIMIZER" in shown["--out"] and "(default: none)" not in shown["--momentum"]


# ---- the end of the job: final checkpoint, rerun resumes, progress bar, log ----------------------------------

def test_progress_bar_is_full_only_at_the_last_step():
    record = {"loss": 2.0, "lr": 1e-3}
    line = {step: progress(step, 400, record, 2.0, 0, 1000, 10, 1.0) for step in (390, 399, 400)}
    assert line[390].startswith("[###################.]  97% step 390/400")
    assert line[399].startswith("[###################.]  99% step 399/400")
    assert line[400].startswith("[####################] 100% step 400/400")


def test_default_out_is_one_directory_per_optimizer(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")
    assert parse_args(TINY).out == tmp_path / "runs" / "reg"
    assert parse_args([*TINY, "--optimizer", "muon", "--resume", "none"]).out == tmp_path / "runs" / "muon"


def test_run_saves_its_final_checkpoint_says_where_and_a_rerun_resumes_from_it(data_dir, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")  # the default --out: runs/reg, as `make train` uses it
    out = tmp_path / "runs" / "reg"
    argv = [*TINY, "--data-dir", data_dir]
    first = main(argv)
    final = out / "checkpoints" / "step-000006"
    assert complete_checkpoints(out) == [final]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("done:") and f"final checkpoint {final}" in lines[-1]
    assert lines[-2].startswith("[####################] 100% step 6/6")
    saved = json.loads((out / "log.json").read_text())
    assert saved["args"]["resume"] == "auto" and saved["args"]["resumed_from"] is None
    assert first["args"]["resume"] == "auto"
    again = main(argv)  # the same command: resumes from the final checkpoint, nothing left to train
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("nothing to train") for line in lines) and f"final checkpoint {final}" in lines[-1]
    assert again["resumed"] == [{"step": 6, "from": str(final)}] and again["final"]["tokens"] == 0
    assert again["args"]["resume"] == "auto" and again["args"]["resumed_from"] == str(final)
    assert [r["loss"] for r in again["train"]] == [r["loss"] for r in first["train"]]
    assert json.loads((out / "log.json").read_text())["args"]["resumed_from"] == str(final)


def test_rerun_of_a_finished_two_rank_run_exits_0_on_every_rank(data_dir, tmp_path):
    """``make train`` twice: the second torchrun resumes the final checkpoint on both ranks, trains
    nothing, says so and exits 0 (every rank, not only rank 0, which alone holds the run's log)."""
    from multiproc import torchrun

    argv = [*TINY, "--dp", "2", "--data-dir", data_dir, "--out", str(tmp_path / "run")]
    assert torchrun(LAUNCH / "train.py", 2, argv).returncode == 0
    again = torchrun(LAUNCH / "train.py", 2, argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout and "final checkpoint" in again.stdout.splitlines()[-1]


def test_no_save_writes_no_checkpoint_and_says_so(data_dir, tmp_path, capsys):
    log = main([*TINY, "--steps", "2", "--no-save", "--resume", "none", "--data-dir", data_dir,
                "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists() and log["args"]["resume"] == "none"
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("no checkpoint saved (--no-save)")
    with pytest.raises(SystemExit) as e:
        parse_args([*TINY, "--no-save", "--save-every", "2", "--out", str(tmp_path / "other")])
    assert e.value.code == 2


def test_auto_resume_of_another_runs_checkpoint_says_how_to_start_afresh(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main([*TINY, "--steps", "2", "--data-dir", data_dir, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--steps", "2", "--depth", "2", "--data-dir", data_dir, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the checkpoint has model" in err and "--resume none --overwrite" in err


# ---- the split of train.py: one module per job, no import cycle ------------------------------------------------

def _launch_imports(path: Path) -> set[str]:
    """The ``launch.*`` modules ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "launch":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("launch."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("launch."))
    return found - {path.stem}


def test_launch_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _launch_imports(p) for p in LAUNCH.glob("*.py") if p.stem != "__init__"}
    assert {"cli", "ranks", "tensor_parallel", "checkpoints", "loop", "job", "exits"} <= set(graph)
    assert not any("train" in deps for deps in graph.values())  # the entry point: nothing imports it
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in graph.get(node, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


# ---- launch/pretrain_gpt.py as a script ---------------------------------------------------------------------

def test_escape_broken_help_doubles_only_the_percent_signs_argparse_cannot_format():
    pytest.importorskip("megatron.core")
    import argparse
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's "Apex is not installed" and the like
        from launch.pretrain_gpt import escape_broken_help
    p = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--a", default=1, help="fine, %(default)s")
    p.add_argument("--b", default=2, help="a share (e.g. 10%)")
    escape_broken_help(p)
    text = p.format_help()
    assert "fine, 1" in text and "a share (e.g. 10%)" in text


def test_pretrain_gpt_runs_as_a_script_and_prints_its_help(tmp_path):
    pytest.importorskip("megatron.core")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(LAUNCH / "pretrain_gpt.py"), "--help"], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path, env=env)  # from elsewhere: nothing but the script's own path
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No module named" not in run.stderr and "unsupported format character" not in run.stderr
    assert "--moe-paged-stash-buffer-size-factor-cuda" in run.stdout and "--reg-p" in run.stdout
