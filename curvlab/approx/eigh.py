"""The one eigen-decomposition of a symmetric PSD Kronecker factor used everywhere in curvlab."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

#: Relative size of the diagonal jitter added when an eigen-decomposition fails.
EIGH_JITTER = 1e-6


def symmetrize(mat: Tensor) -> Tensor:
    """``(M + Mᵀ)/2``: factors are symmetric by definition; this removes rounding asymmetry."""
    return 0.5 * (mat + mat.mT)


def psd_eigh(mat: Tensor, compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD factor: ``M = U diag(λ) Uᵀ``.

    Computed in ``compute_dtype`` (float64 by default: small eigenvalues of ill-conditioned
    factors matter for the inverse), returned in ``mat``'s dtype.  Negative eigenvalues can only
    be rounding error of a PSD matrix and are clamped to 0.  If the solver fails (it can on
    badly conditioned input), it is retried once on ``M + ε I`` with
    ``ε = EIGH_JITTER · mean |diag M|``, with a ``RuntimeWarning``.

    Returns:
        ``(λ [n], U [n, n])`` with ``λ`` ascending and ``U`` orthonormal.
    """
    sym = symmetrize(mat.to(compute_dtype))
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        jitter = EIGH_JITTER * (sym.diagonal().abs().mean().item() + torch.finfo(sym.dtype).tiny)
        warnings.warn(
            f"curvlab: eigen-decomposition of a {mat.shape[0]}×{mat.shape[0]} factor failed ({err}); "
            f"retrying with {jitter:.3g}·I added",
            RuntimeWarning,
            stacklevel=2,
        )
        evals, evecs = torch.linalg.eigh(sym + jitter * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device))
    return evals.clamp_min(0).to(mat.dtype), evecs.to(mat.dtype)


def diagonal_in_basis(mat: Tensor, u: Tensor) -> Tensor:
    """``diag(Uᵀ M U)`` of a PSD ``M`` (clamped at 0 against rounding)."""
    return ((mat @ u) * u).sum(0).clamp_min(0)
