"""Kronecker-factored approximations of Fisher blocks: pure linear algebra on tensors.

Every approximation is ``K̂ = (U_out ⊗ U_in) diag(s) (U_out ⊗ U_in)ᵀ`` on the matrix form
``W̄ ∈ R^{d_out × D}`` and shares one interface (:class:`KroneckerApproximation`): products,
damped inverses (:mod:`~curvlab.approx.damping`), spectrum, trace, Frobenius norm, dense form.

===========  ===================================================  ======
name         definition                                           status
===========  ===================================================  ======
``kfac``     ``G ⊗ A`` of the MC-Fisher factors                   [C]
``kflr``     ``G ⊗ A`` of the exact-GGN factors                   [C]
``ekfac``    eigenbasis of the reference flavour's ``G ⊗ A``      [C]
             (KFLR's for ``exact``), optimal diagonal ``s*``
``tkfac``    ``(δΨ ⊗ δΦ)/δ``, trace-preserving                    [C], damping [R]
``tekfac``   TKFAC eigenbasis, optimal diagonal ``s*``            [R]
``kfoc``     Frobenius-optimal ``B ⊗ C`` (reference floor)        [C]
``diagonal`` ``diag(F)`` (identity basis, optimal diagonal)       [D]
===========  ===================================================  ======

Every approximation applies to Kronecker blocks; ``diagonal`` also to parameter blocks (one
tensor outside the Kronecker layers, see :mod:`curvlab.model_blocks`).

The comparison module measures these objects; the optimizers invert the same objects, built from
running averages with the plain constructors.  An :class:`EighPolicy` (``eigh=`` of every
constructor) sets the dtype of the eigen-decompositions and inverses and whether factors larger
than a threshold get a truncated eigenbasis (top ``k`` eigenpairs by a randomized range finder
plus a flat remainder: :mod:`curvlab.approx.spectral`) — which then *is* the approximation.
Use :func:`approximate` to build one from a :class:`~curvlab.stats.LayerStats` (or a whole
extraction).
"""

from __future__ import annotations

from curvlab.approx.base import MAX_DENSE_PARAMS, KroneckerApproximation
from curvlab.approx.damping import (
    DAMPING_STRATEGIES,
    DampingStrategy,
    ExactDamping,
    FactoredDamping,
    NorDamping,
    TraceRelativeDamping,
    get_damping,
)
from curvlab.approx.diagonal import Diagonal
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy, factor_eigh, psd_eigh, randomized_eigh
from curvlab.approx.ekfac import EKFAC
from curvlab.approx.families import EigenCorrected, KroneckerProduct
from curvlab.approx.inverse import DampedInverse
from curvlab.approx.spectral import TruncatedFactor
from curvlab.approx.kfac import KFAC
from curvlab.approx.kfoc import KFOC
from curvlab.approx.registry import (
    APPROXIMATIONS,
    DEFAULT_DAMPING,
    REGISTRY,
    applies,
    approximate,
    needed_kfac_flavours,
)
from curvlab.approx.tekfac import TEKFAC
from curvlab.approx.tkfac import TKFAC

__all__ = [
    "APPROXIMATIONS",
    "DAMPING_STRATEGIES",
    "DEFAULT_DAMPING",
    "EKFAC",
    "EXACT_EIGH",
    "KFAC",
    "KFOC",
    "MAX_DENSE_PARAMS",
    "REGISTRY",
    "TEKFAC",
    "TKFAC",
    "DampedInverse",
    "DampingStrategy",
    "Diagonal",
    "EighPolicy",
    "EigenCorrected",
    "ExactDamping",
    "FactoredDamping",
    "KroneckerApproximation",
    "KroneckerProduct",
    "NorDamping",
    "TraceRelativeDamping",
    "applies",
    "TruncatedFactor",
    "approximate",
    "factor_eigh",
    "get_damping",
    "needed_kfac_flavours",
    "psd_eigh",
    "randomized_eigh",
]
