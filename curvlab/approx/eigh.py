"""The eigen-decompositions of symmetric PSD Kronecker factors used everywhere in curvlab.

* :func:`psd_eigh` — the one full decomposition, with a jitter retry;
* :func:`randomized_eigh` — the top ``k`` eigenpairs by a randomized range finder (Halko,
  Martinsson & Tropp 2011, Alg. 4.4 + 5.3), the rest of the spectrum as its mean;
* :class:`EighPolicy` / :func:`factor_eigh` — which of the two a factor gets, in which dtype;
* :func:`within_span` — full decompositions (and damped inverses) through a narrow span known to
  hold the factor's range: an analysis's input-side factors of one small batch.

A truncated decomposition of an ``n × n`` factor ``M`` stands for the PSD matrix

    M̃ = U diag(λ) Uᵀ + μ (I − U Uᵀ),   U ∈ R^{n × k},   μ = (tr M − Σ λ)/(n − k),

whose eigenbasis is ``U`` completed by *any* orthonormal basis of the complement, on which it is
flat (see :mod:`curvlab.approx.spectral`); ``tr M̃ = tr M``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab._options import is_int
from curvlab.approx.spectral import complement_basis
from curvlab.reuse import digest, name_values, recall, remember, reuse, sharing
from curvlab.sqrt import SquareRoot

#: Relative size of the diagonal jitter added when an eigen-decomposition fails.
EIGH_JITTER = 1e-6

#: :func:`span_basis` gives a span only where it is at most this share of the factor's width:
#: narrower, the route through it is the faster (measured on this project's CPU, float64, two
#: threads: 4608 wide, full ``eigh`` 11.1 s; through a span of 256 0.6 s, of 1024 2.3 s).
SPAN_MAX_SHARE = 0.5

#: :func:`span_projection` takes a factor's range to lie in the span where the part of its trace
#: outside is at most this share: the rounding of float32 statistics (ResNet-18's input factors
#: on 16 CIFAR-10 images, converted to float64: |outside| ≤ 1.2e-8 of the trace), far below what
#: a factor with another range leaves outside.
SPAN_TOLERANCE = 1e-5

_SPANS: ContextVar[tuple[Tensor, ...]] = ContextVar("curvlab_factor_spans", default=())


def symmetrize(mat: Tensor) -> Tensor:
    """``(M + Mᵀ)/2``: factors are symmetric by definition; this removes rounding asymmetry.
    The result is exactly symmetric (``a + b == b + a``); inside
    :func:`curvlab.reuse.shared_work` it is remembered as such (:func:`symmetric`), and a result
    from named values is named after them (:func:`curvlab.reuse.name_values`)."""
    out = torch.add(mat, mat.mT).mul_(0.5)  # one fresh matrix (large ones cost page faults)
    if sharing():
        remember(out, "symmetric", True)
        source = recall(mat, "digest")
        if source is not None:  # symmetrizing an exactly symmetric matrix gives its values
            name_values(out, source if recall(mat, "symmetric") else ("symmetrize", source))
    return out


def symmetric(mat: Tensor) -> Tensor:
    """``mat`` itself where :func:`symmetrize` made it (unchanged since, inside
    :func:`curvlab.reuse.shared_work`), else :func:`symmetrize` of it: for reading only."""
    return mat if recall(mat, "symmetric") else symmetrize(mat)


def psd_eigh(mat: Tensor, compute_dtype: torch.dtype | None = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD factor: ``M = U diag(λ) Uᵀ``.

    Computed in ``compute_dtype`` (float64 by default: small eigenvalues of ill-conditioned
    factors matter for the inverse; ``None``: ``mat``'s own dtype), returned in ``mat``'s dtype.
    Negative eigenvalues can only be rounding error of a PSD matrix and are clamped to 0.  If the
    solver fails (it can on badly conditioned input), it is retried once on ``M + ε I`` with
    ``ε = EIGH_JITTER · mean |diag M|``, with a ``RuntimeWarning``.  A factor with NaN/inf entries
    raises ``ValueError`` (no jitter helps it; eigh failed on it, misleadingly, as ill-conditioned,
    or returned NaN).

    A diagonal ``M`` (an embedding's input factor: token frequencies) is its own decomposition,
    its diagonal sorted and the unit vectors in that order (LAPACK took 6.3 s for a 2048-wide one
    in float32 on this project's CPU, one thread).

    Returns:
        ``(λ [n], U [n, n])`` with ``λ`` ascending and ``U`` orthonormal.
    """
    sym = symmetric(mat if compute_dtype is None else mat.to(compute_dtype))
    if is_diagonal(sym):
        diagonal = sym.diagonal()
        if not bool(torch.isfinite(diagonal).all()):
            _refuse_non_finite(sym)
        evals, order = diagonal.sort(stable=True)
        evecs = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)[:, order]
        return evals.clamp_min(0).to(mat.dtype), evecs.to(mat.dtype)
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        _refuse_non_finite(sym, err)
        jitter = EIGH_JITTER * (sym.diagonal().abs().mean().item() + torch.finfo(sym.dtype).tiny)
        warnings.warn(
            f"curvlab: eigen-decomposition of a {mat.shape[0]}×{mat.shape[0]} factor failed ({err}); "
            f"retrying with {jitter:.3g}·I added",
            RuntimeWarning,
            stacklevel=2,
        )
        evals, evecs = torch.linalg.eigh(sym + jitter * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device))
    if not bool(torch.isfinite(evals).all()):  # n values (eigh synchronises a GPU anyway)
        _refuse_non_finite(sym)
    return evals.clamp_min(0).to(mat.dtype), evecs.to(mat.dtype)


