"""Damped inverses ``(K̂ + damping)⁻¹`` prepared once, applied many times.

An approximation's :meth:`~curvlab.approx.KroneckerApproximation.inverse` returns one of these
(and keeps it until asked for another damping): everything that does not depend on the vector —
damped eigenvalues, damped factor inverses — is computed here once.

* :class:`DiagonalInverse` — any approximation, in its eigenbasis:
  ``U_out [(U_outᵀ X U_in) ⊙ (1/s_damped)] U_inᵀ`` (four GEMMs; cheaper on a truncated side).
* :class:`ElementwiseInverse` — a diagonal in the identity basis (:class:`~curvlab.approx.Diagonal`):
  ``X ⊘ s_damped``, no rotation.
* :class:`KroneckerInverse` — a Kronecker product ``L ⊗ R`` whose damping is itself a Kronecker
  product, ``(L + aI) ⊗ (R + bI)`` (the ``"factored"`` and ``"nor"`` strategies):
  ``(L + aI)⁻¹ X (R + bI)⁻¹`` with the two damped factor inverses stored (two GEMMs, no
  eigen-decomposition: a Cholesky factorisation each).

:meth:`DampedInverse.columns` applies the same map to ``X`` given as column blocks (a layer's
weight and bias columns) and returns the result's column blocks: the optimizers' update path,
where a :class:`KroneckerInverse` then multiplies by the blocks of ``(R + bI)⁻¹`` instead of
forming ``X`` and writing a ``D``-wide product — measured inside a training step on this
project's 2-core CPU, a ``[128, 785]`` GEMM output cost ~0.5 ms more than its ``[128, 784]``
weight part plus the bias terms.  A small block (and any block off the CPU) is joined into ``X``
instead (:func:`joins_columns`): there a step pays for each op, not for its flops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from curvlab import device_routes, mkl
from curvlab.approx.eigh import in_scope_span, is_diagonal, psd_eigh, symmetrize
from curvlab.approx.spectral import (
    TruncatedFactor, complement_map, diagonal_apply, flat_route, is_truncated, left_apply, right_apply,
    transposed_basis)
from curvlab.basis import permutation_order
from curvlab.reuse import keep, kept


class DampedInverse(ABC):
    """``X ↦ (K̂ + damping)⁻¹ X`` for ``X`` of shape ``[..., d_out, D]``."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """The damped inverse applied to ``x``."""

    @property
    def positive_definite(self) -> bool:
        """Whether the map is positive definite by construction: applied through orthonormal
        bases with positive damped eigenvalues, ``⟨K̂⁻¹x, x⟩ = Σ y_i²/s_i`` (``y``: ``x`` in the
        basis), negative only by its rounding — at most ``n·ε`` of ``‖K̂⁻¹x‖‖x‖`` for ``n``-wide
        bases.  False where that is not known: a dense inverse by Cholesky, which a float32
        factor's spectrum beyond its resolution leaves indefinite (the optimizers then check
        every step's direction, :func:`curvlab.optim.update.negative_guard`)."""
        return False

    def columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """The damped inverse applied to ``X = [X₁ … X_k]`` (``[d_out, D]``) given as its column
        blocks ``X_i`` (``[d_out, c_i]``), returned as the column blocks of the result (same
        widths).  Here: through ``X`` itself; subclasses may avoid it where it is large
        (:func:`joins_columns`)."""
        if len(parts) == 1:
            return [self(parts[0])]
        return cut_columns(self(torch.cat(list(parts), 1)), parts)

    def columns_and_inner(self, parts: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """:meth:`columns` ``Y`` and ``⟨Y, X⟩`` (the sum of ``Y ⊙ X``: ``vec(X)ᵀ (K̂ + damping)⁻¹
        vec(X)``, what an optimizer guards its step with) — one product of ``X`` joined where
        :func:`joins_columns` (one ``torch.dot``: a small block's step pays its ops, not its
        flops), else one per column block."""
        if len(parts) == 1 or joins_columns(parts):
            x = parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)
            y = self(x)
            return cut_columns(y, parts), torch.dot(y.reshape(-1), x.reshape(-1))
        ys = self.columns(parts)
        dots = column_inners(ys, parts)
        return ys, sum(dots[1:], dots[0])


#: On the CPU, column blocks of at most this many entries in all (``d_out·D``) are joined into
#: one matrix before a damped inverse is applied to them (:func:`joins_columns`).  Measured on
#: this project's CPU (one thread, float32, a :class:`KroneckerInverse` and the ``⟨Y, X⟩`` of
#: :meth:`DampedInverse.columns_and_inner`), the blockwise route against the joined one:
#: ``[16, 17]`` 25.6 → 17.9 µs, ``[64, 129]`` 59.2 → 54.4, ``[64, 257]`` 125 → 120; even at
#: ``[128, 257]``, ``[64, 513]`` and ``[256, 257]`` (±1 %); above, the blockwise route gains
#: 1–2 % (``[128, 785]`` 1414 against 1448 µs).
JOIN_MAX_ENTRIES = 32768

