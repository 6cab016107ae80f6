"""``scale · aᵀa`` by BLAS ``?syrk`` — the upper triangle only, half a GEMM's flops.

torch exposes no ``syrk``.  Its CPU wheels for x86 link MKL into ``libtorch_cpu`` and export
MKL's BLAS routines ``mkl_blas_ssyrk`` / ``mkl_blas_dsyrk`` (the Fortran BLAS interface), which
are called here through ctypes; MKL follows torch's thread count (``torch.set_num_threads``
sets MKL's).  Where they are absent (other builds, other platforms) or a first check on a small
product disagrees with ``torch.mm``, :func:`available` is False and callers keep their GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

# LP64 MKL reads the low 4 bytes of each integer (little-endian), ILP64 all 8: both get the value
_INT = ctypes.c_int64
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def available(dtype: torch.dtype) -> bool:
    """Whether :func:`syrk` can run for CPU tensors of ``dtype``."""
    return dtype in _routines()


def supports(a: Tensor) -> bool:
    """Whether :func:`syrk` takes ``a``: a CPU ``[R, d]`` tensor of a dtype it is
    :func:`available` for, stored along ``R`` (``a.stride(0) == 1``: a convolution's patches in
    ``[D, N·T]`` memory) with a leading dimension ``R ≤ a.stride(1) < 2³¹`` (an LP64 MKL's
    integers)."""
    return (a.device.type == "cpu" and a.stride(0) == 1 and max(1, a.shape[0]) <= a.stride(1) < 2**31
            and available(a.dtype))


def syrk(a: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · aᵀa`` (``[d, d]``) for an ``a`` (``[R, d]``) that it :func:`supports`."""
    if not supports(a):
        raise ValueError(f"syrk: needs a CPU float32/float64 [R, d] tensor stored along R, got "
                         f"{a.dtype} {a.device.type} shape {tuple(a.shape)} strides {a.stride()}")
    return _run(_routines()[a.dtype], a, scale)


def _run(routine, a: Tensor, scale: float) -> Tensor:
    r, d = a.shape
    out = a.new_empty(d, d)
    scalar = _SCALAR[a.dtype]
    # column-major: a is R × d with leading dimension stride(1); C = aᵀa, upper triangle
    routine(
        b"U", b"T", ctypes.byref(_INT(d)), ctypes.byref(_INT(r)), ctypes.byref(scalar(scale)),
        ctypes.c_void_p(a.data_ptr()), ctypes.byref(_INT(a.stride(1))), ctypes.byref(scalar(0.0)),
        ctypes.c_void_p(out.data_ptr()), ctypes.byref(_INT(d)),
    )
    # the column-major upper triangle is the row-major lower one; the rest was never written
    out.tril_()
    return out.add_(out.tril(-1).mT)


@functools.cache
def _routines() -> dict:
    if not torch.backends.mkl.is_available():
        return {}
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        found = {torch.float32: lib.mkl_blas_ssyrk, torch.float64: lib.mkl_blas_dsyrk}
    except (OSError, AttributeError):
        return {}
    checked = {}
    for dtype, routine in found.items():
        routine.restype = None
        a = torch.linspace(-1.0, 2.0, 35, dtype=dtype).reshape(5, 7).T  # [7, 5] stored along R
        if torch.allclose(_run(routine, a, 0.5), 0.5 * a.mT @ a, rtol=1e-5, atol=1e-6):
            checked[dtype] = routine
    return checked
