"""GPT pretraining with Megatron-LM and reg_dist's optimizers: megatron-core's ``GPTModel`` trained by
``megatron.training.pretrain``, with ``--optimizer reg | reg_muon | muoneq`` and their flags added to
Megatron's own (``reg_dist.megatron``). Run it as any Megatron-LM pretraining script, on CUDA GPUs:

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc-per-node 8 launch/pretrain_gpt.py \\
        --tensor-model-parallel-size 2 --use-distributed-optimizer --bf16 \\
        --transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion \\
        --num-layers 12 --hidden-size 768 --num-attention-heads 12 --group-query-attention --num-query-groups 4 \\
        --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 8 --global-batch-size 256 \\
        --train-iters 2000 --lr 0.02 --min-lr 0.002 --lr-decay-style cosine --lr-warmup-iters 100 \\
        --optimizer reg --reg-p 2 --weight-decay 0.1 --clip-grad 1.0 --log-interval 10 --eval-interval 500

Data: with neither ``--data-path`` nor ``--mock-data``, byte-level windows of the Python standard library's
own sources (``launch.data.build_corpus``: no download; tokens are bytes, ``--vocab-size 256`` with
Megatron's ``NullTokenizer`` by default), the ``val`` split for validation; ``--mock-data`` is Megatron's
``MockGPTDataset``; ``--data-path`` its indexed datasets (with a real ``--tokenizer-type``).

``--transformer-impl local`` (megatron-core's own layers; without Apex also ``--no-persist-layer-norm
--no-gradient-accumulation-fusion``) or ``transformer_engine`` (the default, needs Transformer Engine).
``--use-distributed-optimizer`` runs ours on Megatron's flat distributed optimizer
(``reg_dist.megatron.parse_and_validate_args`` keeps it: Megatron's ``validate_args`` would switch
optimizers other than adam and sgd to its layer-wise one), or with ``--reg-distributed-optimizer
layer-wise`` on that layer-wise one.

``--cpu``: a dry run of the same ``pretrain`` on CPU ranks (gloo), to check a configuration, its flags and a
checkpoint round trip before spending GPU hours; slow (a tiny model only), never the default. It installs
``launch.megatron_cpu``'s CUDA → CPU shim in the rank before Megatron initialises and adds its
``CPU_ARGS`` (gloo, ``--transformer-impl local``, no fused kernels) before the command's own flags.
"""

import argparse
import os
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable (``launch.*``)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reg_dist.megatron as rm  # noqa: E402  first: the typing.override alias megatron.training needs on Python 3.11

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_with_transformer_engine_spec)
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import core_transformer_config_from_args, pretrain_cfg_container_from_args

from launch import megatron_cpu
from launch.data import build_corpus
from launch.exits import run_and_exit

DEFAULTS = {"tokenizer_type": "NullTokenizer", "vocab_size": 256}  # byte-level; Megatron fills unset args only


class ByteSamples(torch.utils.data.Dataset):
    """``n`` windows of ``seq_len + 1`` bytes of a token file, at offsets drawn from ``seed`` and the
    sample index (the same sample on every rank): ``tokens``, ``labels`` (shifted by one), ``loss_mask``,
    ``position_ids``, each ``(seq_len,)``."""

    def __init__(self, path, seq_len: int, n: int, seed: int) -> None:
        self.data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
        if self.data.numel() <= seq_len + 1:
            raise ValueError(f"{path} holds {self.data.numel()} bytes, not more than --seq-length + 1 = {seq_len + 1}")
        self.seq_len, self.n, self.seed = seq_len, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(self.data.numel() - self.seq_len - 1, (1,), generator=g))
        w = self.data[start:start + self.seq_len + 1].long()
        return {"tokens": w[:-1], "labels": w[1:], "loss_mask": torch.ones(self.seq_len),
                "position_ids": torch.arange(self.seq_len)}


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None) -> GPTModel:
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    spec_of = get_gpt_layer_with_transformer_engine_spec if args.transformer_impl == "transformer_engine" \
        else get_gpt_layer_local_spec
    spec = spec_of(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                   qk_layernorm=args.qk_layernorm)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, vp_stage=vp_stage, pg_collection=pg_collection)


