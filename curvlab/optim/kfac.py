"""KFAC [C] (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016).

Preconditioner: the damped inverse of ``curvlab.approx.KFAC(A, G)``, ``K̂ = G ⊗ A`` (row-major on
``W̄ = [W b]``), with

* ``A = EMA[1/(N·T) Σ ā āᵀ]``, ``G = EMA[Σ g gᵀ]`` of the chosen Fisher flavour (``fisher="mc"``:
  KFAC; ``fisher="exact"``: KFLR factors), averaged every ``stats_interval`` steps;
* the object rebuilt from the averages every ``eigen_interval`` steps (the inverse interval: its
  damped inverse is computed once per rebuild and kept with it);
* damping: ``"factored"`` by default, ``(G + √λ/π I) ⊗ (A + π√λ I)`` [C], inverted factor by
  factor (Cholesky, in ``factor_dtype``: two GEMMs a step, no eigen-decomposition); factors above
  ``truncate_above`` are replaced by a truncated eigen-decomposition (rank ``truncation_rank``
  plus a flat remainder), which then defines the approximation.
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
