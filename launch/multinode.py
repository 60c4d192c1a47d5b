"""Launch one node's part of a multi-node job: torchrun with c10d rendezvous, run on every node.

    # node 0 hosts the rendezvous at its own address; every node runs the same command but --node-rank
    python launch/multinode.py --nnodes 2 --node-rank 0 --endpoint node0:29500 --nproc-per-node 8 train --dp 4 --tp 4
    python launch/multinode.py --nnodes 2 --node-rank 1 --endpoint node0:29500 --nproc-per-node 8 train --dp 4 --tp 4
    # elastic: no --node-rank, every node joins rendezvous --rdzv-id; --nnodes MIN:MAX (a change restarts from --out)
    python launch/multinode.py --nnodes 2:4 --rdzv-id job7 --endpoint node0:29500 --max-restarts 3 \
        train --out runs/job7 --save-every 50
    # under SLURM (one task per node: srun ... launch/multinode.py JOB; see launch/slurm/train.sbatch)
    python launch/multinode.py --nproc-per-node 8 train

Jobs (what follows the job name is passed to it unchanged):
    train [ARGS]               launch/train.py, the native mode (reg_dist's dp × tp mesh)
    deepspeed CONFIG [ARGS]    launch/train.py --deepspeed CONFIG (DeepSpeed ZeRO through reg_dist)
    megatron [ARGS]            launch/pretrain_gpt.py (Megatron-LM's arguments)
    fsdp2 SCRIPT [ARGS]        your FSDP2 training script (reg_dist has no FSDP2 trainer of its own)

Under SLURM (``SLURM_JOB_ID`` set) the defaults come from its environment: --nnodes from
``SLURM_NNODES``, --node-rank from ``SLURM_NODEID``, --rdzv-id from ``SLURM_JOB_ID`` and the
endpoint's host from the first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``), port
``MASTER_PORT`` or 29500. The node of --node-rank 0 hosts the rendezvous store (it must own the
endpoint's address); without --node-rank a node hosts it when it can bind the endpoint's address.

Every node runs --nproc-per-node ranks, numbered node by node (contiguous), and the
tensor-parallel groups of every job are contiguous ranks, so data parallelism runs across nodes
and --tp (Megatron: --tensor-model-parallel-size) stays inside a node: it must divide
--nproc-per-node unless --tp-across-nodes is given. A node other than the host first waits for the
endpoint to accept a TCP connection, at most --rdzv-timeout seconds, and stops with a message if it
never does; a rendezvous that does not gather --nnodes nodes within --rdzv-timeout stops every
node with a message (torchrun's ``join_timeout``). A ``train`` or ``deepspeed`` job's arguments are
first parsed as launch/train.py will parse them at world size nnodes × nproc-per-node: a node
whose arguments it refuses stops with train.py's message before joining (its ranks would fail
silently: only global rank 0 prints). Use --local-addr when this node's hostname does
not resolve to an address the other nodes reach, and ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``
to pick the network interface of the collectives.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
MEGATRON = ROOT / "launch" / "pretrain_gpt.py"
JOBS = ("train", "deepspeed", "megatron", "fsdp2")
DEFAULT_PORT = 29500
# what torchrun's stderr says when the rendezvous itself failed, and what that means here
RENDEZVOUS_FAILURES = {
    "RendezvousTimeoutError": "the rendezvous at {endpoint} (id {rdzv_id}) did not gather --nnodes {nnodes} nodes "
                              "within --rdzv-timeout {timeout} s: start every node with the same --nnodes, "
                              "--endpoint and --rdzv-id (this node: --nproc-per-node {nproc})",
    "RendezvousConnectionError": "lost the connection to the rendezvous store at {endpoint}: its host node "
                                 "exited or is unreachable",
    "RendezvousClosedError": "the rendezvous at {endpoint} (id {rdzv_id}) was closed: another node of the job "
                             "has failed or finished",
}
WORKERS_FAILED = "ChildFailedError"  # torchrun's summary when the job's ranks themselves failed


def fail(message: str) -> None:
    print(f"multinode.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when present, else parsed:
    ``gpu[03-05,9],cpu1`` → ``gpu03``)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
    if not m:
        raise ValueError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    slurm = "SLURM_JOB_ID" in env
    p = argparse.ArgumentParser(prog="multinode.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nnodes", default=env.get("SLURM_NNODES") if slurm else None,
                   help="nodes, or MIN:MAX for an elastic job (SLURM: SLURM_NNODES)")
    p.add_argument("--node-rank", type=int, default=int(env["SLURM_NODEID"]) if slurm and "SLURM_NODEID" in env
                   else None,
                   help="this node's rank, 0 hosts the rendezvous (SLURM: SLURM_NODEID); omit for elastic rendezvous")
    p.add_argument("--endpoint", default=None, metavar="HOST:PORT",
                   help="the rendezvous store, on node 0 (SLURM: first host of SLURM_JOB_NODELIST, "
                        f"port MASTER_PORT or {DEFAULT_PORT})")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes (ranks) on this node (default: its CUDA devices, or 1)")
    p.add_argument("--rdzv-id", default=env.get("SLURM_JOB_ID", "reg_dist"),
                   help="rendezvous (job) id, the same on every node (SLURM: SLURM_JOB_ID)")
    p.add_argument("--rdzv-timeout", type=int, default=600,
                   help="seconds to reach the endpoint and for all nodes to join")
    p.add_argument("--local-addr", default=None, help="this node's address as the other nodes reach it")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the worker group")
    p.add_argument("--tp-across-nodes", action="store_true",
                   help="allow a tensor-parallel degree that does not divide --nproc-per-node")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    p.add_argument("job", choices=JOBS)
    p.add_argument("job_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nnodes is None:
        p.error("--nnodes is required outside SLURM")
    if not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", args.nnodes):
        p.error(f"--nnodes must be N or MIN:MAX (positive integers), got {args.nnodes!r}")
    max_nodes = int(args.nnodes.split(":")[-1])
    if args.node_rank is not None and not 0 <= args.node_rank < max_nodes:
        p.error(f"--node-rank {args.node_rank} must be in [0, {max_nodes})")
    if args.endpoint is None:
        if not slurm:
            p.error("--endpoint HOST:PORT is required outside SLURM")
        args.endpoint = f"{slurm_first_host(env['SLURM_JOB_NODELIST'])}:{env.get('MASTER_PORT', DEFAULT_PORT)}"
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", args.endpoint)
    if not m or not 0 < int(m.group(2)) < 65536:
        p.error(f"--endpoint must be HOST:PORT, got {args.endpoint!r}")
    args.host, args.port = m.group(1), int(m.group(2))
    if args.nproc_per_node is None:
        import torch
        args.nproc_per_node = torch.cuda.device_count() or 1
    if args.nproc_per_node < 1 or args.rdzv_timeout <= 0 or args.max_restarts < 0:
        p.error("--nproc-per-node must be >= 1, --rdzv-timeout > 0 and --max-restarts >= 0")
    args.script, args.script_args = job_command(p, args.job, args.job_args)
    tp = tensor_parallel_degree(p, args.job, args.script_args)
    if tp > 1 and args.nproc_per_node % tp and not args.tp_across_nodes:
        p.error(f"tensor-parallel degree {tp} does not divide --nproc-per-node {args.nproc_per_node}: its groups "
                f"(contiguous ranks) would span nodes; choose a degree that divides the processes per node, "
                f"or pass --tp-across-nodes")
    return args


def job_command(p: argparse.ArgumentParser, job: str, rest: list[str]) -> tuple[Path, list[str]]:
    """The script torchrun runs on every rank and its arguments."""
    if job in ("deepspeed", "fsdp2") and not rest:
        p.error(f"{job} needs {'CONFIG' if job == 'deepspeed' else 'SCRIPT'}: multinode.py ... {job} "
                f"{'CONFIG' if job == 'deepspeed' else 'SCRIPT'} [ARGS]")
    script, args = {"train": (TRAIN, rest), "deepspeed": (TRAIN, ["--deepspeed", *rest]),
                    "megatron": (MEGATRON, rest), "fsdp2": (Path(rest[0]) if rest else None, rest[1:])}[job]
    if not script.is_file():
        p.error(f"{job}: no script {script}")
    return script, args


def tensor_parallel_degree(p: argparse.ArgumentParser, job: str, args: list[str]) -> int:
    """The tensor-parallel degree the job's arguments ask for (1 when they name none)."""
    flag = "--tensor-model-parallel-size" if job == "megatron" else "--tp"
    for i, arg in enumerate(args):
        if arg == flag or arg.startswith(flag + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                p.error(f"{job}: {flag} must be a positive integer, got {value!r}")
            return int(value)
    return 1


def check_train_args(args: argparse.Namespace) -> None:
    """Parse the job's arguments as launch/train.py will on this node's ranks (world = --nnodes ×
    --nproc-per-node), before joining: a node whose arguments train.py refuses stops here with its
    message, rather than its ranks failing silently (only global rank 0 prints) while the other nodes wait."""
    world = int(args.nnodes) * args.nproc_per_node
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": str(args.nproc_per_node),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    check = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'train.py'; from launch.train "
                            "import parse_args; parse_args(sys.argv[1:])", *args.script_args], env=env)
    if check.returncode:
        fail(f"launch/train.py refuses these arguments at world size {world} (--nnodes {args.nnodes} × "
             f"--nproc-per-node {args.nproc_per_node}); this node does not join the rendezvous")


