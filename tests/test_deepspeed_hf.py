"""After ``reg_dist.deepspeed.register()``, on 2 gloo ranks (fp32):

- Accelerate's ``accelerator.prepare`` with a ``DeepSpeedPlugin`` and ``"REG"`` in its config, or a
  REG client optimizer and a scheduler built on it (ZeRO 2, 3), equals single-process REG with the
  same lr per step;
- the Hugging Face ``transformers.Trainer`` with ``deepspeed=`` a config naming ``"REG"`` or
  ``"reg_dist.Muon"``, or with REG from a ``create_optimizer`` override (ZeRO 2; REG in the config also
  at ZeRO 3 with the model built whole, and reg_dist.Muon at ZeRO 3 from ``from_pretrained``, under
  ``deepspeed.zero.Init``), trains a tiny GPT-2 to the weights of a single-process run on the same
  batches, also when interrupted after its checkpoint at step 2 (``save_steps``) and resumed by a new
  job (``resume_from_checkpoint``). GPT-2's Conv1D weights are stored in × out: one process routes
  them as their transpose, DeepSpeed's flat partitions step them as stored; REG is symmetric in rows
  and columns, Newton–Schulz commutes with the transpose and the default scale (``"match_rms_adamw"``,
  ρ·√max(m, n)) is symmetric, so the two are equal."""

import os

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
import deepspeed  # noqa: E402,F401
import deepspeed.runtime.zero.stage_1_and_2  # noqa: E402,F401
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DummyOptim  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import reg_dist.deepspeed as rds  # noqa: E402
from multiproc import run_ranks  # noqa: E402
from reg_dist import optim  # noqa: E402
from reg_dist.integrations.deepspeed import RegDistAdapter  # noqa: E402
from sharded import BATCH, Net, assert_matches, data, loss_of  # noqa: E402
from test_integration_deepspeed import _config, _full, _no_shm_build, _reg_with_lrs  # noqa: E402
from test_integration_deepspeed import _reference as _net_reference  # noqa: E402

WORLD, PER_RANK, STEPS, SEQ, LR, WD = 2, 4, 3, 16, 0.02, 0.1
# the key bias's gradient is 0 in exact arithmetic (softmax ignores it): AdamW at eps 1e-8 would scale its
# rounding noise, which differs with the order of the sums, up to ~lr; at 1e-4 the noise stays noise
EPS = 1e-4
CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
ALGORITHMS = {  # JSON type and params, the single-process class and its kwargs
    "reg": ("REG", {}, optim.REG, {}),
    "muon": ("reg_dist.Muon", {"ns_dtype": "float32", "move_dtype": "float32"}, optim.Muon,
             {"ns_dtype": torch.float32}),
}


