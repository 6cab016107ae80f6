"""The two families of Kronecker approximations (interface: :mod:`curvlab.approx.base`).

* :class:`KroneckerProduct` — ``K̂ = scale · L ⊗ R`` (KFAC/KFLR, TKFAC, KFOC);
* :class:`EigenCorrected` — a fixed basis with a free diagonal ``s`` (EKFAC, TEKFAC).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from curvlab.approx.base import KroneckerApproximation, check_square, resolve_layout
from curvlab.approx.damping import DampingStrategy
from curvlab.approx.eigh import EXACT_EIGH, EighPolicy, factor_eigh, symmetrize
from curvlab.approx.inverse import DampedInverse, FactorInverse, KroneckerInverse
from curvlab.approx.spectral import TruncatedFactor, left_apply, right_apply, width
from curvlab.block import BlockLayout

#: A Kronecker factor: a dense symmetric PSD matrix or a truncated eigen-decomposition.
Factor = Tensor | TruncatedFactor


class KroneckerProduct(KroneckerApproximation):
    """``K̂ = scale · L ⊗ R`` with symmetric PSD ``L`` (``[d_out, d_out]``, output side) and ``R``
    (``[D, D]``, input side).

    ``K̂ X = scale · L X Rᵀ`` needs no eigen-decomposition; the eigenbasis is
    ``(eigh(L), eigh(R))`` and ``s = scale · λ_L λ_Rᵀ``.  For damping the factors are split as
    ``(√scale L) ⊗ (√scale R)``, so ``l = √scale λ_L`` and ``r = √scale λ_R``; a damping that is
    itself a Kronecker product (``"factored"``, ``"nor"``) is inverted as
    ``(√scale L + aI)⁻¹ X (√scale R + bI)⁻¹`` from two Cholesky factorisations (no eigh).

    A factor may be a :class:`~curvlab.approx.spectral.TruncatedFactor`; a dense one that
    ``eigh`` truncates (:meth:`EighPolicy.truncates`) is replaced by its truncation here, so the
    object *is* the product with the truncated factor.  ``eigh`` also sets the dtype of the
    decompositions and inverses.
    """

    def __init__(
        self, left: Factor, right: Factor, scale: Tensor | None, layout: BlockLayout | None, name: str,
        eigh: EighPolicy = EXACT_EIGH,
    ) -> None:
        who = type(self).__name__
        left = self._prepare(left, eigh, "the output-side factor", who)
        right = self._prepare(right, eigh, "the input-side factor", who)
        if left.dtype != right.dtype or left.device != right.device:
            raise ValueError(f"{who}: factors must share dtype and device")
        self._left, self._right = left, right
        self._scale = scale
        self.eigh_policy = eigh
        self.layout = resolve_layout(layout, _size(left), _size(right), who)
        self.name = name
        self._eig: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @staticmethod
    def _prepare(factor: Factor, eigh: EighPolicy, what: str, who: str) -> Factor:
        if isinstance(factor, TruncatedFactor):
            return factor
        check_square(factor, what, who)
        if eigh.truncates(factor.shape[0]):
            return TruncatedFactor(*factor_eigh(factor, eigh))
        return symmetrize(factor)

    def options(self) -> dict[str, object]:
        return {"eigh": self.eigh_policy}

    def _converted(self, dtype: torch.dtype | None, device: torch.device | str | None) -> "KroneckerProduct":
        """A copy converted to ``dtype`` (its decompositions then computed in ``dtype`` too)
        and/or moved to ``device``."""
        policy = self.eigh_policy
        if dtype is not None and policy.dtype is not None:
            policy = dataclasses.replace(policy, dtype=dtype)
        moved = {k: v.to(dtype=dtype, device=device) for k, v in self.tensors().items()}
        return type(self).from_tensors(moved, layout=self.layout, name=self.name, eigh=policy)

    @property
    def dtype(self) -> torch.dtype:
        return self._left.dtype

    @property
    def device(self) -> torch.device:
        return self._left.device

    def _factor_eigh(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Cached compressed ``((λ_L, U_L), (λ_R, U_R))``."""
        if self._eig is None:
            self._eig = tuple(  # type: ignore[assignment]
                (f.values, f.vectors) if isinstance(f, TruncatedFactor) else factor_eigh(f, self.eigh_policy)
                for f in (self._left, self._right)
            )
        return self._eig  # type: ignore[return-value]

    #: Names of the cached ``(λ_L, U_L, λ_R, U_R)`` in :meth:`decomposition`.
    DECOMPOSITION = ("lam_left", "u_left", "lam_right", "u_right")

    def decomposition(self) -> dict[str, Tensor]:
        if self._eig is None:
            return {}
        (lam_left, u_left), (lam_right, u_right) = self._eig
        return dict(zip(self.DECOMPOSITION, (lam_left, u_left, lam_right, u_right)))

    def adopt_decomposition(self, decomposition: dict[str, Tensor]) -> None:
        if not decomposition:
            return
        if set(decomposition) != set(self.DECOMPOSITION):
            raise ValueError(f"{type(self).__name__}: a decomposition has {self.DECOMPOSITION}, got {sorted(decomposition)}")
        lam_left, u_left, lam_right, u_right = (decomposition[k] for k in self.DECOMPOSITION)
        self._eig = ((lam_left, u_left), (lam_right, u_right))

    def _basis(self) -> tuple[Tensor, Tensor]:
        (_, u_left), (_, u_right) = self._factor_eigh()
        return u_left, u_right

    def _eigenvalue_grid(self) -> Tensor:
        return torch.outer(*self._factor_grid())

    def _factor_grid(self) -> tuple[Tensor, Tensor]:
        # √scale on each side: TKFAC's δΦ, δΨ are ~δ each and scale = 1/δ, so λ_L λ_Rᵀ before
        # the scale overflowed float32 from δ ~ 1e19 where the product itself is ~δ
        (lam_left, _), (lam_right, _) = self._factor_eigh()
        if self._scale is None:
            return lam_left, lam_right
        root = self._scale.sqrt()
        return root * lam_left, root * lam_right

    def factor_means(self) -> tuple[Tensor, Tensor]:
        """``(tr √scale L / d_out, tr √scale R / D)`` straight from the factors (no eigh)."""
        root = 1.0 if self._scale is None else self._scale.sqrt()
        return tuple(root * _trace(f) / _size(f) for f in (self._left, self._right))  # type: ignore[return-value]

    def mat_mul(self, x: Tensor) -> Tensor:
        """``K̂ X = (√scale L) X (√scale R)ᵀ`` straight from the factors (no ``~δ²`` product)."""
        self._check_matrix(x)
        dtype, x = x.dtype, x.to(self.dtype)
        root = None if self._scale is None else self._scale.sqrt()
        if root is not None:
            x = x * root
        r = self._right
        out = x @ r if isinstance(r, Tensor) else right_apply(x, r.vectors, r.values.reshape(1, -1))
        left = self._left
        if root is not None:
            out = out * root
        out = left @ out if isinstance(left, Tensor) else left_apply(out, left.vectors, left.values)
        return out.to(dtype)

    def _build_inverse(self, strategy: DampingStrategy, damping: float | Tensor) -> DampedInverse:
        shifts = strategy.kronecker_shifts(self, damping)
        if shifts is None:
            return super()._build_inverse(strategy, damping)
        root = torch.ones((), dtype=self.dtype, device=self.device) if self._scale is None else self._scale.sqrt()
        dt = self.eigh_policy.dtype
        return KroneckerInverse(
            FactorInverse(self._left, root, shifts[0], dt), FactorInverse(self._right, root, shifts[1], dt)
        )

    def _dense_matrix_order(self) -> Tensor:
        root = 1.0 if self._scale is None else self._scale.sqrt()
        left, right = (root * _dense(f).contiguous() for f in (self._left, self._right))
        return torch.kron(left, right)


