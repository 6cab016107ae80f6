"""TKFAC [C definitions; damping R]: trace-restricted KFAC (Gao et al., AAAI 2021).

From the unnormalised trace statistics (curvature-math §3)

    δ = tr F = Σ_k ‖M_k‖²_F,   δΦ = Tr_out F = Σ_k M_kᵀ M_k,   δΨ = Tr_in F = Σ_k M_k M_kᵀ,

``Φ = δΦ/δ`` and ``Ψ = δΨ/δ`` have unit trace and

    K̂ = δ · Ψ ⊗ Φ = (δΨ ⊗ δΦ)/δ     (Ψ output side, Φ input side, row-major),

so ``tr K̂ = δ = tr F`` exactly.  Eigenvalues ``s = δ λ_Ψ λ_Φᵀ``.  For damping the product is
split as ``(√δ Ψ) ⊗ (√δ Φ)``.  Running averages must average δ, δΦ, δΨ *before* normalising
(averaging Φ, Ψ afterwards breaks the trace identity), hence the constructor takes the
unnormalised statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy
from curvlab.approx.families import Factor, KroneckerProduct
from curvlab.approx.spectral import TruncatedFactor, flatten_tensors
from curvlab.block import BlockLayout

if TYPE_CHECKING:
    from curvlab.stats import LayerStats


class TKFAC(KroneckerProduct):
    """``K̂ = (δΨ ⊗ δΦ)/δ``.

    Args:
        delta: ``δ`` (scalar).
        delta_phi: ``δΦ``, ``[D, D]`` (input side), or its truncation.
        delta_psi: ``δΨ``, ``[d_out, d_out]`` (output side), or its truncation.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.
        eigh: how the factors are decomposed and inverted (see :class:`~curvlab.approx.KFAC`).

    Attributes:
        delta: ``δ`` as a 0-dim tensor.
        phi: ``Φ = δΦ/δ`` (unit trace when ``tr δΦ = δ``).
        psi: ``Ψ = δΨ/δ``.
    """

    trace_factored = True

    def __init__(
        self,
        delta: Tensor | float,
        delta_phi: Factor,
        delta_psi: Factor,
        *,
        layout: BlockLayout | None = None,
        name: str = "tkfac",
        eigh: EighPolicy = EXACT_EIGH,
    ) -> None:
        delta_t = torch.as_tensor(delta, dtype=delta_phi.dtype, device=delta_phi.device).reshape(())
        # A dead layer has δ = δΦ = δΨ = 0; the clamp keeps K̂ = 0 instead of NaN.
        inv_delta = 1.0 / delta_t.clamp_min(torch.finfo(delta_phi.dtype).tiny)
        super().__init__(delta_psi, delta_phi, inv_delta, layout, name, eigh)
        self.delta = delta_t

    @property
    def phi(self) -> Factor:
        """``Φ = δΦ/δ``."""
        return _scaled(self._right, self._scale)

    @property
    def psi(self) -> Factor:
        """``Ψ = δΨ/δ``."""
        return _scaled(self._left, self._scale)

    @property
    def delta_phi(self) -> Factor:
        """``δΦ = Σ_k M_kᵀ M_k``, ``[D, D]``."""
        return self._right

    @property
    def delta_psi(self) -> Factor:
        """``δΨ = Σ_k M_k M_kᵀ``, ``[d_out, d_out]``."""
        return self._left

    def tensors(self) -> dict[str, Tensor]:
        return flatten_tensors({"delta": self.delta, "delta_phi": self.delta_phi, "delta_psi": self.delta_psi})

    @classmethod
    def from_stats(cls, stats: "LayerStats", name: str = "tkfac", eigh: EighPolicy = EXACT_EIGH) -> "TKFAC":  # type: ignore[override]
        """TKFAC of ``stats.tkfac`` (either form, ``"exact"`` or ``"kfc"``)."""
        if stats.tkfac is None:
            raise missing_statistic(stats, name, "the trace statistics δ, δΦ, δΨ (stats.tkfac)", "stats=('tkfac', ...)")
        ts = stats.tkfac
        return cls(ts.delta, ts.delta_phi, ts.delta_psi, layout=stats.layout, name=name, eigh=eigh)


def _scaled(factor: Factor, c: Tensor) -> Factor:
    if isinstance(factor, TruncatedFactor):
        return TruncatedFactor(factor.values * c, factor.vectors)
    return factor * c
