"""Damping strategies: how ``K̂ + damping`` is inverted, as damped eigenvalues.

Every approximation is ``K̂ = Q diag(s) Qᵀ`` (see :mod:`curvlab.approx.base`); every strategy
here damps it to ``Q diag(s + Δ) Qᵀ`` with an increment ``Δ`` (``[d_out, D]`` or a scalar) that is
diagonal in the same basis, so the damped inverse costs two rotations and one division — or, for
a Kronecker product whose damping is itself a Kronecker product (``"factored"``, ``"nor"``:
:meth:`DampingStrategy.kronecker_shifts`), two products with the damped factor inverses.
With ``λ`` the damping and ``(l, r)`` the approximation's :meth:`factor_eigenvalues` (the
eigenvalues of its Kronecker factors ``L ⊗ R``):

* ``"exact"`` [C]: ``Δ = λ`` — Tikhonov damping ``K̂ + λI`` of the approximation itself.
* ``"factored"`` [C for KFAC/KFLR, Martens & Grosse 2015 §6.3]: ``(L + √λ/π I) ⊗ (R + π√λ I)``
  with ``π² = (tr R / D)/(tr L / d_out)``, i.e. damped eigenvalues ``(l + √λ/π)(r + π√λ)ᵀ``.
  For the eigenvalue-corrected approximations (EKFAC, TEKFAC) [R] the same damping *increment*
  ``(L + √λ/π)⊗(R + π√λ) − L⊗R = π√λ L⊗I + (√λ/π) I⊗R + λI`` is added to ``K̂``, so that
  ``Δ = π√λ l ⊕ (√λ/π) r + λ`` (``⊕``: outer sum).  For plain Kronecker products this is exactly
  the π-damped product.
* ``"nor"`` [R] (TKFAC's "normal" damping), TKFAC and TEKFAC only: with ``L = √δ Ψ``,
  ``R = √δ Φ``, the damped matrix ``(√δ Ψ + √λ I) ⊗ (√δ Φ + √λ I)`` for TKFAC, and
  ``K̂ + [(√δΨ + √λ I) ⊗ (√δΦ + √λ I) − δ Ψ⊗Φ]`` for TEKFAC (curvature-math §4 item 5):
  ``Δ = √λ (l ⊕ r) + λ``.
* ``"trace-relative"`` [R] (a candidate for TKFAC's unknown CNN damping):
  ``Δ = λ · tr(K̂)/P``, Tikhonov damping relative to the mean eigenvalue.

A strategy that an approximation does not support raises ``ValueError`` naming both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from curvlab._options import is_number

if TYPE_CHECKING:
    from curvlab.approx.base import KroneckerApproximation

#: Names accepted wherever a strategy is expected.
DAMPING_STRATEGIES = ("exact", "factored", "nor", "trace-relative")


def check_damping(damping: float | Tensor, who: str = "damping") -> None:
    """A positive finite ``damping`` (a tensor on an accelerator is not inspected: that would
    force a device sync); ``who`` names it in the error.  Zero is refused as by the optimizers and
    ``curvlab.compare``: a minibatch's blocks have rank ≤ N·C, below their size, so the undamped
    inverse of an approximation of them divided by zero eigenvalues (NaN, silently)."""
    if isinstance(damping, Tensor):
        if damping.numel() != 1:
            raise ValueError(f"{who} must be one number, got a tensor of shape {tuple(damping.shape)}")
        if damping.device.type != "cpu":
            return
        value = damping.detach()
        ok = bool(torch.isfinite(value).all() and (value > 0).all())
    else:  # (a bool or a string is no damping: True was taken as 1.0, "1e-3" failed inside math)
        ok = is_number(damping) and damping > 0
    if not ok:
        raise ValueError(f"{who} must be a positive finite number, got {damping}")


def pi_of_means(mean_l: Tensor, mean_r: Tensor) -> Tensor:
    """``π = √((tr R/D)/(tr L/d_out))`` — the ratio of the factors' mean eigenvalues, from those
    means; ``π = 1`` when either factor has zero trace (a dead layer)."""
    ok = (mean_l > 0) & (mean_r > 0)
    tiny = torch.finfo(mean_l.dtype).tiny
    return torch.where(ok, (mean_r / mean_l.clamp_min(tiny)).sqrt(), torch.ones_like(mean_l))


class DampingStrategy(ABC):
    """Damping ``K̂ + damping`` as ``Q diag(s + Δ) Qᵀ`` in the approximation's eigenbasis.

    Everything here is *compressed* (see :mod:`curvlab.approx.spectral`): for an approximation
    with a truncated side, ``Δ`` and ``s + Δ`` have one entry for that side's flat remainder.
    """

    #: The strategy's name (one of :data:`DAMPING_STRATEGIES` for the built-in ones).
    name: ClassVar[str]

    @abstractmethod
    def increment(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        """``Δ``, broadcastable to the compressed ``s`` (``[d_out, D]`` for full bases)."""

    def damped_eigenvalues(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        """``s + Δ``, compressed (``[d_out, D]`` for full bases): what the damped inverse
        divides by."""
        check_damping(damping)
        return approx.eigenvalues(compressed=True) + self.increment(approx, damping)

    def kronecker_shifts(self, approx: "KroneckerApproximation", damping: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """``(a, b)`` when, for a Kronecker product ``K̂ = L ⊗ R`` split as ``l rᵀ``, the damped
        matrix is the Kronecker product ``(L + aI) ⊗ (R + bI)`` (so that it is inverted factor
        by factor); ``None`` otherwise (the default)."""
        return None

    def unsupported(self, approx: "KroneckerApproximation", why: str) -> ValueError:
        """The error for a combination this strategy does not define."""
        return ValueError(
            f"damping strategy {self.name!r} is not defined for approximation {approx.name!r}: {why}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _on_device(damping: float | Tensor, approx: "KroneckerApproximation") -> Tensor:
    """``damping`` as a 0-dim tensor of the approximation's dtype and device: a number filled in
    there (``torch.as_tensor`` would copy it from the host: on a GPU a copy that waits for the
    device, once per block at every statistics step)."""
    if isinstance(damping, Tensor):
        return damping.to(dtype=approx.dtype, device=approx.device).reshape(())
    return torch.full((), damping, dtype=approx.dtype, device=approx.device)


class ExactDamping(DampingStrategy):
    """``"exact"`` [C]: ``K̂ + λI``, damped eigenvalues ``s + λ``."""

    name = "exact"

    def increment(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        return _on_device(damping, approx)


class FactoredDamping(DampingStrategy):
    """``"factored"`` [C for KFAC, R for the eigenvalue-corrected ones]: π-damping
    ``(L + √λ/π I) ⊗ (R + π√λ I)``; increment ``Δ = π√λ l ⊕ (√λ/π) r + λ``.

    π is invariant to rescaling ``L → cL, R → R/c``, so the split of a scalar between the factors
    does not matter.
    """

    name = "factored"

    def increment(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        a, b = self.kronecker_shifts(approx, damping)
        l, r = approx.factor_eigenvalues(compressed=True)
        # (l + a)(r + b) − l r with a = √λ/π, b = π√λ, expanded to avoid cancellation.
        return (b * l)[:, None] + (a * r)[None, :] + a * b

    def kronecker_shifts(self, approx: "KroneckerApproximation", damping: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(√λ/π, π√λ)``: ``π`` from the factors' traces (no eigen-decomposition needed)."""
        check_damping(damping)
        means = approx.factor_means()
        if means is None:
            raise self.unsupported(approx, "it carries no Kronecker factor eigenvalues")
        pi = pi_of_means(*means)
        root = _on_device(damping, approx).sqrt()
        return root / pi, pi * root