def is_diagonal(mat: Tensor) -> bool:
    """Whether the square ``mat`` has no nonzero entry off its diagonal (NaN counts as nonzero):
    ``O(n²)`` and one sync, against the ``O(n³)`` decomposition or inverse it can spare — ``O(n)``
    for a dense factor, whose first off-diagonal decides (the two counts of a 785-wide ``A``
    took 0.39 ms of the MLP's KFAC refresh)."""
    if mat.shape[0] > 1 and bool(mat.diagonal(1).any()):  # (NaN counts as nonzero here too)
        return False
    return bool(torch.count_nonzero(mat) == torch.count_nonzero(mat.diagonal()))


def _refuse_non_finite(sym: Tensor, err: BaseException | None = None) -> None:
    """Raise ``ValueError`` if ``sym`` has NaN/inf entries: eigh then either failed as
    "ill-conditioned or too many repeated eigenvalues" (also after a jitter retry), which points
    away from the cause, or returned NaN eigenvalues, which every product and inverse carried on."""
    bad = int((~torch.isfinite(sym)).sum())
    if bad:
        raise ValueError(
            f"curvlab: a {sym.shape[0]}×{sym.shape[0]} factor to eigen-decompose has {bad} non-finite entries "
            "(NaN/inf): its statistics came from non-finite inputs, outputs or gradients"
        ) from err


