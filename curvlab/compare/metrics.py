"""Exact, matrix-free quality metrics of one approximation of one block [D].

Everything comes from the ``K × K`` Gram matrix ``VᵀV`` of the block's square root and from
products with ``V`` (``K = N·C``); no ``P × P`` matrix is formed (but by :func:`convention_error`
when ``P`` is at most the number of columns it compares).  For ``K̂ = Q diag(s) Qᵀ``:

* ``‖F‖²_F = ‖VᵀV‖²_F``; the nonzero spectrum of F is ``eig(VᵀV)``;
* ``s* = Σ_k (U_outᵀ M_k U_in)² = diag(Qᵀ F Q)`` — on a truncated basis's complement, where
  ``K̂`` is flat, its mean there (the best flat value; no completion of the basis enters);
  ``‖F − K̂‖²_F = ‖Qᵀ F Q − diag(s*)‖²_F + ‖s − s*‖²`` — projection and scaling error, the first
  ``‖F‖²_F − ‖s*‖²`` (where that cancels, a near-exact approximation of a block of at most
  :data:`DENSE_EIGH_LIMIT` parameters: from the rotated root, see :func:`off_diagonal_sq`);
* damped natural gradient, exact by Woodbury: ``F_λ⁻¹ g = λ⁻¹ [g − V (λI + VᵀV)⁻¹ Vᵀ g]``;
* top-k eigenvectors of F: ``U_F = V W_k Λ_k^{-1/2}`` from ``eig(VᵀV)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvlab.approx import KroneckerApproximation
from curvlab.approx.eigh import span_of_inputs
from curvlab.approx.spectral import projected_energy
from curvlab.reuse import reuse
from curvlab.sqrt import SquareRoot

#: Gram matrices larger than this use Lanczos (scipy's eigsh) for the top of the spectrum;
#: :func:`convention_error` spends at most the work of a dense eigh of this size (``~LIMIT³``).
DENSE_EIGH_LIMIT = 4096
#: The projection error's square is read off ``‖F‖²_F − ‖s*‖²`` above this share of ``‖F‖²_F``
#: (:func:`off_diagonal_sq`): a relative projection error above 1e-3.
RESOLVED_BELOW = 1e-6


def _arpack():
    """``scipy.sparse.linalg``, imported where Lanczos runs: ~0.8 s of start-up that a training
    run without probes (which imports this package) would otherwise pay."""
    import scipy.sparse.linalg

    return scipy.sparse.linalg


def _start_vector(size: int) -> np.ndarray:
    """A fixed start vector for ARPACK: its default is drawn from a generator whose state carries
    over from call to call within a process, so the same matrix would give results that differ
    in the last bits depending on what ran before (a resumed run's probes would not match)."""
    return np.random.default_rng(0).standard_normal(size)


@dataclass
class ExactBlock:
    """What every metric needs from the exact block, computed once per layer (float64).

    Attributes:
        sqrt: the square root (float64; once a layer is measured, :func:`curvlab.compare.dataset.measure`
            keeps the extraction's own instead, converted again where used).
        gram: ``VᵀV`` (``[K, K]``).
        eigenvalues: nonzero spectrum of F, descending (the top ones when Lanczos was used).
        top_vectors: Gram eigenvectors ``W_k`` of the ``k`` largest eigenvalues (``[K, k]``).
        trace: ``tr F``.
        frobenius_sq: ``‖F‖²_F``.
        root_dtype: the dtype the extraction's root (and the statistics) came in: what they were
            rounded to, whatever they are converted to here.
    """

    sqrt: SquareRoot
    gram: Tensor
    eigenvalues: Tensor
    top_vectors: Tensor
    trace: Tensor
    frobenius_sq: Tensor
    root_dtype: torch.dtype = torch.float64
    #: eigenvalues of F this close, relatively, count as one (the spread rounding gives a repeated one)
    ties: float = 0.0


def gram_eigenvalues(gram: Tensor, top: int) -> Tensor:
    """Eigenvalues of a PSD Gram matrix, descending: all of them (dense, values only), or the
    top ``top`` by Lanczos (scipy's eigsh) when the matrix is large."""
    k = gram.shape[0]
    if k <= DENSE_EIGH_LIMIT or top >= k - 1 or not gram.any():
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    arpack = _arpack()
    try:
        evals = arpack.eigsh(gram.cpu().numpy(), k=top, which="LA", return_eigenvectors=False, v0=_start_vector(k))
    except arpack.ArpackError:  # e.g. no convergence: fall back to the dense solver
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)[:top]
    return torch.from_numpy(np.sort(evals)[::-1].copy()).to(gram).clamp_min(0)


