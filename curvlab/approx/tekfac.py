"""TEKFAC [R — reconstructed from the paper's abstract]: trace-restricted eigenvalue-corrected KFAC
(Gao, Liu et al. 2020; curvature-math §4).

Basis ``Q = U_Ψ ⊗ U_Φ`` from ``δΨ = U_Ψ diag(δλ_Ψ) U_Ψᵀ`` (output side) and
``δΦ = U_Φ diag(δλ_Φ) U_Φᵀ`` (input side) — TKFAC's eigenbasis — with EKFAC's optimal scaling

    s*[i, j] = Σ_k (U_Ψᵀ M_k U_Φ)²[i, j].

Hence ``‖F − TEKFAC‖_F ≤ ‖F − TKFAC‖_F`` (same basis, optimal diagonal) and ``tr = tr F`` [D], for
the ``F`` the ``M_k`` describe (under coupled examples the per-example block: see
:mod:`curvlab.approx.ekfac`).
``δ``, ``λ_Ψ``, ``λ_Φ`` are kept for the ``"nor"`` and ``"factored"`` damping, with the split
``L = √δ Ψ``, ``R = √δ Φ``.

``basis="kfac"`` (ablation) uses the KFAC factors' eigenbasis instead, where TEKFAC equals EKFAC;
``λ_Ψ``, ``λ_Φ`` then denote the diagonals ``diag(U_outᵀ Ψ U_out)``, ``diag(U_inᵀ Φ U_in)``, so the
damping stays the diagonal (in the basis) of the same damping matrix.

Truncated bases (large factors, :class:`~curvlab.approx.eigh.EighPolicy`): as for EKFAC; the
complement's ``λ`` is the mean eigenvalue of the rest of the spectrum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy, factor_eigh
from curvlab.approx.families import EigenCorrected
from curvlab.approx.spectral import diagonal_in_basis, optimal_scaling
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot
from curvlab.stats import KroneckerFactors, LayerStats

#: Bases TEKFAC can be built in.
TEKFAC_BASES = ("trace", "kfac")


class TEKFAC(EigenCorrected):
    """``K̂ = (U_out ⊗ U_in) diag(s) (U_out ⊗ U_in)ᵀ`` with TKFAC's damping statistics.

    Args:
        u_out: ``U_Ψ`` (or any orthonormal ``[d_out, d_out]`` basis; ``[d_out, k]``: truncated).
        u_in: ``U_Φ`` (or any orthonormal ``[D, D]`` basis; ``[D, k]``: truncated).
        scaling: compressed ``s`` (``[d_out, D]`` for full bases).
        delta: ``δ = tr F``.
        psi_eigenvalues: compressed ``λ_Ψ = diag(U_outᵀ Ψ U_out)`` (Ψ's eigenvalues in its own
            eigenbasis).
        phi_eigenvalues: compressed ``λ_Φ = diag(U_inᵀ Φ U_in)``.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.

    Attributes:
        scaling: ``s``; delta: ``δ`` (0-dim); psi_eigenvalues, phi_eigenvalues: ``λ_Ψ``, ``λ_Φ``.
    """

    trace_factored = True

    def __init__(
        self,
        u_out: Tensor,
        u_in: Tensor,
        scaling: Tensor,
        *,
        delta: Tensor | float,
        psi_eigenvalues: Tensor,
        phi_eigenvalues: Tensor,
        layout: BlockLayout | None = None,
        name: str = "tekfac",
    ) -> None:
        delta_t = torch.as_tensor(delta, dtype=scaling.dtype, device=scaling.device).reshape(())
        root = delta_t.sqrt()
        super().__init__(u_out, u_in, scaling, (root * psi_eigenvalues, root * phi_eigenvalues), layout, name)
        self.delta = delta_t
        self.psi_eigenvalues = psi_eigenvalues
        self.phi_eigenvalues = phi_eigenvalues

    def tensors(self) -> dict[str, Tensor]:
        return {
            "u_out": self.u_out,
            "u_in": self.u_in,
            "scaling": self.scaling,
            "delta": self.delta,
            "psi_eigenvalues": self.psi_eigenvalues,
            "phi_eigenvalues": self.phi_eigenvalues,
        }

    @classmethod
    def from_trace_stats(
        cls,
        delta: Tensor | float,
        delta_phi: Tensor,
        delta_psi: Tensor,
        *,
        sqrt: SquareRoot | None = None,
        scaling: Tensor | str | None = None,
        basis: tuple[Tensor, Tensor] | KroneckerFactors | None = None,
        layout: BlockLayout | None = None,
        name: str = "tekfac",
        eigh: EighPolicy = EXACT_EIGH,
    ) -> "TEKFAC":
        """TEKFAC from TKFAC's unnormalised statistics ``δ``, ``δΦ``, ``δΨ`` (decomposed as
        ``eigh`` says).

        Args:
            basis: ``(U_out, U_in)``, or KFAC factors whose eigenvectors are taken (the
                ``basis="kfac"`` ablation); default the eigenvectors of ``δΨ`` and ``δΦ``.
            sqrt: the block's square root, for ``s* = sqrt.rotated_sq_sum(U_out, U_in)``.
            scaling: ``s`` computed in this basis (overrides ``sqrt``), or ``"kronecker"``:
                TKFAC's own diagonal ``δ λ_Ψ λ_Φᵀ`` in this basis (the optimizers' reset at an
                eigen refresh).
        """
        # a copy: the caller's δ may be a running average that changes in place later
        delta_t = torch.as_tensor(delta, dtype=delta_phi.dtype, device=delta_phi.device).reshape(()).clone()
        inv_delta = 1.0 / delta_t.clamp_min(torch.finfo(delta_phi.dtype).tiny)
        if basis is None:
            mu_psi, u_out = factor_eigh(delta_psi, eigh)
            mu_phi, u_in = factor_eigh(delta_phi, eigh)
        else:
            if isinstance(basis, KroneckerFactors):
                basis = (factor_eigh(basis.G, eigh)[1], factor_eigh(basis.A, eigh)[1])
            u_out, u_in = basis
            mu_psi, mu_phi = diagonal_in_basis(delta_psi, u_out), diagonal_in_basis(delta_phi, u_in)
        if isinstance(scaling, str):
            if scaling != "kronecker":
                raise ValueError(f"TEKFAC.from_trace_stats: scaling={scaling!r}; pass a tensor, 'kronecker' or None")
            root = inv_delta.sqrt()  # on each side: δλ_Ψ δλ_Φᵀ alone overflows float32 from δ ~ 1e19
            scaling = torch.outer(mu_psi * root, mu_phi * root)  # δ λ_Ψ λ_Φᵀ
        elif scaling is None:
            if sqrt is None:
                raise ValueError("TEKFAC.from_trace_stats: pass the block's square root `sqrt` or a `scaling`")
            scaling = optimal_scaling(sqrt, u_out, u_in).to(delta_phi.dtype)
        return cls(
            u_out,
            u_in,
            scaling,
            delta=delta_t,
            psi_eigenvalues=mu_psi * inv_delta,
            phi_eigenvalues=mu_phi * inv_delta,
            layout=layout,
            name=name,
        )

    @classmethod
    def from_stats(  # type: ignore[override]
        cls,
        stats: "LayerStats",
        basis: str = "trace",
        scaling: Tensor | None = None,
        name: str = "tekfac",
        eigh: EighPolicy = EXACT_EIGH,
    ) -> "TEKFAC":
        """TEKFAC of ``stats``: ``stats.tkfac`` for the basis and damping, ``stats.kronecker_sqrt``
        for ``s*`` (as :meth:`EKFAC.from_stats <curvlab.approx.ekfac.EKFAC.from_stats>`).

        Args:
            basis: ``"trace"`` (eigenvectors of δΨ, δΦ; default) or ``"kfac"`` (eigenvectors of
                ``stats.kfac[stats.flavour]``; then TEKFAC equals EKFAC — for ablation).
            scaling: ``s`` already computed in that basis (needed when ``stats.sqrt`` is absent).
        """
        if basis not in TEKFAC_BASES:
            raise ValueError(f"TEKFAC: unknown basis {basis!r}; choose one of {TEKFAC_BASES}")
        if stats.tkfac is None:
            raise missing_statistic(stats, name, "the trace statistics δ, δΦ, δΨ (stats.tkfac)", "stats=('tkfac', ...)")
        if scaling is None and stats.sqrt is None:
            raise missing_statistic(stats, name, "the square root (stats.sqrt) for the rescaling s*", "stats=('sqrt', ...)")
        factors = None
        if basis == "kfac":
            factors = stats.kfac.get(stats.flavour)
            if factors is None:
                raise missing_statistic(
                    stats, name, f"the KFAC factors of flavour {stats.flavour!r} for basis='kfac'",
                    f"stats=('kfac', ...) with kfac_flavours containing {stats.flavour!r}",
                )
        ts = stats.tkfac
        return cls.from_trace_stats(
            ts.delta, ts.delta_phi, ts.delta_psi,
            sqrt=stats.kronecker_sqrt, scaling=scaling, basis=factors, layout=stats.layout, name=name, eigh=eigh,
        )
