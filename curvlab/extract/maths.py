"""The maths of extraction: per-layer statistics from the layer input and the backpropagated root.

Everything here is plain tensor algebra (BackPACK's ``core/derivatives`` counterpart); the
BackPACK plumbing lives in :mod:`curvlab.extract.extension`.

Notation (both layer types, ``T = 1`` for ``nn.Linear``):

* ``x``: unfolded layer input ``[N, D, T]`` (conv: ``unfold`` of the input; ``D = C_in·kh·kw``,
  plus a row of ones when the bias is part of the block) — or an engine's :class:`LazyInputs`,
  which unfolds them only where a statistic reads them (:func:`dense`) and may form the
  per-sample products without them.
* ``g``: backpropagated square root at the layer output ``[C, N, d_out, T]`` with the loss
  reduction folded in.
* Per-sample gradient matrices ``M_{c,n} = Σ_t g_{c,n,:,t} x_{n,:,t}ᵀ``; ``F = Σ vec(M) vec(M)ᵀ``.

Weight sharing (``T > 1``: a Linear on ``[N, T, D]``, a convolution's output locations, several
calls of one module — calls are further shared positions) has two Kronecker conventions
(Eschenhagen et al., NeurIPS 2023; curvlinops' ``kfac_approx``) [C]:

* **expand** (default): every ``(n, t)`` is a sample, ``A = 1/(N·T) Σ_{n,t} x xᵀ``,
  ``G = Σ_{c,n,t} g gᵀ`` — exact for a Linear layer when the loss has one independent term per
  position (a transformer's per-token loss).
* **reduce**: positions are pooled first, ``x̂_n = (1/T) Σ_t x_{n,t}``, ``ĝ_{c,n} = Σ_t g_{c,n,t}``,
  then ``A = 1/N Σ_n x̂ x̂ᵀ``, ``G = Σ_{c,n} ĝ ĝᵀ`` — exact when the shared positions are summed
  before one loss term per example (``M_{c,n} = ĝ x̂ᵀ·T/T`` when ``x`` does not vary over ``t``).

TKFAC's statistics with the same conventions (:func:`trace_statistics`): ``form="exact"`` (default)
takes the partial traces ``δΦ = Σ_k M_kᵀ M_k``, ``δΨ = Σ_k M_k M_kᵀ`` of the per-sample matrices
themselves — independent of the convention, trace-preserving; ``form="kfc"`` takes those of the
samples the convention approximates ``M_k`` by: expand, KFC's per-example ``Λ_n = Σ_t x xᵀ``,
``Γ_{c,n} = (1/T) Σ_t g gᵀ`` (:func:`tkfac_kfc`); reduce, the rank-one ``ĝ_{c,n} x̂_nᵀ``.  All
forms coincide for ``T = 1``.  EKFAC/TEKFAC's rescaling ``s* = Σ_k (U_outᵀ M_k U_in)²`` is always
taken on the per-sample matrices (so ``tr = tr F`` whatever the convention).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch
from torch import Tensor

from curvlab.basis import in_basis, permutation_order
from curvlab.extract.options import KFAC_APPROX
from curvlab.gram import GramRows, gram, gram_or_rows, symmetric_product
from curvlab.stats import KroneckerFactors, TraceStats
from curvlab.sqrt import CHUNK_ELEMENTS, DenseSqrt, FactoredSqrt, SquareRoot, UnfoldedSqrt, unfolded_is_cheaper

#: Elements of a temporary that is squared and summed as soon as it is formed (:func:`kfe_scaling`'s rotated
#: per-sample products): a chunk that stays in cache and reuses its memory.  ResNet-18's
#: rescaling at N = 128 (this project's AMD EPYC, one thread), with glibc's default allocator:
#: 256×1152 at 64 locations 394 → 316 ms, 512×2304 and 512×4608 at 16 (truncated input bases of
#: 256) 91 → 62 and 124 → 96; with freed memory reused (:mod:`curvlab.app.allocator`) 331 → 305,
#: 68 → 67, 102 → 97.
CACHED_ELEMENTS = 2**21


class LazyInputs(Protocol):
    """A layer's inputs ``x`` before they are unfolded (the autograd engine's convolutions)."""

    shape: torch.Size  # [N, D, T]

    def dense(self) -> Tensor:
        """``x`` itself, ``[N, D, T]`` (unfolded at the first call, then kept)."""

    def per_sample(self, g: Tensor, examples: slice) -> Tensor:
        """:func:`per_sample_products` of ``g`` (``[C, B, d_out, T]``) with ``x[examples]``."""

    def gram(self, scale: float, keep_rows: bool) -> Tensor | GramRows:
        """:func:`input_gram` of ``x``."""

    def at_positions(self, examples: Tensor, positions: Tensor) -> "Tensor | LazyInputs | None":
        """``x[examples, :, positions]`` as ``[K, D, 1]`` (:func:`one_position_samples`), or
        ``None`` where the inputs' own routes are cheaper than samples at one position."""


