"""EKFAC [C]: eigenvalue-corrected KFAC (George et al. 2018).

Basis: the Kronecker-factored eigenbasis ``Q = U_G ⊗ U_A`` of the KFAC factors ``G = U_G Λ_G U_Gᵀ``,
``A = U_A Λ_A U_Aᵀ``.  Scaling: the optimal diagonal in that basis,

    s*[i, j] = (Qᵀ F Q)_{(i,j),(i,j)} = Σ_k (U_Gᵀ M_k U_A)²[i, j],

which minimises ``‖F − Q diag(s) Qᵀ‖_F`` for the fixed basis, hence ``‖F − EKFAC‖ ≤ ‖F − KFAC‖``
(KFAC of the same flavour: KFLR's basis under ``fisher="exact"``) and ``tr EKFAC = tr F`` [D] —
for the ``F`` the ``M_k`` describe: where the forward couples the examples (train-mode
BatchNorm) that is the per-example block the Kronecker statistics describe, not the exact
coupled one, whose trace it misses by ``compare``'s ``coupling_trace_ratio``.  ``λ_G``, ``λ_A``
are kept for factored damping.

A truncated eigenbasis (large factors, :class:`~curvlab.approx.eigh.EighPolicy`) keeps the top
``k`` eigenvectors of a factor; the rest of the basis is any orthonormal complement on which
``s`` is flat (per row/column: the mean of ``s*`` over the complement — the optimal flat value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy, factor_eigh
from curvlab.approx.families import EigenCorrected
from curvlab.approx.spectral import optimal_scaling
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot

if TYPE_CHECKING:
    from curvlab.stats import LayerStats


class EKFAC(EigenCorrected):
    """``K̂ = (U_G ⊗ U_A) diag(s) (U_G ⊗ U_A)ᵀ``.

    Args:
        u_out: ``U_G``, eigenvectors of the output-side KFAC factor (``[d_out, k]``, ``k < d_out``:
            truncated).
        u_in: ``U_A``, eigenvectors of the input-side KFAC factor.
        scaling: compressed ``s`` (``[d_out, D]`` for full bases; ``s*`` or a running average).
        factor_eigenvalues: compressed ``(λ_G, λ_A)`` for factored damping; ``None`` disables it.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.

    Attributes:
        scaling: ``s``.
    """

    def __init__(
        self,
        u_out: Tensor,
        u_in: Tensor,
        scaling: Tensor,
        *,
        factor_eigenvalues: tuple[Tensor, Tensor] | None = None,
        layout: BlockLayout | None = None,
        name: str = "ekfac",
    ) -> None:
        super().__init__(u_out, u_in, scaling, factor_eigenvalues, layout, name)

    def tensors(self) -> dict[str, Tensor]:
        out = {"u_out": self.u_out, "u_in": self.u_in, "scaling": self.scaling}
        if self._factor_eigenvalues is not None:
            out["lam_out"], out["lam_in"] = self._factor_eigenvalues
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, layout: BlockLayout | None = None, name: str | None = None,
                     **options: object) -> "EKFAC":
        t = dict(tensors)
        fe = (t.pop("lam_out"), t.pop("lam_in")) if "lam_out" in t else None
        return cls(**t, factor_eigenvalues=fe, layout=layout, name=name or "ekfac")

    @classmethod
    def from_factors(
        cls,
        A: Tensor,
        G: Tensor,
        *,
        sqrt: SquareRoot | None = None,
        scaling: Tensor | str | None = None,
        layout: BlockLayout | None = None,
        name: str = "ekfac",
        eigh: EighPolicy = EXACT_EIGH,
    ) -> "EKFAC":
        """EKFAC in the eigenbasis of the KFAC factors ``G ⊗ A`` (decomposed as ``eigh`` says).

        ``s`` is ``scaling`` when it is a tensor (compressed, computed in this basis);
        ``"kronecker"``: the KFAC eigenvalues ``λ_G λ_Aᵀ`` (the optimizers' reset at an eigen
        refresh); ``None``: ``s* = sqrt.rotated_sq_sum(U_G, U_A)``.
        """
        lam_a, u_a = factor_eigh(A, eigh)
        lam_g, u_g = factor_eigh(G, eigh)
        if isinstance(scaling, str):
            if scaling != "kronecker":
                raise ValueError(f"EKFAC.from_factors: scaling={scaling!r}; pass a tensor, 'kronecker' or None")
            scaling = torch.outer(lam_g, lam_a)
        elif scaling is None:
            if sqrt is None:
                raise ValueError("EKFAC.from_factors: pass the block's square root `sqrt` or a `scaling`")
            scaling = optimal_scaling(sqrt, u_g, u_a).to(A.dtype)
        return cls(u_g, u_a, scaling, factor_eigenvalues=(lam_g, lam_a), layout=layout, name=name)

    @classmethod
    def from_stats(  # type: ignore[override]
        cls,
        stats: "LayerStats",
        scaling: Tensor | None = None,
        flavour: str | None = None,
        name: str = "ekfac",
        eigh: EighPolicy = EXACT_EIGH,
    ) -> "EKFAC":
        """EKFAC of ``stats``: basis from ``stats.kfac[flavour]`` (default: the block's own flavour),
        ``s*`` from ``stats.kronecker_sqrt`` (under train-mode BatchNorm the block the Kronecker
        statistics describe, as the optimizers form it, not the exact coupled ``stats.sqrt``).

        Without a square root the scaling is ``scaling`` if given, else ``stats.kfe_scaling``,
        which is then assumed to have been extracted in the eigenbasis of these same factors.
        """
        flavour = stats.flavour if flavour is None else flavour
        factors = stats.kfac.get(flavour)
        if factors is None:
            raise missing_statistic(
                stats, name, f"the KFAC factors of flavour {flavour!r} (stats.kfac[{flavour!r}])",
                f"stats=('kfac', ...) with kfac_flavours containing {flavour!r}",
            )
        if scaling is None and stats.sqrt is None:
            if stats.kfe_scaling is None:
                raise missing_statistic(
                    stats, name, "the square root (stats.sqrt) or the KFE scaling (stats.kfe_scaling)",
                    "stats=('sqrt', ...) (or stats=('kfe', ...) with eigenbases set to this KFAC eigenbasis)",
                )
            sums = stats.kfe_scaling  # sums over eigen-directions: per direction once the basis is known
            built = cls.from_factors(factors.A, factors.G, scaling=sums, layout=stats.layout, name=name, eigh=eigh)
            return built.with_scaling(built.compressed_mean(sums))
        return cls.from_factors(factors.A, factors.G, sqrt=stats.kronecker_sqrt, scaling=scaling, layout=stats.layout, name=name,
                                eigh=eigh)
