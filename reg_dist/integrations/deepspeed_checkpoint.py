"""DeepSpeed checkpoints that resume at another data-parallel world size or ZeRO stage.

``engine.save_checkpoint`` stores each rank's flat partitions as they are, so it resumes at the same
stage and world size only; DeepSpeed's universal checkpoint (``ds_to_universal``) reads Adam's
``exp_avg`` / ``exp_avg_sq`` by name and cannot carry a momentum, step counts or per-row state.
``save_checkpoint(engine, path)`` instead writes one ``torch.distributed.checkpoint`` (DCP) directory
in ``reg_dist.checkpoint``'s form, where every rank writes its pieces of each parameter's logical 2-D
tensor (the layout its flat partition slice carries):

    "{name}/fp32"             the fp32 master weights
    "{name}/{key}", ".../step" reg_dist's optimizer state (``reg_dist.checkpoint.optimizer_state_dict``)
    "reg_dist_deepspeed"      DeepSpeed's param groups' hyper-parameters (the scheduled lr), the
                              engine's step counters and its lr scheduler's state

and ``load_checkpoint(engine, path)`` reads back whatever pieces this engine's ranks hold (DCP
reshards), copies the fp32 masters into DeepSpeed's bit16 / fp32 model parameters and restores the
rest. Both are collective over the engine's ranks.
"""

import io
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from .. import checkpoint
from ..layout import LAYOUT_ATTR
from .deepspeed import RegDistAdapter

ENGINE = "reg_dist_deepspeed"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # the engine's, restored as they were


def _adapter(engine: Any) -> RegDistAdapter:
    adapter = getattr(engine, "basic_optimizer", None)
    if not isinstance(adapter, RegDistAdapter) or adapter.inner is None:
        raise ValueError(f"this engine does not step a reg_dist optimizer ({type(adapter).__name__}): build it "
                         f"with reg_dist.deepspeed.initialize, or deepspeed.initialize after register()")
    if engine.fp16_enabled():
        raise NotImplementedError("reg_dist.deepspeed.save_checkpoint / load_checkpoint: fp16 (its loss scaler's "
                                  "state is not carried); use engine.save_checkpoint at the same world size")
    return adapter


def _masters(adapter: RegDistAdapter) -> dict:
    """``"{name}/fp32"``: this rank's fp32 master elements of every parameter, as DCP pieces."""
    out = {}
    for group in adapter.inner.param_groups:
        for p, name in zip(group["params"], group["param_names"]):
            laid = getattr(p, LAYOUT_ATTR, None)  # ZeRO 1-3: a slice of the flat fp32 partition
            layout = laid if laid is not None else checkpoint.holding(p)  # ZeRO 0: the parameter itself
            out[f"{name}/fp32"] = checkpoint.Pieces(layout.shape, p.detach(), layout)
    return out


def _engine_state(engine: Any, adapter: RegDistAdapter) -> dict:
    scheduler = engine.lr_scheduler
    return {"groups": [{k: v for k, v in g.items() if k != "params"} for g in adapter.param_groups],
            "counters": {k: getattr(engine, k) for k in COUNTERS},
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}


def save_checkpoint(engine: Any, path: str | Path) -> None:
    """Every rank writes its pieces of the fp32 weights and reg_dist's state, and the engine's
    counters, to the DCP directory ``path`` (see the module docstring)."""
    adapter = _adapter(engine)
    meta = io.BytesIO()
    torch.save(_engine_state(engine, adapter), meta)
    state = {**checkpoint.optimizer_state_dict(adapter.inner), **_masters(adapter), ENGINE: meta}
    dcp.save(state, checkpoint_id=str(path), planner=checkpoint.SavePlanner())


def _to_model(engine: Any, adapter: RegDistAdapter) -> None:
    """Copy the fp32 master partitions into the model's parameters (DeepSpeed's bit16 partitions)."""
    wrapper = engine.optimizer
    if adapter.stage in (1, 2):
        wrapper.update_lp_params()  # bit16 partition ← fp32 partition, then all-gathered
    elif adapter.stage == 3:  # each sub-group's bit16 partition holds its parameters' ds_tensor
        for low, master in zip(wrapper.fp16_partitioned_groups_flat, wrapper.fp32_partitioned_groups_flat):
            low.data.copy_(master.data)


@torch.no_grad()
def load_checkpoint(engine: Any, path: str | Path) -> None:
    """Fill ``engine``'s weights, reg_dist's state and the engine's counters from ``save_checkpoint``'s
    directory ``path``, saved at any ZeRO stage and data-parallel world size."""
    adapter = _adapter(engine)
    checkpoint.load(adapter.inner, path)  # checks the parameters' names and shapes; raises before any change
    target = {**_masters(adapter), ENGINE: io.BytesIO()}
    dcp.load(target, checkpoint_id=str(path), planner=checkpoint.LoadPlanner())
    state = target[ENGINE]
    if isinstance(state, io.BytesIO):
        state.seek(0)
        state = torch.load(state, weights_only=False)
    _to_model(engine, adapter)
    if len(state["groups"]) != len(adapter.param_groups):
        raise ValueError(f"checkpoint {path} has {len(state['groups'])} parameter groups, this engine "
                         f"{len(adapter.param_groups)}")
    for group, old in zip(adapter.param_groups, state["groups"]):
        group.update(old)
    for key, value in state["counters"].items():
        setattr(engine, key, value)
    if (state["lr_scheduler"] is None) != (engine.lr_scheduler is None):
        raise ValueError(f"checkpoint {path} was saved {'without' if state['lr_scheduler'] is None else 'with'} "
                         f"an lr scheduler, this engine has {'one' if engine.lr_scheduler is not None else 'none'}")
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