def dense(x: Tensor | LazyInputs) -> Tensor:
    """``x`` as a tensor ``[N, D, T]``."""
    return x if isinstance(x, Tensor) else x.dense()


def one_position_samples(x: Tensor | LazyInputs, g: Tensor) -> tuple[Tensor | LazyInputs, Tensor] | None:
    """The samples ``M_{c,n}`` as samples at one position each — ``x' [K, D, 1]``, ``g' [1, K,
    d_out, 1]``, ``k = c·N + n`` (:func:`per_sample_gradients`' order), the same ``M_k`` — where
    every column of ``g`` reaches the layer at one position at most (and lazy inputs take that
    form: :meth:`LazyInputs.at_positions`); else ``None``.

    That is the case of a per-position loss's term-separated roots (a language model's or a token
    classifier's ``[N·T, C]`` rows, a root column per term) at a layer nothing after which mixes
    the positions: the output head.  The statistics of the ``M_k`` alone (exact partial traces,
    EKFAC's rescaling, the square root) then take their ``T = 1`` routes, rank-one products:
    EKFAC's rescaling of a ``Linear(128, 2048)`` head at N = 16, T = 64 rotated ``C·N·T`` roots
    by the ``2048 × 2048`` output basis (550 GFLOP), ``1/T`` of that here.  The check reads ``g``
    once (and waits for a GPU)."""
    c, n, d_out, t = g.shape
    if t == 1:
        return None
    reached = (g.amax(2) != 0) | (g.amin(2) != 0)  # [C, N, T] (twice as fast as ne(0).any(2))
    if not bool((reached.sum(-1) <= 1).all()):
        return None
    positions = reached.to(torch.int8).argmax(-1).reshape(-1)  # 0 where none: g is zero there too
    examples = torch.arange(n, device=g.device).repeat(c)
    x_at = x[examples, :, positions].unsqueeze(-1) if isinstance(x, Tensor) else x.at_positions(examples, positions)
    if x_at is None:
        return None
    g_at = g.flatten(0, 1)[torch.arange(c * n, device=g.device), :, positions]  # [K, d_out]
    return x_at, g_at[None, :, :, None]


