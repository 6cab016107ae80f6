"""``ShardedSqrt``: one block's square root with its columns spread over a process group.

Rank ``r`` holds the columns ``V_r`` of its own examples (any :class:`~curvlab.sqrt.SquareRoot`
back-end, normally the result of a local :func:`curvlab.extract`); the block is
``F = Σ_r V_r V_rᵀ = V Vᵀ`` with ``V = [V_0 … V_{R-1}]``.  :class:`ShardedSqrt` implements the
whole :class:`~curvlab.sqrt.SquareRoot` interface with ``torch.distributed`` collectives, so every
consumer written against that interface (the metrics of :mod:`curvlab.compare`, EKFAC's and
TEKFAC's ``s*``, KFOC's Lanczos iteration) runs on it unchanged — and on every rank at once: all
methods are collective and must be called by every rank of the group in the same order.

Column order (rank-major)
    ``V``'s columns are rank 0's columns, then rank 1's, …; within a rank the local order of
    :mod:`curvlab.sqrt` (``k_r = c·N_r + n_r``).  A single process on the concatenated batch
    (examples of rank 0 first, then rank 1, …) orders the same columns ``k = c·N + n``.  The two
    orders differ by the permutation :func:`sharded_column_order`; every quantity
    :func:`curvlab.compare.measure` reports is invariant under it (spectra, traces, norms,
    natural gradients, overlaps), the ``K``-indexed results of :meth:`~ShardedSqrt.gram`,
    :meth:`~ShardedSqrt.inner`, :meth:`~ShardedSqrt.column_norms_sq`, :meth:`~ShardedSqrt.matrices`
    and the argument of :meth:`~ShardedSqrt.combine` are in the sharded order.

Communication per call (``K = Σ K_r`` columns, ``P = d_out·D`` parameters, ``R`` ranks):

==========================  =================================================================
``column_norms_sq``         ``all_gather`` of ``K_r`` numbers
``trace``                   ``all_reduce`` of one number
``gram``                    ``⌊R/2⌋`` pairwise exchanges of one shard (symmetry halves the
                            ring), then ``all_reduce`` of the ``K × K`` Gram
``inner``                   ``all_gather`` of ``K_r``
``combine``                 ``broadcast`` of ``K`` + ``all_reduce`` of ``P``
``sandwich_in/out``         ``all_reduce`` of ``D²`` / ``d_out²``
``partial_traces``          one ``all_reduce`` of ``D² + d_out²``
``rotated_sq_sum``          ``broadcast`` of ``d_out² + D²`` + ``all_reduce`` of ``P``
``matrices`` (tests only)   ``all_gather`` of ``K_r·P``
``input_rows``              ``all_gather`` of ``N_r·T·D``
==========================  =================================================================

A shard is what the back-end stores: ``N_r·D + K_r·d_out`` numbers for a
:class:`~curvlab.sqrt.FactoredSqrt` (linear layers), ``T·(N_r·D + K_r·d_out)`` for an
:class:`~curvlab.sqrt.UnfoldedSqrt` (a layer at ``T`` locations whose root is kept unfolded),
``K_r·P`` for a :class:`~curvlab.sqrt.DenseSqrt` (the other convolutions).  Each rank's
extraction chooses between the last two for its own ``N_r``; where they chose differently, the
unfolded shards travel as their matrices.

Operands from eigen-decompositions are rank 0's: with ``sync_operands=True`` (default) the
weights of :meth:`~ShardedSqrt.combine` and the bases of :meth:`~ShardedSqrt.rotated_sq_sum`
are broadcast from group rank 0 first.  Ranks compute those arguments themselves, from
eigenvectors of the Gram and of the Kronecker factors; on ranks whose floating point differs
(heterogeneous devices) an eigenvector's sign or a degenerate eigenspace's basis could differ,
and summing ``V_r w_r`` over inconsistent ``w_r`` would be silently wrong.  Broadcasting makes
every such result the exact image of rank 0's operand.  The operands of ``inner`` and
``sandwich_*`` (gradients, KFOC's iterates) are continuous functions of bit-identical reduced
data and are used as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.distributed import collectives as coll
from curvlab.sqrt import DenseSqrt, FactoredSqrt, SquareRoot, UnfoldedSqrt

#: Shard formats exchanged between ranks (the back-end's own storage).
SHARD_KINDS = ("factored", "dense", "unfolded")

#: Length of the integer header describing a rank's shard (kind, tensor shapes).
_HEADER = 12


# ----------------------------------------------------------------------------- shard formats


def shard_tensors(sqrt: SquareRoot, dense: bool = False) -> tuple[str, list[Tensor]]:
    """The tensors that represent ``sqrt`` on the wire.

    ``FactoredSqrt`` → ``("factored", [ā, g])``; ``UnfoldedSqrt`` → ``("unfolded", [ā, g])``
    (``dense``: as its matrices); ``DenseSqrt`` → ``("dense", [M])``; any other back-end →
    ``("dense", [sqrt.matrices()])``.
    """
    if isinstance(sqrt, FactoredSqrt):
        return "factored", [sqrt.a.contiguous(), sqrt.g.contiguous()]
    if isinstance(sqrt, UnfoldedSqrt) and not dense:
        return "unfolded", [sqrt.a.contiguous(), sqrt.g.contiguous()]
    if isinstance(sqrt, DenseSqrt):
        return "dense", [sqrt.m.contiguous()]
    return "dense", [sqrt.matrices().contiguous()]


def cross_gram(kind: str, mine: Sequence[Tensor], other: Sequence[Tensor]) -> Tensor:
    """``V_mineᵀ V_other`` (``[K_mine, K_other]``) of two shards of format ``kind``."""
    if kind == "factored":
        (a1, g1), (a2, g2) = mine, other
        c = g1.shape[0]
        out = g1.reshape(-1, g1.shape[-1]) @ g2.reshape(-1, g2.shape[-1]).T  # [C·N1, C·N2]
        return out * (a1 @ a2.T).repeat(c, c)
    if kind == "unfolded":
        return UnfoldedSqrt(*mine).cross_gram(UnfoldedSqrt(*other))
    (m1,), (m2,) = mine, other
    return m1.flatten(1) @ m2.flatten(1).T


def scaled(sqrt: SquareRoot, factor: float) -> SquareRoot:
    """The root ``factor · V`` (so the block is scaled by ``factor²``), in ``sqrt``'s back-end."""
    if factor == 1.0:
        return sqrt
    if isinstance(sqrt, (FactoredSqrt, UnfoldedSqrt)):  # the roots scaled, the inputs shared
        return type(sqrt)(sqrt.a, sqrt.g * factor)
    if isinstance(sqrt, DenseSqrt):
        return DenseSqrt(sqrt.m * factor, sqrt.rows)
    return DenseSqrt(sqrt.matrices() * factor)