def datasets_provider(num_samples, vp_stage=None):
    """(train, valid, test) datasets of ``num_samples`` = (n_train, n_valid, n_test) samples."""
    args = get_args()
    if args.mock_data or args.data_path:
        from megatron.core.datasets.gpt_dataset import GPTDataset
        from megatron.training import get_tokenizer
        from megatron.training.utils import get_blend_and_blend_per_split

        blend, per_split = get_blend_and_blend_per_split(args)
        config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
                                  blend_per_split=per_split, split=args.split, path_to_cache=args.data_cache_path,
                                  tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
                                  reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
                                  create_attention_mask=args.create_attention_mask_in_dataloader)
        kind = MockGPTDataset if args.mock_data else GPTDataset
        return BlendedMegatronDatasetBuilder(kind, num_samples, lambda: True, config).build()
    paths = build_corpus()
    return (ByteSamples(paths["train"], args.seq_length, num_samples[0], args.seed),
            ByteSamples(paths["val"], args.seq_length, max(num_samples[1], 1), args.seed + 1), None)


datasets_provider.is_distributed = True  # every rank builds it: TP ranks read the same samples, no broadcast


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Summed token loss, the token count, and Megatron's ``lm loss`` report."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.view(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def forward_step(data_iterator, model: GPTModel):
    """One micro-batch: the causal LM loss per token (attention mask None: the layers' causal mask). Every
    pipeline stage reads the batch; a stage after the first takes its input from the previous one."""
    batch = {k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


def escape_broken_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Double every '%' of a help string that argparse cannot format (megatron-core 0.19.2's
    ``--moe-paged-stash-buffer-size-factor-cuda`` says "10%)": ``--help`` would raise ``ValueError:
    unsupported format character``); help strings that format (``%(default)s``) are left as they are."""
    for action in parser._actions:
        if isinstance(action.help, str) and "%" in action.help:
            try:
                action.help % {**vars(action), "prog": parser.prog}
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    return parser


def cpu_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--cpu`` in ``--help`` (``use_cpu`` takes it out of ``sys.argv`` before Megatron parses)."""
    parser.add_argument("--cpu", action="store_true", help="Dry run on CPU ranks with gloo (slow; a tiny model): "
                        "check a configuration, its flags and a checkpoint round trip before a GPU run.")
    return parser


def use_cpu(argv: list[str]) -> bool:
    """If ``argv`` (``sys.argv``, changed in place) asks for ``--cpu``: take it out, put ``CPU_ARGS`` before
    the command's flags (every later parse of ``sys.argv`` sees them) and install the CUDA → CPU shim."""
    if "--cpu" not in argv[1:]:
        return False
    argv[1:] = [*megatron_cpu.CPU_ARGS, *(a for a in argv[1:] if a != "--cpu")]
    if os.environ.get("RANK", "0") == "0":
        print("pretrain_gpt.py --cpu: Megatron's pretrain on CPU ranks with gloo, a dry run; it is slow, use a "
              "tiny model", file=sys.stderr, flush=True)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    megatron_cpu.install_for_pretrain()
    return True


def parse_args():
    """Megatron's arguments with reg_dist's (``reg_dist.megatron``), validated and set as Megatron's global
    arguments, and the ``PretrainConfigContainer`` ``pretrain`` takes."""
    rm.register()
    args = rm.parse_and_validate_args(cpu_flag, escape_broken_help, args_defaults=DEFAULTS)
    return args, pretrain_cfg_container_from_args(args)


def use_shipped_dataset_helpers() -> None:
    """megatron-core's wheel ships its compiled dataset helpers (``helpers_cpp``) but not the Makefile that
    Megatron's initialisation runs ``make`` on (a source checkout has both): where they import, skip that."""
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    utils.compile_helpers = lambda: None


def main() -> None:
    use_cpu(sys.argv)
    _, cfg = parse_args()
    use_shipped_dataset_helpers()
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)


if __name__ == "__main__":
    run_and_exit(main)  # os._exit after the job: no interpreter finalization (see launch/exits.py)
