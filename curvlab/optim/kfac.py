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

import warnings
from typing import Any

import torch

from curvlab.approx import KFAC as KFACApprox
from curvlab.approx import KroneckerApproximation
from curvlab.approx.kfac import FLAVOUR_NAMES
from curvlab.extract import LayerStats
from curvlab.optim.base import EIGH_JITTER, Block, KroneckerOptimizer, accumulate_kfac


def decomposed(make: Any, factors: list[torch.Tensor], what: str) -> tuple[KroneckerApproximation, list[torch.Tensor]]:
    """``make(*factors)`` with its eigen-decomposition computed now; on failure, retried once
    with a small relative jitter on every factor (warned).  Returns the object and the factors
    it was built from."""
    approx = make(*factors)
    try:
        approx.eigenbasis()
        return approx, factors
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        jittered = []
        for f in factors:
            if f.dim() == 2:
                eps = EIGH_JITTER * (f.diagonal().abs().mean().item() + torch.finfo(f.dtype).tiny)
                f = f + eps * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
            jittered.append(f)
        warnings.warn(
            f"curvlab.optim: eigen-decomposition of {what} failed ({err}); retrying with a "
            f"relative jitter of {EIGH_JITTER:g}·I",
            RuntimeWarning,
            stacklevel=4,
        )
        approx = make(*jittered)
        approx.eigenbasis()
        return approx, jittered


class KFAC(KroneckerOptimizer):
    """KFAC optimizer [C]: preconditions with ``curvlab.approx.KFAC`` (see the module docstring;
    arguments and the order of a step: :class:`~curvlab.optim.base.KroneckerOptimizer`).

    Per-block state (``opt.state[layer.weight]``): ``A``, ``G`` (running averages), ``inv_A``,
    ``inv_G`` (the averages at the last refresh: what is inverted), ``momentum_buffer``.
    """

    method = "kfac"

    def stat_kinds(self) -> tuple[str, ...]:
        return ("kfac",)

    def _accumulate(self, state: dict[str, Any], stats: LayerStats) -> None:
        accumulate_kfac(state, stats, self.fisher, self.stat_decay)

    def _has_stats(self, state: dict[str, Any]) -> bool:
        return "A" in state

    def _has_inverse(self, state: dict[str, Any]) -> bool:
        return "inv_A" in state

    def _make(self, block: Block) -> Any:
        name = FLAVOUR_NAMES.get(self.fisher, f"kfac-{self.fisher}")
        return lambda A, G: KFACApprox(A, G, layout=block.layout, name=name)

    def _refresh(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        approx, (A, G) = decomposed(
            self._make(block), [state["A"].clone(), state["G"].clone()], f"the KFAC factors of {block.name!r}"
        )
        state["inv_A"], state["inv_G"] = A, G
        return approx

    def _build(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        return self._make(block)(state["inv_A"], state["inv_G"])