def _chunks(n: int, per_example: int, elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Split range(n) into slices whose temporaries stay under ``elements``."""
    size = max(1, elements // max(per_example, 1))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def per_sample_products(g: Tensor, x: Tensor) -> Tensor:
    """Every ``M_{c,n} = Σ_t g_{c,n,:,t} x_{n,:,t}ᵀ``, ``[C, N, d_out, D]``.

    Where ``x`` is stored along ``T`` (a convolution's patches) and there are fewer than 64
    outputs it is the transpose of ``x_n g_nᵀ`` (a view of ``[C, N, D, d_out]`` memory): one
    batched GEMM reading the patches as they lie, where the einsum's ``g_n x_nᵀ`` took twice as long
    (this project's CPU, one thread: 64 × 145 × 1024 patches, 32 outputs, 18.7 → 9.4 ms; 16
    outputs from 28 × 1024: 2.3 → 1.2 ms; but 64 outputs from 576 × 1024: 33 → 35 ms)."""
    c, n, d_out, t = g.shape
    if d_out >= 64 or t == 1 or x.stride(2) != 1:
        return torch.einsum("cnot,ndt->cnod", g, x)
    products = [torch.bmm(x, column.mT) for column in g]  # [N, D, d_out] each
    return stack_columns(products).mT


def stack_columns(products: list[Tensor]) -> Tensor:
    """Each root column's products (``[...]`` each) as ``[C, ...]``: one column (an MC sample) as
    a view, where ``torch.stack`` would copy it."""
    return products[0].unsqueeze(0) if len(products) == 1 else torch.stack(products)


def reduce_shared(x: Tensor | LazyInputs, g: Tensor) -> tuple[Tensor, Tensor]:
    """KFAC-reduce's pooled samples: ``x̂ = mean_t x`` (``[N, D, 1]``), ``ĝ = Σ_t g`` (``[C, N, d_out, 1]``)."""
    return _pooled_inputs(x), _pooled_roots(g)


def _pooled_inputs(x: Tensor | LazyInputs) -> Tensor:
    return dense(x).mean(2, keepdim=True)


def _pooled_roots(g: Tensor) -> Tensor:
    return g.sum(3, keepdim=True)


def kfac_factors(x: Tensor | LazyInputs, g: Tensor, approx: str = "expand", keep_rows: bool = False) -> KroneckerFactors:
    """KFAC factors [C]: expand, ``A = 1/(N·T) Σ_{n,t} x xᵀ``, ``G = Σ_{c,n,t} g gᵀ`` (KFC's
    ``Ω ⊗ Γ``, Grosse & Martens 2016, for convolutions); reduce, the same on
    :func:`reduce_shared`'s pooled samples.  Both are exact for ``N = T = 1``.  ``keep_rows``: a
    factor with fewer samples than its width is handed over as its rows (:class:`~curvlab.gram.GramRows`).
    """
    return kfac_flavours(x, {None: g}, approx, keep_rows)[None]


def kfac_flavours(x: Tensor | LazyInputs, gs: Mapping, approx: str = "expand",
                  keep_rows: bool = False) -> dict:
    """:func:`kfac_factors` of several flavours' roots ``gs`` (flavour → ``g``) on the same inputs:
    ``A`` formed once and shared (it depends on the inputs alone; KFAC's and KFLR's of a
    ResNet-18 convolution were two of its costliest Grams)."""
    if approx not in KFAC_APPROX:
        raise ValueError(f"kfac_approx={approx!r}; choose one of {KFAC_APPROX}")
    if approx == "reduce":  # reduce_shared's pooling, the inputs once
        x, gs = _pooled_inputs(x), {f: _pooled_roots(g) for f, g in gs.items()}
    n, _, t = x.shape
    a = input_gram(x, 1.0 / (n * t), keep_rows)
    return {f: KroneckerFactors(A=a, G=gram_or_rows(_g_rows(g, t), keep_rows=keep_rows)) for f, g in gs.items()}


def _g_rows(g: Tensor, t: int) -> Tensor:
    """``g`` ``[C, N, d_out, T]`` as the ``[C·N·T, d_out]`` rows of ``G``'s Gram: for ``T > 1``
    a ``[d_out, C·N·T]`` memory copied in runs of T, which the Gram reads along C·N·T (as for A);
    a ``[C·N·T, d_out]`` copy transposes every output location."""
    return g.transpose(2, 3).reshape(-1, g.shape[2]) if t == 1 else g.permute(2, 0, 1, 3).reshape(g.shape[2], -1).mT


def input_gram(x: Tensor | LazyInputs, scale: float = 1.0, keep_rows: bool = False) -> Tensor | GramRows:
    """``scale · Σ_{n,t} x_{n,t} x_{n,t}ᵀ`` (:func:`~curvlab.gram.gram_or_rows` of the rows); lazy
    inputs form it themselves (a convolution's from its input, where cheaper:
    :mod:`curvlab.extract.conv_gram`)."""
    if not isinstance(x, Tensor):
        return x.gram(scale, keep_rows)
    n, _, t = x.shape
    rows = x.transpose(1, 2).reshape(n * t, -1)  # a view for both layouts of unfold_input
    return gram_or_rows(rows, scale, keep_rows=keep_rows)


def tkfac_exact(x: Tensor | LazyInputs, g: Tensor, keep_rows: bool = False) -> TraceStats:
    """TKFAC statistics as exact partial traces of F (trace-preserving) [D].

    ``δΦ = Σ_k M_kᵀ M_k``, ``δΨ = Σ_k M_k M_kᵀ``, ``δ = tr δΦ = tr F``.  For ``T = 1`` these are
    weighted outer products; for convolutions the cheaper of two routes is taken: Gram
    matrices over output locations (``δΦ = Σ_n Ā_nᵀ (Σ_c G_nc G_ncᵀ) Ā_n``) or explicit
    per-sample gradients in chunks.  ``keep_rows``: for ``T = 1``, a partial trace with fewer
    samples than its width is handed over as its rows (:class:`~curvlab.gram.GramRows`).
    """
    c, n, d_out, t = g.shape
    d_in = x.shape[1]
    if t == 1:
        a, gg = dense(x)[..., 0], g[..., 0]
        g_norms = gg.square().sum((0, 2))  # Σ_c ‖g_cn‖²  [N]
        a_norms = torch.linalg.vector_norm(a, dim=1).square()  # ‖ā_n‖² [N], no squared copy of a
        phi = gram_or_rows(a, weights=g_norms, keep_rows=keep_rows)
        psi = gram_or_rows(gg.reshape(-1, d_out), weights=a_norms.repeat(c), keep_rows=keep_rows)
        return TraceStats(delta=(g_norms * a_norms).sum(), delta_phi=phi, delta_psi=psi)

    route = partial_traces_by_chunks if traces_by_chunks(c, n, d_out, d_in, t) else partial_traces_by_gram
    phi, psi = route(x, g)
    return TraceStats(delta=phi.trace(), delta_phi=phi, delta_psi=psi)


def traces_by_chunks(c: int, n: int, d_out: int, d_in: int, t: int) -> bool:
    """Whether :func:`tkfac_exact` takes the per-sample route (:func:`partial_trace_costs`)."""
    gram_cost, chunk_cost = partial_trace_costs(c, n, d_out, d_in, t)
    return chunk_cost <= gram_cost


def trace_statistics(
    x: Tensor | LazyInputs, g: Tensor, form: str = "exact", approx: str = "expand", keep_rows: bool = False
) -> TraceStats:
    """TKFAC's statistics of the samples ``M_k`` given by ``x``, ``g`` (see the module docstring):
    ``form="exact"`` the partial traces of ``Σ vec(M_k) vec(M_k)ᵀ``; ``"kfc"`` those of the
    samples the Kronecker convention ``approx`` replaces ``M_k`` by (equal for ``T = 1``);
    ``keep_rows`` as for :func:`tkfac_exact`."""
    if form == "exact" or x.shape[2] == 1:
        return tkfac_exact(x, g, keep_rows)
    if approx == "reduce":
        out = tkfac_exact(*reduce_shared(x, g), keep_rows)
        out.form = "kfc"
        return out
    return tkfac_kfc(x, g)


def partial_trace_costs(c: int, n: int, d_out: int, d_in: int, t: int) -> tuple[int, int]:
    """Multiply-adds of the two routes of :func:`tkfac_exact` for convolutions: (Gram matrices
    over locations, explicit per-sample gradients); δΦ's :func:`symmetric_product` counts its
    upper triangle, ``D (D + 1) / 2`` per row."""
    sym_phi = d_in * (d_in + 1) // 2
    gram = c * n * t * t * d_out + n * (2 * t * t * d_in + t * sym_phi) + c * n * (t * t * d_out + t * d_out * d_out)
    chunks = c * n * d_out * (d_in * t + sym_phi + d_in * d_out)
    return gram, chunks


def partial_traces_by_gram(x: Tensor | LazyInputs, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ M_kᵀM_k, Σ M_kM_kᵀ)`` through Gram matrices over output locations (cheap for small T)."""
    x = dense(x)
    c, n, d_out, t = g.shape
    d_in = x.shape[1]
    phi = psi = None
    for sl in _chunks(n, max(c * d_out * t, t * t, d_in * t)):
        xs, gs = x[sl], g[:, sl]
        out_gram = torch.einsum("cnot,cnos->nts", gs, gs)  # Σ_c G_nc G_ncᵀ
        in_gram = torch.einsum("ndt,nds->nts", xs, xs)  # Ā_n Ā_nᵀ
        # Σ_n Ā_nᵀ (O_n Ā_n): one symmetric product over the rows of every Ā_n
        a = xs.transpose(1, 2)  # [n, T, D]
        phi = _accumulate(phi, symmetric_product(a.reshape(-1, d_in), (out_gram @ a).reshape(-1, d_in)))
        psi = _accumulate(psi, torch.einsum("cnot,nts,cnps->op", gs, in_gram, gs))
    return phi, psi


def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    """``total + term`` in place, or ``term`` itself for the first chunk (one chunk: no zeroed
    D × D matrix and no pass adding to it)."""
    return term if total is None else total.add_(term)


def partial_traces_by_chunks(x: Tensor | LazyInputs, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ M_kᵀM_k, Σ M_kM_kᵀ)`` from explicit per-sample gradients, a chunk at a time."""
    traces = _PartialTraceSums()
    for m in per_sample_chunks(x, g):
        traces.add(m)
    return traces.phi, traces.psi


def per_sample_chunks(x: Tensor | LazyInputs, g: Tensor) -> Iterator[Tensor]:
    """Every ``M_k`` (:func:`per_sample_products`) as ``[B, d_out, D]`` chunks whose
    temporaries stay under :data:`CHUNK_ELEMENTS`."""
    c, n, d_out, d_in = *g.shape[:3], x.shape[1]
    for sl in _chunks(n, c * d_out * max(d_in, d_out)):
        yield _products(x, g[:, sl], sl).flatten(0, 1)


def _products(x: Tensor | LazyInputs, g: Tensor, examples: slice) -> Tensor:
    """:func:`per_sample_products` of ``g`` (the examples' roots) with ``x[examples]``."""
    return per_sample_products(g, x[examples]) if isinstance(x, Tensor) else x.per_sample(g, examples)


class _PartialTraceSums:
    """``Σ M_kᵀM_k``, ``Σ M_kM_kᵀ`` over chunks of ``M_k``."""

    def __init__(self) -> None:
        self.phi: Tensor | None = None
        self.psi: Tensor | None = None

    def add(self, m: Tensor) -> None:
        # one GEMM over the rows of every M_k, and batched M_k M_kᵀ: an einsum over (c, n, d)
        # copies M into [d_out, B·D] first (128×1152 at T=256: 0.35 + 0.29 s → 0.27 + 0.04 s)
        self.phi = _accumulate(self.phi, gram(m.flatten(0, 1)))
        self.psi = _accumulate(self.psi, (m @ m.mT).sum(0))


def tkfac_kfc(x: Tensor | LazyInputs, g: Tensor) -> TraceStats:
    """TKFAC statistics in the KFC-style form for convolutions [R].

    Per example ``Λ_n = Σ_t ā āᵀ`` and per column ``Γ_{c,n} = (1/T) Σ_t g gᵀ``:
    ``δ = Σ tr Λ tr Γ``, ``δΦ = Σ tr Γ · Λ``, ``δΨ = Σ tr Λ · Γ``.  Equals :func:`tkfac_exact` for
    ``T = 1``; preserves the trace only under KFC's independence assumptions.
    """
    x = dense(x)
    t = x.shape[2]
    tr_gamma = g.square().sum((2, 3)).sum(0) / t  # Σ_c tr Γ_cn  [N]
    tr_lambda = x.square().sum((1, 2))  # tr Λ_n  [N]
    phi = torch.einsum("n,ndt,net->de", tr_gamma, x, x)
    psi = torch.einsum("n,cnot,cnpt->op", tr_lambda, g, g) / t
    return TraceStats(
        delta=(tr_gamma * tr_lambda).sum(), delta_phi=phi, delta_psi=psi, form="kfc"
    )


def per_sample_gradients(x: Tensor | LazyInputs, g: Tensor) -> Tensor:
    """All ``M_{c,n}``, shape ``[C·N, d_out, D]`` (column ``k = c·N + n``), built in chunks."""
    c, n, d_out, _ = g.shape
    out = g.new_empty(c, n, d_out, x.shape[1])
    for sl in _chunks(n, c * d_out * x.shape[1]):
        out[:, sl] = _products(x, g[:, sl], sl)
    return out.reshape(c * n, d_out, -1)


def square_root(x: Tensor | LazyInputs, g: Tensor) -> SquareRoot:
    """The block's square root: factored at one location (linear layers), unfolded where that
    is cheaper (:func:`~curvlab.sqrt.unfolded_is_cheaper`: few locations for the layer's
    width), otherwise every ``M_k`` explicit."""
    c, n, d_out, t = g.shape
    if t == 1:
        return FactoredSqrt(dense(x)[..., 0], g[..., 0])
    if unfolded_is_cheaper(c * n, n, d_out, x.shape[1], t):
        return UnfoldedSqrt(dense(x), g)
    return DenseSqrt(per_sample_gradients(x, g))


def coupled_square_root(x: Tensor | LazyInputs, g: Tensor) -> SquareRoot:
    """The exact root of a block whose examples are coupled (train-mode BatchNorm), from every
    root row's gradients at the layer output ``g [K, N, d_out, T]``: each row reaches every
    example, ``M_k = Σ_{n,t} g_{k,n,:,t} x_{n,:,t}ᵀ`` — one example of ``N·T`` locations, so an
    :class:`~curvlab.sqrt.UnfoldedSqrt` of ``K`` columns where that is cheaper
    (:func:`~curvlab.sqrt.unfolded_is_cheaper`), else the ``M_k`` formed, with the inputs as
    the rows whose span holds theirs where fewer than the width."""
    k, n, d_out, t = g.shape
    x = dense(x)
    d_in = x.shape[1]
    root = UnfoldedSqrt(x.transpose(0, 1).reshape(1, d_in, n * t), g.transpose(1, 2).reshape(k, 1, d_out, n * t))
    if unfolded_is_cheaper(k, 1, d_out, d_in, n * t):
        return root
    return DenseSqrt(root.matrices(), root.input_rows() if n * t < d_in else None)


def kfe_scaling(x: Tensor | LazyInputs, g: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """EKFAC's rescaling ``Σ_k (U_outᵀ M_k U_in)²`` without storing every ``M_k`` [C].

    Linear: one matmul of squared projections.  Conv: the rotated per-sample gradients are
    formed in chunks, so memory stays bounded, by the cheaper of two routes
    (:func:`kfe_scaling_costs`): the rotated inputs and roots multiplied, or each ``M_k``
    formed and then rotated.  A basis with fewer columns than rows (``[n, k]``: a truncated
    eigenbasis) gets one more entry on its side, the sum over the complement of its columns
    (the compressed form of :mod:`curvlab.approx.spectral`).
    """
    c, n, d_out, t = g.shape
    u_out, u_in = u_out.to(g.dtype), u_in.to(g.dtype)
    if t == 1:
        g_sq = _squared_coordinates(g[..., 0], u_out).sum(0)  # [N, w_out]
        return g_sq.T @ _squared_coordinates(dense(x)[..., 0], u_in)
    if kfe_by_chunks(c, n, d_out, x.shape[1], t, u_out.shape[1], u_in.shape[1]):
        return _kfe_scaling_by_chunks(x, g, u_out, u_in)
    x = dense(x)
    g_rot = torch.einsum("cnot,op->cnpt", g, u_out)
    order = permutation_order(u_in)  # a gather for a permutation basis (an embedding's)
    x_rot = torch.einsum("ndt,de->net", x, u_in) if order is None else x[:, order]
    truncated_in = u_in.shape[1] < u_in.shape[0]
    by_gram = truncated_in and _row_norms_by_gram(c, d_out, x.shape[1], t)
    out = x.new_zeros(d_out, u_in.shape[1] + int(truncated_in))
    for sl in _chunks(n, c * d_out * max(u_in.shape[1], t if by_gram else x.shape[1]), CACHED_ELEMENTS):
        # squared in place: the product is fresh, and a second chunk-sized temporary costs
        # as much as the squaring (first-touch memory)
        rot_sq = torch.einsum("cnot,ndt->cnod", g_rot[:, sl], x_rot[sl]).square_()
        out[:, : u_in.shape[1]] += rot_sq.sum((0, 1))
        if truncated_in:  # row norms of U_outᵀ M outside span(U_in)
            if by_gram:
                locations = torch.einsum("ndt,nds->nts", x[sl], x[sl])
                rows = torch.einsum("cnot,nts,cnos->cno", g_rot[:, sl], locations, g_rot[:, sl])
            else:
                rows = torch.einsum("cnot,ndt->cnod", g_rot[:, sl], x[sl]).square_().sum(-1)
            out[:, -1] += (rows - rot_sq.sum(-1)).sum((0, 1))
    return out.clamp_min_(0) if truncated_in else out


def kfe_by_chunks(c: int, n: int, d_out: int, d_in: int, t: int, k_out: int, k_in: int) -> bool:
    """Whether :func:`kfe_scaling` of a conv layer forms every ``M_k`` (a truncated output
    side, or the cheaper route by :func:`kfe_scaling_costs`)."""
    rotated_first, formed_first = kfe_scaling_costs(c, n, d_out, d_in, t, k_out, k_in)
    return k_out < d_out or formed_first < rotated_first


def trace_statistics_and_kfe_scaling(
    x: Tensor | LazyInputs, g: Tensor, u_out: Tensor, u_in: Tensor, form: str = "exact", approx: str = "expand",
    keep_rows: bool = False,
) -> tuple[TraceStats, Tensor]:
    """:func:`trace_statistics` and :func:`kfe_scaling` (TEKFAC's statistics step) — from one
    pass over the per-sample gradients where both would form every ``M_k`` (exact partial
    traces of a convolution, both on their per-sample routes), so each ``M_k`` is formed once."""
    c, n, d_out, t = g.shape
    if form != "exact" or not shares_per_sample_products(c, n, d_out, x.shape[1], t, u_out.shape[1], u_in.shape[1]):
        return trace_statistics(x, g, form, approx, keep_rows), kfe_scaling(x, g, u_out, u_in)
    traces, scaling = _PartialTraceSums(), _KfeSums(u_out.to(g.dtype), u_in.to(g.dtype))
    for m in per_sample_chunks(x, g):
        traces.add(m)
        scaling.add(m)
    return TraceStats(delta=traces.phi.trace(), delta_phi=traces.phi, delta_psi=traces.psi), scaling.result()


def shares_per_sample_products(c: int, n: int, d_out: int, d_in: int, t: int, k_out: int, k_in: int) -> bool:
    """Whether :func:`trace_statistics_and_kfe_scaling` forms every ``M_k`` once for both (a
    convolution whose exact partial traces and rescaling both take their per-sample routes:
    :func:`partial_trace_costs`, :func:`kfe_scaling_costs`), saving ``C·N·d_out·T·D``
    multiply-adds of forming them twice."""
    return t > 1 and traces_by_chunks(c, n, d_out, d_in, t) and kfe_by_chunks(c, n, d_out, d_in, t, k_out, k_in)


def kfe_scaling_costs(c: int, n: int, d_out: int, d_in: int, t: int, k_out: int, k_in: int) -> tuple[int, int]:
    """Multiply-adds of :func:`kfe_scaling`'s two conv routes with bases ``[d_out, k_out]``,
    ``[d_in, k_in]``: (rotate ``x`` and ``g`` first, then their products per sample; form every
    ``M_k`` first, then rotate it).  Rotating first wins for few locations ``T``, forming ``M_k``
    for many (a 64×576 conv at T = 1024: about 6× fewer)."""
    truncated_in = k_in < d_in
    rows = 0 if not truncated_in else (
        t * t * (d_in + c * d_out) if _row_norms_by_gram(c, d_out, d_in, t) else c * d_out * t * d_in)
    rotated = n * (c * t * d_out * k_out + t * d_in * k_in + c * k_out * t * k_in + rows)
    formed = c * n * (d_out * t * d_in + d_out * d_in * k_in + k_out * d_out * k_in
                      + (k_out * d_out * d_in if truncated_in else 0))
    return rotated, formed


def _row_norms_by_gram(c: int, d_out: int, d_in: int, t: int) -> bool:
    """Whether the row norms ``‖(U_outᵀ M)_o‖²`` of a truncated input side are cheaper through
    the Gram matrices of the locations (``Σ_{t,s} g_t g_s x_tᵀx_s``: ``T² (D + C d_out)`` per
    example) than through ``U_outᵀ M`` itself (``C d_out T D``) — few locations."""
    return t * (d_in + c * d_out) < c * d_out * d_in


def _squared_coordinates(v: Tensor, u: Tensor) -> Tensor:
    """``(Uᵀ v)²`` per vector (last dim), plus ``‖v‖² − ‖Uᵀ v‖²`` for a truncated ``U``."""
    sq = in_basis(v, u).square_()
    if u.shape[1] == u.shape[0]:
        return sq
    rest = (v.square().sum(-1) - sq.sum(-1)).clamp_min(0)
    return torch.cat([sq, rest.unsqueeze(-1)], -1)


def _kfe_scaling_by_chunks(x: Tensor | LazyInputs, g: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """:func:`kfe_scaling` of a conv layer from explicit ``M_k`` (any basis, truncated or not)."""
    scaling = _KfeSums(u_out, u_in)
    for m in per_sample_chunks(x, g):
        scaling.add(m)
    return scaling.result()


class _KfeSums:
    """``Σ_k (U_outᵀ M_k U_in)²`` over chunks of ``M_k``, with the complement entries of a
    truncated basis (:func:`kfe_scaling`)."""

    def __init__(self, u_out: Tensor, u_in: Tensor) -> None:
        self.u_out, self.u_in = u_out, u_in
        k_out, k_in = u_out.shape[1], u_in.shape[1]
        self.truncated_out, self.truncated_in = k_out < u_out.shape[0], k_in < u_in.shape[0]
        self.out = u_in.new_zeros(k_out + int(self.truncated_out), k_in + int(self.truncated_in))

    def add(self, m: Tensor) -> None:
        out, u_out, u_in = self.out, self.u_out, self.u_in
        k_out, k_in = u_out.shape[1], u_in.shape[1]
        m_in = in_basis(m, u_in)  # M U_in
        v_sq = (u_out.mT @ m_in).square_()
        out[:k_out, :k_in] += v_sq.sum(0)
        if self.truncated_out:
            out[k_out, :k_in] += (m_in.square().sum(-2) - v_sq.sum(-2)).sum(0)
        if self.truncated_in:
            out_rows = (u_out.mT @ m).square_()
            out[:k_out, k_in] += (out_rows.sum(-1) - v_sq.sum(-1)).sum(0)
            if self.truncated_out:
                out[k_out, k_in] += m.square().sum() - m_in.square().sum() - out_rows.sum() + v_sq.sum()

    def result(self) -> Tensor:
        return self.out.clamp_min_(0) if self.truncated_out or self.truncated_in else self.out