def gram_top_vectors(gram: Tensor, k: int) -> Tensor:
    """Eigenvectors of the ``k`` largest eigenvalues, descending (Lanczos unless tiny)."""
    size = gram.shape[0]
    k = min(k, size)
    if size <= 4 * k + 16 or not gram.any():  # tiny, or a dead layer (ARPACK needs a nonzero start)
        return torch.linalg.eigh(gram)[1].flip(1)[:, :k]
    arpack = _arpack()
    try:
        evals, evecs = arpack.eigsh(gram.cpu().numpy(), k=k, which="LA", v0=_start_vector(size))
    except arpack.ArpackError:
        return torch.linalg.eigh(gram)[1].flip(1)[:, :k]
    order = np.argsort(evals)[::-1].copy()
    return torch.from_numpy(evecs[:, order]).to(gram)


def in_float64(sqrt: SquareRoot) -> SquareRoot:
    """``sqrt`` in float64; inside :func:`curvlab.reuse.shared_work`, one conversion of a root
    object however many ask (the exact block's root is then the one the approximations built in
    float64 rotate, and their rotations of it are shared)."""
    return reuse(("in_float64", id(sqrt)), lambda: (sqrt, sqrt.to(dtype=torch.float64)))[1]  # sqrt: kept alive


def spectrum(gram: Tensor, top: int, size: int, root_dtype: torch.dtype) -> Tensor:
    """The spectrum of ``F = V Vᵀ`` (``size × size``, ``P``) from its Gram ``VᵀV`` (``K × K``),
    descending: at most ``P`` values (the Gram's further ones are zeros), those within rounding of
    zero set to 0 — ``λ ≤ max(K, P)·ε·λ_max``, the rounding of the Gram's entries (inner products
    of ``P``-long columns), as ``torch.linalg.matrix_rank`` decides for F, with ``ε`` the Gram's
    or, where the root ``V`` was rounded to ``root_dtype`` (float32), that one's squared (a null
    direction of ``V`` is off by ``ε·‖V‖``, its eigenvalue by ``ε²·λ_max``).  A rank-deficient
    block (a softmax's ``C − 1`` per example) then has no round-off "eigenvalues" (6e-16 against
    0.01–0.14 seen) that metrics would take for its spectrum, e.g. as top directions.  F's
    eigenvalues beyond the Gram's ``K`` (``P > K``) are zeros too, and listed as such, up to
    ``top``."""
    evals = gram_eigenvalues(gram, top)[:size]
    if len(evals):
        eps = max(torch.finfo(gram.dtype).eps, torch.finfo(root_dtype).eps ** 2)
        tol = evals[0] * max(gram.shape[0], size) * eps
        evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
    missing = min(top, size) - len(evals)
    if missing > 0 and len(evals) == gram.shape[0]:  # all of the Gram's: the rest of F's are 0
        evals = torch.cat([evals, evals.new_zeros(missing)])
    return evals


def top_count(eigenvalues: Tensor, k: int, ties: float) -> int:
    """``k`` for F's top-``k`` eigenvector subspace: at most F's rank, and raised to the end of the
    eigenspace the ``k``-th eigenvalue belongs to (eigenvalues within ``ties`` of it,
    relatively) — a top-``k`` subspace that cuts an eigenspace is no subspace of F's at all
    (MSE's last layer, ``I_C ⊗ A``, has every eigenvalue ``C`` times: an exact approximation
    scored 0.87 at ``k = 5``, ``C = 3``).  At most ``k + 64`` (each direction is a ``d_out × D``
    matrix formed: an eigenvalue repeated by a thousand outputs still cuts)."""
    positive = int((eigenvalues > 0).sum())
    k = min(k, positive)
    if k in (0, positive):
        return k
    return min(int((eigenvalues[:positive] >= eigenvalues[k - 1] * (1 - ties)).sum()), k + 64)


