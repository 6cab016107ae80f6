"""The diagonal approximation [D]: ``K̂ = diag(F)``.

In the identity basis ``Q = I ⊗ I`` EKFAC's optimal scaling is ``s* = diag(QᵀFQ) = diag(F) =
Σ_k M_k²`` (elementwise), so the diagonal of ``F`` is the Frobenius-optimal approximation of ``F``
by any diagonal matrix and keeps ``tr K̂ = tr F``: an :class:`~curvlab.approx.EigenCorrected`
approximation in the identity basis.  No rotation is computed and no ``D × D`` identity formed
unless :meth:`eigenbasis` is asked for.  It applies to every block — the only approximation of
a parameter block (a norm layer's affine parameter, a position embedding), whose optimizer
update is first order — and is the baseline of the Kronecker ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic, resolve_layout
from curvlab.approx.damping import DampingStrategy
from curvlab.approx.families import EigenCorrected
from curvlab.approx.inverse import DampedInverse, ElementwiseInverse
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
        if scaling.dim() != 2:
            raise ValueError(f"Diagonal: scaling must be a [d_out, D] matrix, got shape {tuple(scaling.shape)}")
        self.scaling = scaling
        self._factor_eigenvalues = None
        self.layout = resolve_layout(layout, *scaling.shape, type(self).__name__)
        self.name = name

    @property
    def u_out(self) -> Tensor:  # type: ignore[override]
        return torch.eye(self.scaling.shape[0], dtype=self.dtype, device=self.device)

    @property
    def u_in(self) -> Tensor:  # type: ignore[override]
        return torch.eye(self.scaling.shape[1], dtype=self.dtype, device=self.device)

    identity_basis = True

    @property
    def truncated(self) -> bool:
        return False

    def multiplicity(self) -> Tensor:
        return torch.ones_like(self.scaling)

    def rotate(self, x: Tensor) -> Tensor:
        return x

    def unrotate(self, y: Tensor) -> Tensor:
        return y

    def mat_mul(self, x: Tensor) -> Tensor:
        self._check_matrix(x)
        return (x.to(self.dtype) * self.scaling).to(x.dtype)

    def _build_inverse(self, strategy: DampingStrategy, damping: float | Tensor) -> DampedInverse:
        return ElementwiseInverse(strategy.damped_eigenvalues(self, damping))

    def _dense_matrix_order(self) -> Tensor:
        return torch.diag(self.scaling.flatten())

    def optimal_scaling(self, sqrt: SquareRoot) -> Tensor:
        return sqrt.diagonal()

    def tensors(self) -> dict[str, Tensor]:
        return {"scaling": self.scaling}

    def with_scaling(self, scaling: Tensor) -> "Diagonal":
        return type(self)(scaling, layout=self.layout, name=self.name)

    @classmethod
    def from_stats(cls, stats: "LayerStats", name: str = "diagonal") -> "Diagonal":  # type: ignore[override]
        """``diag(F)`` of ``stats``' block, from its square root."""
        if stats.sqrt is None:
            raise missing_statistic(stats, name, "the square root (stats.sqrt)", "stats=('sqrt', ...)")
        return cls(stats.sqrt.diagonal(), layout=stats.layout, name=name)
