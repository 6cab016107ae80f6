"""TKFAC [C definitions; damping R] (Gao et al., AAAI 2021; curvature-math §3).

Preconditioner: the damped inverse of ``curvlab.approx.TKFAC(δ, δΦ, δΨ)``,
``K̂ = (δΨ ⊗ δΦ)/δ`` with ``tr K̂ = δ = tr F``, where

* ``δ = EMA[Σ_k ‖M_k‖²]``, ``δΦ = EMA[Σ_k M_kᵀ M_k]``, ``δΨ = EMA[Σ_k M_k M_kᵀ]`` are averaged
  *unnormalised* every ``stats_interval`` steps (averaging ``Φ``, ``Ψ`` after normalising would
  break the trace identity) — for convolutions the exact partial traces of the extraction;
* the object is rebuilt from the averages every ``eigen_interval`` steps (inverse interval);
* damping: ``"nor"`` by default, ``(√δ Ψ + √λ I) ⊗ (√δ Φ + √λ I)`` — a reconstruction [R]: the
  paper's own damping for CNNs is unknown (``"trace-relative"`` is the candidate to ablate).
"""

from __future__ import annotations

from typing import Any

from curvlab.approx import TKFAC as TKFACApprox
from curvlab.approx import KroneckerApproximation
from curvlab.extract import LayerStats
from curvlab.optim.base import Block, KroneckerOptimizer, accumulate_trace
from curvlab.optim.kfac import decomposed


class TKFAC(KroneckerOptimizer):
    """TKFAC optimizer [C, damping R]: preconditions with ``curvlab.approx.TKFAC`` (see the module
    docstring; arguments and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state: ``delta``, ``delta_phi``, ``delta_psi`` (running averages), ``inv_delta``,
    ``inv_delta_phi``, ``inv_delta_psi`` (the averages at the last refresh), ``momentum_buffer``.
    """

    method = "tkfac"
    trace_factored = True

    def stat_kinds(self) -> tuple[str, ...]:
        return ("tkfac",)

    def _accumulate(self, state: dict[str, Any], stats: LayerStats) -> None:
        accumulate_trace(state, stats, self.stat_decay)

    def _has_stats(self, state: dict[str, Any]) -> bool:
        return "delta" in state

    def _has_inverse(self, state: dict[str, Any]) -> bool:
        return "inv_delta" in state

    @staticmethod
    def _make(block: Block) -> Any:
        return lambda d, phi, psi: TKFACApprox(d, phi, psi, layout=block.layout, name="tkfac")

    def _refresh(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        approx, (d, phi, psi) = decomposed(
            self._make(block),
            [state["delta"].clone(), state["delta_phi"].clone(), state["delta_psi"].clone()],
            f"the TKFAC factors of {block.name!r}",
        )
        state["inv_delta"], state["inv_delta_phi"], state["inv_delta_psi"] = d, phi, psi
        return approx

    def _build(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        return self._make(block)(state["inv_delta"], state["inv_delta_phi"], state["inv_delta_psi"])