def exact_block(sqrt: SquareRoot, top: int, top_k: int) -> ExactBlock:
    """Gram matrix, spectrum, top eigenvectors, trace and Frobenius norm of ``F = V Vᵀ``."""
    sqrt64 = in_float64(sqrt)
    gram = sqrt64.gram()
    rank_bound = sqrt64.shape[0] * sqrt64.shape[1]  # F is P × P: at most P nonzero eigenvalues
    eigenvalues = spectrum(gram, max(top, top_k), rank_bound, sqrt.dtype)
    # a repeated eigenvalue is spread by the rounding of V (ε of its dtype) and of the Gram's
    # eigensolver (K·ε): relative to the eigenvalue, not to P (on ResNet-18, P·ε₃₂ made every
    # eigenvalue within 28 % of the largest one eigenspace, and k ran to thousands of vectors)
    ties = max(gram.shape[0] * torch.finfo(gram.dtype).eps, 64 * torch.finfo(sqrt.dtype).eps)
    return ExactBlock(
        sqrt=sqrt64,
        gram=gram,
        eigenvalues=eigenvalues,
        top_vectors=gram_top_vectors(gram, top_count(eigenvalues, top_k, ties)),
        trace=sqrt64.trace(),
        frobenius_sq=gram.square().sum(),
        root_dtype=sqrt.dtype,
        ties=ties,
    )


