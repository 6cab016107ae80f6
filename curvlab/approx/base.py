"""The one interface of every Kronecker-factored approximation of a Fisher block.

Every approximation ``K̂`` of a block ``F`` (``P × P``, ``P = d_out·D``) in curvlab has the form

    K̂ = Q diag(s) Qᵀ,   Q = U_out ⊗ U_in,

with ``Q`` acting on the matrix form ``X ∈ R^{d_out × D}`` as ``X ↦ U_out X U_inᵀ`` (row-major
Kronecker convention of :mod:`curvlab.block`).  The eigenvalues ``s`` are stored as a
``[d_out, D]`` matrix: ``s[i, j]`` belongs to the eigenvector ``U_out[:, i] ⊗ U_in[:, j]``, so

    K̂ X = U_out [(U_outᵀ X U_in) ⊙ s] U_inᵀ,
    (K̂ + damping)⁻¹ X = U_out [(U_outᵀ X U_in) ⊘ s_damped] U_inᵀ,

where ``s_damped`` is given by a :mod:`~curvlab.approx.damping` strategy.

A side may be *truncated* (large factors, :class:`~curvlab.approx.eigh.EighPolicy`): ``U`` has
``k`` columns and the other ``n − k`` eigen-directions share one value (a flat remainder, see
:mod:`curvlab.approx.spectral`).  Every quantity then exists *compressed* (``compressed=True``:
``k + 1`` entries on that side) and expanded (the default: one entry per eigen-direction; the
expanded basis completes ``U`` by an arbitrary orthonormal complement, for the dense/analysis
paths).  Products and inverses only ever use the compressed form.

Two intermediate classes share the code of the two families:

* :class:`~curvlab.approx.families.KroneckerProduct` — ``K̂ = scale · L ⊗ R`` (KFAC/KFLR,
  TKFAC, KFOC);
* :class:`~curvlab.approx.families.EigenCorrected` — a fixed basis with a free diagonal ``s``
  (EKFAC, TEKFAC).

No method forms a ``P × P`` matrix except :meth:`KroneckerApproximation.to_dense`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from curvlab.approx.damping import DampingStrategy, built_in_class, check_damping, get_damping
from curvlab.approx.inverse import DampedInverse, DiagonalInverse
from curvlab.approx.spectral import (complete_basis, diagonal_apply, expand, in_basis, is_truncated, multiplicity,
                                     out_of_basis, unflatten_tensors)
from curvlab.approx.spectral import optimal_scaling as spectral_optimal_scaling
from curvlab.block import BlockLayout

if TYPE_CHECKING:
    from curvlab.sqrt import SquareRoot
    from curvlab.stats import LayerStats

#: Largest block (in parameters) :meth:`KroneckerApproximation.to_dense` builds.
MAX_DENSE_PARAMS = 20000


# ----------------------------------------------------------------------------- helpers


def default_layout(d_out: int, d_in: int) -> BlockLayout:
    """Layout of a plain ``d_out × d_in`` weight without bias column (constructors' default)."""
    return BlockLayout(d_out, d_in, bias_column=False, weight_shape=(d_out, d_in))


def resolve_layout(layout: BlockLayout | None, d_out: int, d_in: int, who: str) -> BlockLayout:
    """``layout`` (checked against the factor sizes) or :func:`default_layout`."""
    if layout is None:
        return default_layout(d_out, d_in)
    if layout.shape != (d_out, d_in):
        raise ValueError(
            f"{who}: layout has matrix form {layout.shape} but the factors give ({d_out}, {d_in})"
        )
    return layout


def check_square(mat: Tensor, what: str, who: str) -> None:
    """Raise ``ValueError`` unless ``mat`` is a square matrix."""
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"{who}: {what} must be a square matrix, got shape {tuple(mat.shape)}")


def missing_statistic(stats: "LayerStats", approximation: str, statistic: str, request: str) -> ValueError:
    """The error raised when ``stats`` lacks what an approximation is built from."""
    return ValueError(
        f"layer {stats.name!r}: approximation {approximation!r} needs {statistic}, which was not "
        f"extracted; request {request} from curvlab.extract"
    )


# ----------------------------------------------------------------------------- interface


class KroneckerApproximation(ABC):
    """``K̂ = (U_out ⊗ U_in) diag(s) (U_out ⊗ U_in)ᵀ`` approximating one block (see module doc).

    Instances are immutable: eigen-decompositions and the damped inverse last asked for are
    computed lazily once and cached.

    Attributes:
        name: the approximation's name (``"kfac"``, ``"kflr"``, ``"ekfac"``, …).
        layout: the block's :class:`~curvlab.block.BlockLayout` (flat parameter order).
    """

    name: str
    layout: BlockLayout
    _inverse: tuple[tuple, DampedInverse] | None = None

    #: Whether the approximation carries TKFAC's trace split ``L = √δ Ψ``, ``R = √δ Φ``
    #: (needed by the ``"nor"`` damping).
    trace_factored: ClassVar[bool] = False

    # --- what each approximation defines (compressed) ------------------------------------

    @abstractmethod
    def _basis(self) -> tuple[Tensor, Tensor]:
        """``(U_out [d_out, k_out], U_in [D, k_in])``, orthonormal columns (``k < n``: truncated)."""

    @abstractmethod
    def _eigenvalue_grid(self) -> Tensor:
        """Compressed ``s``, ``[width(U_out), width(U_in)]``."""

    def _factor_grid(self) -> tuple[Tensor, Tensor] | None:
        """Compressed ``(l, r)`` (see :meth:`factor_eigenvalues`), or ``None``."""
        return None

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define the approximation, by constructor argument name (what
        :meth:`from_tensors` takes back: state dicts, broadcasts, device moves)."""
        raise NotImplementedError(f"{type(self).__name__} does not define tensors()")

    def options(self) -> dict[str, object]:
        """Constructor options besides the tensors (e.g. KFAC's ``eigh`` policy): what
        :meth:`from_tensors` needs to rebuild an identical object."""
        return {}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], *, layout: BlockLayout | None = None, name: str | None = None, **options: object
    ) -> "KroneckerApproximation":
        """Inverse of :meth:`tensors` (with :meth:`options`)."""
        return cls(**unflatten_tensors(tensors), layout=layout, **({} if name is None else {"name": name}), **options)  # type: ignore[call-arg]

    def decomposition(self) -> dict[str, Tensor]:
        """The eigen-decompositions this object has computed and cached beyond :meth:`tensors`
        (empty where :meth:`tensors` already holds the eigenbasis).  The data-parallel
        optimizers broadcast them so that one rank's ``eigh`` serves every rank."""
        return {}

    def adopt_decomposition(self, decomposition: dict[str, Tensor]) -> None:
        """Take as cache the :meth:`decomposition` of an object with the same :meth:`tensors`."""
        if decomposition:
            raise ValueError(f"{type(self).__name__} caches no decomposition, got {sorted(decomposition)}")

    def to(self, dtype: torch.dtype | torch.device | str | None = None,
           device: torch.device | str | None = None) -> "KroneckerApproximation":
        """A copy converted to ``dtype`` and/or moved to ``device``; as with ``Tensor.to``, a
        device may come first (``approx.to("cuda")``)."""
        if isinstance(dtype, (str, torch.device)) and device is None:
            dtype, device = None, dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{type(self).__name__} {self.name!r}.to: dtype={dtype!r} must be a torch.dtype")
        return self._converted(dtype, device)

    def _converted(self, dtype: torch.dtype | None, device: torch.device | str | None) -> "KroneckerApproximation":
        """:meth:`to`'s copy, its arguments checked."""
        moved = {k: v.to(dtype=dtype, device=device) for k, v in self.tensors().items()}
        return type(self).from_tensors(moved, layout=self.layout, name=self.name, **self.options())

    @classmethod
    @abstractmethod
    def from_stats(cls, stats: "LayerStats", **options: object) -> "KroneckerApproximation":
        """Build the approximation of ``stats``' block from its extracted statistics."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating point type."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device."""

    # --- the eigen-decomposition, compressed or expanded ---------------------------------

    #: whether the eigenbasis is the identity's (the diagonal approximation: no ``D × D`` identity
    #: need be formed to rotate into it)
    identity_basis: bool = False

    @property
    def truncated(self) -> bool:
        """Whether a side's basis is truncated (a flat remainder on its complement)."""
        u_out, u_in = self._basis()
        return u_out.shape[1] < u_out.shape[0] or u_in.shape[1] < u_in.shape[0]

    def eigenbasis(self, compressed: bool = False) -> tuple[Tensor, Tensor]:
        """``(U_out, U_in)``, orthonormal: ``[d_out, d_out]`` and ``[D, D]`` (a truncated side
        completed by an arbitrary orthonormal complement), or as stored (``compressed``)."""
        u_out, u_in = self._basis()
        return (u_out, u_in) if compressed else (complete_basis(u_out), complete_basis(u_in))

    def eigenvalues(self, compressed: bool = False) -> Tensor:
        """``s`` as a ``[d_out, D]`` matrix (``s[i, j]`` ↔ ``U_out[:, i] ⊗ U_in[:, j]``), or
        compressed (``[width_out, width_in]``)."""
        return self._expand(self._eigenvalue_grid(), compressed)

    def factor_eigenvalues(self, compressed: bool = False) -> tuple[Tensor, Tensor] | None:
        """``(l [d_out], r [D])``: the diagonals, in the eigenbasis, of the Kronecker factors
        ``L ⊗ R`` that factored damping perturbs; ``None`` where there are none.

        For a plain Kronecker product ``s = l rᵀ``.
        """
        grid = self._factor_grid()
        if grid is None or compressed:
            return grid
        u_out, u_in = self._basis()
        return expand(grid[0], u_out), expand(grid[1], u_in)

    def factor_means(self) -> tuple[Tensor, Tensor] | None:
        """``(mean l, mean r)`` over all eigen-directions (traces / sizes), or ``None``."""
        grid = self._factor_grid()
        if grid is None:
            return None
        u_out, u_in = self._basis()
        return tuple(  # type: ignore[return-value]
            ((v * multiplicity(u)).sum() if is_truncated(u) else v.sum()) / u.shape[0]
            for v, u in zip(grid, (u_out, u_in))
        )

    def multiplicity(self) -> Tensor:
        """``[width_out, width_in]``: eigen-directions behind each compressed entry."""
        u_out, u_in = self._basis()
        return torch.outer(multiplicity(u_out), multiplicity(u_in))

    def compressed_mean(self, sums: Tensor) -> Tensor:
        """Compressed sums over eigen-directions (e.g. ``kfe_scaling`` extracted in a truncated
        basis) → compressed per-direction values."""
        return sums / self.multiplicity() if self.truncated else sums

    def _expand(self, grid: Tensor, compressed: bool) -> Tensor:
        if compressed or not self.truncated:
            return grid
        u_out, u_in = self._basis()
        return expand(expand(grid, u_in, dim=-1), u_out, dim=-2)

    # --- derived quantities -----------------------------------------------------------------

    @property
    def num_params(self) -> int:
        """P = d_out · D."""
        return self.layout.num_params

    def spectrum(self, count: int | None = None) -> Tensor:
        """The ``count`` largest eigenvalues of ``K̂`` (default: all P), descending (a 512 × 4608
        grid: topk, not a sort)."""
        values = self.eigenvalues().flatten()
        if count is None or count >= values.numel():
            return values.sort(descending=True).values
        return values.topk(count).values

    def trace(self) -> Tensor:
        """``tr K̂ = Σ s``."""
        s = self._eigenvalue_grid()
        return (s * self.multiplicity()).sum() if self.truncated else s.sum()

    def frobenius_norm(self) -> Tensor:
        """``‖K̂‖_F = ‖s‖₂`` (``Q`` is orthogonal)."""
        s = self._eigenvalue_grid()
        return ((s.square() * self.multiplicity()).sum() if self.truncated else s.square().sum()).sqrt()

    def optimal_scaling(self, sqrt: "SquareRoot") -> Tensor:
        """``s* = diag(Qᵀ F Q) = Σ_k (U_outᵀ M_k U_in)²`` of the block with square root ``sqrt`` in
        this approximation's basis (what the comparison measures the scaling against), ``[d_out,
        D]``.  On a truncated side's complement, where ``K̂`` is flat, the mean of ``s*`` over it
        (:func:`~curvlab.approx.spectral.optimal_scaling`, as EKFAC's rescaling takes it): the
        best flat value, the same for every completion of the basis."""
        return self._expand(spectral_optimal_scaling(sqrt, *self.eigenbasis(compressed=True)), compressed=False)

    def rotate(self, x: Tensor) -> Tensor:
        """Into the (expanded) eigenbasis: ``U_outᵀ X U_in`` (``X``: ``[..., d_out, D]``)."""
        u_out, u_in = self.eigenbasis()
        return in_basis(u_out.mT @ x, u_in)

    def unrotate(self, y: Tensor) -> Tensor:
        """Out of the (expanded) eigenbasis: ``U_out Y U_inᵀ``."""
        u_out, u_in = self.eigenbasis()
        return out_of_basis(u_out @ y, u_in)

    def mat_mul(self, x: Tensor) -> Tensor:
        """``K̂ X`` for ``X`` of shape ``[..., d_out, D]``: ``U_out [(U_outᵀ X U_in) ⊙ s] U_inᵀ``
        (computed in the approximation's dtype, returned in ``X``'s)."""
        self._check_matrix(x)
        return diagonal_apply(x.to(self.dtype), *self._basis(), self._eigenvalue_grid()).to(x.dtype)

    def damped_eigenvalues(self, damping: float, strategy: str | DampingStrategy = "exact", compressed: bool = False) -> Tensor:
        """What the damped inverse divides by in the eigenbasis, ``[d_out, D]`` (or compressed)."""
        return self._expand(get_damping(strategy).damped_eigenvalues(self, damping), compressed)

    def inverse(self, damping: float | Tensor, strategy: str | DampingStrategy = "exact") -> DampedInverse:
        """``X ↦ (K̂ + damping)⁻¹ X`` with the damping of ``strategy``, prepared once: the last
        one asked for (by damping value and built-in strategy) is kept."""
        key = _cache_key(strategy, damping)
        cached = self._inverse
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        strategy = get_damping(strategy)
        check_damping(damping, f"{type(self).__name__} {self.name!r}: damping")
        inverse = self._build_inverse(strategy, damping)
        if key is not None:
            self._inverse = (key, inverse)
        return inverse

    def _build_inverse(self, strategy: DampingStrategy, damping: float | Tensor) -> DampedInverse:
        return DiagonalInverse(*self._basis(), strategy.damped_eigenvalues(self, damping))

    def inv_mat_mul(self, x: Tensor, damping: float, strategy: str | DampingStrategy = "exact") -> Tensor:
        """``(K̂ + damping)⁻¹ X`` with the damping of ``strategy``:
        ``U_out [(U_outᵀ X U_in) ⊘ s_damped] U_inᵀ`` (for a Kronecker product with Kronecker
        damping, equivalently ``(L + aI)⁻¹ X (R + bI)⁻¹``); computed in the approximation's
        dtype, returned in ``X``'s.  The default ``"exact"`` is ``(K̂ + λI)⁻¹`` itself; the
        optimizers and :func:`curvlab.compare` damp each method its own way
        (:data:`curvlab.approx.DEFAULT_DAMPING`), so pass that strategy to reproduce them."""
        self._check_matrix(x)
        if x.dtype == self.dtype:  # the common case: no conversion calls
            return self.inverse(damping, strategy)(x)
        return self.inverse(damping, strategy)(x.to(self.dtype)).to(x.dtype)

    def inv_mat_mul_columns(self, parts: Sequence[Tensor], damping: float,
                            strategy: str | DampingStrategy = "exact") -> list[Tensor]:
        """:meth:`inv_mat_mul` of ``X = [X₁ … X_k]`` given as its column blocks (``[d_out, c_i]``;
        a layer's weight and bias columns, :meth:`curvlab.block.Block.grad_columns`), returned
        as the result's column blocks — the same map, without forming ``X`` where the damped
        inverse allows (:meth:`curvlab.approx.inverse.DampedInverse.columns`)."""
        inverse, converted = self._columns_input(parts, damping, strategy)
        if converted is None:
            return inverse.columns(parts)
        return [y.to(parts[0].dtype) for y in inverse.columns(converted)]

    def inv_mat_mul_columns_and_inner(self, parts: Sequence[Tensor], damping: float,
                                      strategy: str | DampingStrategy = "exact") -> tuple[list[Tensor], Tensor]:
        """:meth:`inv_mat_mul_columns` ``Y`` and ``⟨Y, X⟩ = vec(X)ᵀ (K̂ + damping)⁻¹ vec(X)`` (an
        optimizer's ``⟨K̂⁻¹g, g⟩``), the latter in the approximation's dtype
        (:meth:`curvlab.approx.inverse.DampedInverse.columns_and_inner`)."""
        inverse, converted = self._columns_input(parts, damping, strategy)
        if converted is None:
            return inverse.columns_and_inner(parts)
        ys, inner = inverse.columns_and_inner(converted)
        return [y.to(parts[0].dtype) for y in ys], inner

    def _columns_input(self, parts: Sequence[Tensor], damping: float,
                       strategy: str | DampingStrategy) -> tuple[DampedInverse, list[Tensor] | None]:
        """The damped inverse, and ``parts`` in the approximation's dtype (``None``: already)."""
        d_out, d_in = self.layout.shape
        width, same_dtype = 0, True
        for p in parts:  # a loop, not generators: this runs for every block of every step
            if p.dim() != 2 or p.shape[0] != d_out:
                width = -1
                break
            width += p.shape[1]
            same_dtype = same_dtype and p.dtype == self.dtype
        if width != d_in:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: column blocks {[tuple(p.shape) for p in parts]} do not "
                f"make a [{d_out}, {d_in}] matrix"
            )
        inverse = self.inverse(damping, strategy)
        return inverse, None if same_dtype else [p.to(self.dtype) for p in parts]

    def matvec(self, v: Tensor) -> Tensor:
        """``K̂ v`` for ``v`` in the flat parameter order (``[..., P]``)."""
        return self.layout.to_vector(self.mat_mul(self.layout.to_matrix(v)))

    def inverse_matvec(self, v: Tensor, damping: float, strategy: str | DampingStrategy = "exact") -> Tensor:
        """``(K̂ + damping)⁻¹ v`` for ``v`` in the flat parameter order (``[..., P]``)."""
        return self.layout.to_vector(self.inv_mat_mul(self.layout.to_matrix(v), damping, strategy))

    def to_dense(self) -> Tensor:
        """``K̂`` as a ``P × P`` matrix in the flat parameter order (tests, small blocks only).

        Raises:
            ValueError: if ``P > MAX_DENSE_PARAMS``.
        """
        if self.num_params > MAX_DENSE_PARAMS:
            raise ValueError(
                f"{type(self).__name__}.to_dense: approximation {self.name!r} has P={self.num_params} "
                f"> {MAX_DENSE_PARAMS} parameters; use mat_mul/matvec instead"
            )
        dense = self._dense_matrix_order()
        perm = self.layout.permutation().to(dense.device)
        return dense[perm][:, perm]

    def _dense_matrix_order(self) -> Tensor:
        """``Q diag(s) Qᵀ`` indexed by the row-major flattening of the matrix form."""
        u_out, u_in = self.eigenbasis()
        q = torch.kron(u_out.contiguous(), u_in.contiguous())
        return (q * self.eigenvalues().flatten()) @ q.T

    def _check_matrix(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} {self.name!r}: expected a tensor of matrices [..., "
                            f"{self.layout.shape[0]}, {self.layout.shape[1]}], got {type(x).__name__}")
        if tuple(x.shape[-2:]) != self.layout.shape:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: expected matrices [..., {self.layout.shape[0]}, "
                f"{self.layout.shape[1]}], got shape {tuple(x.shape)}"
            )

    def __repr__(self) -> str:
        d_out, d_in = self.layout.shape
        return f"{type(self).__name__}(name={self.name!r}, shape=({d_out}, {d_in}), dtype={self.dtype})"


def _cache_key(strategy: str | DampingStrategy, damping: float | Tensor) -> tuple | None:
    """What identifies a damped inverse: a built-in strategy (by name or object; no object made:
    this runs for every block of every step) and a Python damping value (``None``: not cached — a
    tensor damping or a user strategy may change in place)."""
    kind = built_in_class(strategy)
    if kind is None or not isinstance(damping, (int, float)):
        return None
    return (kind, float(damping))

