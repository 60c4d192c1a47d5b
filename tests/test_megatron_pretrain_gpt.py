"""``launch/pretrain_gpt.py`` on a CPU machine: its argument parsing (Megatron's, with reg_dist's flags)
reaches ``validate_args`` and the ``PretrainConfigContainer`` that ``pretrain`` takes without touching
CUDA; its byte-level data serves Megatron-shaped samples; its GPTModel and forward step train with our
optimizer; ``main()`` runs Megatron's whole ``pretrain`` under the shim that pretends to be CUDA
(``launch.megatron_cpu.install_for_pretrain``, what ``--cpu`` installs), and ``--cpu`` under torchrun.
docs/megatron.md gives the GPU command."""

import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    import reg_dist.megatron  # noqa: F401  (the typing.override alias, before megatron.training)
    import megatron.training  # noqa: F401

from launch import megatron_cpu
from multiproc import run_ranks, torchrun

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--train-iters", "5", "--lr", "0.02"]


def _in_a_fresh_process(argv, fn):
    """``fn(args, cfg, module)`` after ``pretrain_gpt.parse_args()`` with ``argv``, in a forked process
    (Megatron's global arguments stay out of the pytest process)."""

    def body(rank, world):
        import torch

        warnings.simplefilter("ignore")
        sys.argv = ["pretrain_gpt.py", *BASE, *argv]
        from launch import pretrain_gpt

        args, cfg = pretrain_gpt.parse_args()
        out = fn(args, cfg, pretrain_gpt)
        assert not torch.cuda.is_initialized()
        return out

    return run_ranks(1, body, init_group=False)[0]


def test_pretrain_gpt_parses_our_flags_into_megatrons_config_container():
    def read(args, cfg, module):
        from reg_dist.integrations.megatron.optimizer import settings_from

        settings = settings_from(cfg.optimizer)  # what the registry entry reads: Megatron's global arguments
        return (args.optimizer, args.use_distributed_optimizer, args.use_layer_wise_distributed_optimizer,
                cfg.optimizer.optimizer, cfg.optimizer.use_distributed_optimizer, cfg.ddp.use_distributed_optimizer,
                cfg.optimizer.bf16, cfg.optimizer.lr, settings.reg_p, settings.reg_iters, args.padded_vocab_size >= 256)

    got = _in_a_fresh_process(["--optimizer", "reg", "--reg-p", "3", "--reg-iters", "2", "--use-distributed-optimizer",
                               "--bf16"], read)
    # Megatron's validate_args alone would have made it its layer-wise optimizer
    assert got == ("reg", True, False, "reg", True, True, True, 0.02, 3.0, 2, True)
    layer_wise = _in_a_fresh_process(["--optimizer", "reg", "--use-distributed-optimizer",
                                      "--reg-distributed-optimizer", "layer-wise"],
                                     lambda args, cfg, module: (args.use_distributed_optimizer,
                                                                cfg.optimizer.use_layer_wise_distributed_optimizer))
    assert layer_wise == (False, True)  # Megatron's layer-wise optimizer, as its validate_args makes it


def test_pretrain_gpt_byte_data_gives_megatron_samples():
    def sample(args, cfg, module):
        train, valid, test = module.datasets_provider([6, 2, 0])
        s = train[5]
        return len(train), len(valid), test, {k: (tuple(v.shape), str(v.dtype)) for k, v in s.items()}, \
            bool((s["tokens"][1:] == s["labels"][:-1]).all()), bool((train[5]["tokens"] == s["tokens"]).all())

    n_train, n_valid, test, shapes, shifted, same = _in_a_fresh_process(["--optimizer", "reg_muon"], sample)
    assert (n_train, n_valid, test, shifted, same) == (6, 2, None, True, True)
    assert shapes == {"tokens": ((16,), "torch.int64"), "labels": ((16,), "torch.int64"),
                      "loss_mask": ((16,), "torch.float32"), "position_ids": ((16,), "torch.int64")}