def hosts_endpoint(args: argparse.Namespace) -> bool:
    """Whether this node hosts the rendezvous store: node 0, or (elastic) a node that owns the endpoint's address."""
    if args.node_rank is not None:
        return args.node_rank == 0
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.bind((args.host, 0))
        return True
    except OSError:
        return False


def wait_for_endpoint(host: str, port: int, timeout: int) -> None:
    """Return once ``host:port`` accepts a TCP connection; exit with a message after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(f"the rendezvous endpoint {host}:{port} did not answer within --rdzv-timeout {timeout} s "
                 f"(last attempt: {last}); is node 0 started with --endpoint {host}:{port}, and is the port "
                 f"reachable from this node?")
        try:
            with socket.create_connection((host, port), timeout=min(2.0, left)):
                return
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def torchrun_command(args: argparse.Namespace, is_host: bool) -> list[str]:
    conf = f"join_timeout={args.rdzv_timeout}"
    if args.node_rank is not None:
        conf += f",is_host={str(is_host).lower()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nnodes}",
            f"--nproc-per-node={args.nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.endpoint}",
            f"--rdzv-id={args.rdzv_id}", f"--rdzv-conf={conf}", f"--max-restarts={args.max_restarts}",
            *([f"--local-addr={args.local_addr}"] if args.local_addr else []), str(args.script), *args.script_args]


def run(cmd: list[str], args: argparse.Namespace) -> int:
    """Run torchrun (in a session of its own: SIGINT and SIGTERM reach it once, forwarded), its stderr relayed
    line by line; a failed rendezvous or job ends with a message that says what failed."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: proc.send_signal(signum))
    seen: list[str] = []
    workers_failed = False

    def relay() -> None:
        nonlocal workers_failed
        for line in proc.stderr:
            sys.stderr.write(line)
            seen.extend(name for name in RENDEZVOUS_FAILURES if name in line and name not in seen)
            workers_failed = workers_failed or WORKERS_FAILED in line

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    if code and workers_failed:
        fail(f"{args.script.name} failed on this node (torchrun's report above; the job's own message is printed "
             f"on the node of global rank 0)")
    if code and seen:
        fail(RENDEZVOUS_FAILURES[seen[0]].format(endpoint=args.endpoint, rdzv_id=args.rdzv_id, nnodes=args.nnodes,
                                                 timeout=args.rdzv_timeout, nproc=args.nproc_per_node))
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    is_host = hosts_endpoint(args)
    cmd = torchrun_command(args, is_host)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if args.script == TRAIN and ":" not in args.nnodes:
        check_train_args(args)
    if not is_host:
        wait_for_endpoint(args.host, args.port, args.rdzv_timeout)
    return run(cmd, args)


if __name__ == "__main__":
    sys.exit(main())