def randomized_eigh(
    mat: Tensor,
    rank: int,
    *,
    power_iterations: int = 2,
    oversampling: int = 16,
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The top-``rank`` eigenpairs of a symmetric PSD ``M`` and the mean of the others.

    A Gaussian sketch ``M Ω`` (``rank + oversampling`` columns, seeded and drawn on the CPU: the
    result is a function of ``M`` on every device) is refined by ``power_iterations`` products with
    ``M``, each of a well-conditioned basis of the last one's span (:func:`_span_basis`), and
    orthonormalised once at the end (QR); the eigenpairs of ``Qᵀ M Q`` (:func:`psd_eigh`, with its
    jitter retry) give ``U = Q W``.  Cost ``2 (power_iterations + 2) n² (rank + oversampling)`` flops.

    Returns:
        ``(values [rank + 1], U [n, rank])``: ``values[:rank]`` the top eigenvalues (ascending),
        ``values[rank] = μ = (tr M − Σ λ)/(n − rank) ≥ 0`` the flat remainder; in ``mat``'s dtype.
    """
    n = mat.shape[0]
    if not 0 < rank < n:
        raise ValueError(f"randomized_eigh: rank={rank} must be in [1, {n - 1}] for a {n}×{n} factor")
    # M itself (symmetric up to rounding): symmetrising an n × n matrix would cost a transposed
    # pass over it; the small Rayleigh quotient is symmetrised by psd_eigh instead.
    sym = mat if compute_dtype is None else mat.to(compute_dtype)
    width = min(n, rank + oversampling)
    # drawn on the CPU: the same sketch on every device, so the result is a function of M alone
    gen = torch.Generator().manual_seed(seed)
    sketch = torch.randn(n, width, generator=gen, dtype=sym.dtype).to(sym.device)
    y = sym @ sketch
    for _ in range(power_iterations):
        y = sym @ _span_basis(y)
    q = torch.linalg.qr(y).Q
    small, w = psd_eigh(q.mT @ (sym @ q), compute_dtype=None)
    top, vectors = small[-rank:], q @ w[:, -rank:]
    rest = ((sym.diagonal().sum() - top.sum()) / (n - rank)).clamp_min(0)
    return torch.cat([top, rest.reshape(1)]).to(mat.dtype), vectors.to(mat.dtype)


def _span_basis(y: Tensor) -> Tensor:
    """A well-conditioned basis of ``span(Y)`` (``[n, w]``, ``w ≤ n``) for the next power
    iteration, not orthonormalised: ``P L`` of ``Y = P L U``, LU with partial pivoting
    (``|L_ij| ≤ 1``, unit diagonal).  Where ``Y`` has full column rank it spans ``span(Y)``; where
    not, it still has full rank (LAPACK leaves a zero pivot's column unscaled) and spans more, as a
    QR's ``Q`` does.  Power iterations need some normalisation between products — Halko,
    Martinsson & Tropp (2011) take a QR, fbpca (Facebook's randomized PCA) this LU, at a fraction
    of the cost (``8193 × 272`` float32, this project's CPU, one thread: 15 against 66–77 ms); only
    the last basis is orthonormalised."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(y)
    lower = lu.tril(-1)
    lower.diagonal().fill_(1.0)
    # LAPACK's row interchanges (row i with row pivots[i], 1-based), in order, as one permutation
    order = list(range(y.shape[0]))
    for i, j in enumerate(pivots.tolist()):
        order[i], order[j - 1] = order[j - 1], order[i]
    basis = torch.empty_like(lower)
    basis[torch.tensor(order, device=y.device)] = lower
    return basis


@dataclass(frozen=True)
class EighPolicy:
    """How the eigen-decomposition (and damped inverse) of a Kronecker factor is computed.

    Attributes:
        dtype: compute dtype (``None``: the factor's own).  float64 is the analysis default;
            the optimizers default to float32 (:class:`~curvlab.optim.KroneckerOptions`).
        truncate_above: factors with more rows than this get a truncated eigenbasis of rank
            ``rank`` plus a flat remainder (:func:`randomized_eigh`); ``None``: never.
        rank, power_iterations, oversampling, seed: of :func:`randomized_eigh`.
    """

    dtype: torch.dtype | None = torch.float64
    truncate_above: int | None = None
    rank: int = 256
    power_iterations: int = 2
    oversampling: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"EighPolicy: dtype={self.dtype!r} must be torch.float32, torch.float64 or None (the factor's)")
        least = {"truncate_above": 1, "rank": 1, "power_iterations": 0, "oversampling": 0, "seed": None}
        for name, minimum in least.items():
            value = getattr(self, name)
            if name == "truncate_above" and value is None:
                continue
            if not is_int(value) or (minimum is not None and value < minimum):
                need = "an int" if minimum is None else f"an int ≥ {minimum}"
                raise ValueError(f"EighPolicy: {name}={value!r} must be {need}"
                                 + (" (None: never)" if name == "truncate_above" else ""))
            object.__setattr__(self, name, int(value))

    def truncates(self, size: int) -> bool:
        """Whether an ``size × size`` factor gets a truncated eigenbasis."""
        return self.truncate_above is not None and size > self.truncate_above and self.rank < size


#: Full float64 decompositions (what the analyses use unless told otherwise).
EXACT_EIGH = EighPolicy()


def factor_eigh(mat: Tensor, policy: EighPolicy = EXACT_EIGH) -> tuple[Tensor, Tensor]:
    """``(values, U)`` of a PSD factor as ``policy`` says: full (:func:`psd_eigh`, ``U`` square)
    or truncated (:func:`randomized_eigh`, ``U`` of ``policy.rank`` columns and one more value,
    the flat remainder).  Returned in ``mat``'s dtype; inside :func:`curvlab.reuse.shared_work`,
    a factor already decomposed there (the same values in the compute dtype, the same policy)
    is not decomposed again."""
    full = not policy.truncates(mat.shape[0])
    if full and policy.dtype not in (None, mat.dtype):
        # symmetrized in its own dtype first, as a KroneckerProduct stores its factors, so that a
        # factor gives the same bytes to decompose whether it comes raw (EKFAC's) or stored (KFAC's)
        mat = symmetrize(mat)
    if not sharing():
        return _decompose(mat, policy)
    work = mat if policy.dtype is None else mat.to(policy.dtype)
    name = _symmetric_name(work) if full else None
    if name is not None:
        # a named factor: the name of what psd_eigh decomposes is known without forming it (an
        # n × n copy per approximation object only to key a decomposition already made)
        key = ("factor_eigh", policy, name)
        compute = lambda: _decompose(symmetric(work), policy)  # noqa: E731
    else:
        if full:
            work = symmetric(work)  # what psd_eigh decomposes (symmetrizing again changes nothing)
        key = ("factor_eigh", policy, digest(work))
        compute = lambda: _decompose(work, policy)  # noqa: E731
    # the scope's own tensors, not copies (a copy per approximation object: an n × n float64
    # basis each); a caller that changed them in place bumped their versions, and the next one
    # gets a fresh decomposition
    held = reuse(key, lambda: _versioned(compute()))
    if (held[0]._version, held[1]._version) != held[2]:
        held[:] = _versioned(compute())
    values, vectors = held[0], held[1]
    # named: a rotation into this basis is keyed cheaply
    return (name_values(values.to(mat.dtype), (*key, "values", mat.dtype)),
            name_values(vectors.to(mat.dtype), (*key, "vectors", mat.dtype)))


def _versioned(pair: tuple[Tensor, Tensor]) -> list:
    """``[values, vectors, (their versions)]``: :func:`factor_eigh`'s shared decomposition."""
    values, vectors = pair
    return [values, vectors, (values._version, vectors._version)]


def _symmetric_name(mat: Tensor):
    """The name :func:`symmetric` gives ``mat``'s symmetrization (:func:`symmetrize`'s naming),
    where ``mat``'s values are named in this scope; else ``None``."""
    source = recall(mat, "digest")
    if source is None:
        return None
    return source if recall(mat, "symmetric") else ("symmetrize", source)


def _decompose(mat: Tensor, policy: EighPolicy) -> tuple[Tensor, Tensor]:
    if policy.truncates(mat.shape[0]):
        return randomized_eigh(
            mat, policy.rank, power_iterations=policy.power_iterations,
            oversampling=policy.oversampling, seed=policy.seed, compute_dtype=policy.dtype,
        )
    found = in_scope_span(mat, policy.dtype)
    if found is not None:
        lam, u = spanned_eigh(*found)
        return lam.to(mat.dtype), u.to(mat.dtype)
    return psd_eigh(mat, policy.dtype)


@contextlib.contextmanager
def within_span(*bases: Tensor | None) -> Iterator[None]:
    """Inside: a full decomposition by :func:`factor_eigh` (:func:`spanned_eigh`) or a damped
    inverse (:class:`curvlab.approx.inverse.FactorInverse`, in spectral form) of a factor whose
    range lies in the span of one of ``bases`` (orthonormal columns, ``[n, r]``, of the factor's
    dtype and device; ``None`` entries are left out) goes through that span.  Where the range does not lie
    there (another factor of the same width), they run in full, as outside."""
    token = _SPANS.set(tuple(b for b in bases if b is not None))
    try:
        yield
    finally:
        _SPANS.reset(token)


def span_basis(rows: Tensor) -> Tensor | None:
    """An orthonormal float64 basis ``[n, r]`` of a space holding the span of ``rows`` (``[r, n]``;
    the QR factor of ``rowsᵀ``), where ``r ≤ SPAN_MAX_SHARE · n`` (a decomposition through it is
    then the faster); ``None`` otherwise."""
    if not narrow(*rows.shape):
        return None
    return torch.linalg.qr(rows.to(torch.float64).mT).Q


def narrow(r: int, n: int) -> bool:
    """Whether :func:`span_basis` gives a span for ``r`` rows of width ``n``."""
    return r <= SPAN_MAX_SHARE * n


def _scope_spans(width: int, dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
    """The spans of the :func:`within_span` scope of this width (narrower), dtype and device."""
    for basis in _SPANS.get():
        n, r = basis.shape
        if n == width and r < n and basis.dtype == dtype and basis.device == device:
            yield basis


def in_scope_span(mat: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(Q, λ, W, μ)`` for the first span of the :func:`within_span` scope (of ``M``'s width and
    device, of ``dtype``: ``M``'s own where ``None``, ``M`` converted to it only where such a span
    exists) that holds the range of the symmetric PSD ``M`` (:func:`span_projection`):
    ``(λ, W)`` the eigenpairs of ``QᵀMQ`` (inside :func:`curvlab.reuse.shared_work`, once for the
    same matrix, whether its eigenpairs or its inverse are asked for; for a named ``M``,
    :func:`curvlab.reuse.name_values`, ``QᵀMQ`` too); ``None`` where none does."""
    dtype = mat.dtype if dtype is None else dtype
    for basis in _scope_spans(mat.shape[0], dtype, mat.device):
        mat = mat.to(dtype)
        named = recall(mat, "digest")  # a factor both decomposed and inverted: projected once
        projected = span_projection(mat, basis) if named is None else reuse(
            ("span_projection", named, id(basis)), lambda: (basis, span_projection(mat, basis)))[1]
        if projected is not None:
            small, flat = projected  # r × r: its digest is cheap, inside a scope or not
            lam, w = reuse(("span_eigh", digest(small)), lambda: psd_eigh(small, compute_dtype=None))
            return basis, lam, w, flat
    return None


def span_of_inputs(root: SquareRoot) -> Tensor | None:
    """:func:`span_holding` the root's input rows (:meth:`~curvlab.sqrt.SquareRoot.input_rows`),
    which hold the rows of every ``M_k``; ``None`` for a root without them."""
    rows = root.input_rows()
    return None if rows is None else span_holding(rows)


def span_holding(rows: Tensor) -> Tensor | None:
    """The first span of the :func:`within_span` scope (of the width, dtype and device of
    ``rows``, ``[R, n]``) that holds ``rows``: at most :data:`SPAN_TOLERANCE` of their energy
    outside it; ``None`` where none does."""
    for basis in _scope_spans(rows.shape[1], rows.dtype, rows.device):
        energy = rows.square().sum()
        if bool((energy - (rows @ basis).square().sum()).abs() <= SPAN_TOLERANCE * energy):
            return basis
    return None


def span_projection(mat: Tensor, basis: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(QᵀMQ, μ)`` for a symmetric PSD ``M`` (``[n, n]``) whose range lies in the span of
    ``basis`` (``Q``, ``[n, r]``, orthonormal columns, ``r < n``): then
    ``M = Q (QᵀMQ) Qᵀ + μ (I − QQᵀ)``, with ``μ = 0`` where nothing lies outside; ``O(n² r)``
    flops.

    The range is taken to lie in the span where the part of ``tr M`` outside it is at most
    :data:`SPAN_TOLERANCE` of the trace (rounding of the statistics); that part is kept as ``μ``,
    the complement's one eigenvalue (their mean, clamped at 0), so that the trace is kept, as a
    truncated decomposition keeps it.  ``None`` where more lies outside (or ``M`` is not finite).
    """
    n, r = basis.shape
    small = symmetrize(basis.mT @ (mat @ basis))
    trace = mat.diagonal().sum()
    outside = trace - small.diagonal().sum()
    if not bool(outside.abs() <= SPAN_TOLERANCE * trace):
        return None
    return small, outside.clamp_min(0) / (n - r)


def spanned_eigh(basis: Tensor, lam: Tensor, w: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`psd_eigh` of ``M = Q S Qᵀ + μ (I − QQᵀ)`` (``basis`` ``Q`` ``[n, r]``, ``(λ, W)``
    the eigenpairs of ``S``, ``flat`` ``μ``; :func:`in_scope_span`): ``U = Q W``, and ``Q``'s
    complement (:func:`~curvlab.approx.spectral.complement_basis`, once per basis inside
    :func:`curvlab.reuse.shared_work`) is the eigenspace of ``μ``.

    Returns:
        ``(λ [n], U [n, n])``, ``λ`` ascending.
    """
    n, r = basis.shape
    # basis kept alive; only the n − r complement columns are kept, not the completed n × n basis
    complement = reuse(("complement_basis", id(basis)), lambda: (basis, complement_basis(basis)))[1]
    # λ ascending (psd_eigh) and μ one value: ascending, and as a stable sort would order them, are
    # λ ≤ μ, the complement, λ > μ — the basis formed in one n × n allocation, in that order
    low = int((lam <= flat).sum())
    spanned = basis @ w
    values = torch.cat([lam[:low], flat.expand(n - r), lam[low:]])
    return values, torch.cat([spanned[:, :low], complement, spanned[:, low:]], 1)