def woodbury_solve(gram: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(λI + VᵀV)⁻¹ rhs`` by Cholesky (the system is symmetric positive definite)."""
    system = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(system)
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)


def woodbury_natural_gradient(sqrt: SquareRoot, gram: Tensor, grad: Tensor, damping: float) -> Tensor:
    """``(F + λI)⁻¹ g = λ⁻¹ [g − V (λI + VᵀV)⁻¹ Vᵀ g]`` without a ``P × P`` matrix."""
    alpha = woodbury_solve(gram, sqrt.inner(grad), damping)
    return (grad - sqrt.combine(alpha)) / damping


#: The largest ``ε₆₄ · λ_max(F) / λ`` at which the exact damped natural gradient is reported:
#: Woodbury's ``λ⁻¹ [g − V(…)Vᵀg]`` cancels to about that relative accuracy times ~100 (against
#: a 60-digit reference: 1e-5 at ‖F‖/λ = 1.5e10, 0.6 % at 1.6e11, 92 % at 1.6e13).
NG_ROUNDING_LIMIT = 1e-5


def natural_gradient_resolved(eigenvalues: Tensor, damping: float) -> bool:
    """Whether float64 resolves ``(F + λI)⁻¹ g`` (see :data:`NG_ROUNDING_LIMIT`)."""
    top = eigenvalues[0].item() if eigenvalues.numel() else 0.0
    return torch.finfo(torch.float64).eps * top / damping <= NG_ROUNDING_LIMIT


#: λ_max(F)/damping below which the damped natural gradient is the gradient over the damping
#: to within about this ratio, for F and for any approximation of its size: ng_cosine near 1
#: there measures the damping, not the approximation.
NG_DAMPING_DOMINATES = 1e-2


def damping_dominates(eigenvalues: Tensor, damping: float) -> bool:
    """Whether ``damping`` swamps the block's curvature (see :data:`NG_DAMPING_DOMINATES`) — also
    a zero block (a dead layer, a diverged network), whose damped natural gradients are all the
    gradient over the damping: their cosines of 1 said nothing, and nothing said so."""
    top = eigenvalues[0].item() if eigenvalues.numel() else 0.0
    return top < NG_DAMPING_DOMINATES * damping


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two tensors viewed as vectors (NaN where one is zero: undefined), in
    [-1, 1] (parallel vectors gave 1 + 3e-15 by rounding, which ``arccos`` turns into NaN)."""
    return ((a * b).sum() / (a.norm() * b.norm())).clamp(-1.0, 1.0)


@dataclass
class ApproximationMetrics:
    """Quality of one approximation of one block (all relative to ``‖F‖_F`` where errors)."""

    trace_ratio: float
    rel_frobenius_error: float
    projection_error: float
    scaling_error: float
    ng_cosine: float
    ng_rel_error: float
    subspace_overlap: float
    spectrum: Tensor  # the largest eigenvalues of K̂, descending
    error_sq: float  # ‖F − K̂‖²_F, for the whole-network error
    natural_gradient: Tensor  # (K̂ + damping)⁻¹ g, float64: the whole network's is their concatenation


def top_eigenvector_overlap(exact: ExactBlock, approx: KroneckerApproximation, k: int,
                            eps: float | None = None) -> float:
    """``tr(U_Fᵀ P̂ U_F) / k``: the share of F's top-``k`` eigenvector subspace (``U_F``) that lies
    in ``K̂``'s top-``k`` one (its projector ``P̂``); ``‖U_Fᵀ Û‖²_F / k`` where that is well defined.

    * ``k`` is at most F's numerical rank (its eigenvectors of zero eigenvalues are no "top"
      direction), and raised to the end of F's eigenspace at its ``k``-th eigenvalue
      (:func:`top_count`) — the same ``k`` for every approximation of a block, so they are
      compared on one scale.
    * ``K̂``'s directions are those of its *nonzero* eigenvalues (``s > max(d_out, D)·ε·s_max``, ``ε``
      that of the statistics' or the approximation's dtype, whichever is coarser): a ``K̂`` of rank
      ``r < k`` (KFAC from one MC sample of one example: rank 1) contributes its ``r`` directions
      and so overlaps at most ``r/k``; a basis of its null space is arbitrary and never counts.
    * Where the ``k``-th largest eigenvalue belongs to an eigenspace of which only ``j`` of its
      ``m`` directions fit (a truncated side's flat complement; repeated factor eigenvalues),
      that eigenspace counts with weight ``j/m`` — the mean over every choice of ``j`` directions
      in it, so no completion of a basis enters.

    Matrix-free: only the selected entries of F's rotated eigenvectors are formed."""
    k = min(top_count(exact.eigenvalues, k, exact.ties), exact.top_vectors.shape[1])
    if k == 0:
        return float("nan")
    s = approx.eigenvalues(compressed=True).to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        return float("nan")
    mult = approx.multiplicity().to(torch.float64)
    u_out, u_in = ((None, None) if approx.identity_basis
                   else (u.to(torch.float64) for u in approx.eigenbasis(compressed=True)))
    if eps is None:
        eps = torch.finfo(approx.dtype).eps
    nonzero = s > s.max() * max(approx.layout.shape) * eps
    values, order = s[nonzero], nonzero.flatten().nonzero().squeeze(1)
    values, idx = values.sort(descending=True)
    order, counts = order[idx], mult.flatten()[order[idx]]
    if len(values) == 0:  # K̂ = 0: no direction
        return 0.0
    before = counts.cumsum(0) - counts  # directions of the entries ahead of each
    if counts.sum() <= k:  # every nonzero direction
        weights = torch.ones_like(counts)
    else:
        # the eigenvalue at which the k-th direction falls, and the eigenspace it spans
        kth = int((before + counts < k).sum())
        boundary = values[kth]
        tied = values == boundary
        above = values > boundary
        fit = k - counts[above].sum()
        weights = torch.where(above, torch.ones_like(counts),
                              torch.where(tied, fit / counts[tied].sum(), torch.zeros_like(counts)))
    keep = weights > 0
    order, weights = order[keep], weights[keep]
    width_in = s.shape[1]
    rows, cols = order // width_in, order % width_in
    overlap = 0.0
    for x in top_eigenvectors(exact, k):
        overlap += (weights * projected_energy(x, u_out, u_in, rows, cols)).sum().item()
    return min(overlap / k, 1.0)  # (a share: at most 1, which rounding overshot by 4e-16)


def top_eigenvectors(exact: ExactBlock, k: int) -> list[Tensor]:
    """F's unit eigenvectors of its ``k`` largest eigenvalues in matrix form, ``V w_i / √λ_i``;
    inside :func:`curvlab.reuse.shared_work` once per exact block for all its approximations."""
    def compute() -> tuple[tuple, list[Tensor]]:
        vectors = [exact.sqrt.combine(exact.top_vectors[:, i]) / exact.eigenvalues[i].sqrt() for i in range(k)]
        return (exact.sqrt, exact.top_vectors), vectors  # kept alive: their ids are the key
    return reuse(("top_eigenvectors", id(exact.sqrt), id(exact.top_vectors), k), compute)[1]


def approximation_metrics(
    exact: ExactBlock,
    approx: KroneckerApproximation,
    grad: Tensor,
    damping: float,
    strategy: str,
    top_k: int,
    exact_ng: Tensor,
    num_eigenvalues: int | None = None,
) -> ApproximationMetrics:
    """Every metric of ``approx`` against the exact block (float64, matrix-free); its spectrum
    the ``num_eigenvalues`` largest eigenvalues (all: ``None``)."""
    # what the statistics or the approximation were rounded to: K̂'s eigenvalues within that of 0 are 0
    eps = max(torch.finfo(exact.root_dtype).eps, torch.finfo(approx.dtype).eps)
    if approx.dtype != torch.float64:
        approx = approx.to(dtype=torch.float64)
    s = approx.eigenvalues()
    s_star = approx.optimal_scaling(exact.sqrt)
    norm_sq = exact.frobenius_sq
    projection_sq = off_diagonal_sq(exact, approx, s_star)
    scaling_sq = (s - s_star).square().sum()
    ng = approx.inv_mat_mul(grad, damping, strategy)
    return ApproximationMetrics(
        trace_ratio=(approx.trace() / exact.trace).item(),
        rel_frobenius_error=((projection_sq + scaling_sq) / norm_sq).sqrt().item(),
        projection_error=(projection_sq / norm_sq).sqrt().item(),
        scaling_error=(scaling_sq / norm_sq).sqrt().item(),
        ng_cosine=cosine(ng, exact_ng).item(),
        ng_rel_error=((ng - exact_ng).norm() / exact_ng.norm()).item(),
        subspace_overlap=top_eigenvector_overlap(exact, approx, top_k, eps),
        spectrum=approx.spectrum(num_eigenvalues),
        error_sq=(projection_sq + scaling_sq).item(),
        natural_gradient=ng,
    )


def off_diagonal_sq(exact: ExactBlock, approx: KroneckerApproximation, s_star: Tensor) -> Tensor:
    """``‖Qᵀ F Q − diag(s*)‖²_F``, the projection error's square, for ``Q`` ``approx``'s eigenbasis.

    ``‖F‖²_F − ‖s*‖²`` where that difference is resolved: above :data:`RESOLVED_BELOW` of ``‖F‖²_F``
    it keeps at least 7 digits (the two terms are each rounded to ~K·eps of ``‖F‖²_F``).  Below it,
    the difference cancels as the error vanishes (an exact approximation read ``[0, ~4e-8]`` of
    ``‖F‖_F``, by the BLAS's rounding); there, for ``P ≤ DENSE_EIGH_LIMIT`` (and the ``P × P``
    product within :func:`convention_error`'s work), the entries of ``Qᵀ F Q − diag(s*)``
    themselves (``Qᵀ F Q = RᵀR``, ``R`` the rotated root ``[K, P]``, in a completion of a truncated
    basis; its complement's diagonal differs from the flat ``s*`` by its spread), each rounded on
    its own — an exact approximation gives ~eps.  (That product, ``P²K`` multiply-adds, for every approximation made
    the comparison of a 3120-parameter block from 640 columns 9× slower.)"""
    k, p = exact.gram.shape[0], s_star.numel()
    by_difference = (exact.frobenius_sq - s_star.square().sum()).clamp_min(0)
    if (by_difference > RESOLVED_BELOW * exact.frobenius_sq or p > DENSE_EIGH_LIMIT
            or p * p * k > DENSE_EIGH_LIMIT**3):
        return by_difference
    rotated = approx.rotate(exact.sqrt.matrices()).flatten(1)
    inner = rotated.mT @ rotated
    inner.diagonal().sub_(s_star.flatten())  # ~eps where s* is the diagonal; a flat complement's spread
    return inner.square().sum()


def convention_error(exact: ExactBlock, convention: SquareRoot) -> tuple[float, float]:
    """``(‖F − F_c‖_F / ‖F‖_F, tr F_c / tr F)`` for ``F_c = V_c V_cᵀ``: what the block the Kronecker
    statistics describe (per-example quantities, the coupling between examples ignored) misses of
    the exact block.  With ``W = [V V_c]`` (``P × n``, ``n = K + K_c``) and ``S = diag(I_K, −I_Kc)``,
    ``F − F_c = W S Wᵀ``; its norm comes from

    * ``P ≤ n``: ``V Vᵀ − V_c V_cᵀ`` itself (``P × P``);
    * ``P > n``: ``R S Rᵀ`` for the Householder QR ``W = Q R`` (``n × n``).

    Both are backward stable in W and resolve the error to ~eps·(tr F + tr F_c)/‖F‖_F (an exact
    convention gives ~1e-15).  Gram matrices cannot: their rounding is no perturbation of W, so
    ``‖F − F_c‖² = ‖VᵀV‖² − 2‖VᵀV_c‖² + ‖V_cᵀV_c‖²`` resolves it to ~√eps only (so would the
    eigenvectors of ``WᵀW``): an exact convention gives ``[0, ~1e-8]``, by the BLAS's rounding.
    That expansion is the fallback where ``min(P, n)²·max(P, n) > DENSE_EIGH_LIMIT³`` (either
    route's work; at that limit the QR takes ~3 s on two cores, ~4× the expansion).

    Where the :func:`~curvlab.approx.eigh.within_span` scope holds a span ``Q`` (``D × r``) of
    both roots' input rows (a batch narrower than the layer), every ``M_k`` of either root is
    ``M_k Q Qᵀ``: ``W`` is taken in those coordinates, ``P = d_out·r`` (norms unchanged; the
    coupled train-mode ResNet-18's layer4 at N = 8: 36× fewer rows)."""
    root, conv = exact.sqrt, convention.to(dtype=torch.float64)
    basis = _common_span(root, conv)
    if basis is not None:
        root, conv = root.in_input_basis(basis), conv.in_input_basis(basis)
    v, v_c = root.matrices().flatten(1), conv.matrices().flatten(1)  # Vᵀ, V_cᵀ
    (k, p), n = v.shape, v.shape[0] + v_c.shape[0]
    if min(p, n) ** 2 * max(p, n) > DENSE_EIGH_LIMIT**3:  # too costly: the Gram expansion (~√eps)
        err_sq = exact.frobenius_sq - 2 * (v @ v_c.T).square().sum() + conv.gram().square().sum()
        err = err_sq.clamp_min(0).sqrt()
    elif p <= n:
        err = torch.linalg.matrix_norm(v.T @ v - v_c.T @ v_c)
    else:  # ‖W S Wᵀ‖ = ‖R S Rᵀ‖ (Q has orthonormal columns)
        r = torch.linalg.qr(torch.cat([v, v_c]).T, mode="r").R
        sign = torch.ones(n, dtype=r.dtype, device=r.device)
        sign[k:] = -1
        err = torch.linalg.matrix_norm((r * sign) @ r.T)
    norm = exact.frobenius_sq.sqrt()
    error = (err / norm).item() if norm > 0 else float("nan")
    ratio = (conv.trace() / exact.trace).item() if exact.trace > 0 else float("nan")
    return error, ratio


def _common_span(*roots: SquareRoot) -> Tensor | None:
    """The scope's span holding the input rows of every root
    (:func:`~curvlab.approx.eigh.span_of_inputs`), or ``None``."""
    bases = [span_of_inputs(root) for root in roots]
    return bases[0] if bases[0] is not None and all(b is bases[0] for b in bases) else None
