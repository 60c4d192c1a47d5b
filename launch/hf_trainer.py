"""The Hugging Face Trainer with DeepSpeed and reg_dist's REG: an example to copy.

    deepspeed --num_gpus 2 launch/hf_trainer.py --deepspeed configs/hf_zero2_reg.json
    torchrun --nproc_per_node 2 launch/hf_trainer.py --deepspeed configs/hf_zero2_reg.json   # CPU too (gloo)
    ... --resume runs/hf-reg/checkpoint-20                                   # continue a run

What makes it reg_dist's: ``reg_dist.deepspeed.register()`` before the Trainer is built, and
``"optimizer": {"type": "REG", "params": {"lr": "auto", "weight_decay": "auto"}}`` in the DeepSpeed
config (``"MuonEq"``, ``"reg_dist.Muon"``, ``"NorMuon"`` likewise); the Trainer fills the ``"auto"``
values from its arguments and drives the lr with its own schedule. Everything else is the Trainer's
usual job: here a small GPT-2 (``--model`` names a ``from_pretrained`` checkpoint instead) trained on
byte windows of the Python standard library's sources (``launch.data``), a checkpoint every
``--save-steps`` (``engine.save_checkpoint``, reg_dist's state included), ``--resume`` from one.

On machines without a GPU (CPU ranks, gloo) Accelerate finds no backend for DeepSpeed and would run
every rank as a one-process job on all the data: the script then makes the gloo state first.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import reg_dist.deepspeed  # noqa: E402
from launch.data import DEFAULT_CACHE, ByteWindows, build_corpus  # noqa: E402
from launch.deepspeed_job import skip_shm_build_if_asked  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON config naming reg_dist's optimizer")
    p.add_argument("--model", default=None, help="from_pretrained name or path (default: a small GPT-2 built here)")
    p.add_argument("--out", default="runs/hf-reg", help="the Trainer's output_dir (checkpoint-N/ inside)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--resume", default=None, help="a checkpoint-N directory of an earlier run to continue")
    p.add_argument("--data-dir", default=str(DEFAULT_CACHE), help="cache of the corpus token files")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Trainer:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("reg_dist").setLevel(logging.INFO)  # the routing table, and what DeepSpeed steps
    reg_dist.deepspeed.register()  # deepspeed.initialize, as the Trainer calls it, now builds reg_dist's optimizers
    extra = {}
    if not torch.cuda.is_available():  # CPU ranks: DeepSpeed over gloo, set up before the Trainer's Accelerator
        from accelerate import PartialState

        skip_shm_build_if_asked()
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    world = int(os.environ.get("WORLD_SIZE", 1))
    windows = ByteWindows(build_corpus(args.data_dir)["train"], args.seq_len, args.steps * args.batch_size * world)
    tokens = windows.next_batch()[0]  # the same windows on every rank: the Trainer's sampler splits them
    samples = [{"input_ids": x, "labels": x} for x in tokens]
    training = TrainingArguments(
        output_dir=args.out, deepspeed=args.deepspeed, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps", save_steps=args.save_steps,
        logging_steps=1, report_to="none", seed=0, train_sampling_strategy="sequential", **extra)
    if args.model is not None:
        model = GPT2LMHeadModel.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=args.seq_len))
    trainer = Trainer(model=model, args=training, train_dataset=samples)
    trainer.train(resume_from_checkpoint=args.resume)
    return trainer


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a clean teardown: exiting with gloo's threads alive can abort a rank
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