def _size(factor: Factor) -> int:
    return factor.size if isinstance(factor, TruncatedFactor) else factor.shape[0]


def _trace(factor: Factor) -> Tensor:
    return factor.trace() if isinstance(factor, TruncatedFactor) else factor.diagonal().sum()


def _dense(factor: Factor) -> Tensor:
    return factor.dense() if isinstance(factor, TruncatedFactor) else factor


class EigenCorrected(KroneckerApproximation):
    """A fixed Kronecker eigenbasis ``U_out ⊗ U_in`` with a free diagonal ``s`` (``.scaling``).

    Args:
        u_out: ``[d_out, k_out]`` orthonormal columns (``k_out = d_out``: full; fewer: truncated).
        u_in: ``[D, k_in]`` orthonormal columns.
        scaling: compressed ``s``, ``[width(u_out), width(u_in)]`` (``[d_out, D]`` for full bases).
        factor_eigenvalues: compressed ``(l, r)``, the diagonals in this basis of the underlying
            Kronecker factors used by factored damping, or ``None``.
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
        for u, what in ((u_out, "U_out"), (u_in, "U_in")):
            if u.dim() != 2 or u.shape[1] > u.shape[0] or u.shape[1] < 1:
                raise ValueError(f"{who}: {what} must be [n, k] with 1 ≤ k ≤ n, got shape {tuple(u.shape)}")
        shape = (width(u_out), width(u_in))
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
        self.layout = resolve_layout(layout, u_out.shape[0], u_in.shape[0], who)
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.scaling.dtype

    @property
    def device(self) -> torch.device:
        return self.scaling.device

    def _basis(self) -> tuple[Tensor, Tensor]:
        return self.u_out, self.u_in

    def _eigenvalue_grid(self) -> Tensor:
        return self.scaling

    def _factor_grid(self) -> tuple[Tensor, Tensor] | None:
        return self._factor_eigenvalues

    def with_scaling(self, scaling: Tensor) -> "EigenCorrected":
        """The same basis (and damping statistics) with another (compressed) diagonal ``s``."""
        return type(self).from_tensors({**self.tensors(), "scaling": scaling}, layout=self.layout, name=self.name)
