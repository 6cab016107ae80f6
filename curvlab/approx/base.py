"""The one interface of every Kronecker-factored approximation of a Fisher block.

Every approximation ``K̂`` of a block ``F`` (``P × P``, ``P = d_out·D``) in curvlab has the form

    K̂ = Q diag(s) Qᵀ,   Q = U_out ⊗ U_in,

with ``Q`` acting on the matrix form ``X ∈ R^{d_out × D}`` as ``X ↦ U_out X U_inᵀ`` (row-major
Kronecker convention of :mod:`curvlab.layout`).  The eigenvalues ``s`` are stored as a
``[d_out, D]`` matrix: ``s[i, j]`` belongs to the eigenvector ``U_out[:, i] ⊗ U_in[:, j]``, so

    K̂ X = U_out [(U_outᵀ X U_in) ⊙ s] U_inᵀ,
    (K̂ + damping)⁻¹ X = U_out [(U_outᵀ X U_in) ⊘ s_damped] U_inᵀ,

where ``s_damped`` is given by a :mod:`~curvlab.approx.damping` strategy.

Two intermediate classes share the code of the two families:

* :class:`KroneckerProduct` — ``K̂ = scale · L ⊗ R`` (KFAC/KFLR, TKFAC, KFOC): products use the
  factors directly, the eigenbasis is ``eigh(L) ⊗ eigh(R)``, ``s = scale · λ_L λ_Rᵀ``.
* :class:`EigenCorrected` — a fixed basis with a free diagonal ``s`` (EKFAC, TEKFAC).

No method forms a ``P × P`` matrix except :meth:`KroneckerApproximation.to_dense`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from curvlab.approx.damping import DampingStrategy, get_damping
from curvlab.approx.eigh import psd_eigh, symmetrize
from curvlab.block import BlockLayout

if TYPE_CHECKING:
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

    Instances are immutable: eigen-decompositions are computed lazily once and cached.

    Attributes:
        name: the approximation's name (``"kfac"``, ``"kflr"``, ``"ekfac"``, …).
        layout: the block's :class:`~curvlab.layout.BlockLayout` (flat parameter order).
    """

    name: str
    layout: BlockLayout

    #: Whether the approximation carries TKFAC's trace split ``L = √δ Ψ``, ``R = √δ Φ``
    #: (needed by the ``"nor"`` damping).
    trace_factored: ClassVar[bool] = False

    # --- what each approximation defines -------------------------------------------------

    @abstractmethod
    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """``(U_out [d_out, d_out], U_in [D, D])``, both orthonormal."""

    @abstractmethod
    def eigenvalues(self) -> Tensor:
        """``s`` as a ``[d_out, D]`` matrix (``s[i, j]`` ↔ ``U_out[:, i] ⊗ U_in[:, j]``)."""

    def factor_eigenvalues(self) -> tuple[Tensor, Tensor] | None:
        """``(l [d_out], r [D])``: the diagonals, in the eigenbasis, of the Kronecker factors
        ``L ⊗ R`` that factored damping perturbs; ``None`` where there are none.

        For a plain Kronecker product ``s = l rᵀ``.
        """
        return None

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define the approximation, by constructor argument name (what
        :meth:`from_tensors` takes back: state dicts, broadcasts, device moves)."""
        raise NotImplementedError(f"{type(self).__name__} does not define tensors()")

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, layout: BlockLayout | None = None, name: str | None = None) -> "KroneckerApproximation":
        """Inverse of :meth:`tensors`."""
        return cls(**tensors, layout=layout, **({} if name is None else {"name": name}))  # type: ignore[call-arg]

    def decomposition(self) -> dict[str, Tensor]:
        """The eigen-decompositions this object has computed and cached beyond :meth:`tensors`
        (empty where :meth:`tensors` already holds the eigenbasis).  The data-parallel
        optimizers broadcast them so that one rank's ``eigh`` serves every rank."""
        return {}

    def adopt_decomposition(self, decomposition: dict[str, Tensor]) -> None:
        """Take as cache the :meth:`decomposition` of an object with the same :meth:`tensors`."""
        if decomposition:
            raise ValueError(f"{type(self).__name__} caches no decomposition, got {sorted(decomposition)}")

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "KroneckerApproximation":
        """A copy converted to ``dtype`` and/or moved to ``device``."""
        moved = {k: v.to(dtype=dtype, device=device) for k, v in self.tensors().items()}
        return type(self).from_tensors(moved, layout=self.layout, name=self.name)

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

    # --- derived quantities -----------------------------------------------------------------

    @property
    def num_params(self) -> int:
        """P = d_out · D."""
        return self.layout.num_params

    def spectrum(self) -> Tensor:
        """All P eigenvalues of ``K̂``, sorted descending."""
        return self.eigenvalues().flatten().sort(descending=True).values

    def trace(self) -> Tensor:
        """``tr K̂ = Σ s``."""
        return self.eigenvalues().sum()

    def frobenius_norm(self) -> Tensor:
        """``‖K̂‖_F = ‖s‖₂`` (``Q`` is orthogonal)."""
        return torch.linalg.vector_norm(self.eigenvalues())

    def rotate(self, x: Tensor) -> Tensor:
        """Into the eigenbasis: ``U_outᵀ X U_in`` (``X``: ``[..., d_out, D]``)."""
        u_out, u_in = self.eigenbasis()
        return u_out.mT @ x @ u_in

    def unrotate(self, y: Tensor) -> Tensor:
        """Out of the eigenbasis: ``U_out Y U_inᵀ``."""
        u_out, u_in = self.eigenbasis()
        return u_out @ y @ u_in.mT

    def mat_mul(self, x: Tensor) -> Tensor:
        """``K̂ X`` for ``X`` of shape ``[..., d_out, D]``: ``U_out [(U_outᵀ X U_in) ⊙ s] U_inᵀ``."""
        self._check_matrix(x)
        return self.unrotate(self.rotate(x) * self.eigenvalues())

    def damped_eigenvalues(self, damping: float, strategy: str | DampingStrategy = "exact") -> Tensor:
        """What the damped inverse divides by in the eigenbasis, ``[d_out, D]``."""
        return get_damping(strategy).damped_eigenvalues(self, damping)

    def inv_mat_mul(self, x: Tensor, damping: float, strategy: str | DampingStrategy = "exact") -> Tensor:
        """``(K̂ + damping)⁻¹ X`` with the damping of ``strategy``:
        ``U_out [(U_outᵀ X U_in) ⊘ s_damped] U_inᵀ``."""
        self._check_matrix(x)
        return self.unrotate(self.rotate(x) / self.damped_eigenvalues(damping, strategy))

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
        if tuple(x.shape[-2:]) != self.layout.shape:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: expected matrices [..., {self.layout.shape[0]}, "
                f"{self.layout.shape[1]}], got shape {tuple(x.shape)}"
            )

    def __repr__(self) -> str:
        d_out, d_in = self.layout.shape
        return f"{type(self).__name__}(name={self.name!r}, shape=({d_out}, {d_in}), dtype={self.dtype})"


