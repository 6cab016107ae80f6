"""KFAC [C] (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016).

Preconditioner: the damped inverse of ``curvlab.approx.KFAC(A, G)``, ``K̂ = G ⊗ A`` (row-major on
``W̄ = [W b]``), with

* ``A = EMA[1/(N·T) Σ ā āᵀ]``, ``G = EMA[Σ g gᵀ]`` of the chosen Fisher flavour (``fisher="mc"``:
  KFAC; ``fisher="exact"``: KFLR factors), averaged every ``stats_interval`` steps;
* the object rebuilt from the averages every ``eigen_interval`` steps (the inverse interval: its
  factor eigen-decompositions are computed once per rebuild and cached);
* damping: ``"factored"`` by default, ``(G + √λ/π I) ⊗ (A + π√λ I)`` [C].
"""

from __future__ import annotations

from curvlab.approx.kfac import FLAVOUR_NAMES
from curvlab.block import Block
from curvlab.optim.base import KroneckerOptimizer
from curvlab.optim.state import RunningFactors


class KFAC(KroneckerOptimizer):
    """KFAC optimizer [C]: preconditions with ``curvlab.approx.KFAC`` (see the module docstring;
    options and the order of a step: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state: :class:`~curvlab.optim.state.RunningFactors` (``A``, ``G`` and the
    ``curvlab.approx.KFAC`` of the averages at the last refresh).
    """

    method = "kfac"

    def new_state(self, block: Block) -> RunningFactors:
        flavour = self.options.fisher
        return RunningFactors(block.layout, FLAVOUR_NAMES.get(flavour, f"kfac-{flavour}"), flavour,
                              eigh=self.options.eigh_policy())