#: :meth:`DiagonalInverse.columns` of full bases multiplies ``X U_in`` as written (``D``-wide
#: products) where ``D`` is at least this many times ``d_out``, transposed elsewhere.  Measured on
#: this project's Intel Xeon (MKL, one thread, float32, a weight and a bias column, interleaved):
#: as written against transposed 128×785 2.59 against 2.71 ms, 64×2049 8.37 against 9.39,
#: 256×1153 11.19 against 11.29; slower 512×513 (7.24 against 7.07), 768×769 (22.1 against 21.7),
#: 192×193, 384×385, 1000×513 (1–3 %).  Inside the MLP's (784-128-64-10, N = 128) EKFAC and
#: TEKFAC plain steps, 0.02–0.10 ms (0.5–2.4 %) less in each of three interleaved runs.
WIDE_INPUT_RATIO = 4


#: On the CPU a dense damped factor inverse whose rows are a multiple of this many elements long
#: (4 KiB of float32) is kept with its rows 16 elements further apart (:func:`repeated_operand`).
#: Measured (this project's Intel Xeon, MKL, one thread, float32, ``L (X M)``, interleaved): from
#: 64 rows 1024 wide 1056 → 773 µs, 2048 wide 4294 → 3108; from 128 rows 2068 → 1664 and 8683 →
#: 6350; even from 256 rows (3772 → 3684, 13792 → 13738) and 1024 (22.9 → 23.2 ms), and slower
#: where the rows are not such a multiple (576 wide: 526 → 583 µs), hence the multiple.  A
#: biased layer's weight block of its inverse (1024 of 1025 wide), contiguous against in place:
#: from 64 rows 1074 → 894 µs, from 128 rows 2238 → 1830, 2048 wide 8965 → 6768.
ALIASED_ROW = 1024


def pads_rows(m: Tensor) -> bool:
    """Whether :func:`repeated_operand` pads ``m``'s rows: a 2-D matrix on the CPU whose rows are
    a multiple of :data:`ALIASED_ROW` elements long."""
    width = m.shape[-1]
    return device_routes.cpu_tuned(m) and m.dim() == 2 and width > 0 and width % ALIASED_ROW == 0


def repeated_operand(m: Tensor) -> Tensor:
    """``m`` (2-D) as a row-major operand of the products a damped inverse repeats at every step:
    contiguous, and where :func:`pads_rows`, with 16 more elements between its rows (a view of
    ``m``'s shape) — rows 4 KiB apart make MKL's GEMM read them through the same few cache sets."""
    if not pads_rows(m):
        return m.contiguous()
    width = m.shape[-1]
    return m.new_empty(m.shape[0], width + 16)[:, :width].copy_(m)


def repeated_basis(u: Tensor) -> Tensor:
    """A full (square) eigenbasis as :func:`repeated_operand` keeps it where that pads it — one
    copy per basis (:func:`curvlab.reuse.keep`: EKFAC's inverse is rebuilt at every rescaling) —
    else ``u`` itself, and so a permutation (an embedding's basis, applied by gathers).  The
    rotations of ``X`` of 64 and 128 rows into and out of 1024- and 2048-wide bases alone: 13–17 %
    faster; EKFAC/TEKFAC's whole plain step on such Linear layers 6–12 %
    (``benchmarks/results/padded_rows_cpu.md``)."""
    if not pads_rows(u) or u.shape[0] != u.shape[1] or permutation_order(u) is not None:  # (once per basis)
        return u
    held = kept(u, "padded")  # (never u itself: a value holding its weak key would keep it alive)
    return held if held is not None else keep(u, "padded", repeated_operand(u))


def joins_columns(parts: Sequence[Tensor]) -> bool:
    """Whether a damped inverse is applied to the column blocks ``parts`` joined into one matrix:
    a small block on the CPU (:data:`JOIN_MAX_ENTRIES`), and any block on another device, where
    the blockwise route's products are more kernel launches for the same work (not measured
    there)."""
    first = parts[0]
    if not device_routes.cpu_tuned(first):
        return True
    width = 0
    for p in parts:  # a loop, not a generator: this runs for every block of every step
        width += p.shape[1]
    return first.shape[0] * width <= JOIN_MAX_ENTRIES


def column_inners(ys: Sequence[Tensor], parts: Sequence[Tensor]) -> list[Tensor]:
    """``⟨Y_i, X_i⟩`` of every column block (the sum of ``Y_i ⊙ X_i``)."""
    return [torch.dot(y.reshape(-1), x.reshape(-1)) for y, x in zip(ys, parts)]


