"""Run megatron-core on CPU ranks (gloo): ``launch/pretrain_gpt.py --cpu`` and the test suite.

megatron-core hard-codes ``torch.cuda`` calls (``device="cuda"``, ``torch.cuda.current_device()``, streams,
``synchronize``) and type names (the distributed optimizer accepts ``p.type() ==
"torch.cuda.FloatTensor"`` only). ``install()`` points every such device at the CPU for the rest of the
process, makes the stream / event / synchronize calls no-ops, reports CPU tensor types by their
CUDA names, gives Megatron's model-parallel "CUDA" RNG tracker the CPU generator's state, and answers
device-property queries as a Hopper (arch 9) device would, which ``validate_args`` asks under TP > 1.
``install_for_pretrain()`` also lets ``megatron.training.pretrain`` run (see its docstring). Install it in
each rank process before Megatron initialises (in tests: inside a forked rank, never in the pytest
parent); it cannot be undone. ``CPU_ARGS`` are the Megatron flags a CPU run needs.
"""

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args):
        return _Event()


class _Event(_Stream):
    def record(self, *args):
        pass

    def query(self):
        return True


CPU_ARGS = ("--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
            "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
            "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion")
# gloo, megatron-core's own layers initialised on the CPU, no fused CUDA kernels

_MODE = None
_TYPE = torch.Tensor.type


def _cuda_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None:
        name = _TYPE(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return _TYPE(self, dtype, non_blocking, **kwargs)


def install() -> None:
    """CUDA → CPU for this process (idempotent)."""
    global _MODE
    if _MODE is not None:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _cuda_type
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=9, minor=0, name="cpu", total_memory=0,
                                                                       multi_processor_count=1)
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _MODE = _CudaToCpu()
    _MODE.__enter__()


def install_for_pretrain() -> None:
    """``install()``, and what ``megatron.training.pretrain`` needs beyond it: ``torch.cuda.is_available()``
    true (``initialize_megatron`` asserts it) with one device, and ``torch.compile`` off (Megatron's fused
    kernels would compile for the device this shim only pretends to be)."""
    import torch._dynamo

    install()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch._dynamo.config.disable = True
