"""The diagonal approximation [D]: ``K̂ = diag(F)``.

In the identity basis ``Q = I ⊗ I`` EKFAC's optimal scaling is ``s* = diag(QᵀFQ) = diag(F) =
Σ_k M_k²`` (elementwise), so the diagonal of ``F`` is the Frobenius-optimal approximation of ``F``
by any diagonal matrix, keeps ``tr K̂ = tr F``, and fits the one interface of curvlab's
approximations (eigenbasis ``(I, I)``, eigenvalues ``s``).  It applies to every block — the only
approximation of a parameter block (a norm layer's affine parameter, a position embedding), whose
optimizer update is first order — and is the baseline of the Kronecker ones.  Rotations are
skipped (the basis is the identity), so no ``D × D`` identity is formed except by
:meth:`eigenbasis`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import KroneckerApproximation, missing_statistic, resolve_layout
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot

if TYPE_CHECKING:
    from curvlab.stats import LayerStats


class Diagonal(KroneckerApproximation):
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
        self.layout = resolve_layout(layout, *scaling.shape, "Diagonal")
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.scaling.dtype

    @property
    def device(self) -> torch.device:
        return self.scaling.device

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        d_out, d_in = self.scaling.shape
        eye = lambda n: torch.eye(n, dtype=self.dtype, device=self.device)  # noqa: E731
        return eye(d_out), eye(d_in)

    def eigenvalues(self) -> Tensor:
        return self.scaling

    def rotate(self, x: Tensor) -> Tensor:
        return x

    def unrotate(self, y: Tensor) -> Tensor:
        return y

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