class NorDamping(DampingStrategy):
    """``"nor"`` [R]: TKFAC's normal damping ``(√δΨ + √λ I) ⊗ (√δΦ + √λ I)``; increment
    ``Δ = √λ (l ⊕ r) + λ`` with ``l = √δ λ_Ψ``, ``r = √δ λ_Φ``.  TKFAC and TEKFAC only."""

    name = "nor"

    def increment(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        root, _ = self.kronecker_shifts(approx, damping)
        l, r = approx.factor_eigenvalues(compressed=True)
        return root * (l[:, None] + r[None, :]) + root * root

    def kronecker_shifts(self, approx: "KroneckerApproximation", damping: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(√λ, √λ)``."""
        check_damping(damping)
        if not approx.trace_factored or approx.factor_means() is None:
            raise self.unsupported(
                approx, "it needs the trace split √δΨ ⊗ √δΦ of TKFAC/TEKFAC (use 'tkfac' or 'tekfac')"
            )
        root = _on_device(damping, approx).sqrt()
        return root, root


class TraceRelativeDamping(DampingStrategy):
    """``"trace-relative"`` [R]: ``K̂ + λ·(tr K̂ / P) I``, damped eigenvalues ``s + λ·mean(s)``."""

    name = "trace-relative"

    def increment(self, approx: "KroneckerApproximation", damping: float | Tensor) -> Tensor:
        return damping * approx.trace() / approx.num_params


_STRATEGIES: dict[str, type[DampingStrategy]] = {
    cls.name: cls for cls in (ExactDamping, FactoredDamping, NorDamping, TraceRelativeDamping)
}

#: The built-in strategy classes (stateless: a damped inverse may be cached per class and value).
BUILT_IN = frozenset(_STRATEGIES.values())


def built_in_class(strategy: str | DampingStrategy) -> type[DampingStrategy] | None:
    """The built-in class of a strategy name or object, without making one (``None``: a user
    strategy or an unknown name)."""
    kind = _STRATEGIES.get(strategy) if isinstance(strategy, str) else type(strategy)
    return kind if kind in BUILT_IN else None


def get_damping(strategy: str | DampingStrategy) -> DampingStrategy:
    """The strategy object for a name in :data:`DAMPING_STRATEGIES` (objects pass through)."""
    if isinstance(strategy, DampingStrategy):
        return strategy
    try:
        return _STRATEGIES[strategy]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown damping strategy {strategy!r}; choose one of {DAMPING_STRATEGIES}"
        ) from None
