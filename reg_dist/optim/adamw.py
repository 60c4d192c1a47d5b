"""AdamW for everything that is not a hidden matrix: torch's own functional kernel (fused where
the device has one), bias-corrected, decoupled weight decay with the group's lr and wd."""

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from ..layout import local_tensor


def init_adamw_state(p: Tensor, state: dict) -> None:
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adamw_step(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None:
    """One AdamW step on ``params`` with ``grads``, whose states ``init_adamw_state`` made.

    AdamW is element-wise, so a DTensor parameter steps exactly on its local shard, and a slice
    of a parameter (a view) on its elements.
    """
    if not params:
        return
    grads = [local_tensor(g) for g in grads]
    params = [local_tensor(p) for p in params]
    fused = all(p.device.type in _get_fused_kernels_supported_devices() for p in params)
    steps = []
    for p, s in zip(params, states):
        if fused and s["step"].device != p.device:
            s["step"] = s["step"].to(p.device)
        steps.append(s["step"])
    beta1, beta2 = group["adamw_betas"]
    adamw(
        params,
        grads,
        [local_tensor(s["exp_avg"]) for s in states],
        [local_tensor(s["exp_avg_sq"]) for s in states],
        [],
        steps,
        foreach=None if not fused else False,
        fused=fused,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["adamw_eps"],
        maximize=False,
    )
