"""Fused CPU kernels for the element-wise passes of a matrix step (``kernels.cpp``), one pass each:

    all_finite        no NaN or Inf in G                      read G
    momentum_into_    M ← G + μ·M;  N ← G + μ·M | M           read G, M; write M (or not), N (and, on a rectangle,
                                                                add N's row/column sums as add_pow_sums_)
    add_pow_sums_     r_i (+)= Σ_j |x_ij|^p, c_j (+)= Σ_i …     read x once for both (p = inf: max)
    scale_            x_ij ← x_ij · row_i · col_j, and Σ x_ij²  one read-modify-write
    update_           W ← W·(1 − lr·wd) − lr·s·U               read W, U; write W

Each returns False or None (having done nothing) where it does not apply (not the CPU; a dtype other than
fp32, or bf16 for parameters and momentum; a non-contiguous tensor; fusion off), and the caller
runs its torch code: the kernels round where that code rounds, so both agree to fp32 rounding.

The library is compiled with the system C++ compiler on first use (about 2 s; ``g++ -O3
-march=native -fopenmp``) and cached in ``$REG_DIST_KERNEL_CACHE`` (default
``~/.cache/reg_dist``) under a hash of the source, the flags and the CPU, so later processes load
it at once. ``REG_DIST_FUSED=0`` in the environment, or ``set_enabled(False)``, turns fusion off.
"""

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("reg_dist")

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
PARALLEL_ELEMENTS = 1 << 15  # smaller tensors run on one thread

_enabled = os.environ.get("REG_DIST_FUSED", "1") != "0"
_library: ctypes.CDLL | None = None
_failed: str | None = None

I64, F32, INT, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "reg_momentum_f32": (PTR, PTR, PTR, I64, F32, INT, INT, INT),
    "reg_momentum_bf16": (PTR, PTR, PTR, I64, F32, INT, INT, INT),
    "reg_row_col_f32": (PTR, I64, I64, INT, F32, PTR, PTR, INT),
    "reg_momentum_row_col_f32": (PTR, PTR, PTR, I64, I64, F32, INT, INT, INT, F32, PTR, PTR, INT),
    "reg_momentum_row_col_bf16": (PTR, PTR, PTR, I64, I64, F32, INT, INT, INT, F32, PTR, PTR, INT),
    "reg_scale_f32": (PTR, I64, I64, PTR, PTR, INT),
    "reg_update_f32": (PTR, PTR, I64, F32, INT, F32, F32, INT, INT),
    "reg_update_bf16": (PTR, PTR, I64, F32, INT, F32, F32, INT, INT),
    "reg_finite_f32": (PTR, I64, INT),
    "reg_finite_bf16": (PTR, I64, INT),
}
RESTYPES = {"reg_finite_f32": INT, "reg_finite_bf16": INT, "reg_scale_f32": ctypes.c_double}


def set_enabled(enabled: bool) -> None:
    """Turn the fused kernels on or off for this process (``REG_DIST_FUSED=0`` starts with them off)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether the fused kernels are on and built (building them on the first call)."""
    return _enabled and _load() is not None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where the compiled library for this source, these flags and this CPU is cached."""
    compiler = os.environ.get("CXX", "g++")
    key = "\0".join([SOURCE.read_text(), compiler, *FLAGS, platform.machine(), _cpu_name()])
    root = Path(os.environ.get("REG_DIST_KERNEL_CACHE", Path.home() / ".cache" / "reg_dist"))
    return root / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(path: Path) -> None:
    """Compile ``kernels.cpp`` to ``path`` (atomically: concurrent builders each write their own file)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _library, _failed
    if _library is not None or _failed is not None:
        return _library
    try:
        path = library_path()
        if not path.exists():
            logger.info("reg_dist: compiling the fused step kernels (%s) into %s", SOURCE.name, path)
            build(path)
        lib = ctypes.CDLL(str(path))
        for name, args in SIGNATURES.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = RESTYPES.get(name)
        _library = lib
    except (OSError, RuntimeError) as e:
        _failed = str(e)
        logger.warning("reg_dist: fused step kernels unavailable, using torch ops instead: %s", e)
    return _library


