"""Kronecker-factored approximations of Fisher blocks: pure linear algebra on tensors.

Every approximation is ``K̂ = (U_out ⊗ U_in) diag(s) (U_out ⊗ U_in)ᵀ`` on the matrix form
``W̄ ∈ R^{d_out × D}`` and shares one interface (:class:`KroneckerApproximation`): products,
damped inverses (:mod:`~curvlab.approx.damping`), spectrum, trace, Frobenius norm, dense form.

===========  ===================================================  ======
name         definition                                           status
===========  ===================================================  ======
``kfac``     ``G ⊗ A`` of the MC-Fisher factors                   [C]
``kflr``     ``G ⊗ A`` of the exact-GGN factors                   [C]
``ekfac``    KFAC eigenbasis, optimal diagonal ``s*``             [C]
``tkfac``    ``(δΨ ⊗ δΦ)/δ``, trace-preserving                    [C], damping [R]
``tekfac``   TKFAC eigenbasis, optimal diagonal ``s*``            [R]
``kfoc``     Frobenius-optimal ``B ⊗ C`` (reference floor)        [C]
===========  ===================================================  ======

The comparison module measures these objects; the optimizers invert the same objects, built from
running averages with the plain constructors.  Use :func:`approximate` to build one from a
:class:`~curvlab.extract.stats.LayerStats`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from curvlab.approx.base import MAX_DENSE_PARAMS, EigenCorrected, KroneckerApproximation, KroneckerProduct
from curvlab.approx.damping import (
    DAMPING_STRATEGIES,
    DampingStrategy,
    ExactDamping,
    FactoredDamping,
    NorDamping,
    TraceRelativeDamping,
    get_damping,
    pi_factor,
)
from curvlab.approx.ekfac import EKFAC
from curvlab.approx.kfac import KFAC
from curvlab.approx.kfoc import KFOC
from curvlab.approx.tekfac import TEKFAC
from curvlab.approx.tkfac import TKFAC

if TYPE_CHECKING:
    from curvlab.extract.stats import LayerStats

#: Names accepted by :func:`approximate`.
APPROXIMATIONS = ("kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc")

#: Default damping strategy of each approximation's inverse — the optimizers' defaults, and so
#: what the comparison measures unless told otherwise.  KFAC/KFLR: Martens & Grosse's factored
#: (π) damping [C]; EKFAC: exact damping in its eigenbasis [C]; TKFAC and TEKFAC: TKFAC's "nor"
#: damping [R]; KFOC (a reference, never inverted by an optimizer): factored.
DEFAULT_DAMPING = {
    "kfac": "factored",
    "kflr": "factored",
    "ekfac": "exact",
    "tkfac": "nor",
    "tekfac": "nor",
    "kfoc": "factored",
}


def approximate(stats: "LayerStats", name: str, **options: Any) -> KroneckerApproximation:
    """Build the approximation ``name`` of the block described by ``stats``.

    Args:
        stats: the block's extracted statistics.
        name: one of :data:`APPROXIMATIONS`.
        options: passed to the class's ``from_stats`` (e.g. ``basis="kfac"`` for TEKFAC,
            ``init="identity"`` / ``tol`` for KFOC, ``scaling`` for EKFAC/TEKFAC).

    Raises:
        ValueError: unknown ``name``, or a statistic it needs was not extracted (the message
            names the layer, the approximation and what to request from ``curvlab.extract``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key in ("kfac", "kflr") and "flavour" in options:
        raise ValueError(
            f"approximate: {name!r} fixes the flavour ('kfac': 'mc', 'kflr': 'exact'); "
            "use KFAC.from_stats(stats, flavour=...) for other factors"
        )
    if key == "kfac":
        return KFAC.from_stats(stats, flavour="mc", name="kfac", **options)
    if key == "kflr":
        return KFAC.from_stats(stats, flavour="exact", name="kflr", **options)
    if key == "ekfac":
        return EKFAC.from_stats(stats, **options)
    if key == "tkfac":
        return TKFAC.from_stats(stats, **options)
    if key == "tekfac":
        return TEKFAC.from_stats(stats, **options)
    if key == "kfoc":
        return KFOC.from_stats(stats, **options)
    raise ValueError(f"unknown approximation {name!r}; choose one of {APPROXIMATIONS}")


__all__ = [
    "APPROXIMATIONS",
    "DAMPING_STRATEGIES",
    "DEFAULT_DAMPING",
    "EKFAC",
    "KFAC",
    "KFOC",
    "MAX_DENSE_PARAMS",
    "TEKFAC",
    "TKFAC",
    "DampingStrategy",
    "EigenCorrected",
    "ExactDamping",
    "FactoredDamping",
    "KroneckerApproximation",
    "KroneckerProduct",
    "NorDamping",
    "TraceRelativeDamping",
    "approximate",
    "get_damping",
    "pi_factor",
]
