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

from curvlab.block import Block
from curvlab.optim.base import KroneckerOptimizer
from curvlab.optim.state import RunningTraces


class TKFAC(KroneckerOptimizer):
    """TKFAC optimizer [C, damping R]: preconditions with ``curvlab.approx.TKFAC`` (see the module
    docstring; options and step order: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state: :class:`~curvlab.optim.state.RunningTraces` (``δ``, ``δΦ``, ``δΨ`` and the
    ``curvlab.approx.TKFAC`` of the averages at the last refresh).
    """

    method = "tkfac"
    trace_factored = True

    def new_state(self, block: Block) -> RunningTraces:
        return RunningTraces(block.layout, "tkfac", eigh=self.options.eigh_policy())