def _model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _samples():
    """Token sequences whose first label is -100: no token predicts it, so the Trainer's token count
    (labels not -100, before the shift: transformers 5.24) is the number of predicted tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (STEPS * WORLD * PER_RANK, SEQ), generator=g)
    return [{"input_ids": x, "labels": torch.cat([torch.tensor([-100]), x[1:]])} for x in ids]


def _reference(algorithm="reg"):
    """The algorithm in one process on the global batches (the samples in order, WORLD · PER_RANK at a time) with
    the Trainer's linear decay of the lr to 0 over STEPS."""
    _, _, cls, kwargs = ALGORITHMS[algorithm]
    model, samples = _model(), _samples()
    opt = cls(model, lr=LR, weight_decay=WD, adamw_eps=EPS, **kwargs)
    size = WORLD * PER_RANK
    for k in range(STEPS):
        batch = samples[k * size:(k + 1) * size]
        ids, labels = (torch.stack([s[key] for s in batch]) for key in ("input_ids", "labels"))
        for group in opt.param_groups:
            group["lr"] = LR * (1 - k / STEPS)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _gloo_deepspeed_state():
    """Accelerate's DeepSpeed state on gloo ranks: with no accelerator found and ``use_cpu`` off (DeepSpeed
    needs it off) it would pick no backend and train every rank on the whole data as one process."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def _accelerator_and_net(config: dict):
    """On a forked gloo rank after ``register()``: an Accelerator with a DeepSpeed plugin of ``config``,
    and a fresh ``Net`` (seed 0)."""
    _no_shm_build()
    rds.register()
    _gloo_deepspeed_state()
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(config)))
    torch.manual_seed(0)
    return accelerator, Net()


def _arguments(out, config: dict, **saving) -> TrainingArguments:
    """The Trainer's arguments for STEPS steps of PER_RANK samples per rank in order, the linear lr
    decay, no clipping; no checkpoints unless ``saving`` says."""
    return TrainingArguments(output_dir=str(out), deepspeed=config, max_steps=STEPS,
                             per_device_train_batch_size=PER_RANK, learning_rate=LR, weight_decay=WD,
                             lr_scheduler_type="linear", max_grad_norm=0.0, train_sampling_strategy="sequential",
                             report_to="none", disable_tqdm=True, logging_steps=10**6, seed=0,
                             accelerator_config={"use_configured_state": True},
                             **({"save_strategy": "no"} | saving))


def _assert_reference(model, stage, expected):
    with _full(model, stage):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


class StopAfter(TrainerCallback):
    """Interrupts training after ``steps`` optimizer steps (after that step's checkpoint is written)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


class RegTrainer(Trainer):
    """The route for a reg_dist optimizer built in code: with DeepSpeed on, the Trainer drops
    ``optimizers=(...)`` and builds its own through ``create_optimizer``."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = optim.REG(self.model, lr=LR, weight_decay=WD, adamw_eps=EPS)
        return self.optimizer


@pytest.mark.parametrize("route,algorithm,stage", [("config", "reg", 2), ("config", "muon", 2),
                                                  ("create_optimizer", "reg", 2), ("config", "reg", 3),
                                                  ("from_pretrained", "muon", 3)])
def test_trainer_equals_single_process(tmp_path, route, algorithm, stage):
    """``deepspeed=`` naming ``"REG"`` or ``"reg_dist.Muon"`` (``"auto"`` lr and weight decay filled by
    the Trainer), or no optimizer in the config and REG from a ``create_optimizer`` override (DeepSpeed's
    client optimizer); either way the Trainer's lr schedule reaches reg_dist's groups. ``from_pretrained``
    at ZeRO 3 builds the model under ``deepspeed.zero.Init`` (partitioned at construction)."""
    expected = _reference(algorithm)
    if route == "from_pretrained":
        _model().save_pretrained(tmp_path / "init")
    kind, params, _, _ = ALGORITHMS[algorithm]
    config = {**CONFIG, "zero_optimization": {"stage": stage}}
    if route != "create_optimizer":
        config["optimizer"] = {"type": kind, "params": {"lr": "auto", "weight_decay": "auto", "adamw_eps": EPS,
                                                        **params}}
    cls = RegTrainer if route == "create_optimizer" else Trainer

    def body(rank, world):
        _no_shm_build()
        rds.register()
        _gloo_deepspeed_state()
        args = _arguments(tmp_path / "out", config)
        if route == "from_pretrained":
            model = GPT2LMHeadModel.from_pretrained(tmp_path / "init")
            assert all(p.numel() == 0 for p in model.parameters())  # under zero.Init
        else:
            model = _model()
        trainer = cls(model=model, args=args, train_dataset=_samples())
        trainer.train()
        assert isinstance(trainer.model_wrapped.basic_optimizer, RegDistAdapter)
        _assert_reference(trainer.model, stage, expected)

    run_ranks(WORLD, body, init_group=False)


@pytest.mark.parametrize("algorithm,stage", [("reg", 2), ("muon", 3)])
def test_trainer_resumes_from_its_own_checkpoint_exactly(tmp_path, algorithm, stage):
    """The Trainer's own checkpointing (``save_steps=2``: ``engine.save_checkpoint`` under DeepSpeed),
    then a new Trainer on a model of other initial weights with ``resume_from_checkpoint``: it skips the
    two batches it saw, restores reg_dist's state, the lr schedule and the weights, takes the last step,
    and ends at the single-process (= uninterrupted) weights."""
    expected = _reference(algorithm)
    kind, params, _, _ = ALGORITHMS[algorithm]
    config = {**CONFIG, "zero_optimization": {"stage": stage},
              "optimizer": {"type": kind, "params": {"lr": "auto", "weight_decay": "auto", "adamw_eps": EPS, **params}}}

    def interrupted(rank, world):
        _no_shm_build()
        rds.register()
        _gloo_deepspeed_state()
        first = Trainer(model=_model(), args=_arguments(tmp_path / "out", config, save_strategy="steps", save_steps=2),
                        train_dataset=_samples(), callbacks=[StopAfter(2)])
        first.train()
        assert first.state.global_step == 2

    def resumed(rank, world):  # a new job: one Accelerator per process
        _no_shm_build()
        rds.register()
        _gloo_deepspeed_state()
        torch.manual_seed(1)
        trainer = Trainer(model=GPT2LMHeadModel(_model().config), args=_arguments(tmp_path / "out", config),
                          train_dataset=_samples())
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
        assert trainer.state.global_step == STEPS
        _assert_reference(trainer.model, stage, expected)

    run_ranks(WORLD, interrupted, init_group=False)
    run_ranks(WORLD, resumed, init_group=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_prepare_with_a_client_optimizer_and_its_scheduler(stage):
    """``accelerator.prepare(model, REG(model), LambdaLR(...))``: the engine steps REG on DeepSpeed's
    partitions, and the scheduler built on the client optimizer drives its lr (the groups are shared)."""
    config = {"train_micro_batch_size_per_gpu": BATCH // WORLD, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}

    def body(rank, world):
        accelerator, model = _accelerator_and_net(config)
        client = optim.REG(model, lr=0.02)
        schedule = torch.optim.lr_scheduler.LambdaLR(client, lambda s: 1 / (1 + s))
        engine, optimizer, schedule = accelerator.prepare(model, client, schedule)
        lrs, per = [], BATCH // world
        for tokens in data():
            lrs.append(client.param_groups[0]["lr"])
            accelerator.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        assert isinstance(engine.basic_optimizer, RegDistAdapter)
        with _full(model, stage):
            return lrs, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # by value

    (lrs, state), _ = run_ranks(WORLD, body, init_group=False)
    assert lrs[0] == 0.02 and lrs[-1] < lrs[1] < lrs[0]  # the schedule applied
    assert_matches(_reg_with_lrs(lrs), {k: torch.from_numpy(v) for k, v in state.items()})


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_prepare_with_reg_in_the_deepspeed_config(stage):
    """``accelerator.prepare(model, DummyOptim(...))`` with ``"REG"`` in the plugin's config: the engine
    steps REG (what the Trainer does with the type in its config)."""
    config, expected = _config("reg", stage, 1), _net_reference("reg")

    def body(rank, world):
        accelerator, model = _accelerator_and_net(config)
        engine, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
        per = BATCH // world
        for tokens in data():
            accelerator.backward(loss_of(engine, tokens[rank * per:(rank + 1) * per]))
            optimizer.step()
            optimizer.zero_grad()
        assert isinstance(engine.basic_optimizer, RegDistAdapter)
        with _full(model, stage):
            assert_matches(model, expected)

    run_ranks(WORLD, body, init_group=False)
