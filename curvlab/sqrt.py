"""Square roots of curvature blocks: the per-sample gradient matrices ``M_k``.

A layer's exact (or MC, or empirical) Fisher block is ``F = Σ_k vec(M_k) vec(M_k)ᵀ = V Vᵀ`` with
``M_k ∈ R^{d_out × D}`` in the matrix form of :mod:`curvlab.block` and the loss reduction
folded in.  Columns are indexed ``k = c·N + n`` (BackPACK's ``[C, N, ...]`` order: ``c`` the
flavour's column, ``n`` the example).

Two storage back-ends share one interface, so that every consumer (approximations, metrics,
optimizers) is written once:

* :class:`FactoredSqrt` — a linear layer's ``M_{c,n} = g_{c,n} ā_nᵀ``: stores the inputs
  ``ā`` (``[N, D]``) and the backpropagated root ``g`` (``[C, N, d_out]``), never the
  ``K × P`` matrix.  Gram matrices and rotations cost one matmul each.
* :class:`UnfoldedSqrt` — a layer applied at ``T`` locations (a convolution's output pixels, a
  transformer's tokens): ``M_{c,n} = Σ_t g_{c,n,t} ā_{n,t}ᵀ``, kept as the unfolded inputs and
  the roots, ``N·T·D + K·T·d_out`` numbers.  Where ``T`` is small against the layer's width it is
  far smaller and cheaper than ``M`` itself: a rotation rotates the ``N·T`` inputs, not the ``K``
  matrices (ResNet-18's 512×4608 convolutions on CIFAR, ``T = 16``, ``K = 90``: 14 GFLOP instead
  of 2.2 TFLOP, 11 MB instead of 1.7 GB in float64).  :func:`unfolded_is_cheaper` chooses.
* :class:`DenseSqrt` — explicit ``M`` (``[K, d_out, D]``): the other convolutions, and every
  root that is not a product over locations (examples coupled through BatchNorm's batch
  statistics, parameter blocks).  Its reductions run over chunks of ``k`` whose temporaries
  stay under :data:`CHUNK_ELEMENTS`: ResNet-18's 512×4608 blocks at K = 90 are 1.7 GB each in
  float64, and an unchunked rotation held three such temporaries.

No method forms a ``P × P`` matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from curvlab.block import BlockLayout
from curvlab.gram import symmetric_product

#: Elements of the largest temporary a chunked computation may allocate.
CHUNK_ELEMENTS = 2**24

#: :meth:`UnfoldedSqrt.rotated_sq_sum` leaves out the rotated input directions whose energy is at
#: most this many ``ε²`` of the largest (``(64 ε)²``: rounding of a rotation, far below anything
#: float64 resolves beside the largest entry).
UNREACHED = 64.0**2


class SquareRoot(ABC):
    """``V = [vec M_1, …, vec M_K]`` of one block; ``F = V Vᵀ``."""

    @property
    @abstractmethod
    def num_columns(self) -> int:
        """K, the number of columns of V."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """Matrix form ``(d_out, D)`` of each ``M_k``."""

    @abstractmethod
    def column_norms_sq(self) -> Tensor:
        """``‖M_k‖²_F`` for every k, shape ``[K]``; their sum is ``tr F``."""

    @abstractmethod
    def gram(self) -> Tensor:
        """``VᵀV``, shape ``[K, K]``, entries ``⟨M_k, M_l⟩``."""

    @abstractmethod
    def inner(self, x: Tensor) -> Tensor:
        """``Vᵀ vec(X)``: ``⟨M_k, X⟩`` for ``X`` of shape ``[d_out, D]`` → ``[K]``."""

    @abstractmethod
    def combine(self, w: Tensor) -> Tensor:
        """``V w``: ``Σ_k w_k M_k`` for ``w`` of shape ``[K]`` → ``[d_out, D]``."""

    @abstractmethod
    def sandwich_in(self, b: Tensor) -> Tensor:
        """``Σ_k M_kᵀ B M_k`` (``B``: ``[d_out, d_out]``) → ``[D, D]``.

        With ``B = I`` this is the partial trace ``Tr_out F = δΦ``.
        """

    @abstractmethod
    def sandwich_out(self, c: Tensor) -> Tensor:
        """``Σ_k M_k C M_kᵀ`` (``C``: ``[D, D]``) → ``[d_out, d_out]``.

        With ``C = I`` this is the partial trace ``Tr_in F = δΨ``.
        """

    @abstractmethod
    def rotated_sq_sum(self, u_out: Tensor, u_in: Tensor) -> Tensor:
        """``s* = Σ_k (U_outᵀ M_k U_in)²`` (elementwise square) → ``[d_out, D]``.

        The diagonal of ``Qᵀ F Q`` for ``Q = U_out ⊗ U_in``: EKFAC's optimal rescaling.
        """

    def diagonal(self) -> Tensor:
        """``diag(F) = Σ_k M_k²`` (elementwise) as ``[d_out, D]``: :meth:`rotated_sq_sum` in the
        identity basis."""
        d_out, d_in = self.shape
        eye = lambda n: torch.eye(n, dtype=self.dtype, device=self.device)  # noqa: E731
        return self.rotated_sq_sum(eye(d_out), eye(d_in))

    @abstractmethod
    def matrices(self) -> Tensor:
        """All ``M_k`` explicitly, ``[K, d_out, D]`` (``K·P`` numbers)."""

    def columns(self, layout: BlockLayout) -> Tensor:
        """``Vᵀ`` in the flat parameter order of ``layout``, shape ``[K, P]``."""
        return layout.to_vector(self.matrices())

    def trace(self) -> Tensor:
        """``tr F = Σ_k ‖M_k‖²``."""
        return self.column_norms_sq().sum()

    def partial_traces(self) -> tuple[Tensor, Tensor]:
        """``(Tr_out F, Tr_in F) = (Σ M_kᵀ M_k, Σ M_k M_kᵀ)``."""
        d_out, d_in = self.shape
        eye_out = torch.eye(d_out, dtype=self.dtype, device=self.device)
        eye_in = torch.eye(d_in, dtype=self.dtype, device=self.device)
        return self.sandwich_in(eye_out), self.sandwich_out(eye_in)

    def input_rows(self) -> Tensor | None:
        """Rows ``[R, D]`` whose span holds the rows of every ``M_k`` — and so the range of every
        input-side factor of the same batch (KFAC's ``A``, TKFAC's ``δΦ``) — where the root keeps
        them (the layer's inputs); ``None`` otherwise."""
        return None

    def in_input_basis(self, q: Tensor) -> "SquareRoot":
        """The root of ``(I ⊗ Qᵀ) F (I ⊗ Q)`` for ``Q`` ``[D, r]``: every ``M_k Q``, ``[d_out, r]``
        (with orthonormal columns spanning the rows of every ``M_k``: ``F`` in those coordinates)."""
        return DenseSqrt(self.matrices() @ q)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating point type of the stored tensors."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the stored tensors."""

    @abstractmethod
    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> "SquareRoot":
        """A copy converted to ``dtype`` and/or moved to ``device``."""


class _InputsAndRoots(SquareRoot):
    """A root kept as a layer's inputs ``a`` (``[N, D, ...]``) and backpropagated roots ``g``
    (``[C, N, d_out, ...]``): what :class:`FactoredSqrt` and :class:`UnfoldedSqrt` share."""

    a: Tensor
    g: Tensor

    def __init__(self, inputs: Tensor, grads: Tensor) -> None:
        self.a, self.g = inputs, grads

    @property
    def num_columns(self) -> int:
        return self.g.shape[0] * self.g.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.g.shape[2], self.a.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> "_InputsAndRoots":
        return type(self)(self.a.to(device=device, dtype=dtype), self.g.to(device=device, dtype=dtype))

    def in_input_basis(self, q: Tensor) -> "_InputsAndRoots":
        # the inputs in the basis, the roots shared
        return type(self)(torch.einsum("nd...,dr->nr...", self.a, q), self.g)

    def input_rows(self) -> Tensor:
        """The inputs ``ā_{n,t}`` as rows, ``[N·T, D]``."""
        return self.a if self.a.dim() == 2 else self.a.transpose(1, 2).reshape(-1, self.a.shape[1])


class FactoredSqrt(_InputsAndRoots):
    """Linear layer: ``M_{c,n} = g_{c,n} ā_nᵀ``.

    Args:
        inputs: ``ā``, shape ``[N, D]`` (bias column included when part of the block).
        grads: backpropagated root ``g``, shape ``[C, N, d_out]`` (loss scaling folded in).
    """

    def __init__(self, inputs: Tensor, grads: Tensor) -> None:
        if inputs.dim() != 2 or grads.dim() != 3 or grads.shape[1] != inputs.shape[0]:
            raise ValueError(
                "FactoredSqrt: expected inputs [N, D] and grads [C, N, d_out], got "
                f"{tuple(inputs.shape)} and {tuple(grads.shape)}"
            )
        super().__init__(inputs, grads)

    def column_norms_sq(self) -> Tensor:
        return (self.g.square().sum(-1) * self.a.square().sum(-1)).flatten()

    def gram(self) -> Tensor:
        c, n, _ = self.g.shape
        g_flat = self.g.reshape(c * n, -1)
        gram_a = (self.a @ self.a.T).repeat(c, c)
        return (g_flat @ g_flat.T) * gram_a

    def inner(self, x: Tensor) -> Tensor:
        return torch.einsum("cno,od,nd->cn", self.g, x, self.a).flatten()

    def combine(self, w: Tensor) -> Tensor:
        c, n, _ = self.g.shape
        return torch.einsum("cn,cno,nd->od", w.reshape(c, n), self.g, self.a)

    def sandwich_in(self, b: Tensor) -> Tensor:
        weights = torch.einsum("cno,op,cnp->n", self.g, b, self.g)
        return torch.einsum("n,nd,ne->de", weights, self.a, self.a)

    def sandwich_out(self, c: Tensor) -> Tensor:
        weights = torch.einsum("nd,de,ne->n", self.a, c, self.a)
        return torch.einsum("n,cno,cnp->op", weights, self.g, self.g)

    def rotated_sq_sum(self, u_out: Tensor, u_in: Tensor) -> Tensor:
        g_rot = (self.g @ u_out).square().sum(0)  # [N, d_out]
        a_rot = (self.a @ u_in).square()  # [N, D]
        return g_rot.T @ a_rot

    def diagonal(self) -> Tensor:
        return self.g.square().sum(0).T @ self.a.square()

    def matrices(self) -> Tensor:
        c, n, d_out = self.g.shape
        return torch.einsum("cno,nd->cnod", self.g, self.a).reshape(c * n, d_out, -1)


class UnfoldedSqrt(_InputsAndRoots):
    """A layer at ``T`` locations: ``M_{c,n} = Σ_t g_{c,n,:,t} ā_{n,:,t}ᵀ = g_{c,n} ā_nᵀ``.

    (:class:`FactoredSqrt` is the case ``T = 1``, where the squares of a rotation factorise.)
    Every reduction works on the ``T × T`` products of the inputs and of the roots, or on the
    rotated inputs and roots; ``M_k`` are formed only for one example at a time where an
    elementwise square needs them (``rotated_sq_sum``, ``diagonal``), and in chunks of examples
    (:data:`CHUNK_ELEMENTS`) for the Gram matrix where that is cheaper than the ``T × T`` route.

    Args:
        inputs: unfolded inputs ``ā``, shape ``[N, D, T]`` (bias row included when part of the
            block).
        grads: backpropagated root ``g``, shape ``[C, N, d_out, T]`` (loss scaling folded in).
    """

    def __init__(self, inputs: Tensor, grads: Tensor) -> None:
        if (inputs.dim() != 3 or grads.dim() != 4 or grads.shape[1] != inputs.shape[0]
                or grads.shape[3] != inputs.shape[2]):
            raise ValueError(
                "UnfoldedSqrt: expected inputs [N, D, T] and grads [C, N, d_out, T], got "
                f"{tuple(inputs.shape)} and {tuple(grads.shape)}"
            )
        super().__init__(inputs, grads)

    def column_norms_sq(self) -> Tensor:
        # ‖g_k āₙᵀ‖² = ⟨g_kᵀ g_k, āₙᵀ āₙ⟩ over the T × T products
        return ((self.g.mT @ self.g) * (self.a.mT @ self.a)).sum((-2, -1)).flatten()

    def gram(self) -> Tensor:
        return self.cross_gram(self)

    def cross_gram(self, other: "UnfoldedSqrt") -> Tensor:
        """``VᵀV_other`` (``[K, K_other]``) with the root of the same layer on other examples (a
        shard on another process, :class:`curvlab.distributed.ShardedSqrt`); :meth:`gram` is
        ``cross_gram(self)``.

        ``⟨M_k, M_l⟩ = ⟨g_k (āₙᵀ ā_m), g_l⟩``: the roots times the inputs' ``T × T`` products
        first, ``K·N'·T²·d_out + K·K'·T·d_out`` flops, against ``K·K'·d_out·D`` (and forming
        them) for the ``M_k`` themselves — the cheaper of the two (:func:`_gram_work`; one
        example of many locations, as coupled examples give: ResNet-18's layer4 at N = 8, 1.1
        against 39 GFLOP)."""
        c, n, d_out, t = self.g.shape
        if other.g.shape[0] != c or other.g.shape[2:] != self.g.shape[2:] or other.a.shape[1] != self.a.shape[1]:
            raise ValueError(f"UnfoldedSqrt.cross_gram: roots {tuple(self.g.shape)}, {tuple(other.g.shape)} and "
                             f"inputs {tuple(self.a.shape)}, {tuple(other.a.shape)} are not of one layer")
        n_other = other.g.shape[1]
        if _gram_work(c * n, n, d_out, self.a.shape[1], t, None if other is self else n_other)[1]:
            return self._gram_of_matrices(other)
        # per example n: its roots times the inputs' (n, t) × (m, s) products, then for every
        # other example m one product over (d_out, s) with m's roots
        inputs = (self.a.mT.reshape(n * t, -1) @ other.a.mT.reshape(n_other * t, -1).T).view(n, t, n_other * t)
        rows = other.g.permute(1, 0, 2, 3).reshape(n_other, c, d_out * t)  # [m, c', (o, s)]
        out = self.g.new_empty(c, n, c, n_other)
        for i in range(n):
            mixed = (self.g[:, i].reshape(c * d_out, t) @ inputs[i]).view(c, d_out, n_other, t)
            mixed = mixed.permute(2, 0, 1, 3).reshape(n_other, c, d_out * t)
            out[:, i] = torch.bmm(mixed, rows.mT).permute(1, 2, 0)  # [c, c', m]: column l = c'·N' + m
        return out.reshape(c * n, c * n_other)

    def _gram_of_matrices(self, other: "UnfoldedSqrt") -> Tensor:
        """``VᵀV_other`` from the ``M_k`` formed for a chunk of examples at a time (each chunk
        under :data:`CHUNK_ELEMENTS`; ``other``'s formed once per chunk of ``self``'s, or, for
        ``other is self``, each chunk once per later chunk and the lower blocks by symmetry)."""
        same = other is self
        left_chunks, right_chunks = self._chunks(), other._chunks()
        out = self.g.new_empty(self.num_columns, other.num_columns)
        for i, (examples, rows) in enumerate(left_chunks):
            left = self._of_examples(examples).flatten(1)
            if same:
                out[rows[:, None], rows] = left @ left.T
            for examples_r, cols in right_chunks[i + 1:] if same else right_chunks:
                block = left @ other._of_examples(examples_r).flatten(1).T
                out[rows[:, None], cols] = block
                if same:
                    out[cols[:, None], rows] = block.T
        return out

    def _chunks(self) -> list[tuple[slice, Tensor]]:
        """Spans of examples whose ``M_k`` (every ``c``) stay under :data:`CHUNK_ELEMENTS`
        together, each with its columns ``k = c·N + n`` (n-major, as :meth:`_of_examples`
        orders them)."""
        c, n, d_out, _ = self.g.shape
        step = max(1, CHUNK_ELEMENTS // max(c * d_out * self.a.shape[1], 1))
        spans = [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]
        return [(s, (torch.arange(s.start, s.stop, device=self.device)[:, None]
                     + n * torch.arange(c, device=self.device)).flatten()) for s in spans]

    def _of_examples(self, examples: slice) -> Tensor:
        """``M_{c,n}`` of the examples ``n`` in ``examples``, every ``c``: ``[n'·C, d_out, D]``,
        n-major (one product ``[C·d_out, T] × [T, D]`` per example)."""
        c, _, d_out, _ = self.g.shape
        ns = range(examples.start, examples.stop)
        out = self.g.new_empty(len(ns), c, d_out, self.a.shape[1])
        for j, n in enumerate(ns):
            torch.matmul(self.g[:, n].reshape(c * d_out, -1), self.a[n].T, out=out[j].view(c * d_out, -1))
        return out.flatten(0, 1)

    def inner(self, x: Tensor) -> Tensor:
        # ⟨g_k āₙᵀ, X⟩ = Σ_t g_{k,t}ᵀ (X āₙ)_t
        return (self.g * (x @ self.a)).sum((-2, -1)).flatten()

    def combine(self, w: Tensor) -> Tensor:
        c, n, d_out, t = self.g.shape
        h = torch.einsum("cn,cnot->not", w.reshape(c, n), self.g)  # Σ_c w_k g_k, per example
        return h.transpose(0, 1).reshape(d_out, n * t) @ self.a.transpose(0, 1).reshape(-1, n * t).T

    def sandwich_in(self, b: Tensor) -> Tensor:
        # Σ_n āₙ (Σ_c g_kᵀ B g_k) āₙᵀ: the T × T middles, then one product over (n, t)
        c, n, d_out, t = self.g.shape
        middle = (self.g.mT @ (b @ self.g)).sum(0)  # [N, T, T]
        left = (self.a @ middle).transpose(0, 1).reshape(-1, n * t)
        return left @ self.a.transpose(0, 1).reshape(-1, n * t).T

    def sandwich_out(self, c: Tensor) -> Tensor:
        # Σ_k g_k (āₙᵀ C āₙ) g_kᵀ: the T × T middles, then one product over (k, t)
        cols, n, d_out, t = self.g.shape
        middle = self.a.mT @ (c @ self.a)  # [N, T, T]
        left = (self.g @ middle).permute(2, 0, 1, 3).reshape(d_out, -1)
        return left @ self.g.permute(2, 0, 1, 3).reshape(d_out, -1).T

    def rotated_sq_sum(self, u_out: Tensor, u_in: Tensor) -> Tensor:
        # the inputs and the roots rotated (N·T·D·D' + K·T·d_out·d', one product each), then the
        # rotated M_k formed example by example and squared: K·T·d'·D' — not K·d_out·D·(d' + D')
        # for the M_k themselves
        c, n, d_out, t = self.g.shape
        a_rot = (u_in.T @ self.a.transpose(0, 1).reshape(self.a.shape[1], -1)).view(-1, n, t).transpose(0, 1)
        g_rot = (u_out.T @ self.g.permute(2, 0, 1, 3).reshape(d_out, -1)).view(-1, c, n, t).permute(1, 2, 0, 3)
        # input directions that no input reaches (a basis completed beyond the span of the
        # inputs, as an analysis's batch narrower than the layer gives: curvlab.approx.eigh.
        # within_span) hold squares of rounding alone, ≤ UNREACHED of the largest: their sums
        # are 0, and the elementwise products are formed for the reached directions only
        return _over_reached(_reached(a_rot.square().sum((0, 2))), g_rot.shape[2],
                             lambda cols: self._square_sum(g_rot, a_rot[:, cols]))

    def diagonal(self) -> Tensor:
        return self._square_sum(self.g, self.a)

    def _square_sum(self, g: Tensor, a: Tensor) -> Tensor:
        """``Σ_k (g_k āₙᵀ)²`` (elementwise) for the given roots and inputs: per example, one
        product ``[C·rows, T] × [T, cols]`` (for as many ``c`` as :data:`CHUNK_ELEMENTS`
        allows), squared and summed over ``c``."""
        c, n, rows, t = g.shape
        per_c = max(1, CHUNK_ELEMENTS // max(rows * a.shape[1], 1))
        total = None
        for i in range(n):
            for lo in range(0, c, per_c):
                part = (g[lo:lo + per_c, i].reshape(-1, t) @ a[i].T).square_().view(-1, rows, a.shape[1]).sum(0)
                total = part if total is None else total.add_(part)
        return total

    def matrices(self) -> Tensor:
        c, n, d_out, d_in = *self.g.shape[:3], self.a.shape[1]
        return self._of_examples(slice(0, n)).view(n, c, d_out, d_in).transpose(0, 1).reshape(c * n, d_out, d_in)


def _reached(energy: Tensor) -> Tensor:
    """The rotated input directions some input reaches, from the inputs' energy in each: above
    :data:`UNREACHED` ``ε²`` of the largest."""
    return energy > UNREACHED * torch.finfo(energy.dtype).eps ** 2 * energy.max()


def _over_reached(reached: Tensor, rows: int, sums: Callable[[Tensor | slice], Tensor]) -> Tensor:
    """``[rows, len(reached)]``: ``sums(columns)`` in the ``reached`` input directions, 0 in the
    others (all of them computed where every one is reached)."""
    if bool(reached.all()):
        return sums(slice(None))
    part = sums(reached)
    out = part.new_zeros(rows, reached.shape[0])
    out[:, reached] = part
    return out


def unfolded_is_cheaper(columns: int, examples: int, d_out: int, d_in: int, locations: int) -> bool:
    """Whether :class:`UnfoldedSqrt` beats :class:`DenseSqrt` for ``K = columns`` roots of a
    ``d_out × D`` layer at ``T = locations``: no larger, and fewer flops for what a comparison
    does with a root — its Gram matrix and three rotations (KFAC's, KFLR's and TKFAC's bases).
    Large ``T`` rules it out: the inputs outgrow the ``M_k`` (ResNet-18's first stages on
    CIFAR)."""
    k, n, t = columns, examples, locations
    dense_size = k * d_out * d_in
    unfolded_size = t * (n * d_in + k * d_out)
    dense_work = k * k * d_out * d_in + 3 * k * d_out * d_in * (d_out + d_in)
    unfolded_work = _gram_work(k, n, d_out, d_in, t)[0] + 3 * (
        n * t * d_in * d_in + k * t * d_out * d_out + k * t * d_out * d_in)
    return unfolded_size <= dense_size and unfolded_work < dense_work


def _gram_work(columns: int, examples: int, d_out: int, d_in: int, locations: int,
               other_examples: int | None = None) -> tuple[int, bool]:
    """Flops of :meth:`UnfoldedSqrt.cross_gram` with a root of ``other_examples`` examples
    (``None``: :meth:`UnfoldedSqrt.gram`, the root with itself), and whether it forms the
    ``M_k`` (a chunk of examples at a time; for the Gram each chunk once per later chunk, its
    lower blocks by symmetry) rather than multiplying the roots by the inputs' ``T × T``
    products — whichever costs less."""
    k, n, t = columns, examples, locations
    c = k // max(n, 1)
    per_example = c * d_out * d_in
    chunks = -(-n // max(1, CHUNK_ELEMENTS // max(per_example, 1)))
    if other_examples is None:
        n_other, k_other = n, k
        by_matrices = k * d_out * d_in * (k + t * (chunks + 1) // 2)
    else:
        n_other, k_other = other_examples, c * other_examples
        by_matrices = d_out * d_in * (k * k_other + t * (k + chunks * k_other))
    by_products = k * n_other * t * t * d_out + k * k_other * t * d_out + n * t * n_other * t * d_in
    return min(by_matrices, by_products), by_matrices < by_products


class DenseSqrt(SquareRoot):
    """Explicit per-sample gradient matrices ``M``, shape ``[K, d_out, D]``; optionally with
    ``inputs`` ``[R, D]``, rows whose span holds the rows of every ``M_k`` (the layer's inputs of
    the batch, where the examples are coupled: :meth:`~SquareRoot.input_rows`)."""

    def __init__(self, mats: Tensor, inputs: Tensor | None = None) -> None:
        if mats.dim() != 3:
            raise ValueError(f"DenseSqrt: expected [K, d_out, D], got {tuple(mats.shape)}")
        if inputs is not None and (inputs.dim() != 2 or inputs.shape[1] != mats.shape[2]):
            raise ValueError(f"DenseSqrt: inputs must be [R, {mats.shape[2]}], got {tuple(inputs.shape)}")
        self.m, self.rows = mats, inputs

    @property
    def num_columns(self) -> int:
        return self.m.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m.shape[1], self.m.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.m.dtype

    @property
    def device(self) -> torch.device:
        return self.m.device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> "DenseSqrt":
        rows = None if self.rows is None else self.rows.to(device=device, dtype=dtype)
        return DenseSqrt(self.m.to(device=device, dtype=dtype), rows)

    def input_rows(self) -> Tensor | None:
        return self.rows

    def in_input_basis(self, q: Tensor) -> "DenseSqrt":
        return DenseSqrt(self.m @ q, None if self.rows is None else self.rows @ q)

    def column_norms_sq(self) -> Tensor:
        return torch.cat([m.square().sum((1, 2)) for m in self._chunks()])

    def gram(self) -> Tensor:
        flat = self.m.flatten(1)
        return flat @ flat.T

    def inner(self, x: Tensor) -> Tensor:
        return self.m.flatten(1) @ x.flatten()

    def combine(self, w: Tensor) -> Tensor:
        return (w @ self.m.flatten(1)).reshape(self.shape)

    def sandwich_in(self, b: Tensor) -> Tensor:
        # Σ_{k,o} M_k[o]ᵀ (B M_k)[o]: one product over the chunk's rows (k, o)
        symmetric = torch.equal(b, b.mT)
        return self._sum(lambda m: _rows_product(m.flatten(0, 1), torch.matmul(b, m).flatten(0, 1), symmetric))

    def sandwich_out(self, c: Tensor) -> Tensor:
        # Σ_{k,e} (M_k C)[:, e] M_k[:, e]ᵀ: one product over (k, e), the chunk laid out
        # [d_out, k, D] (a copy) — against a batched einsum, 1.2–1.6× faster (float64, one thread)
        symmetric = torch.equal(c, c.mT)

        def term(m: Tensor) -> Tensor:
            by_out = m.transpose(0, 1).reshape(m.shape[1], -1)  # [d_out, k·D]
            right = (by_out.reshape(-1, m.shape[2]) @ c).view_as(by_out)
            return _rows_product(right.mT, by_out.mT, symmetric)

        return self._sum(term, 2 * self.m.shape[1] * self.m.shape[2])

    def rotated_sq_sum(self, u_out: Tensor, u_in: Tensor) -> Tensor:
        # input directions no input reaches (UnfoldedSqrt.rotated_sq_sum) are left out, their
        # sums 0: M_k holds only rounding there (of a float32 extraction: ~ε₃₂² of its energy)
        def sums(cols: Tensor | slice) -> Tensor:
            u = u_in[:, cols]  # squared in place: the product is fresh
            return self._sum(lambda m: (u_out.T @ m @ u).square_().sum(0),
                             max(u_out.shape[1], self.m.shape[1]) * max(u.shape[1], self.m.shape[2]))

        if self.rows is None:
            return sums(slice(None))
        return _over_reached(_reached((self.rows @ u_in).square_().sum(0)), u_out.shape[1], sums)

    def diagonal(self) -> Tensor:
        return self._sum(lambda m: m.square().sum(0))

    def _chunks(self, per_column: int | None = None) -> tuple[Tensor, ...]:
        """``M`` split along ``k`` so that a temporary of ``per_column`` elements per ``M_k``
        (default: ``d_out·D``) stays under :data:`CHUNK_ELEMENTS` per chunk."""
        _, d_out, d_in = self.m.shape
        return self.m.split(max(1, CHUNK_ELEMENTS // max(per_column or d_out * d_in, 1)))

    def _sum(self, term: Callable[[Tensor], Tensor], per_column: int | None = None) -> Tensor:
        """``Σ`` over the chunks of ``term(chunk)`` (added into the first chunk's result)."""
        total = None
        for m in self._chunks(per_column):
            part = term(m)
            total = part if total is None else total.add_(part)
        return total

    def matrices(self) -> Tensor:
        return self.m


def _rows_product(a: Tensor, b: Tensor, symmetric: bool) -> Tensor:
    """``aᵀ b`` for ``[R, d]`` operands; only its upper triangle multiplied where the product is
    known to be symmetric (:func:`curvlab.gram.symmetric_product`)."""
    return symmetric_product(a, b) if symmetric else a.mT @ b
