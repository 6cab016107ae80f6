"""A damping strategy that remembers ``s + Δ`` per approximation object."""

from __future__ import annotations

import weakref

from torch import Tensor

from curvlab.approx import DampingStrategy, KroneckerApproximation, get_damping


class CachedDamping(DampingStrategy):
    """Wraps a damping strategy and computes each object's damped eigenvalues once.

    The objects the optimizers invert are immutable and replaced whenever their statistics
    change, so between two changes every step would recompute the same damped eigenvalues;
    the cache is weakly keyed by the object (and the damping value).
    """

    name = "cached"

    def __init__(self, inner: str | DampingStrategy) -> None:
        self.inner = get_damping(inner)
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def increment(self, approx: KroneckerApproximation, damping: float | Tensor) -> Tensor:
        return self.inner.increment(approx, damping)

    def damped_eigenvalues(self, approx: KroneckerApproximation, damping: float | Tensor) -> Tensor:
        hit = self._cache.get(approx)
        if hit is not None and (hit[0] is damping or (isinstance(damping, (int, float)) and hit[0] == damping)):
            return hit[1]
        value = self.inner.damped_eigenvalues(approx, damping)
        self._cache[approx] = (damping, value)
        return value