def cut_columns(y: Tensor, parts: Sequence[Tensor]) -> list[Tensor]:
    """``y`` (``[..., d_out, D]``) cut into column blocks as wide as ``parts`` (views; ``narrow``,
    not ``Tensor.split``, whose Python wrapper costs more than the views of a small block)."""
    out, start = [], 0
    for p in parts:
        width = p.shape[-1]
        out.append(y.narrow(-1, start, width))
        start += width
    return out


class DiagonalInverse(DampedInverse):
    """In the eigenbasis: ``Σ (1/s_damped)[a, b] P_a X P_b`` (see :mod:`curvlab.approx.spectral`)."""

    def __init__(self, u_out: Tensor, u_in: Tensor, damped: Tensor) -> None:
        self.u_out, self.u_in = repeated_basis(u_out), repeated_basis(u_in)
        self.inv_damped = 1.0 / damped
        self._inv_damped_t: Tensor | None = None
        self._flat_map: Tensor | None = None
        self._flat_side = flat_route(u_out, u_in)  # decided once: flat_route reads the bases
        self._u_in_t = transposed_basis(u_in)

    @cached_property
    def positive_definite(self) -> bool:
        return bool((self.inv_damped > 0).all())

    def __call__(self, x: Tensor) -> Tensor:
        if self._flat_side is not None and self._flat_map is None:  # formed once, applied every step
            self._flat_map = complement_map(self._flat_side, self.u_out, self.u_in, self.inv_damped)
        return diagonal_apply(x, self.u_out, self.u_in, self.inv_damped, flat_map=self._flat_map, u_in_t=self._u_in_t)

    def columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Full bases: ``Y_j = (U_out M) (U_in)_jᵀ`` with ``M = (U_outᵀ Σ_i X_i (U_in)_i) ⊙ grid``
        (``(U_in)_i``: the rows of block ``i``) — for an input side at least
        :data:`WIDE_INPUT_RATIO` times the output's as written, else computed transposed, so
        that no product is ``D`` wide."""
        if len(parts) == 1 or is_truncated(self.u_out) or is_truncated(self.u_in) or joins_columns(parts):
            return super().columns(parts)
        rows = self.u_in.split([p.shape[1] for p in parts], 0)
        if WIDE_INPUT_RATIO * self.u_out.shape[0] <= self.u_in.shape[0]:
            m = parts[0] @ rows[0]
            for r, x in zip(rows[1:], parts[1:]):
                m.addmm_(x, r)
            y = self.u_out @ (self.u_out.mT @ m).mul_(self.inv_damped)  # U_out M
            return [y @ r.mT for r in rows]
        if self._inv_damped_t is None:
            grid = self.inv_damped.expand(self.u_out.shape[1], self.u_in.shape[1])
            self._inv_damped_t = grid.mT.contiguous()
        p_t = rows[0].mT @ parts[0].mT
        for r, x in zip(rows[1:], parts[1:]):
            p_t.addmm_(r.mT, x.mT)
        q_t = (p_t @ self.u_out).mul_(self._inv_damped_t) @ self.u_out.mT  # (U_out M)ᵀ
        return [q_t.mT @ r.mT for r in rows]


class ElementwiseInverse(DampedInverse):
    """``X ↦ X ⊘ s_damped`` (a damped diagonal)."""

    def __init__(self, damped: Tensor) -> None:
        self.inv_damped = 1.0 / damped

    @cached_property
    def positive_definite(self) -> bool:
        return bool((self.inv_damped > 0).all())

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.inv_damped


class FactorInverse:
    """``(c·M + shift·I)⁻¹`` of one PSD factor ``M``: a dense symmetric matrix, or, for a
    :class:`~curvlab.approx.spectral.TruncatedFactor`, its spectral form — also for a dense ``M``
    whose range lies in a span of a :func:`~curvlab.approx.eigh.within_span` scope
    (:func:`~curvlab.approx.eigh.in_scope_span`: ``M = Q S Qᵀ + μ (I − QQᵀ)`` is the truncated
    factor of ``S``'s eigenpairs rotated by ``Q``; no ``n × n`` inverse is formed)."""

    def __init__(self, factor: Tensor | TruncatedFactor, c: Tensor, shift: Tensor,
                 compute_dtype: torch.dtype | None) -> None:
        if not isinstance(factor, TruncatedFactor):
            spanned = in_scope_span(factor, compute_dtype)
            if spanned is not None:
                basis, lam, w, flat = spanned
                values = torch.cat([lam, flat.reshape(1)])
                factor = TruncatedFactor(values.to(factor.dtype), (basis @ w).to(factor.dtype))
        if isinstance(factor, TruncatedFactor):
            self.matrix = None
            self.vectors = factor.vectors
            self.vectors_t = transposed_basis(factor.vectors)
            self.inv_values = 1.0 / (c * factor.values + shift)
        else:
            self.matrix = repeated_operand(damped_inverse_matrix(factor, c, shift, compute_dtype))
        self._blocks: tuple[tuple[int, ...], list[list[Tensor]]] | None = None

    def blocks(self, widths: tuple[int, ...]) -> list[list[Tensor]]:
        """The dense inverse cut into contiguous blocks ``[rows_i, cols_j]`` by ``widths``
        (the last cut kept)."""
        if self._blocks is None or self._blocks[0] != widths:
            rows = self.matrix.split(widths, 0)
            self._blocks = (widths, [[repeated_operand(b) for b in r.split(widths, 1)] for r in rows])
        return self._blocks[1]

    @cached_property
    def positive_definite(self) -> bool:
        """Spectral (truncated) form with positive damped eigenvalues (see
        :attr:`DampedInverse.positive_definite`); a dense inverse is not known to be."""
        return self.matrix is None and bool((self.inv_values > 0).all())

    def from_right(self, z: Tensor) -> Tensor:
        """``Z (c M + shift)⁻¹``."""
        if self.matrix is not None:
            return z @ self.matrix
        return right_apply(z, self.vectors, self.inv_values.reshape(1, -1), self.vectors_t)

    def from_left(self, z: Tensor) -> Tensor:
        """``(c M + shift)⁻¹ Z``."""
        if self.matrix is not None:
            return self.matrix @ z
        return left_apply(z, self.vectors, self.inv_values)


class KroneckerInverse(DampedInverse):
    """``(L_damped ⊗ R_damped)⁻¹ X = L_damped⁻¹ X R_damped⁻¹`` (both damped factors symmetric)."""

    def __init__(self, left: FactorInverse, right: FactorInverse) -> None:
        self.left, self.right = left, right

    @property
    def positive_definite(self) -> bool:
        return self.left.positive_definite and self.right.positive_definite

    def __call__(self, x: Tensor) -> Tensor:
        # X R⁻¹ first, then L⁻¹ (·): both GEMMs row-major, the result contiguous for the update
        return self.left.from_left(self.right.from_right(x))

    def columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Column block ``j`` of the result: ``L⁻¹ Σ_i X_i (R⁻¹)_{ij}``."""
        if len(parts) == 1 or self.right.matrix is None or joins_columns(parts):
            return super().columns(parts)
        blocks = self.right.blocks(tuple(p.shape[1] for p in parts))
        out = []
        for j in range(len(parts)):
            z = parts[0] @ blocks[0][j]
            for i in range(1, len(parts)):
                z.addmm_(parts[i], blocks[i][j])
            out.append(self.left.from_left(z))
        return out


def damped_inverse_matrix(mat: Tensor, c: Tensor, shift: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """``(c·M + shift·I)⁻¹`` of a symmetric PSD ``M`` by Cholesky (``n³/3`` flops, then the
    inverse from the factor: ``n³`` in all; on the CPU in place by MKL's LAPACK,
    :func:`curvlab.mkl.spd_inverse_`, where torch links it); if the factorisation fails (``shift``
    too small for the dtype), by :func:`~curvlab.approx.eigh.psd_eigh` (with its jitter retry)
    with the eigenvalues clamped at 0.  Computed in ``compute_dtype`` (``None``: ``mat``'s),
    returned in ``mat``'s."""
    work = mat if compute_dtype is None else mat.to(compute_dtype)
    if is_diagonal(work):  # (an embedding's token frequencies: no n³ factorisation)
        return torch.diag(1.0 / (work.diagonal() * c.to(work.dtype) + shift.to(work.dtype))).to(mat.dtype)
    inv = (work * c.to(work.dtype)).contiguous()
    inv.diagonal().add_(shift.to(work.dtype))  # in place: no identity, no further copies
    if device_routes.cpu_tuned(inv) and mkl.available("inverse", inv.dtype):
        done = mkl.spd_inverse_(inv)
    else:
        chol, info = torch.linalg.cholesky_ex(inv)
        done = int(info) == 0
        if done:
            # symmetric by construction; LAPACK's column-major result transposed is row-major,
            # which the X R⁻¹ GEMM of every step runs a little faster with
            inv = torch.cholesky_inverse(chol).mT
    if not done:
        lam, u = psd_eigh(work * c.to(work.dtype), compute_dtype=None)
        inv = symmetrize((u / (lam + shift.to(work.dtype))) @ u.mT)
    return inv.to(mat.dtype)

