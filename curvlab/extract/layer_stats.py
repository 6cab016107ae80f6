"""From what an engine recorded to :class:`~curvlab.stats.LayerStats` — one route for both engines.

The BackPACK and the autograd engine hand over the same quantities per block
(:class:`KroneckerData`, or a parameter block's per-column gradients), and the statistics are
built here, with the maths of :mod:`curvlab.extract.maths`, so both engines return the same
``LayerStats`` by construction.

Which root each statistic uses (``C`` root columns of the reference flavour, ``T_out`` loss
terms per example):

* ``sqrt``: the exact block's square root — with the coupling between examples when the batch
  couples them (``KroneckerData.exact``), one column per (root column, loss term, example);
* ``kfac``: the batch convention of kfac-pytorch, ASDL and curvlinops — per-example layer inputs
  ``x`` and output gradients ``g`` of the batch computation (one vjp per root column with its
  cotangent at every loss term), the coupling ignored;
* ``tkfac``, ``kfe``: the per-sample matrices ``M = Σ_t g xᵀ`` of the *term-separated* roots
  (``KroneckerData.g_terms`` when ``T_out > 1``) — so TKFAC's δ and EKFAC/TEKFAC's ``s*`` keep
  ``tr = tr F`` for per-token losses — with the coupling ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from curvlab.block import Block
from curvlab.extract import maths
from curvlab.extract.options import ExtractOptions
from curvlab.sqrt import DenseSqrt
from curvlab.stats import LayerStats


@dataclass
class KroneckerData:
    """One Kronecker block's recorded quantities.

    Attributes:
        x: the block's inputs ``[N, D, T]`` (a row of ones for the bias column; the positions of
            every call of the layer concatenated along ``T``), or an engine's
            :class:`~curvlab.extract.maths.LazyInputs` that unfolds them where they are read.
        g: the stacked roots at the layer output ``[C_total, N, d_out, T]`` (batch convention).
        segments: flavour → its columns of ``g``.
        g_terms: the reference flavour's term-separated roots ``[C·T_out, N, d_out, T]`` when
            ``T_out > 1``, else ``None``.
        exact: the reference flavour's exact square root ``[K, d_out, D]`` when the examples
            are coupled, else ``None`` (it follows from ``x`` and the term roots).
        terms_per_example: ``T_out``.
        exact_roots: instead of ``exact``, where the engine kept them: the coupled exact root's
            rows as their gradients at the layer output, ``[K, N, d_out, T]``
            (:func:`~curvlab.extract.maths.coupled_square_root`).
    """

    x: Tensor | maths.LazyInputs
    g: Tensor
    segments: dict[str, slice]
    g_terms: Tensor | None = None
    exact: Tensor | None = None
    terms_per_example: int = 1
    exact_roots: Tensor | None = None

    @property
    def coupled(self) -> bool:
        return self.exact is not None or self.exact_roots is not None


def kronecker_stats(block: Block, data: KroneckerData, options: ExtractOptions, engine: str) -> LayerStats:
    """Every requested statistic of a Kronecker block (see the module docstring)."""
    x, fisher = data.x, options.fisher
    samples = data.g_terms if data.g_terms is not None else data.g[data.segments[fisher]]
    out = LayerStats(
        block.name, block.module_type, block.layout, fisher, x.shape[0], x.shape[2],
        engine=engine, kfac_approx=options.kfac_approx, coupled=data.coupled,
        terms_per_example=data.terms_per_example,
    )
    kfe = "kfe" in options.stats and block.name in options.eigenbases
    exact_traces = options.tkfac_conv == "exact"  # ("kfc" takes each example's positions, not the M_k)
    # the M_k at one position each where every term's root reaches one (a per-position loss's output
    # head), checked only where a statistic of the M_k alone reads them (the check reads every root)
    of_m = "sqrt" in options.stats or kfe or ("tkfac" in options.stats and exact_traces)
    one_position = maths.one_position_samples(x, samples) if data.g_terms is not None and of_m else None
    m_x, m_g = one_position or (x, samples)
    if "sqrt" in options.stats:
        convention = maths.square_root(m_x, m_g)
        if not data.coupled:
            out.sqrt = convention
        elif data.exact_roots is not None:
            out.sqrt, out.convention_sqrt = maths.coupled_square_root(x, data.exact_roots), convention
        else:  # with the inputs where fewer than the width: their span holds every M_k's rows
            rows = None
            if x.shape[0] * x.shape[2] < x.shape[1]:
                rows = maths.dense(x).transpose(1, 2).reshape(-1, x.shape[1])
            out.sqrt, out.convention_sqrt = DenseSqrt(data.exact, rows), convention
    if "kfac" in options.stats:
        gs = {f: data.g[data.segments[f]] for f in options.factor_flavours}
        out.kfac = maths.kfac_flavours(x, gs, options.kfac_approx, options.gram_rows)
    if "tkfac" in options.stats and kfe and exact_traces:  # TEKFAC: the per-sample gradients formed once for both
        out.tkfac, out.kfe_scaling = maths.trace_statistics_and_kfe_scaling(
            m_x, m_g, *options.eigenbases[block.name], options.tkfac_conv, options.kfac_approx, options.gram_rows)
    else:
        if "tkfac" in options.stats:
            out.tkfac = maths.trace_statistics(*((m_x, m_g) if exact_traces else (x, samples)), options.tkfac_conv,
                                               options.kfac_approx, options.gram_rows)
        if kfe:
            out.kfe_scaling = maths.kfe_scaling(m_x, m_g, *options.eigenbases[block.name])
    return out


def parameter_stats(
    block: Block, columns: Tensor, options: ExtractOptions, engine: str, num_examples: int, terms_per_example: int,
    coupled: bool,
) -> LayerStats:
    """A parameter block: its exact square root from the per-column gradients ``[K, *shape]``."""
    out = LayerStats(
        block.name, block.module_type, block.layout, options.fisher, num_examples, 1, kind="parameter",
        engine=engine, kfac_approx=options.kfac_approx, coupled=coupled, terms_per_example=terms_per_example,
    )
    if "sqrt" in options.stats:
        out.sqrt = DenseSqrt(columns.reshape(columns.shape[0], *block.layout.shape))
    return out


def split_columns(block: Block, full: Tensor, has_bias_column: bool) -> Tensor:
    """The block's part of a layer-wide ``[..., d_out, D(+1)]`` tensor whose last column is the
    bias when ``has_bias_column``: all of it, the weight columns, or the bias column."""
    if block.weight is None:
        return full[..., -1:]
    if has_bias_column and block.bias is None:
        return full[..., :-1]
    return full
