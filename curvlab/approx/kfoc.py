"""KFOC: the Frobenius-optimal single Kronecker product ``B ⊗ C ≈ F`` (Van Loan & Pitsianis 1993).

With the rearrangement ``R(F)[(i,k),(j,l)] = F[(i,j),(k,l)]`` (row-major ``W̄`` indices),
``R(B ⊗ C) = vec(B) vec(C)ᵀ``, so ``min ‖F − B ⊗ C‖_F = min ‖R(F) − vec B vec Cᵀ‖_F`` is solved by
the top singular pair of ``R(F)``.  Matrix-free, from the square root ``F = Σ_k vec M_k vec M_kᵀ``:

    R(F) vec C  = vec Σ_k M_k C M_kᵀ  = sqrt.sandwich_out(C)   ([d_out, d_out]),
    R(F)ᵀ vec B = vec Σ_k M_kᵀ B M_k  = sqrt.sandwich_in(B)    ([D, D]).

Alternating power iteration ``B ← R c / ‖R c‖``, ``c ← Rᵀ B / ‖Rᵀ B‖`` converges to the top pair
at rate ``(σ₂/σ₁)²``.  Both maps send PSD matrices to PSD matrices, so a PSD start (identity or the
KFAC factors) keeps ``B`` and ``C`` PSD.  KFOC is a reference floor: no single Kronecker product
(KFAC, KFLR, TKFAC) has a smaller Frobenius error.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import symmetrize
from curvlab.approx.families import KroneckerProduct
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot

if TYPE_CHECKING:
    from curvlab.stats import LayerStats

#: Starting points accepted by :meth:`KFOC.from_stats`.
KFOC_INITS = ("auto", "kfac", "identity")


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative change of the normalised ``C`` at which the power iteration stops."""
    return 1e-12 if dtype == torch.float64 else 1e-5


