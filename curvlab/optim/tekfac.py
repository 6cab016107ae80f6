"""TEKFAC [R — reconstruction] (Gao, Liu et al. 2020, arXiv 2011.13609; curvature-math §4).

The paper's method section could not be read; this is the reconstruction from its abstract
("corrects the inexact re-scaling factor under the Kronecker-factored eigenbasis" and "considers
the new approximation method and the effective damping technique" of TKFAC):

1. every ``stats_interval`` steps: running averages of TKFAC's *unnormalised* statistics
   ``δ = Σ_k ‖M_k‖²``, ``δΦ = Σ_k M_kᵀ M_k``, ``δΨ = Σ_k M_k M_kᵀ`` (MC Fisher by default);
2. every ``eigen_interval`` steps: ``δΨ = U_Ψ diag(δ λ_Ψ) U_Ψᵀ``, ``δΦ = U_Φ diag(δ λ_Φ) U_Φᵀ``
   (float64 ``eigh``); the basis becomes ``Q = U_Ψ ⊗ U_Φ`` and ``s`` is reset to
   ``δ λ_Ψ λ_Φᵀ`` — TKFAC in its own eigenbasis;
3. every ``scale_interval`` steps (not refresh steps): ``s ← β s + (1 − β) Σ_k (U_Ψᵀ M_k U_Φ)²``,
   the eigenvalue correction, computed inside the BackPACK pass;
4. each step: ``∇̃ = curvlab.approx.TEKFAC(U_Ψ, U_Φ, s, δ, λ_Ψ, λ_Φ).inv_mat_mul(∇W̄, λ,
   strategy)``, then KL clipping, weight decay, momentum as for every method here.

Damping [R]: ``"nor"`` by default — ``K̂ + [(√δΨ + √λ I) ⊗ (√δΦ + √λ I) − δ Ψ⊗Φ]``, i.e.
``s + √λ (√δ λ_Ψ ⊕ √δ λ_Φ) + λ`` with ``δ``, ``λ_Ψ``, ``λ_Φ`` taken at the last refresh;
``"exact"`` and ``"trace-relative"`` are the alternatives to ablate.

``basis="kfac"`` (ablation): the eigenbasis of the KFAC factors ``G``, ``A`` (which are then
averaged too) instead of ``U_Ψ ⊗ U_Φ``; ``s`` is reset to TKFAC's diagonal in that basis,
``δ λ_Ψ λ_Φᵀ`` with ``λ_Ψ = diag(U_Gᵀ Ψ U_G)``, ``λ_Φ = diag(U_Aᵀ Φ U_A)``.  With the rescaling,
this isolates the effect of the basis against EKFAC (only the reset and the damping differ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.approx import TEKFAC as TEKFACApprox
from curvlab.approx import KroneckerApproximation
from curvlab.approx.tekfac import TEKFAC_BASES
from curvlab.extract import LayerStats
from curvlab.optim.base import Block, EigenCorrectedOptimizer, accumulate_kfac, accumulate_trace, robust_eigh


def _diag_in_basis(mat: Tensor, u: Tensor) -> Tensor:
    """``diag(Uᵀ M U)`` (clamped at 0: ``M`` is PSD)."""
    return ((mat @ u) * u).sum(0).clamp_min(0)


class TEKFAC(EigenCorrectedOptimizer):
    """TEKFAC optimizer [R]: preconditions with ``curvlab.approx.TEKFAC`` (see the module docstring;
    arguments and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Args:
        basis: ``"trace"`` (default: eigenvectors of δΨ, δΦ) or ``"kfac"`` (eigenvectors of the
            KFAC factors; ablation).
        **kwargs: as :class:`~curvlab.optim.base.KroneckerOptimizer`.

    Per-block state: ``delta``, ``delta_phi``, ``delta_psi`` (running averages; plus ``A``, ``G``
    for ``basis="kfac"``), ``u_out`` (``U_Ψ``), ``u_in`` (``U_Φ``), ``scaling`` (``s``),
    ``basis_delta``, ``psi_ev``, ``phi_ev`` (``δ``, ``λ_Ψ``, ``λ_Φ`` at the last refresh),
    ``momentum_buffer``.
    """

    method = "tekfac"
    trace_factored = True

    def __init__(self, model: nn.Module, params: Any = None, *, basis: str = "trace", **kwargs: Any) -> None:
        if basis not in TEKFAC_BASES:
            raise ValueError(f"TEKFAC: basis={basis!r}; choose one of {TEKFAC_BASES}")
        self.basis = basis
        super().__init__(model, params, **kwargs)

    def stat_kinds(self) -> tuple[str, ...]:
        return ("tkfac",) if self.basis == "trace" else ("tkfac", "kfac")

    def _accumulate(self, state: dict[str, Any], stats: LayerStats) -> None:
        accumulate_trace(state, stats, self.stat_decay)
        if self.basis == "kfac":
            accumulate_kfac(state, stats, self.fisher, self.stat_decay)

    def _has_stats(self, state: dict[str, Any]) -> bool:
        return "delta" in state and (self.basis == "trace" or "A" in state)

    def _refresh(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        delta, d_phi, d_psi = state["delta"], state["delta_phi"], state["delta_psi"]
        if self.basis == "trace":
            mu_psi, u_out = robust_eigh(d_psi, f"δΨ of {block.name!r}")
            mu_phi, u_in = robust_eigh(d_phi, f"δΦ of {block.name!r}")
        else:
            u_out = robust_eigh(state["G"], f"G of {block.name!r}")[1]
            u_in = robust_eigh(state["A"], f"A of {block.name!r}")[1]
            mu_psi, mu_phi = _diag_in_basis(d_psi, u_out), _diag_in_basis(d_phi, u_in)
        inv_delta = 1.0 / delta.clamp_min(torch.finfo(delta.dtype).tiny)
        state["u_out"], state["u_in"] = u_out, u_in
        state["basis_delta"] = delta.clone()
        state["psi_ev"], state["phi_ev"] = mu_psi * inv_delta, mu_phi * inv_delta
        state["scaling"] = torch.outer(mu_psi, mu_phi) * inv_delta  # δ λ_Ψ λ_Φᵀ
        return self._build(state, block)

    def _build(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        return TEKFACApprox(
            state["u_out"],
            state["u_in"],
            state["scaling"],
            delta=state["basis_delta"],
            psi_eigenvalues=state["psi_ev"],
            phi_eigenvalues=state["phi_ev"],
            layout=block.layout,
            name="tekfac",
        )
