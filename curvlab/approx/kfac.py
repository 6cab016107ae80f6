"""KFAC and KFLR [C]: ``F ≈ G ⊗ A`` (Martens & Grosse 2015; KFLR: Botev et al. 2017).

``A = E[ā āᵀ]`` (``[D, D]``, input side) and ``G = Σ g gᵀ`` (``[d_out, d_out]``, output side),
row-major on ``W̄``: ``(G ⊗ A) vec(X) = vec(G X Aᵀ)``.  KFAC takes the factors of the Monte-Carlo
Fisher (``stats.kfac["mc"]``), KFLR those of the exact GGN (``stats.kfac["exact"]``); the two are the
same class with a different ``name``.  Eigenvalues ``s = λ_G λ_Aᵀ``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy
from curvlab.approx.families import Factor, KroneckerProduct
from curvlab.approx.spectral import flatten_tensors
from curvlab.block import BlockLayout

if TYPE_CHECKING:
    from curvlab.stats import LayerStats

#: Default name of the KFAC approximation of each flavour's factors.
FLAVOUR_NAMES = {"mc": "kfac", "exact": "kflr", "empirical": "kfac-empirical"}


class KFAC(KroneckerProduct):
    """``K̂ = G ⊗ A``.

    Args:
        A: input-side factor ``[D, D]`` (symmetric PSD; stored symmetrised), or its
            :class:`~curvlab.approx.spectral.TruncatedFactor`.
        G: output-side factor ``[d_out, d_out]`` (likewise).
        layout: the block's layout (default: a plain ``d_out × D`` weight without bias column).
        name: ``"kfac"`` (MC factors), ``"kflr"`` (exact factors), or any label.
        eigh: how the factors are decomposed and inverted (dtype; truncation of large factors,
            which then define the approximation: ``G ⊗ Ã``).
    """

    def __init__(self, A: Factor, G: Factor, *, layout: BlockLayout | None = None, name: str = "kfac",
                 eigh: EighPolicy = EXACT_EIGH) -> None:
        super().__init__(G, A, None, layout, name, eigh)

    @property
    def A(self) -> Factor:
        """Input-side factor ``[D, D]``."""
        return self._right

    @property
    def G(self) -> Factor:
        """Output-side factor ``[d_out, d_out]``."""
        return self._left

    def tensors(self) -> dict[str, Tensor]:
        return flatten_tensors({"A": self.A, "G": self.G})

    @classmethod
    def from_stats(cls, stats: "LayerStats", flavour: str = "mc", name: str | None = None,  # type: ignore[override]
                   eigh: EighPolicy = EXACT_EIGH) -> "KFAC":
        """KFAC of the factors ``stats.kfac[flavour]`` (``"mc"``: KFAC, ``"exact"``: KFLR).

        ``name`` defaults to ``"kfac"``/``"kflr"``/``"kfac-empirical"`` by flavour.
        """
        label = name if name is not None else FLAVOUR_NAMES.get(flavour, f"kfac-{flavour}")
        factors = stats.kfac.get(flavour)
        if factors is None:
            raise missing_statistic(
                stats, label, f"the KFAC factors of flavour {flavour!r} (stats.kfac[{flavour!r}])",
                f"stats=('kfac', ...) with kfac_flavours containing {flavour!r}",
            )
        return cls(factors.A, factors.G, layout=stats.layout, name=label, eigh=eigh)