def test_pretrain_gpt_rejects_bad_reg_flags_with_argparses_message(capfd):
    with pytest.raises(AssertionError, match="SystemExit: 2"):
        _in_a_fresh_process(["--optimizer", "muoneq", "--muoneq-phase", "2"], lambda *a: None)
    assert "--optimizer muoneq: phase applies only to mode='rowcol'" in capfd.readouterr().err
    with pytest.raises(AssertionError, match="SystemExit: 2"):
        _in_a_fresh_process(["--optimizer", "normuon", "--use-distributed-optimizer", "--ckpt-format", "torch",
                             "--save", "ckpt"], lambda *a: None)
    assert "--optimizer normuon keeps per-row state, which the flat distributed optimizer checkpoints in " \
           "--ckpt-format torch_dist only" in capfd.readouterr().err
    with pytest.raises(AssertionError, match="SystemExit: 2"):
        _in_a_fresh_process(["--optimizer", "normuon", "--load", "ckpt"], lambda *a: None)
    assert "--optimizer normuon keeps per-row state, which Megatron's torch_dist checkpoints of its DDP and " \
           "layer-wise optimizers cannot hold: use --ckpt-format torch" in capfd.readouterr().err


CPU = list(megatron_cpu.CPU_ARGS)  # gloo, megatron-core's own layers, no fused CUDA kernels


@pytest.mark.parametrize("name", ["reg", "muoneq"])
def test_pretrain_gpt_model_data_and_forward_step_train_with_ours_on_tp2(name):
    """What ``pretrain`` would run, on CPU (the CUDA → CPU shim): ``pretrain_gpt``'s GPTModel on TP 2, its
    byte data and forward step, Megatron's DDP, distributed optimizer and ``get_megatron_optimizer`` with
    our flags. Hidden matrices (``linear_qkv`` as q, k, v) take ours, the rest Adam; repeating one batch,
    the loss falls."""

    def body(rank, world):
        import torch
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import get_megatron_optimizer

        warnings.simplefilter("ignore")
        megatron_cpu.install()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), CUDA_DEVICE_MAX_CONNECTIONS="1")  # for validate_args
        sys.argv = ["pretrain_gpt.py", *BASE, "--optimizer", name, "--tensor-model-parallel-size", "2",
                    "--use-distributed-optimizer", "--reg-ns-dtype", "fp32", *CPU]
        from launch import pretrain_gpt

        args, cfg = pretrain_gpt.parse_args()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        model = pretrain_gpt.model_provider()
        ddp = DistributedDataParallel(config=model.config, ddp_config=cfg.ddp, module=model)
        optimizer = get_megatron_optimizer(cfg.optimizer, [ddp])
        train, _, _ = pretrain_gpt.datasets_provider([2, 1, 0])
        batch = next(iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size)))
        losses = []
        for _ in range(4):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            output, loss_func = pretrain_gpt.forward_step(iter([batch]), ddp)
            loss, tokens, _ = loss_func(output)
            (loss / tokens).backward()
            ddp.finish_grad_sync()
            assert optimizer.step()[0]
            losses.append(float(loss / tokens))
        inner = optimizer.chained_optimizers[0].optimizer.inner
        routes = {r.name: (r.algorithm, r.shape) for r in inner.routes}
        qkv = inner._layouts[id(next(p for g in inner.param_groups for p, n in zip(g["params"], g["param_names"])
                                     if n == "decoder.layers.0.self_attention.linear_qkv.weight"))]
        return losses, routes, len(qkv.block_shapes)

    (losses, routes, qkv_blocks), other = run_ranks(2, body)
    assert other[1] == routes and qkv_blocks == 3
    assert losses[-1] < losses[0]
    algorithm = {"reg": "reg", "muoneq": "muoneq"}[name]
    assert routes["decoder.layers.0.self_attention.linear_qkv.weight"] == (algorithm, (96, 32))  # logical, not TP
    assert routes["decoder.layers.1.mlp.linear_fc2.weight"] == (algorithm, (32, 128))
    assert routes["embedding.word_embeddings.weight"][0] == "adamw"
    assert routes["decoder.final_layernorm.weight"] == ("adamw", (1, 32))


