"""The CPU matrix products of the torch backend: torch's BLAS, or numpy's where it is faster.

Why: torch's CPU wheels multiply fp32 matrices with MKL, which on AMD processors runs its AVX2
code even where the CPU has AVX-512, while numpy's OpenBLAS picks its AVX-512 (SkylakeX) kernels
there. On this project's 2-core AMD EPYC (Zen 5), one core: ``torch.mm`` 98 GFLOP/s, numpy's
OpenBLAS 190-215 at the shapes of the sparse convolutions (gathered chunks such as 910 x 864 by
864 x 96, and the weight gradients' transposed products); a Res16UNet34C step at 100k voxels ran
1.46x faster. (This project's VMs export ``OPENBLAS_CORETYPE=Haswell``, which holds OpenBLAS to its
AVX2 kernels, 113 GFLOP/s: then torch.mm stays.)

Which library multiplies is chosen once per process (:func:`backend`): by :func:`select` or
``HARNESS_CPU_GEMM=torch|numpy``, else by timing both on a convolution-sized product, numpy's
only where it is clearly faster (a near tie keeps torch, so the choice does not flip between
runs). numpy's path needs numpy's BLAS to be an OpenBLAS with a per-thread thread count
(``openblas_set_num_threads_local``, OpenBLAS 0.3.27 and later): every product runs on one
core of the calling thread (the backend's parallelism is its worker threads, and a product's
result must not depend on how many threads computed it); a thread other than the workers gets
its own count back after each product. Operands must be laid out for BLAS (a
unit stride in one dimension); anything else, other dtypes than float32/float64 and other
devices go to ``torch.mm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from typing import Dict, List, Optional

import torch

from .workers import on_worker_thread

__all__ = ["backend", "describe", "select", "using", "mm", "addmm_", "openblas_cores", "CHOICES"]

logger = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "numpy")

# numpy's products must beat torch.mm by this factor in the probe to be chosen: far from both
# sides of what it measured here, so that a loaded machine does not flip the choice (Haswell
# kernels 0.93-1.19x in 41 jobs of `make table1` run two at a time; SkylakeX 2.05-2.18x).
PROBE_MARGIN = 1.5
# The probe's product: a stride-1 chunk of 9 offsets at 96 channels.
PROBE_SHAPE = (512, 864, 96)

_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .one_blas_thread: this thread's OpenBLAS count is set to 1
_STATE = {"choice": None, "detail": ""}


def _loaded_openblas() -> List[str]:
    """Paths of the OpenBLAS libraries loaded in this process (Linux; none elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "openblas" in line and line.split()[-1].startswith("/")})
    except OSError:
        return []


def openblas_cores() -> Dict[str, str]:
    """Each loaded OpenBLAS (numpy's, MinkowskiEngine's) by file name -> the core type it picked
    its kernels for."""
    return {os.path.basename(path): _corename(ctypes.CDLL(path)) for path in _loaded_openblas()}


def _numpy_openblas():
    """(numpy module, the per-thread thread-count setter of numpy's OpenBLAS, its core name), or
    None where numpy's BLAS is no such OpenBLAS."""
    try:
        import numpy as np
    except ImportError:
        return None
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # numpy loads its BLAS lazily on some builds
    for path in _loaded_openblas():
        if "numpy" not in path:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = getattr(lib, "openblas_set_num_threads_local", None)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            return np, setter, _corename(lib)
    return None


def _corename(lib) -> str:
    for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            return fn().decode(errors="replace")
    return "?"


_NUMPY = None  # (np, setter, corename) once numpy's path is chosen


def _probe(np, setter) -> float:
    """numpy's speed-up over torch.mm on one thread at PROBE_SHAPE (median of 7 each)."""
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)  # the caller's random stream stays as it was
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    an, bn, on = a.numpy(), b.numpy(), out.numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = setter(1)
    try:
        def timed(fn):
            fn()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[3]

        t_torch = timed(lambda: torch.mm(a, b, out=out))
        t_numpy = timed(lambda: np.matmul(an, bn, out=on))
    finally:
        setter(old)
        torch.set_num_threads(threads)
    return t_torch / t_numpy


