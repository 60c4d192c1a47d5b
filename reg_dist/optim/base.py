"""The step every matrix optimizer shares (ALGORITHMS.md §4), with AdamW for the rest.

For every matrix parameter W (viewed as ``count`` matrices m × n, see ``routing``):

    M = μ·M + G;  N = G + μ·M (nesterov) | M;  U = transform(N);  U = s·U;  W = W·(1 − lr·wd) − lr·U

Matrices of one group with the same (m, n, dtype, device) are stacked into ``(B, m, n)`` batches of
at most ``STACK_BYTES``, so the transform and the scale run once per stack, not once per parameter.
"""

import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..ops.stats import acc_dtype
from .adamw import adamw_step, init_adamw_state
from .momentum import momentum_into_
from .hyper import warn_near_misses
from .routing import ADAMW, ParamInfo, Route, as_param, format_table, parse_params, route
from .scaling import check_scale, scale_factors
from .tensors import local_tensor

logger = logging.getLogger("reg_dist")

NONFINITE = ("skip", "raise")


def _check_number(name: str, value: Any, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (value < high if high_open else value <= high)
    if not ok:
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_common(group: dict) -> None:
    """The hyper-parameters every group carries, whatever its algorithm."""
    _check_number("lr", group["lr"], 0.0)
    _check_number("weight_decay", group["weight_decay"], 0.0)
    _check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
    check_scale(group["scale"])
    _check_number("rms", group["rms"], 0.0)
    if group["rms"] == 0:
        raise ValueError("rms must be > 0, got 0")
    betas = group["adamw_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        _check_number(f"adamw_betas[{i}]", b, 0.0, 1.0, high_open=True)
    _check_number("adamw_eps", group["adamw_eps"], 0.0)
    if group["adamw_eps"] == 0:
        raise ValueError("adamw_eps must be > 0, got 0")


# A stack of same-shape matrices holds at most this many bytes (always at least one parameter). It
# bounds the step's scratch memory whatever the model size, and on the CPU keeps each scratch buffer
# under glibc's largest mmap threshold, so it is reused instead of page-faulted in every step.
STACK_BYTES = 32 * 2**20


def stacks(items: list, sizes: list[int], budget: int) -> list[list]:
    """``items`` cut, in order, into runs whose ``sizes`` add up to at most ``budget`` (or one item)."""
    runs: list[list] = []
    total = budget + 1
    for item, size in zip(items, sizes):
        if total + size > budget:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """Bool ``(len(tensors),)`` on the CPU: False where a tensor holds a NaN or an Inf.

    One fused ``max |x|`` over the list on accelerators; on the CPU, where that fused reduction is
    an order of magnitude slower, ``aminmax`` per tensor (which propagates NaN as well).
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    if tensors[0].device.type == "cpu":
        extremes = [torch.stack(torch.aminmax(t)) if t.numel() else t.new_zeros(2) for t in tensors]
    else:
        extremes = torch._foreach_norm(tensors, math.inf)
    device = tensors[0].device
    flags = torch.stack([e.to(device, torch.float32) for e in extremes]).isfinite()
    return flags.view(len(tensors), -1).all(dim=1).cpu()


class MatrixOptimizer(Optimizer):
    """REG, Muon and MuonEq: subclasses give ``algorithm``, ``check_group`` and ``transform``."""

    algorithm: str
    supports_dtensor = False  # True where a subclass steps sharded DTensor matrices (reg_dist.distributed)

    def __init__(self, params: Any, defaults: dict, nonfinite: str = "skip") -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.transformed = 0  # matrices (or matrix pieces) this process has transformed, over all steps
        self.routes: list[Route] = []
        self._info: dict[int, ParamInfo] = {}
        self._view: dict[int, tuple[int, int, int]] = {}
        check_common(defaults)
        self.check_group(defaults)
        groups, infos = parse_params(params)
        self._info.update(infos)
        super().__init__(groups, defaults)
        logger.info("%s routing:\n%s", type(self).__name__, self.routing_table())

    # ---- subclass interface -------------------------------------------------------------
    def check_group(self, group: dict) -> None:
        """Raise ValueError on an invalid algorithm-specific hyper-parameter of ``group``."""
        raise NotImplementedError

    def bucket_tag(self, group: dict, step: int) -> Any:
        """Anything besides the shape that decides how a matrix is transformed at ``step``."""
        return None

    def transform(self, x: Tensor, group: dict, tag: Any) -> Tensor:
        """The transform of ``x`` ``(B, m, n)`` (fp32 or fp64, may be overwritten): ``(B, m, n)``, any float dtype."""
        raise NotImplementedError

    # ---- parameters and routing ---------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Route the group's tensors and add them as one matrix group and/or one AdamW group."""
        warn_near_misses(param_group, {*self.defaults, "params", "param_names", "algorithm"})
        group = dict(param_group)
        raw = group.pop("params")
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        names = group.pop("param_names", None)
        tensors = [r[1] if isinstance(r, tuple) else r for r in raw]
        if names is None:
            first = sum(len(g["params"]) for g in self.param_groups)
            names = [r[0] if isinstance(r, tuple) else f"param{first + i}" for i, r in enumerate(raw)]
        requested = group.pop("algorithm", None)
        if requested not in (None, self.algorithm, ADAMW):
            raise ValueError(
                f"algorithm must be one of {(self.algorithm, ADAMW)} for {type(self).__name__}, got {requested!r}"
            )
        split: dict[str, tuple[list, list]] = {}
        routes = []
        for t, name in zip(tensors, names):
            if not isinstance(t, Tensor):
                raise TypeError(f"optimizer can only optimize tensors, but parameter {name} is {type(t).__name__}")
            r = route(t, self._info.get(id(t), ParamInfo((name,))), requested, self.algorithm)
            if r.matrix is not None:
                if isinstance(t, DTensor) and not self.supports_dtensor:
                    raise ValueError(
                        f"parameter {name} is a sharded DTensor, which {type(self).__name__} cannot step yet "
                        f"(Newton–Schulz needs the owner path); use reg_dist.REG, or an algorithm='adamw' group"
                    )
                self._view[id(t)] = r.matrix
            routes.append(r)
            ts, ns = split.setdefault(r.algorithm, ([], []))
            ts.append(t)
            ns.append(name)
        for algorithm, (ts, ns) in split.items():
            sub = {**self.defaults, **group, "params": ts, "param_names": ns, "algorithm": algorithm}
            check_common(sub)
            self.check_group(sub)
            super().add_param_group(sub)
        self.routes.extend(routes)

    def routing_table(self) -> str:
        """Name, shape, algorithm and matrix view of every parameter, as logged at construction."""
        return format_table(self.routes)

    # ---- the step -----------------------------------------------------------------------
    def _grads_finite(self) -> bool:
        grads, names = [], []
        for group in self.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                if not self._steps_here(p) or p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {name})")
                grads.append(p.grad)
                names.append(name)
        finite = finite_flags([local_tensor(g) for g in grads])
        if self._all_ranks_agree(bool(finite.all())):
            return True
        bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
        where = f"in {len(bad)} parameter(s): {', '.join(bad[:8])}" if bad else "on another rank"
        message = f"non-finite gradient {where}"
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.skipped_steps += 1
        logger.warning("%s; step skipped, state unchanged (%d skipped so far)", message, self.skipped_steps)
        return False

    def _steps_here(self, p: Tensor) -> bool:
        """Whether this process steps ``p`` now (a sharded optimizer steps only what it owns)."""
        return p.grad is not None

    def _all_ranks_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank that shares the step (here: this process alone)."""
        return ok

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every group; a non-finite gradient anywhere skips it (or raises)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if self._steps_here(p)]
            if group["algorithm"] == ADAMW:
                self._adamw_step(params, group)
            else:
                self._matrix_step(params, group)
        return loss

    def _adamw_step(self, params: list[Tensor], group: dict) -> None:
        for p in params:
            if not self.state[p]:
                init_adamw_state(p, self.state[p])
        adamw_step(params, [p.grad for p in params], [self.state[p] for p in params], group)

    def matrix_state(self, p: Tensor) -> dict:
        """The state of matrix parameter ``p``, made on first use: a step count and the momentum buffer."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _matrix_step(self, params: list[Tensor], group: dict) -> None:
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            state = self.matrix_state(p)
            _, m, n = self._view[id(p)]
            tag = self.bucket_tag(group, int(state["step"]))
            buckets[(m, n, acc_dtype(p.dtype), p.device, tag)].append(p)
        for (m, n, dtype, device, tag), ps in buckets.items():
            per_param = m * n * dtype.itemsize
            for chunk in stacks(ps, [self._view[id(p)][0] * per_param for p in ps], STACK_BYTES):
                self._stack_step(chunk, group, (m, n), dtype, tag)

    def _stack_step(self, ps: list[Tensor], group: dict, shape: tuple[int, int], dtype: torch.dtype, tag: Any) -> None:
        """Momentum, transform, scale and update of ``ps``, whose matrices stack into one ``(B, m, n)``."""
        counts = [self._view[id(p)][0] for p in ps]
        x = torch.empty((sum(counts), *shape), dtype=dtype, device=ps[0].device)
        slots = [as_param(s, p, self._info.get(id(p))) for s, p in zip(x.split(counts), ps)]
        momentum_into_(
            [p.grad for p in ps],
            [self.state[p]["momentum_buffer"] for p in ps],
            slots,
            group["momentum"],
            group["nesterov"],
        )
        u = self.transform(x, group, tag)
        self.transformed += len(x)
        s = scale_factors(u, group["scale"], group["rms"])
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0 and lr != 0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        for p, u_p, s_p in zip(ps, u.split(counts), s.split(counts)):
            factor = s_p.view(-1, *([1] * (p.ndim - 1))) if u_p.shape[0] > 1 else s_p.view(())
            p.addcmul_(as_param(u_p, p, self._info.get(id(p))), factor, value=-lr)
            self.state[p]["step"] += 1

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped

