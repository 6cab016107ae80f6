"""MKL routines that torch's CPU build links but does not expose, called through ctypes.

* :func:`syrk` — ``scale · aᵀa`` by BLAS ``?syrk``: the upper triangle only, half a GEMM's flops.
* :func:`spd_inverse_` — ``M⁻¹`` of a symmetric positive definite ``M`` in its own memory by
  LAPACK ``?potrf`` + ``?potri``: torch's ``cholesky_ex`` + ``cholesky_inverse`` write two more
  ``n × n`` matrices and copy triangles between them (785 wide, float32, one thread: 9.7 → 7.9 ms).

torch's CPU wheels for x86 link MKL into ``libtorch_cpu`` and export its BLAS
(``mkl_blas_ssyrk``, …) and its ILP64 LAPACK (``spotrf_64``, …) Fortran interfaces; MKL follows
torch's thread count (``torch.set_num_threads`` sets MKL's).  Where a routine is absent (other
builds, other platforms) or a first check on a small problem disagrees with torch,
:func:`available` is False for it and callers keep their torch route.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

# BLAS: LP64 MKL reads the low 4 bytes of each integer (little-endian), ILP64 all 8: both get the
# value; the LAPACK ``*_64`` symbols are ILP64 by name
_INT = ctypes.c_int64
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_SYMBOLS = {
    "syrk": {torch.float32: "mkl_blas_ssyrk", torch.float64: "mkl_blas_dsyrk"},
    "potrf": {torch.float32: "spotrf_64", torch.float64: "dpotrf_64"},
    "potri": {torch.float32: "spotri_64", torch.float64: "dpotri_64"},
}
#: what :func:`available` names → the symbols it calls
_ROUTINES = {"syrk": ("syrk",), "inverse": ("potrf", "potri")}


def available(routine: str, dtype: torch.dtype) -> bool:
    """Whether ``routine`` (``"syrk"`` for :func:`syrk`, ``"inverse"`` for
    :func:`spd_inverse_`) runs for CPU tensors of ``dtype``."""
    return dtype in _checked(routine)


def syrk_supports(a: Tensor) -> bool:
    """Whether :func:`syrk` takes ``a``: a CPU ``[R, d]`` tensor of a dtype it is
    :func:`available` for, stored along ``R`` (``a.stride(0) == 1``: a convolution's patches in
    ``[D, N·T]`` memory) with a leading dimension ``R ≤ a.stride(1) < 2³¹`` (an LP64 MKL's
    integers)."""
    return (a.device.type == "cpu" and a.stride(0) == 1 and max(1, a.shape[0]) <= a.stride(1) < 2**31
            and available("syrk", a.dtype))


def syrk(a: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · aᵀa`` (``[d, d]``) for an ``a`` (``[R, d]``) that :func:`syrk_supports`."""
    if not syrk_supports(a):
        raise ValueError(f"syrk: needs a CPU float32/float64 [R, d] tensor stored along R, got "
                         f"{a.dtype} {a.device.type} shape {tuple(a.shape)} strides {a.stride()}")
    return _syrk(_checked("syrk")[a.dtype], a, scale)


def spd_inverse_(m: Tensor) -> bool:
    """``m ← m⁻¹`` in place for a symmetric positive definite ``m`` (a contiguous ``[n, n]`` CPU
    tensor of a dtype it is :func:`available` for; only its lower triangle is read).

    Returns False, with ``m`` overwritten, where the Cholesky factorisation fails (``m`` not
    positive definite to working precision): the caller recomputes ``m`` for its fallback."""
    if (m.device.type != "cpu" or not available("inverse", m.dtype) or m.dim() != 2
            or m.shape[0] != m.shape[1] or not m.is_contiguous()):
        raise ValueError(f"spd_inverse_: needs a contiguous square CPU float32/float64 matrix, got "
                         f"{m.dtype} {m.device.type} shape {tuple(m.shape)} strides {m.stride()}")
    return _spd_inverse(_checked("inverse")[m.dtype], m)


def _syrk(routines: tuple, a: Tensor, scale: float) -> Tensor:
    (routine,) = routines
    r, d = a.shape
    out = a.new_empty(d, d)
    scalar = _SCALAR[a.dtype]
    # column-major: a is R × d with leading dimension stride(1); C = aᵀa, upper triangle
    routine(
        b"U", b"T", ctypes.byref(_INT(d)), ctypes.byref(_INT(r)), ctypes.byref(scalar(scale)),
        ctypes.c_void_p(a.data_ptr()), ctypes.byref(_INT(a.stride(1))), ctypes.byref(scalar(0.0)),
        ctypes.c_void_p(out.data_ptr()), ctypes.byref(_INT(d)),
    )
    return _mirror_lower(out)


def _spd_inverse(routines: tuple, m: Tensor) -> bool:
    potrf, potri = routines
    n, info = _INT(m.shape[0]), _INT(0)
    # row-major symmetric memory is its own column-major form: LAPACK's upper triangle is the
    # row-major lower one, and only it is read and written
    for routine in (potrf, potri):
        routine(b"U", ctypes.byref(n), ctypes.c_void_p(m.data_ptr()), ctypes.byref(n), ctypes.byref(info))
        if info.value != 0:
            return False
    _mirror_lower(m)
    return True


def _mirror_lower(out: Tensor) -> Tensor:
    """The row-major lower triangle of ``out`` copied above the diagonal (the rest was never
    written)."""
    out.tril_()
    return out.add_(out.tril(-1).mT)


@functools.cache
def _checked(routine: str) -> dict[torch.dtype, tuple]:
    """``dtype → ctypes functions`` of ``routine`` that passed a first check against torch."""
    found = _library_functions(routine)
    checked = {}
    for dtype, functions in found.items():
        if routine == "syrk":
            a = torch.linspace(-1.0, 2.0, 35, dtype=dtype).reshape(5, 7).T  # [7, 5] stored along R
            ok = torch.allclose(_syrk(functions, a, 0.5), 0.5 * a.mT @ a, rtol=1e-5, atol=1e-6)
        else:
            a = torch.linspace(-1.0, 2.0, 35, dtype=dtype).reshape(5, 7)
            spd = a @ a.mT + torch.eye(5, dtype=dtype)
            inv = spd.clone()
            ok = _spd_inverse(functions, inv) and torch.allclose(inv @ spd, torch.eye(5, dtype=dtype), atol=1e-4)
        if ok:
            checked[dtype] = functions
    return checked


def _library_functions(routine: str) -> dict[torch.dtype, tuple]:
    parts = _ROUTINES[routine]
    lib = _library()
    if lib is None:
        return {}
    found = {}
    for dtype in _SCALAR:
        try:
            functions = tuple(getattr(lib, _SYMBOLS[p][dtype]) for p in parts)
        except AttributeError:
            continue
        for f in functions:
            f.restype = None
        found[dtype] = functions
    return found


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not torch.backends.mkl.is_available():
        return None
    try:
        return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    except OSError:
        return None