def _threads(x: Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= PARALLEL_ELEMENTS else 1


def _usable(*tensors: Tensor) -> bool:
    return (_enabled and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and _load() is not None)


def all_finite(x: Tensor) -> bool | None:
    """Whether every element of ``x`` is finite (no NaN, no Inf); None where the kernel does not apply."""
    kind = DTYPES.get(x.dtype)
    if kind is None or not _usable(x):
        return None
    return bool(getattr(_library, f"reg_finite_{kind}")(x.data_ptr(), x.numel(), _threads(x)))


def momentum_into_(g: Tensor, buf: Tensor, out: Tensor, mu: float, nesterov: bool, p: float | None = None,
                   rows: Tensor | None = None, cols: Tensor | None = None, commit: bool = True) -> bool:
    """``buf ← g + μ·buf`` (in buf's dtype; left as it was without ``commit``), ``out ← g + μ·buf`` if
    nesterov else ``buf`` (fp32); with ``p`` (g, buf, out ``h × w``), ``add_pow_sums_(out, p, rows, cols)``
    in the same pass."""
    kind = DTYPES.get(buf.dtype)
    if kind is None or g.dtype != buf.dtype or out.dtype != torch.float32 or not _usable(g, buf, out):
        return False
    mu = torch.tensor(mu, dtype=buf.dtype).item()  # torch.add rounds alpha to the tensors' dtype
    if p is None:
        getattr(_library, f"reg_momentum_{kind}")(g.data_ptr(), buf.data_ptr(), out.data_ptr(), g.numel(), mu,
                                                   int(nesterov), int(commit), _threads(g))
        return True
    if not _vectors_fit(out, rows, cols):
        return False
    getattr(_library, f"reg_momentum_row_col_{kind}")(
        g.data_ptr(), buf.data_ptr(), out.data_ptr(), out.shape[0], out.shape[1], mu, int(nesterov), int(commit),
        _mode(p), p, None if rows is None else rows.data_ptr(), None if cols is None else cols.data_ptr(),
        _threads(g))
    return True


def _vectors_fit(x: Tensor, row: Tensor | None, col: Tensor | None) -> bool:
    """An fp32 ``h × w`` x with fp32 ``row (h,)`` and ``col (w,)`` (either None) the kernels can take."""
    if x.dtype != torch.float32 or x.ndim != 2:
        return False
    vectors = [(t, size) for t, size in ((row, x.shape[0]), (col, x.shape[1])) if t is not None]
    if any(t.dtype != torch.float32 or tuple(t.shape) != (size,) for t, size in vectors):
        return False
    return _usable(x, *(t for t, _ in vectors))


def _mode(p: float) -> int:
    return 0 if p == 2 else 1 if p == 1 else 2 if p == math.inf else 3


def add_pow_sums_(x: Tensor, p: float, rows: Tensor | None, cols: Tensor | None) -> bool:
    """Into fp32 ``rows (h,)``/``cols (w,)`` (either None) of an ``h × w`` fp32 ``x``: ``+= Σ |x|^p`` along
    each row/column (p = inf: ``max(·, max |x|)``), one pass for both."""
    if not _vectors_fit(x, rows, cols):
        return False
    _library.reg_row_col_f32(x.data_ptr(), x.shape[0], x.shape[1], _mode(p), p,
                             None if rows is None else rows.data_ptr(), None if cols is None else cols.data_ptr(),
                             _threads(x))
    return True


def scale_(x: Tensor, row: Tensor | None, col: Tensor | None) -> float | None:
    """In place ``x_ij ← x_ij · row_i · col_j`` on an ``h × w`` fp32 ``x`` (fp32 ``row (h,)``, ``col (w,)``);
    returns ``Σ x_ij²`` of the result (None, having done nothing, where the kernel does not apply)."""
    if not _vectors_fit(x, row, col):
        return None
    return _library.reg_scale_f32(x.data_ptr(), x.shape[0], x.shape[1], None if row is None else row.data_ptr(),
                                  None if col is None else col.data_ptr(), _threads(x))


def update_(x: Tensor, u: Tensor, lr: float, wd: float, s: Tensor | None) -> bool:
    """``x ← x·(1 − lr·wd)`` (rounded to x's dtype; skipped when lr·wd is 0), then ``x ← x − lr·s·u``
    (``x − lr·u`` when ``s`` is None), rounded as ``addcmul_`` (``add_``) rounds it."""
    kind = DTYPES.get(x.dtype)
    if kind is None or u.dtype != torch.float32 or u.numel() != x.numel() or not _usable(x, u):
        return False
    getattr(_library, f"reg_update_{kind}")(x.data_ptr(), u.data_ptr(), x.numel(), 1.0 - lr * wd,
                                             int(wd != 0 and lr != 0), -lr, 1.0 if s is None else float(s),
                                             int(s is not None), _threads(x))
    return True