@pytest.mark.parametrize("name, extra", [
    ("reg", ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16"]),
    ("reg_muon", ["--pipeline-model-parallel-size", "2"]),
], ids=["reg-tp2-dp2-distopt-bf16", "reg_muon-pp2-dp2-ddp-fp32"])
def test_pretrain_gpt_main_runs_megatrons_pretrain_with_ours(name, extra):
    """``launch/pretrain_gpt.py``'s ``main()`` on 4 ranks: Megatron's ``pretrain`` (initialisation, training
    loop with its LR schedule, gradient clipping and pipeline schedule, validation), on CPU through the
    test-only shim that pretends to be CUDA. Every rank steps reg_dist's optimizer once per iteration
    and the loss falls (on the last pipeline stage, which computes it)."""
    iters = 6

    def body(rank, world):
        import torch

        from reg_dist.integrations.megatron.optimizer import NAMES, DistOptAdapter

        warnings.simplefilter("ignore")
        megatron_cpu.install_for_pretrain()
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        sys.argv = ["pretrain_gpt.py", *BASE[:-4], "--train-iters", str(iters), "--lr", "0.01", "--min-lr", "0.001",
                    "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--global-batch-size", "4",
                    "--eval-iters", "1", "--eval-interval", "3", "--log-interval", "3",
                    "--optimizer", name, *extra, *CPU]
        from launch import pretrain_gpt

        steps, losses = [], []
        ours = DistOptAdapter if "--use-distributed-optimizer" in extra else NAMES[name]
        step, loss_func = ours.step, pretrain_gpt.loss_func
        ours.step = lambda self, *a: steps.append(1) or step(self, *a)
        pretrain_gpt.loss_func = lambda mask, out: (lambda r: losses.append(float(r[0] / r[1])) or r)(
            loss_func(mask, out)) if torch.is_grad_enabled() else loss_func(mask, out)
        pretrain_gpt.main()
        return len(steps), losses

    results = run_ranks(4, body, init_group=False)
    assert all(steps == iters for steps, _ in results)
    with_loss = [losses for _, losses in results if losses]
    assert len(with_loss) == (2 if "--pipeline-model-parallel-size" in extra else 4)
    for losses in with_loss:
        assert len(losses) == iters and sum(losses[-2:]) < sum(losses[:2])


def test_pretrain_gpt_cpu_dry_run_under_torchrun():
    """``torchrun --nproc_per_node=2 launch/pretrain_gpt.py --cpu``: Megatron's ``pretrain`` on two CPU ranks
    (DP 2) exits 0, says it is a slow dry run, and logs its losses."""
    script = Path(__file__).resolve().parents[1] / "launch" / "pretrain_gpt.py"
    run = torchrun(script, 2, ["--cpu", *BASE[:-4], "--train-iters", "2", "--lr", "0.01", "--global-batch-size", "4",
                               "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "10",
                               "--optimizer", "reg"], timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "a dry run; it is slow" in run.stderr
    losses = re.findall(r"iteration\s+(\d+)/\s*2 \|.*?lm loss: ([0-9.E+-]+)", run.stdout)
    assert [i for i, _ in losses] == ["1", "2"] and all(0 < float(v) < 10 for _, v in losses), run.stdout[-3000:]


def _pretrain(argv: list[str], world: int = 2) -> list:
    """``pretrain_gpt.py --cpu`` ``main()`` on ``world`` forked ranks: each rank's per-micro-batch training losses,
    its model's final parameters (by name) and each one's tensor-parallel split dimension (None: whole)."""

    def body(rank, world):
        import torch

        warnings.simplefilter("ignore")
        sys.argv = ["pretrain_gpt.py", "--cpu", *argv]
        from launch import pretrain_gpt

        losses, models = [], []
        loss_func, model_provider = pretrain_gpt.loss_func, pretrain_gpt.model_provider
        pretrain_gpt.loss_func = lambda mask, out: (lambda r: losses.append(float(r[0] / r[1])) or r)(
            loss_func(mask, out)) if torch.is_grad_enabled() else loss_func(mask, out)
        pretrain_gpt.model_provider = lambda *a, **k: models.append(model_provider(*a, **k)) or models[-1]
        pretrain_gpt.main()
        named = [(n, p) for m in models for n, p in m.named_parameters()]
        return losses, {n: p.detach().float().numpy() for n, p in named}, \
            {n: p.partition_dim if getattr(p, "tensor_model_parallel", False) else None for n, p in named}  # no shm

    return run_ranks(world, body, init_group=False)


DISTOPT_BF16 = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16"]


@pytest.mark.parametrize("name, world, extra, formats", [
    ("reg", 2, [], ("torch", "torch_dist")),
    ("reg", 2, ["--bf16"], ("torch",)),
    ("reg_muon", 4, ["--tensor-model-parallel-size", "2"], ("torch", "torch_dist")),
    ("reg", 4, DISTOPT_BF16, ("torch_dist", "torch")),
    ("reg_muon", 4, DISTOPT_BF16, ("torch_dist",)),
    ("reg_muon", 4, [*DISTOPT_BF16, "--reg-distributed-optimizer", "layer-wise"], ("torch_dist", "torch")),
], ids=["reg-dp2", "reg-dp2-bf16", "reg_muon-tp2-dp2", "reg-tp2-dp2-distopt-bf16", "reg_muon-tp2-dp2-distopt-bf16",
        "reg_muon-tp2-dp2-layer-wise-bf16"])
def test_pretrain_gpt_checkpoint_resumes_the_uninterrupted_run(name, world, extra, formats, tmp_path):
    """Megatron's DDP, its flat distributed optimizer or its layer-wise one: 4 iterations saving at 2 (in each of
    ``formats``), then a run with ``--load`` from iteration 2 (the tracker file names it, as after a crash at 3)
    continuing to 4: its losses and final weights equal the uninterrupted run's (at TP 2, the owner plans of the
    TP-split matrices survive the load; under a distributed optimizer reg_dist's state and fp32 main copies come
    back). Dropout off: under ``--cpu`` Megatron's "CUDA" generator is the CPU one, which the resumed run's data
    loader draws from after the RNG state is restored."""
    run = [*BASE[:-4], "--train-iters", "4", "--lr", "0.01", "--global-batch-size", "4", "--eval-iters", "0",
           "--eval-interval", "10", "--hidden-dropout", "0", "--attention-dropout", "0", "--optimizer", name,
           "--reg-ns-dtype", "fp32", *extra]
    for fmt in formats:
        ckpt = tmp_path / fmt
        whole = _pretrain([*run, "--ckpt-format", fmt, "--save", str(ckpt), "--save-interval", "2"], world)
        (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
        resumed = _pretrain([*run, "--ckpt-format", fmt, "--load", str(ckpt)], world)
        for (losses, weights, _), (tail, resumed_weights, _) in zip(whole, resumed):
            assert len(losses) == 4 and tail == losses[2:], fmt
            assert weights.keys() == resumed_weights.keys()
            for n, w in weights.items():
                assert (w == resumed_weights[n]).all(), (fmt, n)


@pytest.mark.parametrize("name, mode, fmt", [
    ("reg_muon", "layer-wise", "torch_dist"),
    ("reg", "flat", "torch_dist"),
    ("reg_muon", "flat", "torch"),
    ("muoneq", "flat", "torch_dist"),
    ("normuon", "flat", "torch_dist"),
], ids=["reg_muon-layer-wise-torch_dist", "reg-flat-torch_dist", "reg_muon-flat-torch", "muoneq-flat-torch_dist",
        "normuon-flat-torch_dist"])
def test_pretrain_gpt_moe_experts_under_the_distributed_optimizer_step_like_ddp_and_resume(name, mode, fmt, tmp_path):
    """4 experts (SequentialMLP: each expert's fc1 and fc2 matrices of their own), EP 2 × DP 2 on 4 ranks, gloo's
    allgather token dispatcher, under Megatron's distributed optimizer: the layer-wise one steps each expert matrix
    whole on one rank of its expert-DP group; the flat one (a second instance over the expert-DP group) cuts each
    expert matrix into flat shards on its expert-DP ranks, REG reducing its statistics and Muon moving the pieces
    to an owner over that group. The losses and final weights equal Megatron's DDP run, where every rank steps
    every matrix it holds whole (the single-process optimizer on the same experts), within fp32 rounding (the
    gradients are reduced in another order); a checkpoint (``fmt``) saved at iteration 2 resumes to the same
    iteration 4."""
    run = [*BASE[:-4], "--train-iters", "4", "--lr", "0.01", "--global-batch-size", "8", "--eval-iters", "0",
           "--eval-interval", "10", "--hidden-dropout", "0", "--attention-dropout", "0", "--optimizer", name,
           "--reg-ns-dtype", "fp32", "--num-experts", "4", "--expert-model-parallel-size", "2",
           "--moe-token-dispatcher-type", "allgather", "--disable-bias-linear"]
    distributed = [*run, "--use-distributed-optimizer", "--reg-distributed-optimizer", mode, "--ckpt-format", fmt]
    ddp = _pretrain(run, 4)
    ckpt = tmp_path / "ckpt"
    whole = _pretrain([*distributed, "--save", str(ckpt), "--save-interval", "2"], 4)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = _pretrain([*distributed, "--load", str(ckpt)], 4)
    for (ddp_losses, ddp_weights, _), (losses, weights, _), (tail, resumed_weights, _) in zip(ddp, whole, resumed):
        assert sum("local_experts" in n for n in weights) == 2 * 2 * 2  # 2 layers × 2 local experts × fc1, fc2
        np.testing.assert_allclose(losses, ddp_losses, rtol=1e-6)
        assert len(losses) == 4 and tail == losses[2:]
        for n, w in weights.items():
            np.testing.assert_allclose(w, ddp_weights[n], rtol=1e-5, atol=1e-6, err_msg=n)
            assert (resumed_weights[n] == w).all(), n


def test_pretrain_gpt_refuses_expert_tensor_parallelism_under_the_flat_distributed_optimizer():
    """TP 2 × EP 2 (expert TP 2, Megatron's default: the TP size) with the flat distributed optimizer: refused when the
    optimizer is built, naming the flag and what to use instead."""
    run = [*BASE[:-4], "--train-iters", "1", "--lr", "0.01", "--global-batch-size", "4", "--eval-iters", "0",
           "--eval-interval", "10", "--optimizer", "reg_muon", "--num-experts", "4", "--expert-model-parallel-size",
           "2", "--tensor-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather",
           "--disable-bias-linear", "--use-distributed-optimizer"]
    with pytest.raises(AssertionError, match="--optimizer reg_muon: --expert-tensor-parallel-size > 1 is not supported "
                                             "with the flat distributed optimizer"):
        _pretrain(run, 4)


def _whole(ranks: list, tp: int, iters: int) -> tuple[np.ndarray, dict]:
    """Each iteration's mean loss over its micro-batches (every TP rank records each of its DP rank's), and the
    whole weights: the first TP group's shards (ranks 0 … tp−1 in Megatron's order) joined along their split."""
    losses = np.concatenate([np.reshape(losses, (iters, -1)) for losses, _, _ in ranks], axis=1).mean(axis=1)
    weights = {n: w if dim is None else np.concatenate([ranks[t][1][n] for t in range(tp)], axis=dim)
               for (n, w), dim in zip(ranks[0][1].items(), ranks[0][2].values())}
    return losses, weights


@pytest.mark.parametrize("name, saved, resumed", [
    ("reg", (2, ["--tensor-model-parallel-size", "2"]), (2, [])),
    ("reg_muon", (4, ["--tensor-model-parallel-size", "2"]), (4, [])),
    ("reg_muon", (4, ["--tensor-model-parallel-size", "2"]), (4, ["--pipeline-model-parallel-size", "2"])),
], ids=["reg-tp2-dp1-to-tp1-dp2", "reg_muon-tp2-dp2-to-tp1-dp4", "reg_muon-tp2-dp2-to-pp2-dp2"])
def test_pretrain_gpt_distopt_checkpoint_resumes_at_another_tp_pp_and_dp(name, saved, resumed, tmp_path):
    """The distributed optimizer's ``torch_dist`` checkpoint holds reg_dist's state in model space: saved at
    iteration 2 of a TP 2 run, it resumes at TP 1 on as many ranks (so another DP degree, other flat ranges),
    or at PP 2, and the continued losses (and final weights, whole on TP 1) equal the uninterrupted TP 2 run's
    within fp32 rounding."""
    run = [*BASE[:-4], "--train-iters", "4", "--lr", "0.01", "--global-batch-size", "8", "--eval-iters", "0",
           "--eval-interval", "10", "--hidden-dropout", "0", "--attention-dropout", "0", "--optimizer", name,
           "--reg-ns-dtype", "fp32", "--use-distributed-optimizer", "--save-interval", "2"]
    ckpt = str(tmp_path / "ckpt")
    (world, tp_args), (new_world, new_args) = saved, resumed
    losses, weights = _whole(_pretrain([*run, *tp_args, "--save", ckpt], world), 2, 4)
    tail, resumed_weights = _whole(_pretrain([*run, *new_args, "--load", ckpt, "--ckpt-step", "2"], new_world), 1, 2)
    np.testing.assert_allclose(tail, losses[2:], rtol=1e-5)
    if "--pipeline-model-parallel-size" in new_args:
        return  # each stage names its own layers from 0
    assert weights.keys() == resumed_weights.keys()
    for n, w in weights.items():
        np.testing.assert_allclose(resumed_weights[n], w, rtol=1e-4, atol=1e-6, err_msg=n)


def test_pretrain_gpt_refuses_another_optimizers_checkpoint_and_loads_its_weights_alone_on_request(tmp_path):
    """Megatron's own ``--optimizer adam`` checkpoint (distributed optimizer, DP 2) loaded with ``--optimizer reg``:
    refused before anything loads, naming both. With ``--no-load-optim`` the weights load and the iteration count
    continues (to 4); with ``--finetune`` they load and the iterations start again from 0 (2 of them). ``--lr 0``:
    the weights stay the checkpoint's."""
    run = [*BASE[:-4], "--lr", "0", "--global-batch-size", "4", "--eval-iters", "0", "--eval-interval", "10",
           "--hidden-dropout", "0", "--attention-dropout", "0", "--use-distributed-optimizer"]
    ckpt = str(tmp_path / "adam")
    saved = _pretrain([*run, "--lr", "0.01", "--train-iters", "2", "--optimizer", "adam", "--save", ckpt,
                       "--save-interval", "2"])
    ours = [*run, "--optimizer", "reg", "--load", ckpt]
    with pytest.raises(AssertionError, match="--optimizer reg cannot load this checkpoint's optimizer state: it was "
                                             "saved by an optimizer other than reg_dist's"):
        _pretrain([*ours, "--train-iters", "4"])
    for extra, iters in (["--no-load-optim", "--train-iters", "4"], 2), (["--finetune", "--train-iters", "2"], 2):
        loaded = _pretrain([*ours, *extra])
        for (_, weights, _), (losses, loaded_weights, _) in zip(saved, loaded):
            assert len(losses) == iters, extra
            for n, w in weights.items():
                assert (loaded_weights[n] == w).all(), (extra, n)


def test_pretrain_gpt_refuses_another_reg_dist_optimizers_checkpoint_naming_both(tmp_path):
    """A distributed-optimizer checkpoint of ``--optimizer reg`` loaded with ``--optimizer reg_muon``: refused
    before anything loads, with both names."""
    run = [*BASE[:-4], "--lr", "0.01", "--global-batch-size", "4", "--eval-iters", "0", "--eval-interval", "10",
           "--use-distributed-optimizer"]
    ckpt = str(tmp_path / "reg")
    _pretrain([*run, "--train-iters", "2", "--optimizer", "reg", "--save", ckpt, "--save-interval", "2"])
    with pytest.raises(AssertionError, match="--optimizer reg_muon cannot load this checkpoint's optimizer state: it "
                                             "was saved by --optimizer reg; pass --no-load-optim"):
        _pretrain([*run, "--train-iters", "4", "--optimizer", "reg_muon", "--load", ckpt])
