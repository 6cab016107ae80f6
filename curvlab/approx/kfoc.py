"""KFOC: the Frobenius-optimal single Kronecker product ``B ⊗ C ≈ F`` (Van Loan & Pitsianis 1993).

With the rearrangement ``R(F)[(i,k),(j,l)] = F[(i,j),(k,l)]`` (row-major ``W̄`` indices),
``R(B ⊗ C) = vec(B) vec(C)ᵀ``, so ``min ‖F − B ⊗ C‖_F = min ‖R(F) − vec B vec Cᵀ‖_F`` is solved by
the top singular pair of ``R(F)``.  Matrix-free, from the square root ``F = Σ_k vec M_k vec M_kᵀ``:

    R(F) vec C  = vec Σ_k M_k C M_kᵀ  = sqrt.sandwich_out(C)   ([d_out, d_out]),
    R(F)ᵀ vec B = vec Σ_k M_kᵀ B M_k  = sqrt.sandwich_in(B)    ([D, D]).

The top pair is found by Golub–Kahan–Lanczos bidiagonalisation of ``R`` from a PSD start (the
KFAC factor or the identity), with full reorthogonalisation and explicit restarts: one ``R`` and
one ``Rᵀ`` product a step, as alternating power iteration (``B ← R c``, ``c ← Rᵀ B``), which
converges at the rate ``(σ₂/σ₁)²`` — on vit-tiny's blocks Lanczos met the same tolerance in 6
steps where power iteration took 7–19.  Both maps send PSD matrices to PSD matrices and the top
pair of ``R`` is PSD, so ``B`` and ``C`` are PSD up to the tolerance.  Inside a
:func:`~curvlab.approx.eigh.within_span` scope whose span ``Q`` (``[D, r]``) holds the root's
input rows (a comparison's batch narrower than the layer), every ``M_k = M_k Q Qᵀ``: the pair is
fitted to the root ``M_k Q`` (``r × r`` input-side iterates) and ``C = Q C̃ Qᵀ``.  KFOC is a reference floor:
no single Kronecker product (KFAC, KFLR, TKFAC) has a smaller Frobenius error.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.approx.base import missing_statistic
from curvlab.approx.eigh import span_of_inputs, symmetrize
from curvlab.approx.families import KroneckerProduct
from curvlab.block import BlockLayout
from curvlab.sqrt import SquareRoot

if TYPE_CHECKING:
    from curvlab.stats import LayerStats

#: Starting points accepted by :meth:`KFOC.from_stats`.
KFOC_INITS = ("auto", "kfac", "identity")


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative residual of the top singular pair at which the iteration stops."""
    return 1e-12 if dtype == torch.float64 else 1e-5


#: Elements the Lanczos vectors of one fit may hold (then it restarts), between 3 and
#: :data:`MAX_LANCZOS_STEPS` vectors: a 10 × 8193 block's ``C`` alone has 6.7·10⁷.
LANCZOS_ELEMENTS = 2**27
MAX_LANCZOS_STEPS = 20


class KFOC(KroneckerProduct):
    """``K̂ = B ⊗ C`` (``B`` output side, ``C`` input side).

    Args:
        B: ``[d_out, d_out]`` symmetric PSD.
        C: ``[D, D]`` symmetric PSD.
        layout: the block's layout (default: plain weight, no bias column).
        name: label.
        converged: whether the iteration that produced ``B``, ``C`` converged.
        iterations: its number of steps (one ``R(F)`` and one ``R(F)ᵀ`` product each).
        residual: its last relative residual ``‖R(F)ᵀ b̂ − σ ĉ‖_F / σ`` (unit-norm ``b̂``, ``ĉ``).

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

    def _converted(self, dtype: torch.dtype | None, device: torch.device | str | None) -> "KFOC":
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
        """Top singular pair of ``R(F)`` by Lanczos bidiagonalisation (module docstring).

        Args:
            sqrt: the block's square root.
            init: starting input-side factor ``C₀`` (``[D, D]``, PSD); default (and fallback for a
                zero ``init``) the identity.
            tol: stop when the relative residual ``‖R(F)ᵀ b̂ − σ ĉ‖_F / σ ≤ tol``; default 1e-12
                in float64, 1e-5 otherwise.
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

        basis = span_of_inputs(work)
        if basis is not None:  # every M_k = M_k Q Qᵀ: the pair of F in the span's r coordinates, C = Q C̃ Qᵀ
            start = None if init is None else basis.mT @ init.to(dtype=dtype, device=device) @ basis
            reduced = cls.fit(work.in_input_basis(basis), init=start, tol=tol, max_iter=max_iter,
                              compute_dtype=None, name=name, warn=warn)
            return cls(reduced.B.to(out_dtype), symmetrize(basis @ reduced.C @ basis.mT).to(out_dtype),
                       layout=layout, name=name, converged=reduced.converged, iterations=reduced.iterations,
                       residual=reduced.residual)

        eye = torch.eye(d_in, dtype=dtype, device=device)
        c = eye if init is None else symmetrize(init.to(dtype=dtype, device=device))
        c_norm = torch.linalg.matrix_norm(c)
        if not c_norm > 0:  # a zero start (dead layer's KFAC factor) cannot move
            c, c_norm = eye, torch.linalg.matrix_norm(eye)
        c = c / c_norm

        c, iterations, residual = _top_right_vector(work, c, tol, max_iter)
        converged = residual <= tol
        zero = c is None  # F = 0 (or orthogonal to the start): the optimum is 0

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
                f"KFOC {name!r}: the iteration did not converge in {max_iter} steps "
                f"(last relative residual {residual:.3g} > tol {tol:.3g})",
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


