"""EKFAC [C] (George et al. 2018; curvature-math §2).

Preconditioner: the damped inverse of ``curvlab.approx.EKFAC(U_G, U_A, s)``,
``K̂ = (U_G ⊗ U_A) diag(s) (U_G ⊗ U_A)ᵀ``, where

* ``A``, ``G``: running averages of the KFAC factors (every ``stats_interval`` steps);
* every ``eigen_interval`` steps ``A = U_A Λ_A U_Aᵀ``, ``G = U_G Λ_G U_Gᵀ`` (float64 ``eigh``) and
  ``s`` is reset to the KFAC eigenvalues ``λ_G λ_Aᵀ``;
* every ``scale_interval`` steps (not refresh steps) ``s ← β s + (1 − β) Σ_k (U_Gᵀ M_k U_A)²``,
  the squared projections computed inside the BackPACK pass (no per-sample gradients stored);
* damping: ``"exact"`` by default (``s + λ``) [C]; ``"factored"`` uses ``λ_G``, ``λ_A``.
"""

from __future__ import annotations

from typing import Any

import torch

from curvlab.approx import EKFAC as EKFACApprox
from curvlab.approx import KroneckerApproximation
from curvlab.extract import LayerStats
from curvlab.optim.base import Block, EigenCorrectedOptimizer, accumulate_kfac, robust_eigh


class EKFAC(EigenCorrectedOptimizer):
    """EKFAC optimizer [C]: preconditions with ``curvlab.approx.EKFAC`` (see the module docstring;
    arguments and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state: ``A``, ``G`` (running averages), ``u_out`` (``U_G``), ``u_in`` (``U_A``),
    ``lam_out`` (``λ_G``), ``lam_in`` (``λ_A``), ``scaling`` (``s``), ``momentum_buffer``.
    """

    method = "ekfac"

    def stat_kinds(self) -> tuple[str, ...]:
        return ("kfac",)

    def _accumulate(self, state: dict[str, Any], stats: LayerStats) -> None:
        accumulate_kfac(state, stats, self.fisher, self.stat_decay)

    def _has_stats(self, state: dict[str, Any]) -> bool:
        return "A" in state

    def _refresh(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        lam_g, u_g = robust_eigh(state["G"], f"G of {block.name!r}")
        lam_a, u_a = robust_eigh(state["A"], f"A of {block.name!r}")
        state["u_out"], state["u_in"], state["lam_out"], state["lam_in"] = u_g, u_a, lam_g, lam_a
        state["scaling"] = torch.outer(lam_g, lam_a)
        return self._build(state, block)

    def _build(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        return EKFACApprox(
            state["u_out"],
            state["u_in"],
            state["scaling"],
            factor_eigenvalues=(state["lam_out"], state["lam_in"]),
            layout=block.layout,
            name="ekfac",
        )
