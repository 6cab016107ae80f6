"""TEKFAC [R — reconstruction] (Gao, Liu et al. 2020, arXiv 2011.13609; curvature-math §4).

The paper's method section could not be read; this is the reconstruction from its abstract
("corrects the inexact re-scaling factor under the Kronecker-factored eigenbasis" and "considers
the new approximation method and the effective damping technique" of TKFAC):

1. every ``stats_interval`` steps: running averages of TKFAC's *unnormalised* statistics
   ``δ = Σ_k ‖M_k‖²``, ``δΦ = Σ_k M_kᵀ M_k``, ``δΨ = Σ_k M_k M_kᵀ`` (MC Fisher by default);
2. every ``eigen_interval`` steps: ``δΨ = U_Ψ diag(δ λ_Ψ) U_Ψᵀ``, ``δΦ = U_Φ diag(δ λ_Φ) U_Φᵀ``
   (``eigh`` in ``factor_dtype``, truncated above ``truncate_above``); the basis becomes ``Q = U_Ψ ⊗ U_Φ`` and ``s`` is reset to
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

from curvlab.block import Block
from curvlab.optim.base import KroneckerOptimizer
from curvlab.optim.state import RunningFactors, RunningTraces, TEKFACBasis


class TEKFAC(KroneckerOptimizer):
    """TEKFAC optimizer [R]: preconditions with ``curvlab.approx.TEKFAC`` (see the module docstring;
    options and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`; the option
    ``basis``: ``"trace"`` (default, eigenvectors of δΨ, δΦ) or ``"kfac"`` (ablation)).

    Per-block state: :class:`~curvlab.optim.state.TEKFACBasis` (running ``δ``, ``δΦ``, ``δΨ``,
    plus ``A``, ``G`` for ``basis="kfac"``, and the ``curvlab.approx.TEKFAC`` with its eigenbasis,
    scaling ``s`` and the ``δ``, ``λ_Ψ``, ``λ_Φ`` of the last refresh for the damping).
    """

    method = "tekfac"
    trace_factored = True
    has_basis_option = True
    rescales = True

    def new_state(self, block: Block) -> TEKFACBasis:
        o, eigh = self.options, self.options.eigh_policy()
        factors = RunningFactors(block.layout, o.fisher, o.fisher, eigh=eigh) if o.basis == "kfac" else None
        return TEKFACBasis(block.layout, "tekfac", RunningTraces(block.layout, "tkfac", eigh=eigh), factors, eigh=eigh)