def _top_right_vector(sqrt: SquareRoot, start: Tensor, tol: float,
                      max_iter: int) -> tuple[Tensor | None, int, float]:
    """The top right singular vector ``ĉ`` of ``R(F)`` (unit Frobenius norm; ``None`` when
    ``R(F) start = 0``), the steps taken and the last relative residual.

    Golub–Kahan–Lanczos from ``start``: ``R V = U Bₖ``, ``Rᵀ U = V Bₖᵀ + βₖ vₖ₊₁ eₖᵀ`` with ``Bₖ``
    upper bidiagonal; the top singular triplet ``(σ, p, q)`` of ``Bₖ`` gives ``ĉ = V q`` with the
    residual ``‖Rᵀ U p − σ V q‖ = βₖ |p_k|``.  Full reorthogonalisation (the vectors are few); a
    restart from ``ĉ`` when the basis reaches its size (:data:`LANCZOS_ELEMENTS`)."""
    d_out, d_in = sqrt.shape
    size = max(3, min(MAX_LANCZOS_STEPS, LANCZOS_ELEMENTS // (d_out * d_out + d_in * d_in)))
    c = start / torch.linalg.matrix_norm(start)
    steps, residual = 0, float("inf")
    while steps < max_iter and residual > tol:
        vs, us, alphas, betas = [c], [], [], []
        while True:
            steps += 1
            u = symmetrize(sqrt.sandwich_out(vs[-1]))  # exactly symmetric: the sandwiches' fast route
            if us:
                u = _orthogonalised(u - betas[-1] * us[-1], us)
            alpha = torch.linalg.matrix_norm(u)
            exact = not alpha > 0  # R maps span(V) into span(U): Bₖ's triplet is R's
            if exact and steps == 1:
                return None, steps, 0.0
            alphas.append(alpha.new_zeros(()) if exact else alpha)
            if exact:
                betas.append(alpha.new_zeros(()))
            else:
                us.append(u / alpha)
                v = _orthogonalised(symmetrize(sqrt.sandwich_in(us[-1])) - alpha * vs[-1], vs)
                betas.append(torch.linalg.matrix_norm(v))
            p, sigma, q = _top_singular_triplet(alphas, betas)
            residual = 0.0 if exact else float(betas[-1] * p[-1].abs() / sigma)
            if residual <= tol or steps == max_iter or len(vs) == size:
                break
            vs.append(v / betas[-1])
        c = sum(qi * vi for qi, vi in zip(q, vs))
        c = c / torch.linalg.matrix_norm(c)
    return c, steps, residual


def _orthogonalised(x: Tensor, basis: list[Tensor]) -> Tensor:
    """``x`` minus its components along the orthonormal ``basis`` (twice: classical Gram–Schmidt
    loses orthogonality once)."""
    for _ in range(2):
        for e in basis:
            x = x - (e * x).sum() * e
    return x


def _top_singular_triplet(alphas: list[Tensor], betas: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, σ, q)``: the top singular triplet of the upper bidiagonal ``Bₖ`` (``alphas`` on the
    diagonal, the first ``k − 1`` of ``betas`` above it)."""
    k = len(alphas)
    b = torch.diag(torch.stack(alphas))
    if k > 1:
        b = b + torch.diag(torch.stack(betas[:k - 1]), 1)
    p, s, qh = torch.linalg.svd(b)
    return p[:, 0], s[0], qh[0]
