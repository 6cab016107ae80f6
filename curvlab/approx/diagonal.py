"""The diagonal approximation [D]: ``K̂ = diag(F)``.

In the identity basis ``Q = I ⊗ I`` EKFAC's optimal scaling is ``s* = diag(QᵀFQ) = diag(F) =
Σ_k M_k²`` (elementwise), so the diagonal of ``F`` is the Frobenius-optimal approximation of ``F``
by any diagonal matrix and keeps ``tr K̂ = tr F``: an :class:`~curvlab.approx.base.EigenCorrected`
approximation in the identity basis (no rotation is computed, no ``D × D`` identity formed
unless :meth:`eigenbasis` is asked for).  It applies to every block — the only approximation of
a parameter block (a norm layer's affine parameter, a position embedding), whose optimizer
update is first order — and is the baseline of the Kronecker ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from curvlab.approx.base import EigenCorrected, missing_statistic
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot

if TYPE_CHECKING:
    from curvlab.stats import LayerStats


class Diagonal(EigenCorrected):
    """``K̂ = diag(s)`` on the matrix form ``[d_out, D]`` (``s = diag(F)`` from :meth:`from_stats`).

    Args:
        scaling: ``s``, ``[d_out, D]``.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.
    """

    def __init__(self, scaling: Tensor, *, layout: BlockLayout | None = None, name: str = "diagonal") -> None:
        super().__init__(None, None, scaling, None, layout, name)

    def optimal_scaling(self, sqrt: SquareRoot) -> Tensor:
        return sqrt.diagonal()

    def tensors(self) -> dict[str, Tensor]:
        return {"scaling": self.scaling}

    @classmethod
    def from_stats(cls, stats: "LayerStats", name: str = "diagonal") -> "Diagonal":  # type: ignore[override]
        """``diag(F)`` of ``stats``' block, from its square root."""
        if stats.sqrt is None:
            raise missing_statistic(stats, name, "the square root (stats.sqrt)", "stats=('sqrt', ...)")
        return cls(stats.sqrt.diagonal(), layout=stats.layout, name=name)
