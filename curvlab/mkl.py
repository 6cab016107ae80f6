"""MKL routines that torch's CPU build links but does not expose, called through ctypes.

* :func:`syrk`, :func:`syrk_` — ``scale · aᵀa`` by BLAS ``?syrk``, or added into a matrix in
  place: one triangle only, half a GEMM's flops.
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

from curvlab import device_routes

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
    """Whether :func:`syrk` and :func:`syrk_` take ``a``: a CPU ``[R, d]`` tensor of a dtype they
    are :func:`available` for, whose rows or columns are contiguous (BLAS reads it as a
    column-major ``R × d`` or ``d × R`` matrix) with a leading dimension below ``2³¹`` (an LP64
    MKL's integers)."""
    return (device_routes.cpu_tuned(a) and a.dim() == 2 and _syrk_form(a) is not None
            and available("syrk", a.dtype))


def syrk(a: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · aᵀa`` (``[d, d]``) for an ``a`` (``[R, d]``) that :func:`syrk_supports`."""
    d = a.shape[1]
    return mirror_upper_(syrk_(a.new_empty(d, d), a, scale))


def syrk_(out: Tensor, a: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """``out ← α aᵀa + β out`` on the upper triangle of ``out`` (``[d, d]``, rows contiguous),
    for an ``a`` (``[R, d]``) that :func:`syrk_supports`: the lower triangle is neither read nor
    written (:func:`mirror_upper_` fills it); ``beta = 0`` does not read ``out``."""
    d = a.shape[1]
    if not syrk_supports(a):
        raise ValueError(f"syrk: needs a CPU float32/float64 [R, d] tensor with contiguous rows or "
                         f"columns, got {a.dtype} {a.device.type} shape {tuple(a.shape)} strides {a.stride()}")
    if (out.dtype != a.dtype or out.device.type != "cpu" or tuple(out.shape) != (d, d) or out.stride(1) != 1
            or not d <= out.stride(0) < 2**31):
        raise ValueError(f"syrk_: out must be a [{d}, {d}] {a.dtype} CPU matrix with contiguous rows, got "
                         f"{out.dtype} {out.device.type} shape {tuple(out.shape)} strides {out.stride()}")
    _syrk(_checked("syrk")[a.dtype], out, a, alpha, beta)
    return out


def spd_inverse_(m: Tensor) -> bool:
    """``m ← m⁻¹`` in place for a symmetric positive definite ``m`` (a contiguous ``[n, n]`` CPU
    tensor of a dtype it is :func:`available` for; only its upper triangle is read).

    Returns False, with ``m`` overwritten, where the Cholesky factorisation fails (``m`` not
    positive definite to working precision): the caller recomputes ``m`` for its fallback."""
    if (m.device.type != "cpu" or not available("inverse", m.dtype) or m.dim() != 2
            or m.shape[0] != m.shape[1] or not m.is_contiguous()):
        raise ValueError(f"spd_inverse_: needs a contiguous square CPU float32/float64 matrix, got "
                         f"{m.dtype} {m.device.type} shape {tuple(m.shape)} strides {m.stride()}")
    return _spd_inverse(_checked("inverse")[m.dtype], m)


def _syrk_form(a: Tensor) -> tuple[bytes, int] | None:
    """BLAS's ``trans`` and leading dimension for ``aᵀa``: ``a`` stored along ``R`` is the
    column-major ``R × d`` matrix ``A`` (``AᵀA``, "T"); rows stored contiguously are the
    column-major ``d × R`` matrix ``A = aᵀ`` (``AAᵀ``, "N")."""
    r, d = a.shape
    for trans, unit, ld, rows in ((b"T", 0, 1, r), (b"N", 1, 0, d)):
        if a.stride(unit) == 1 and max(1, rows) <= a.stride(ld) < 2**31:
            return trans, a.stride(ld)
    return None


def _syrk(routines: tuple, out: Tensor, a: Tensor, alpha: float, beta: float) -> None:
    (routine,) = routines
    r, d = a.shape
    trans, lda = _syrk_form(a)
    scalar = _SCALAR[a.dtype]
    # out's row-major upper triangle is the lower one of its column-major reading ("L")
    routine(
        b"L", trans, ctypes.byref(_INT(d)), ctypes.byref(_INT(r)), ctypes.byref(scalar(alpha)),
        ctypes.c_void_p(a.data_ptr()), ctypes.byref(_INT(lda)), ctypes.byref(scalar(beta)),
        ctypes.c_void_p(out.data_ptr()), ctypes.byref(_INT(out.stride(0))),
    )


def _spd_inverse(routines: tuple, m: Tensor) -> bool:
    potrf, potri = routines
    n, info = _INT(m.shape[0]), _INT(0)
    # row-major symmetric memory is its own column-major form: LAPACK's lower triangle is the
    # row-major upper one, and only it is read and written
    for routine in (potrf, potri):
        routine(b"L", ctypes.byref(n), ctypes.c_void_p(m.data_ptr()), ctypes.byref(n), ctypes.byref(info))
        if info.value != 0:
            return False
    mirror_upper_(m)
    return True


def mirror_upper_(out: Tensor) -> Tensor:
    """The upper triangle of the square ``out`` (row-major) copied below the diagonal, in place
    (what is there is not read): a panel of 128 columns at a time, whose transposed reads stay
    in cache (this project's CPU, one thread: 785 wide 2.0 → 0.9 ms, 8193 wide 799 → 72 ms
    against one pass over the whole matrix).  On other devices in one pass (a GPU would launch
    four kernels a panel: 260 for 8193 wide)."""
    if not device_routes.cpu_tuned(out):
        return out.copy_(out.triu() + out.triu(1).mT)
    n = out.shape[0]
    for i in range(0, n, 128):
        j = i + 128
        out[j:, i:j] = out[i:j, j:].mT
        diagonal = out[i:j, i:j]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
    return out


@functools.cache
def _checked(routine: str) -> dict[torch.dtype, tuple]:
    """``dtype → ctypes functions`` of ``routine`` that passed a first check against torch."""
    found = _library_functions(routine)
    checked = {}
    for dtype, functions in found.items():
        if routine == "syrk":
            a = torch.linspace(-1.0, 2.0, 35, dtype=dtype).reshape(5, 7).T  # [7, 5] stored along R
            out = torch.full((5, 5), float("nan"), dtype=dtype)  # β = 0 must not read it
            # both forms: stored along R ("T"), then row-major ("N") added in with β = 0.5
            _syrk(functions, out, a, 0.5, 0.0)
            _syrk(functions, out, a.contiguous(), 0.5, 0.5)
            ok = torch.allclose(mirror_upper_(out), 0.75 * a.mT @ a, rtol=1e-5, atol=1e-6)
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
