"""Train the byte-level GPT of ``launch.model`` on a corpus of ``launch.data`` (``--data stdlib``,
Python sources; ``pydoc``, English reference text), on one rank or many (data × tensor parallel).

    python launch/train.py                                  # one process: REG with the defaults
    python launch/train.py --optimizer muon --steps 50 --out runs/muon
    python launch/train.py --optimizer reg --data pydoc --init runs/adamw --eval-also stdlib  # fine-tune
    torchrun --standalone --nproc_per_node=2 launch/train.py              # dp = 2 (what `make train` runs)
    torchrun --standalone --nproc_per_node=4 launch/train.py --dp 2 --tp 2
    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_reg.json   # DeepSpeed: launch/deepspeed_job.py

Prints (rank 0 only) the optimizer's routing table, then a progress line every --log-every steps,
and writes ``log.json`` (args, per-step train loss / lr / tokens per second, validation losses,
final numbers) to the run directory --out (default ``runs/OPTIMIZER``), rewritten atomically at every
evaluation and at the end. The job ends with a checkpoint of its last step (not with --no-save),
named on the last line it prints.
The learning rate warms up linearly for --warmup steps, then follows a cosine down to 10% at the
last step. Each optimizer's own hyper-parameters have flags (``--betas``; ``--momentum``, ``--rms``
for REG/Muon/MuonEq; ``--reg-p``, ``--reg-iters``; ``--ns-steps``; ``--muoneq-mode``); a flag given
to an optimizer it does not apply to is refused. ``--init CHECKPOINT`` starts from another run's
model weights (the same model) with a fresh optimizer, schedule and data stream: fine-tuning;
``--eval-also DOMAIN`` validates on a second domain too (``val_also`` in the log: forgetting).

Parallelism. Under torchrun the world (gloo on the CPU; nccl with ``--device cuda``) is a
``(dp, tp)`` mesh, ``dp × tp = world`` (``--dp`` defaults to world / ``--tp``). Each dp rank reads
its own ``batch_size / dp`` rows of every global batch of ``--batch-size`` windows (the union is
the single-process batch); the tp ranks of one dp rank read the same rows. With ``tp > 1`` each
block's attention (``qkv`` column-parallel on whole heads, ``proj`` row-parallel) and MLP (``fc``
column-, ``proj`` row-parallel) are DTensors on ``mesh["tp"]``; the ``qkv`` rows are first
permuted to the head-major order, so the model computes the single-process function. REG, Muon
and MuonEq are built with ``mesh=`` (their native data parallelism: ``opt.step()`` itself
averages the gradients over dp, owners alone keep state); ``--optimizer adamw`` gets the
gradients all-reduced (averaged) over dp here and steps ``torch.optim.AdamW`` on every rank.
The reported train loss and validation loss are averages over dp, equal to the single-process ones.

Gradient clipping (``--clip``) is by the global norm of the dp-averaged gradient, as in one
process. With dp > 1 the gradients are all-reduced (SUM, ÷ dp) over dp first, so that every rank
holds the averaged gradient; its norm (shards of TP tensors summed over tp, replicated tensors
counted once) gives the clip coefficient, applied on every rank. ``opt.step()`` of the native mode
then reduce-scatters dp identical copies and divides by dp: it gets the same averaged values back,
bit for bit where the sum of dp copies is exact (dp = 2: x + x and ÷ 2 are; gloo also gives back
x exactly for dp = 4), within one rounding (≤ 1 ulp) otherwise (dp = 3 on gloo); see
tests/test_launch.py. The price is one extra all-reduce of the gradients per step, paid only when
clipping under dp > 1.

Checkpoints. At the last step (unless --no-save), and every N steps with ``--save-every N``, the job
writes ``OUT/checkpoints/step-NNNNNN/`` in
``torch.distributed.checkpoint`` (DCP) form, every rank writing only what it holds: ``model/`` (the
model's tensors, TP shards as DTensors, replicated tensors once; the ``train`` state: step,
scheduler, the data stream's position; each rank's RNG state; rank 0's log) and ``optimizer/``
(``reg_dist.checkpoint`` for REG/Muon/MuonEq: its state as rectangles of each parameter's logical
tensor, whatever rank owns it; DCP's optimizer state dict for AdamW), then ``meta.json``, the
completion marker, written last. It is written as ``.step-NNNNNN.tmp`` and renamed once complete,
so a checkpoint cut short (a rank lost mid-save) is never picked: the newest ``step-N`` with its
``meta.json`` is. ``--keep K`` (default 3; 0: all) keeps the newest K. The ``qkv`` weights (and
their optimizer state) are saved in the head-major row order every tp > 1 holds, permuted on the
way in and out at tp = 1, so that a checkpoint is one logical model at any tp; ``read_model(dir)``
gives it as plain full tensors in one process. Every rank writes into the same directory (several
nodes would need a shared file system).

Resuming. ``--resume auto`` (the default) continues from --out's newest complete checkpoint when
it has one, so a job rerun with the same command (the same --out, or the same default
``runs/OPTIMIZER``; or restarted by ``torchrun --max-restarts=R``) picks up where it stopped, losing at
most the steps since the last checkpoint; a rerun of a finished run (its checkpoint at --steps)
trains nothing and says so. ``log.json`` records the mode used (``"resume"``: auto, none or the PATH
given) and the checkpoint it found (``"resumed_from"``, null when the run started afresh). ``--resume PATH`` names a
checkpoint directory or a run directory (its newest complete checkpoint); ``--resume none`` starts
afresh (into a non-empty --out only with --overwrite, which deletes its checkpoints). A torchrun
restart (``TORCHELASTIC_RESTART_COUNT`` > 0) continues from --out's newest complete checkpoint
whatever --resume says. Resuming in its own run directory from an older checkpoint deletes the
later ones (a trajectory abandoned: never to be picked by a later auto-resume). The model,
optimizer, batch size and sequence length must match; dp and tp need not. The data position is
global: every dp rank draws the whole global batch of windows from one generator (the same state
on every rank) and keeps its rows, so the global batch sequence does not depend on dp and a resume
at another dp × tp trains on exactly the batches the uninterrupted run would have. At the same
dp × tp the continued run is bit for bit the uninterrupted one; at another it differs only as the
layouts themselves differ (the order of the sums over dp and tp: ~1e-7 relative for REG and AdamW;
Muon and MuonEq's default bf16 Newton–Schulz, and their bf16 owner moves at tp > 1, make that
~1e-4–1e-3). The RNG state (nothing draws from it in training: no dropout) is each rank's own at the
same layout, else that of the saved rank at the same (dp, tp) coordinates modulo the saved sizes.
Without --out a resumed run writes into the checkpoint's run directory; a new --out that exists
and is not empty is refused unless --overwrite (a torchrun restart may write into its own --out).
Under torchrun the process group is made on the agent's store with a prefix of its own per attempt
(``attempt_store``): torch 2.13 keeps one store across restarts and adds none, and a restarted rank
could otherwise read the dead attempt's addresses.

Every invalid input (arguments, world size, checkpoint) exits non-zero with one message (printed by
rank 0) before any training step.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the job's parts, one module each: cli (the command line), ranks (process groups, mesh), tensor_parallel,
# checkpoints, job (what the native and DeepSpeed loops share), loop (the native job), deepspeed_job
from launch import deepspeed_job, loop  # noqa: E402
from launch.checkpoints import (CHECKPOINT_FORMAT, CHECKPOINTS, META, complete_checkpoints,  # noqa: E402
                                load_checkpoint, read_model, save_checkpoint)
from launch.cli import HYPER_PARAMETERS, MATRIX_OPTIMIZERS, OPTIMIZERS, parse_args  # noqa: E402
from launch.exits import run_and_exit  # noqa: E402
from launch.job import duration, evaluate, lr_factor, progress, write_json  # noqa: E402
from launch.loop import build_optimizer, routing_text  # noqa: E402
from launch.ranks import Parallel, all_reduce_mean_, die, world_env  # noqa: E402
from launch.tensor_parallel import clip_grad_norm, parallelize  # noqa: E402

__all__ = ["main", "parse_args", "complete_checkpoints", "read_model", "load_checkpoint", "save_checkpoint",
           "CHECKPOINT_FORMAT", "CHECKPOINTS", "META", "HYPER_PARAMETERS", "MATRIX_OPTIMIZERS", "OPTIMIZERS",
           "duration", "evaluate", "lr_factor", "progress", "write_json", "build_optimizer", "routing_text",
           "Parallel", "all_reduce_mean_", "die", "world_env", "clip_grad_norm", "parallelize"]


def main(argv: list[str] | None = None) -> dict:
    """Train as ``argv`` says; returns what ``log.json`` holds (on rank 0; {} elsewhere)."""
    args = parse_args(argv)
    return (deepspeed_job if args.deepspeed is not None else loop).run(args)


if __name__ == "__main__":
    run_and_exit(main)  # os._exit after the job: no interpreter finalization (see launch/exits.py)