def backend() -> str:
    """'numpy' or 'torch': the library that multiplies fp32/fp64 matrices on the CPU."""
    if _STATE["choice"] is None:
        select(os.environ.get("HARNESS_CPU_GEMM", "auto"))
    return _STATE["choice"]


def select(asked: str = "auto") -> str:
    """Choose the CPU GEMM library: 'torch', 'numpy' (an error where numpy's BLAS cannot serve)
    or 'auto' (time both); returns the choice."""
    global _NUMPY
    asked = (asked or "auto").strip().lower()
    if asked not in CHOICES:
        raise ValueError(f"CPU GEMM {asked!r} (HARNESS_CPU_GEMM or gemm.select): expected one of {', '.join(CHOICES)}")
    with _LOCK:
        found = None if asked == "torch" else _numpy_openblas()
        choice, detail = "torch", "torch.mm, as asked"
        if asked == "numpy" and found is None:
            raise ValueError("CPU GEMM 'numpy' asked for, but numpy's BLAS is not an OpenBLAS with "
                             "openblas_set_num_threads_local (OpenBLAS 0.3.27 or later)")
        if found is not None:
            np, setter, core = found
            if asked == "numpy":
                choice, detail = "numpy", f"numpy's OpenBLAS ({core}), as asked"
            else:
                speedup = _probe(np, setter)
                if speedup >= PROBE_MARGIN:
                    choice = "numpy"
                    detail = f"numpy's OpenBLAS ({core}): {speedup:.2f}x torch.mm at {PROBE_SHAPE}"
                else:
                    detail = f"torch.mm (numpy's OpenBLAS ({core}) {speedup:.2f}x it, below {PROBE_MARGIN}x)"
        elif asked == "auto":
            detail = "torch.mm (numpy's BLAS is not an OpenBLAS with per-thread thread counts)"
        _NUMPY = found if choice == "numpy" else None
        _STATE["detail"], _STATE["choice"] = detail, choice
    logger.info("CPU matrix products: %s", detail)
    return choice


@contextlib.contextmanager
def using(choice: str):
    """:func:`select` ``choice`` inside the block, then the choice before it again."""
    global _NUMPY
    saved, saved_numpy = dict(_STATE), _NUMPY
    try:
        select(choice)
        yield _STATE["choice"]
    finally:
        _STATE.update(saved)
        _NUMPY = saved_numpy


def describe() -> str:
    """What :func:`backend` chose, and why (for reports)."""
    backend()
    return _STATE["detail"]


def _blas_layout(t: torch.Tensor) -> bool:
    r, c = t.shape
    s0, s1 = t.stride()
    return (s1 == 1 and s0 >= max(c, 1)) or (s0 == 1 and s1 >= max(r, 1))


def _numpy_ok(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
    if a.device.type != "cpu" or backend() != "numpy" or a.dtype not in _DTYPES or b.dtype != a.dtype:
        return False
    if out is not None and (out.dtype != a.dtype or not _blas_layout(out)):
        return False
    return _blas_layout(a) and _blas_layout(b)


def _numpy_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    np, setter, _ = _NUMPY
    if out is None:
        out = a.new_empty((a.shape[0], b.shape[1]))
    args = (a.detach().numpy(), b.detach().numpy())
    if on_worker_thread():
        if not getattr(_LOCAL, "one_blas_thread", False):  # set once: workers run nothing else
            setter(1)
            _LOCAL.one_blas_thread = True
        np.matmul(*args, out=out.detach().numpy())
        return out
    before = setter(1)  # any other thread gets its own count back
    try:
        np.matmul(*args, out=out.detach().numpy())
    finally:
        setter(before)
    return out


def mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.mm(a, b, out=out)`` through the chosen library (no autograd: callers are the
    backend's autograd functions and their tasks)."""
    if _numpy_ok(a, b, out):
        return _numpy_mm(a, b, out)
    return torch.mm(a, b, out=out)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b``."""
    if _numpy_ok(a, b, None):
        return acc.add_(_numpy_mm(a, b, None))
    return acc.addmm_(a, b)