def sharded_column_order(examples: Sequence[int], columns_per_example: int) -> Tensor:
    """Single-process column index of every column of a :class:`ShardedSqrt`.

    Args:
        examples: ``N_r`` of every rank (the global batch is their concatenation in rank order).
        columns_per_example: ``C`` (the flavour's columns per example, equal on every rank).

    Returns:
        ``perm`` of length ``K = C·N``: sharded column ``i`` is column ``perm[i] = c·N + n`` of
        the single-process root, so ``gram_sharded = gram_single[perm][:, perm]``.
    """
    total = sum(examples)
    parts, offset = [], 0
    for n_r in examples:
        local = torch.arange(n_r)
        parts.extend(c * total + offset + local for c in range(columns_per_example))
        offset += n_r
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------------------- the back-end


class ShardedSqrt(SquareRoot):
    """A square root whose columns are distributed: rank ``r`` holds ``V_r``.

    Args:
        local: this rank's columns (any back-end), with the global loss scaling already folded
            in (see :mod:`curvlab.distributed.reduce`).
        column_counts: ``K_r`` of every rank; gathered from the ranks (a collective) when
            ``None``.
        group: the process group (``None``: the default group).
        sync_operands: broadcast the operands of ``combine`` and ``rotated_sq_sum`` from group
            rank 0 (see the module doc).

    Every method is collective: all ranks of ``group`` call it, in the same order.
    """

    def __init__(
        self,
        local: SquareRoot,
        column_counts: Sequence[int] | None = None,
        group: dist.ProcessGroup | None = None,
        sync_operands: bool = True,
    ) -> None:
        coll.require_initialized()
        self.local = local
        self.group = group
        self.sync_operands = sync_operands
        self.rank = coll.rank_of(group)
        self.world_size = coll.size_of(group)
        if column_counts is None:
            gathered = coll.all_gather_floats([local.num_columns], local.device, group)
            column_counts = [int(v) for v in gathered[:, 0].tolist()]
        self.column_counts = tuple(int(k) for k in column_counts)
        if len(self.column_counts) != self.world_size:
            raise ValueError(
                f"ShardedSqrt: {len(self.column_counts)} column counts for a group of "
                f"{self.world_size} ranks"
            )
        if self.column_counts[self.rank] != local.num_columns:
            raise ValueError(
                f"ShardedSqrt: rank {self.rank} holds {local.num_columns} columns, "
                f"column_counts says {self.column_counts[self.rank]}"
            )
        starts = [0]
        for k in self.column_counts:
            starts.append(starts[-1] + k)
        self.offsets = tuple(starts)

    # --- bookkeeping --------------------------------------------------------------------

    @property
    def num_columns(self) -> int:
        return self.offsets[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.local.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def local_columns(self) -> slice:
        """This rank's columns within the sharded (rank-major) order."""
        return slice(self.offsets[self.rank], self.offsets[self.rank + 1])

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> "ShardedSqrt":
        return ShardedSqrt(self.local.to(dtype=dtype, device=device), self.column_counts, self.group,
                           self.sync_operands)

    def in_input_basis(self, q: Tensor) -> "ShardedSqrt":
        """Every rank's shard in the basis ``Q`` (the same on every rank)."""
        return ShardedSqrt(self.local.in_input_basis(self._operand(q)), self.column_counts, self.group,
                           self.sync_operands)

    def _operand(self, x: Tensor) -> Tensor:
        return coll.broadcast_from_first(x, self.group) if self.sync_operands else x

    def _rows(self, r: int) -> slice:
        return slice(self.offsets[r], self.offsets[r + 1])

    # --- the interface --------------------------------------------------------------------

    def column_norms_sq(self) -> Tensor:
        return coll.all_gather_rows(self.local.column_norms_sq(), self.column_counts, self.group)

    def trace(self) -> Tensor:
        return coll.all_reduce_one(self.local.trace(), self.group)

    def gram(self) -> Tensor:
        """``VᵀV`` assembled blockwise: rank ``r`` computes ``V_rᵀ V_s`` for ``s = r − j``,
        ``j = 0 … ⌊R/2⌋``, receiving shard ``s`` while sending its own to ``r + j``; the
        mirrored blocks come from symmetry; one ``all_reduce`` of the ``K × K`` matrix
        (every entry written by exactly one rank, so the sum is exact) completes it."""
        r, size = self.rank, self.world_size
        local_gram = self.local.gram()
        if size == 1:
            return local_gram
        kind, mine = shard_tensors(self.local)
        kind, mine, shapes = self._shard_shapes(kind, mine)
        k = self.num_columns
        gram = local_gram.new_zeros(k, k)
        gram[self._rows(r), self._rows(r)] = local_gram
        half = size // 2
        for j in range(1, half + 1):
            to, source = (r + j) % size, (r - j) % size
            other = coll.exchange(mine, to, shapes[source], source, mine[0], self.group)
            block = cross_gram(kind, mine, other).to(gram.dtype)
            gram[self._rows(r), self._rows(source)] = block
            if not (size % 2 == 0 and j == half):  # at distance R/2 both ranks of a pair compute it
                gram[self._rows(source), self._rows(r)] = block.T
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
        return gram

    def _shard_shapes(self, kind: str, mine: list[Tensor]) -> tuple[str, list[Tensor], list[list[list[int]]]]:
        """The format all ranks send (``"dense"`` where some kept a layer's root unfolded and
        others as matrices), this rank's shard in it, and every rank's shard tensor shapes (a
        small ``all_gather``, twice for that mix); checks the formats agree."""
        header = [SHARD_KINDS.index(kind), len(mine)]
        for t in mine:
            header += [t.dim(), *t.shape]
        if len(header) > _HEADER:
            raise ValueError(f"ShardedSqrt: shard header too long ({len(header)} > {_HEADER})")
        header += [0] * (_HEADER - len(header))
        table = coll.all_gather_floats(header, mine[0].device, self.group).long().tolist()
        if {SHARD_KINDS[row[0]] for row in table} == {"dense", "unfolded"}:
            # N_r decides between the two back-ends: those ranks send their matrices instead
            return self._shard_shapes(*shard_tensors(self.local, dense=True))
        if any(row[:2] != table[0][:2] for row in table):
            raise ValueError(
                "ShardedSqrt.gram: the ranks hold shards of different formats "
                f"({[SHARD_KINDS[row[0]] for row in table]}); every rank must extract the same layer"
            )
        shapes = []
        for row in table:
            pos, per_rank = 2, []
            for _ in range(row[1]):
                ndim = row[pos]
                per_rank.append(row[pos + 1 : pos + 1 + ndim])
                pos += 1 + ndim
            shapes.append(per_rank)
        return kind, mine, shapes

    def inner(self, x: Tensor) -> Tensor:
        return coll.all_gather_rows(self.local.inner(x), self.column_counts, self.group)

    def combine(self, w: Tensor) -> Tensor:
        w = self._operand(w)
        if w.shape[0] != self.num_columns:
            raise ValueError(f"ShardedSqrt.combine: w has {w.shape[0]} entries, the root {self.num_columns} columns")
        return coll.all_reduce_one(self.local.combine(w[self.local_columns]), self.group)

    def sandwich_in(self, b: Tensor) -> Tensor:
        return coll.all_reduce_one(self.local.sandwich_in(b), self.group)

    def sandwich_out(self, c: Tensor) -> Tensor:
        return coll.all_reduce_one(self.local.sandwich_out(c), self.group)

    def partial_traces(self) -> tuple[Tensor, Tensor]:
        phi, psi = self.local.partial_traces()
        out = coll.all_reduce_sum([phi, psi], self.group)
        return out[0], out[1]

    def rotated_sq_sum(self, u_out: Tensor, u_in: Tensor) -> Tensor:
        if self.sync_operands and self.world_size > 1:
            both = coll.broadcast_from_first(torch.cat([u_out.flatten(), u_in.flatten()]), self.group)
            u_out, u_in = both[: u_out.numel()].view_as(u_out), both[u_out.numel() :].view_as(u_in)
        return coll.all_reduce_one(self.local.rotated_sq_sum(u_out, u_in), self.group)

    def matrices(self) -> Tensor:
        return coll.all_gather_rows(self.local.matrices(), self.column_counts, self.group)

    def input_rows(self) -> Tensor | None:
        """Every rank's :meth:`~curvlab.sqrt.SquareRoot.input_rows`, in rank order (``None``
        where a rank's shard does not keep them)."""
        local = self.local.input_rows()
        counts = coll.all_gather_floats([-1.0 if local is None else local.shape[0]], self.device, self.group)[:, 0]
        if bool((counts < 0).any()):
            return None
        return coll.all_gather_rows(local, [int(c) for c in counts.tolist()], self.group)

    def __repr__(self) -> str:
        return (f"ShardedSqrt(rank={self.rank}/{self.world_size}, columns={self.column_counts}, "
                f"local={type(self.local).__name__})")
