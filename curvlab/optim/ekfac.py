"""EKFAC [C] (George et al. 2018; curvature-math §2).

Preconditioner: the damped inverse of ``curvlab.approx.EKFAC(U_G, U_A, s)``,
``K̂ = (U_G ⊗ U_A) diag(s) (U_G ⊗ U_A)ᵀ``, where

* ``A``, ``G``: running averages of the KFAC factors (every ``stats_interval`` steps);
* every ``eigen_interval`` steps ``A = U_A Λ_A U_Aᵀ``, ``G = U_G Λ_G U_Gᵀ`` (``eigh`` in
  ``factor_dtype``; a truncated eigenbasis above ``truncate_above``) and ``s`` is reset to the
  KFAC eigenvalues ``λ_G λ_Aᵀ``;
* every ``scale_interval`` steps (not refresh steps) ``s ← β s + (1 − β) Σ_k (U_Gᵀ M_k U_A)²``,
  the squared projections computed inside the BackPACK pass (no per-sample gradients stored);
* damping: ``"exact"`` by default (``s + λ``) [C]; ``"factored"`` uses ``λ_G``, ``λ_A``.
"""

from __future__ import annotations

from curvlab.block import Block
from curvlab.optim.base import KroneckerOptimizer
from curvlab.optim.state import EKFACBasis, RunningFactors


class EKFAC(KroneckerOptimizer):
    """EKFAC optimizer [C]: preconditions with ``curvlab.approx.EKFAC`` (see the module docstring;
    options and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state: :class:`~curvlab.optim.state.EKFACBasis` (running ``A``, ``G`` and the
    ``curvlab.approx.EKFAC`` with its eigenbasis and scaling ``s``).
    """

    method = "ekfac"
    rescales = True

    def new_state(self, block: Block) -> EKFACBasis:
        flavour = self.options.fisher
        eigh = self.options.eigh_policy()
        return EKFACBasis(block.layout, "ekfac", RunningFactors(block.layout, flavour, flavour, eigh=eigh), eigh=eigh)
