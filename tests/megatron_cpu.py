"""Test-only: run megatron-core's DDP and optimizer wrappers on the CPU.

They hard-code ``torch.cuda`` calls (``device="cuda"``, ``torch.cuda.current_device()``, streams,
``synchronize``). ``install()`` points every such device at the CPU for the rest of the process and
makes the stream / event / synchronize calls no-ops. Call it only inside a forked rank (``run_ranks``),
never in the pytest parent.
"""

import contextlib

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


_MODE = None


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
    _MODE = _CudaToCpu()
    _MODE.__enter__()