class KFOC(KroneckerProduct):
    """``K̂ = B ⊗ C`` (``B`` output side, ``C`` input side).

    Args:
        B: ``[d_out, d_out]`` symmetric PSD.
        C: ``[D, D]`` symmetric PSD.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.
        converged: whether the power iteration that produced ``B``, ``C`` converged.
        iterations: its number of iterations.
        residual: its last relative change ``‖ĉ_new − ĉ_old‖_F`` (``ĉ = C/‖C‖_F``).

    Use :meth:`fit` (or :meth:`from_stats`) to compute the optimal pair.
    """

    def __init__(
        self,
        B: Tensor,
        C: Tensor,
        *,
        layout: BlockLayout | None = None,
        name: str = "kfoc",
        converged: bool = True,
        iterations: int = 0,
        residual: float = 0.0,
    ) -> None:
        super().__init__(B, C, None, layout, name)
        self.converged = converged
        self.iterations = iterations
        self.residual = residual

    @property
    def B(self) -> Tensor:
        """Output-side factor ``[d_out, d_out]``."""
        return self._left

    @property
    def C(self) -> Tensor:
        """Input-side factor ``[D, D]``."""
        return self._right

    def options(self) -> dict[str, object]:
        return {}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "KFOC":
        return KFOC(
            self.B.to(dtype=dtype, device=device),
            self.C.to(dtype=dtype, device=device),
            layout=self.layout,
            name=self.name,
            converged=self.converged,
            iterations=self.iterations,
            residual=self.residual,
        )

    @classmethod
    def fit(
        cls,
        sqrt: SquareRoot,
        *,
        init: Tensor | None = None,
        tol: float | None = None,
        max_iter: int = 1000,
        compute_dtype: torch.dtype | None = torch.float64,
        layout: BlockLayout | None = None,
        name: str = "kfoc",
        warn: bool = True,
    ) -> "KFOC":
        """Top singular pair of ``R(F)`` by alternating power iteration.

        Args:
            sqrt: the block's square root.
            init: starting input-side factor ``C₀`` (``[D, D]``, PSD); default (and fallback for a
                zero ``init``) the identity.
            tol: stop when ``‖ĉ_new − ĉ_old‖_F ≤ tol`` (``ĉ`` unit-norm); default 1e-12 in float64,
                1e-5 otherwise.
            max_iter: iteration cap; if reached, the result has ``converged=False`` and a
                ``RuntimeWarning`` is issued (when ``warn``).
            compute_dtype: dtype of the iteration (default float64); ``None`` keeps ``sqrt``'s.
                The result is returned in ``sqrt``'s dtype.
            layout: the block's layout.
            name: label.
            warn: warn when not converged.

        The scale is split evenly: ``‖B‖_F = ‖C‖_F = √σ₁``.
        """
        out_dtype = sqrt.dtype
        work = sqrt if compute_dtype is None or compute_dtype == sqrt.dtype else sqrt.to(dtype=compute_dtype)
        dtype, device = work.dtype, work.device
        tol = default_tolerance(dtype) if tol is None else tol
        d_out, d_in = work.shape

        eye = torch.eye(d_in, dtype=dtype, device=device)
        c = eye if init is None else symmetrize(init.to(dtype=dtype, device=device))
        c_norm = torch.linalg.matrix_norm(c)
        if not c_norm > 0:  # a zero start (dead layer's KFAC factor) cannot move
            c, c_norm = eye, torch.linalg.matrix_norm(eye)
        c = c / c_norm

        converged, residual, iterations = False, float("inf"), 0
        zero = False
        for iterations in range(1, max_iter + 1):
            b = work.sandwich_out(c)
            b_norm = torch.linalg.matrix_norm(b)
            if not b_norm > 0:  # F = 0 (or orthogonal to the start): the optimum is 0
                zero, converged, residual = True, True, 0.0
                break
            c_new = symmetrize(work.sandwich_in(b / b_norm))
            c_new = c_new / torch.linalg.matrix_norm(c_new)
            residual = float(torch.linalg.matrix_norm(c_new - c))
            c = c_new
            if residual <= tol:
                converged = True
                break

        if zero:
            big_b = torch.zeros(d_out, d_out, dtype=dtype, device=device)
            big_c = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        else:
            # Least-squares optimal B for the final C: B = R(F) vec ĉ; then balance the norms.
            b = symmetrize(work.sandwich_out(c))
            sigma = torch.linalg.matrix_norm(b)
            if torch.trace(c) < 0:  # sign convention: both factors PSD
                b, c = -b, -c
            root = sigma.sqrt()
            big_b = b / sigma * root
            big_c = c * root

        if not converged and warn:
            warnings.warn(
                f"KFOC {name!r}: power iteration did not converge in {max_iter} iterations "
                f"(last relative change {residual:.3g} > tol {tol:.3g})",
                RuntimeWarning,
                stacklevel=2,
            )
        return cls(
            big_b.to(out_dtype),
            big_c.to(out_dtype),
            layout=layout,
            name=name,
            converged=converged,
            iterations=iterations,
            residual=residual,
        )

    @classmethod
    def from_stats(  # type: ignore[override]
        cls,
        stats: "LayerStats",
        init: str = "auto",
        tol: float | None = None,
        max_iter: int = 1000,
        compute_dtype: torch.dtype | None = torch.float64,
        name: str = "kfoc",
    ) -> "KFOC":
        """KFOC of ``stats.sqrt``.

        Args:
            init: ``"kfac"`` (start from ``stats.kfac[stats.flavour].A``), ``"identity"``, or
                ``"auto"`` (the KFAC factor when extracted, else the identity).
        """
        if init not in KFOC_INITS:
            raise ValueError(f"KFOC: unknown init {init!r}; choose one of {KFOC_INITS}")
        if stats.sqrt is None:
            raise missing_statistic(stats, name, "the square root (stats.sqrt)", "stats=('sqrt', ...)")
        factors = stats.kfac.get(stats.flavour)
        if init == "kfac" and factors is None:
            raise missing_statistic(
                stats, name, f"the KFAC factors of flavour {stats.flavour!r} for init='kfac'",
                f"stats=('kfac', ...) with kfac_flavours containing {stats.flavour!r}",
            )
        start = factors.A if init != "identity" and factors is not None else None
        return cls.fit(
            stats.sqrt, init=start, tol=tol, max_iter=max_iter, compute_dtype=compute_dtype,
            layout=stats.layout, name=name,
        )