# ----------------------------------------------------------------------------- families


class KroneckerProduct(KroneckerApproximation):
    """``K̂ = scale · L ⊗ R`` with symmetric PSD ``L`` (``[d_out, d_out]``, output side) and ``R``
    (``[D, D]``, input side).

    ``K̂ X = scale · L X Rᵀ`` needs no eigen-decomposition; the eigenbasis is
    ``(eigh(L), eigh(R))`` and ``s = scale · λ_L λ_Rᵀ``.  For damping the factors are split as
    ``(√scale L) ⊗ (√scale R)``, so ``l = √scale λ_L`` and ``r = √scale λ_R``.
    """

    def __init__(
        self, left: Tensor, right: Tensor, scale: Tensor | None, layout: BlockLayout | None, name: str
    ) -> None:
        who = type(self).__name__
        check_square(left, "the output-side factor", who)
        check_square(right, "the input-side factor", who)
        if left.dtype != right.dtype or left.device != right.device:
            raise ValueError(f"{who}: factors must share dtype and device")
        self._left = symmetrize(left)
        self._right = symmetrize(right)
        self._scale = scale
        self.layout = resolve_layout(layout, left.shape[0], right.shape[0], who)
        self.name = name
        self._eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._left.dtype

    @property
    def device(self) -> torch.device:
        return self._left.device

    def _factor_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cached ``(λ_L, U_L, λ_R, U_R)``."""
        if self._eig is None:
            self._eig = (*psd_eigh(self._left), *psd_eigh(self._right))
        return self._eig

    #: Names of the cached ``(λ_L, U_L, λ_R, U_R)`` in :meth:`decomposition`.
    DECOMPOSITION = ("lam_left", "u_left", "lam_right", "u_right")

    def decomposition(self) -> dict[str, Tensor]:
        return {} if self._eig is None else dict(zip(self.DECOMPOSITION, self._eig))

    def adopt_decomposition(self, decomposition: dict[str, Tensor]) -> None:
        if not decomposition:
            return
        if set(decomposition) != set(self.DECOMPOSITION):
            raise ValueError(f"{type(self).__name__}: a decomposition has {self.DECOMPOSITION}, got {sorted(decomposition)}")
        self._eig = tuple(decomposition[k] for k in self.DECOMPOSITION)  # type: ignore[assignment]

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        _, u_left, _, u_right = self._factor_eigh()
        return u_left, u_right

    def eigenvalues(self) -> Tensor:
        lam_left, _, lam_right, _ = self._factor_eigh()
        s = torch.outer(lam_left, lam_right)
        return s if self._scale is None else s * self._scale

    def factor_eigenvalues(self) -> tuple[Tensor, Tensor]:
        lam_left, _, lam_right, _ = self._factor_eigh()
        if self._scale is None:
            return lam_left, lam_right
        root = self._scale.sqrt()
        return root * lam_left, root * lam_right

    def mat_mul(self, x: Tensor) -> Tensor:
        """``K̂ X = scale · L X Rᵀ`` straight from the factors."""
        self._check_matrix(x)
        out = self._left @ x @ self._right.mT
        return out if self._scale is None else out * self._scale

    def _dense_matrix_order(self) -> Tensor:
        dense = torch.kron(self._left.contiguous(), self._right.contiguous())
        return dense if self._scale is None else dense * self._scale


class EigenCorrected(KroneckerApproximation):
    """A fixed Kronecker eigenbasis ``U_out ⊗ U_in`` with a free diagonal ``s`` (``.scaling``).

    Args:
        u_out: ``[d_out, d_out]`` orthonormal.
        u_in: ``[D, D]`` orthonormal.
        scaling: ``s``, ``[d_out, D]``.
        factor_eigenvalues: ``(l, r)``, the diagonals in this basis of the underlying Kronecker
            factors used by factored damping, or ``None``.
        layout: the block's layout (default: plain weight, no bias column).
        name: the approximation's name.
    """

    def __init__(
        self,
        u_out: Tensor,
        u_in: Tensor,
        scaling: Tensor,
        factor_eigenvalues: tuple[Tensor, Tensor] | None,
        layout: BlockLayout | None,
        name: str,
    ) -> None:
        who = type(self).__name__
        check_square(u_out, "U_out", who)
        check_square(u_in, "U_in", who)
        shape = (u_out.shape[0], u_in.shape[0])
        if tuple(scaling.shape) != shape:
            raise ValueError(f"{who}: scaling must have shape {shape}, got {tuple(scaling.shape)}")
        if factor_eigenvalues is not None:
            l, r = factor_eigenvalues
            if tuple(l.shape) != shape[:1] or tuple(r.shape) != shape[1:]:
                raise ValueError(
                    f"{who}: factor eigenvalues must have shapes ({shape[0]},) and ({shape[1]},), "
                    f"got {tuple(l.shape)} and {tuple(r.shape)}"
                )
        self.u_out = u_out
        self.u_in = u_in
        self.scaling = scaling
        self._factor_eigenvalues = factor_eigenvalues
        self.layout = resolve_layout(layout, *shape, who)
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.scaling.dtype

    @property
    def device(self) -> torch.device:
        return self.scaling.device

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        return self.u_out, self.u_in

    def eigenvalues(self) -> Tensor:
        return self.scaling

    def factor_eigenvalues(self) -> tuple[Tensor, Tensor] | None:
        return self._factor_eigenvalues

    def with_scaling(self, scaling: Tensor) -> "EigenCorrected":
        """The same basis (and damping statistics) with another diagonal ``s``."""
        return type(self).from_tensors({**self.tensors(), "scaling": scaling}, layout=self.layout, name=self.name)
