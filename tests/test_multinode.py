"""launch/multinode.py across a real network boundary: two network namespaces joined by a veth pair,
each a "node" running torchrun with 2 ranks (gloo over the link), dp = 2 across the nodes × tp = 2
inside each, against one process; and the launcher's bad input (dead endpoint, nodes that disagree,
a --tp that would span nodes), which must stop with a message within the rendezvous timeout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from launch.data import build_corpus
from launch.train import complete_checkpoints, main, read_model
from multiproc import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "multinode.py"
ADDRS = ("10.99.0.1", "10.99.0.2")  # exist only inside the test's own namespaces
PORT = 29500  # a fresh namespace has every port free
TIMEOUT_S = 120
SMALL = ["--steps", "3", "--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "8",
         "--warmup", "1", "--eval-every", "3", "--eval-batches", "1", "--threads", "1", "--save-every", "3",
         "--clip", "0.05"]
# final parameters at dp 2 × tp 2 against one process (test_launch.py's model): its tolerances for a dp = 2 run
# (REG: fp32 sums in another order) and a tp = 2 run (Muon: bf16 Newton–Schulz and bf16 owner moves)
TOLERANCE = {"reg": dict(rtol=1e-4, atol=1e-6), "muon": dict(rtol=1e-5, atol=2e-4)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@pytest.fixture
def two_nodes():
    """Two fresh network namespaces joined by a veth pair ``10.99.0.1`` ↔ ``10.99.0.2``:
    [(netns, interface, address)]. Skipped (with the reason) without root or iproute2; the namespaces are
    deleted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("two-node test needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("two-node test needs iproute2 (`ip`); `make test` installs it when run as root")
    tag = uuid.uuid4().hex[:8]
    ns, ifs = [f"regdist-{tag}-{k}" for k in (0, 1)], [f"rd{tag}{k}" for k in (0, 1)]
    made = []
    try:
        for name in ns:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", ifs[0], "type", "veth", "peer", "name", ifs[1])
        for name, ifname, addr in zip(ns, ifs, ADDRS):
            _ip("link", "set", ifname, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", name, "link", "set", ifname, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except RuntimeError as e:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", ifs[0]], capture_output=True)
        pytest.skip(f"two-node test cannot create its network namespaces: {e}")
    try:
        yield list(zip(ns, ifs, ADDRS))
    finally:
        for name in ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _launch(node_args: list[list[str]], prefixes: list[list[str]] | None = None,
            timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Run ``multinode.py *args`` once per node, all at once (each after its ``prefix``, e.g. ``ip netns exec``);
    past ``timeout`` every node still running gets SIGTERM (torchrun then stops its ranks), then SIGKILL."""
    prefixes = prefixes or [[] for _ in node_args]
    procs = [subprocess.Popen([*prefix, sys.executable, str(LAUNCHER), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for prefix, args in zip(prefixes, node_args)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
    return results


def _final_model(run: Path) -> dict:
    return read_model(complete_checkpoints(run)[-1])


@pytest.mark.parametrize("optimizer", list(TOLERANCE))
def test_two_node_dp2_tp2_run_over_a_veth_link_equals_the_single_process_run(optimizer, two_nodes, corpus, tmp_path):
    job = [*SMALL, "--optimizer", optimizer, "--data-dir", str(corpus["train"].parent)]
    single = main([*job, "--out", str(tmp_path / "single")])
    runs = _launch(
        [["--nnodes", "2", "--node-rank", str(k), "--endpoint", f"{ADDRS[0]}:{PORT}", "--nproc-per-node", "2",
          "--local-addr", addr, "--rdzv-timeout", "60", "train", *job, "--dp", "2", "--tp", "2",
          "--out", str(tmp_path / "two-node")] for k, (_, _, addr) in enumerate(two_nodes)],
        prefixes=[["ip", "netns", "exec", name, "env", f"GLOO_SOCKET_IFNAME={ifname}"]
                  for name, ifname, _ in two_nodes])
    for k, run in enumerate(runs):
        assert run.returncode == 0, f"node {k}:\n{run.stderr[-4000:]}"
    assert "world 4 = dp 2 × tp 2" in runs[0].stdout + runs[1].stdout
    log = json.loads((tmp_path / "two-node" / "log.json").read_text())
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log["train"]]),
                               torch.tensor([r["loss"] for r in single["train"]]), rtol=0, atol=2e-5)
    want, got = _final_model(tmp_path / "single"), _final_model(tmp_path / "two-node")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOLERANCE[optimizer], msg=name)


def _script(tmp_path: Path) -> str:
    """A user's training script for the ``fsdp2`` job (the rendezvous tests never get to run it)."""
    script = tmp_path / "fsdp2_train.py"
    script.write_text("raise SystemExit('the rendezvous should have failed')\n")
    return str(script)


def test_dead_endpoint_stops_a_node_with_a_message_within_the_timeout(tmp_path):
    start = time.monotonic()
    run, = _launch([["--nnodes", "2", "--node-rank", "1", "--endpoint", f"127.0.0.1:{free_port()}",
                     "--nproc-per-node", "2", "--rdzv-timeout", "3", "fsdp2", _script(tmp_path)]])
    assert run.returncode == 1
    assert "did not answer within --rdzv-timeout 3 s" in run.stderr and "ConnectionRefusedError" in run.stderr
    assert time.monotonic() - start < 15


def test_nodes_that_disagree_on_nnodes_stop_with_a_rendezvous_message_within_the_timeout(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    runs = _launch([["--nnodes", n, "--node-rank", str(k), "--endpoint", endpoint, "--nproc-per-node", "1",
                     "--rdzv-timeout", "5", "fsdp2", _script(tmp_path)] for k, n in enumerate(("2", "3"))], timeout=60)
    assert [r.returncode for r in runs] == [1, 1]
    assert "did not gather --nnodes 2 nodes within --rdzv-timeout 5 s" in runs[0].stderr
    assert "multinode.py: error:" in runs[1].stderr
    assert time.monotonic() - start < 40


def test_nodes_started_with_another_tp_stop_naming_the_argument_and_the_ranks(corpus, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    job = [*SMALL, "--data-dir", str(corpus["train"].parent), "--out", str(tmp_path / "run")]
    # one rank per node (a tp group across the nodes, as asked) keeps it quick: the check is train.py's
    runs = _launch([["--nnodes", "2", "--node-rank", str(k), "--endpoint", endpoint, "--nproc-per-node", "1",
                     "--tp-across-nodes", "--rdzv-timeout", "30", "train", *job, "--tp", tp]
                    for k, tp in enumerate(("2", "1"))])
    assert [r.returncode for r in runs] == [1, 1]
    message = runs[0].stderr + runs[1].stderr
    assert "train.py: error: the ranks (nodes) were started with different arguments: " \
           "--dp is 1 on ranks [0], 2 on ranks [1]; --tp is 2 on ranks [0], 1 on ranks [1]" in message
    assert not (tmp_path / "run" / "log.json").exists()  # no training step


def test_node_whose_arguments_train_py_refuses_does_not_join_and_the_other_node_stops_within_the_timeout(
        corpus, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    job = [*SMALL, "--data-dir", str(corpus["train"].parent), "--out", str(tmp_path / "run")]
    start = time.monotonic()
    runs = _launch([["--nnodes", "2", "--node-rank", str(k), "--endpoint", endpoint, "--nproc-per-node", "2",
                     "--rdzv-timeout", "5", "train", *job, "--dp", dp, "--tp", "2"] for k, dp in enumerate(("2", "1"))],
                   timeout=60)
    assert [r.returncode for r in runs] == [1, 1]
    assert "train.py: error: world size 4 (torchrun --nproc_per_node × nodes) must equal --dp × --tp = 1 × 2 = 2" \
           in runs[1].stderr
    assert "this node does not join the rendezvous" in runs[1].stderr
    assert "did not gather --nnodes 2 nodes within --rdzv-timeout 5 s" in runs[0].stderr
    assert time.monotonic() - start < 40


def test_tp_that_does_not_divide_the_processes_per_node_is_refused_unless_asked():
    base = ["--nnodes", "2", "--node-rank", "1", "--endpoint", "127.0.0.1:29500", "--nproc-per-node", "2"]
    run = subprocess.run([sys.executable, str(LAUNCHER), *base, "train", "--tp", "4"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "tensor-parallel degree 4 does not divide --nproc-per-node 2" in run.stderr
    fsdp2 = subprocess.run([sys.executable, str(LAUNCHER), *base, "fsdp2", str(ROOT / "launch" / "train.py"),
                               "--tp=4"], capture_output=True, text=True)
    assert fsdp2.returncode == 2 and "does not divide" in fsdp2.stderr
    asked = subprocess.run([sys.executable, str(LAUNCHER), *base, "--tp-across-nodes", "--dry-run", "train",
                            "--tp", "4"], capture_output=True, text=True)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split()[-2:] == ["--tp", "4"]


def test_slurm_environment_gives_nodes_rank_job_id_and_endpoint():
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_NODEID": "3",
           "SLURM_JOB_NODELIST": "gpu[07-09,12]", "MASTER_PORT": "29611"}
    run = subprocess.run([sys.executable, str(LAUNCHER), "--nproc-per-node", "8", "--dry-run", "deepspeed",
                          "configs/zero2_reg.json", "--steps", "10"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    cmd = run.stdout.split()
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29611",
            "--rdzv-id=4242", "--rdzv-conf=join_timeout=600,is_host=false"} <= set(cmd)
    assert cmd[-5:] == [str(ROOT / "launch" / "train.py"), "--deepspeed", "configs/zero2_reg.json", "--steps", "10"]
