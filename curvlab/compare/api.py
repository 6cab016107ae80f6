"""``curvlab.compare``: how good is each approximation of each layer's Fisher block?"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import xarray as xr
from torch import Tensor, nn

from curvlab.approx import (
    APPROXIMATIONS,
    DampingStrategy,
    EighPolicy,
    KroneckerApproximation,
    applies,
    approximate,
    get_damping,
    needed_kfac_flavours,
)
from curvlab.approx.registry import built_from, decomposed_factors, measurement_limits, spec
from curvlab.block import Block, BlockLayout
from curvlab.compare.dataset import check_settings, measure, merged_attrs, strategies_for
from curvlab.compare.metrics import in_float64
from curvlab.extract import Extraction, extract
from curvlab.extract.layer_stats import KroneckerData, kronecker_stats
from curvlab.extract.options import DEFAULT_MAX_BYTES, ExtractOptions
from curvlab.reuse import forget, name_values, recall, reuse
from curvlab.stats import KroneckerFactors, LayerStats


def compare(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    approximations: Iterable[str] = APPROXIMATIONS,
    fisher: str = "exact",
    mc_samples: int = 1,
    damping: float = 1e-3,
    damping_strategies: Mapping[str, str] | None = None,
    top_k: int = 10,
    num_eigenvalues: int = 256,
    tkfac_conv: str = "exact",
    seed: int | None = 0,
    attrs: Mapping[str, object] | None = None,
    progress: bool = False,
    engine: str = "auto",
    kfac_approx: str = "expand",
    skip_unsupported: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    eigh: EighPolicy | None = None,
    extractor: Callable[..., Extraction] = extract,
) -> xr.Dataset:
    """Measure every approximation of every block against the exact block.

    One extraction (one forward, one backward) gives the square roots and factors; the
    approximations are the objects of :mod:`curvlab.approx` that the optimizers invert, built in
    float64 from those statistics one layer at a time (:class:`LayerApproximations`: what they
    have in common is computed once; the input-side factors of a batch with fewer input rows than
    half the layer's width are decomposed through the span of those rows, where their ranges lie:
    :func:`curvlab.approx.eigh.within_span`).  Every
    trainable parameter is measured: Kronecker blocks against each approximation, parameter
    blocks (norm layers' affine parameters, position embeddings, grouped convolutions, …) against
    ``"diagonal"``, the only approximation that applies to them (see :mod:`curvlab.model_blocks`).
    KFOC is measured on blocks of at most 2¹⁷ parameters, counted in the span of the batch's
    inputs where that is narrower (``d_out·r``: :func:`curvlab.approx.registry.fitted_params`;
    NaN above).
    This is the one comparison path: :func:`curvlab.distributed.compare` runs it with a sharded
    ``extractor``.

    Args:
        model, loss_fn, inputs, targets: as for :func:`curvlab.extract`.
        approximations: names from :data:`curvlab.approx.APPROXIMATIONS`.
        fisher: flavour of the reference block (``exact``, ``mc``, ``empirical``).  The exact
            one has a square-root column per example, loss term and class: ``N·T·V`` for a
            language model's per-token loss (``T`` tokens, ``V`` classes), whose cost grows as
            their cube (a tiny GPT at T = 8, V = 32: 5 s at N = 4, 63 s at N = 8); ``mc`` has
            ``mc_samples`` per term.
        mc_samples: MC samples for the ``mc`` flavour and for KFAC's factors.
        damping: λ of the natural-gradient comparison.
        damping_strategies: per approximation (default :data:`curvlab.approx.DEFAULT_DAMPING`,
            the optimizers' defaults).
        top_k: eigenvectors compared in ``subspace_overlap``.
        num_eigenvalues: spectrum entries stored per layer.
        tkfac_conv: ``"exact"`` partial traces (default) or ``"kfc"`` for conv TKFAC/TEKFAC.
        seed: seeds MC sampling (``None``: global random state).
        attrs: extra attributes (model and data description).
        progress: show a progress bar over layers.
        engine, kfac_approx, skip_unsupported, max_bytes: as for :func:`curvlab.extract`
            (the engine used is the dataset's ``engine`` attribute).
        eigh: how the Kronecker factors are eigen-decomposed (an
            :class:`~curvlab.approx.EighPolicy`; its ``dtype`` is ignored: everything is built in
            float64).  Default: fully.  ``EighPolicy(truncate_above=2048, rank=256)`` measures
            the truncated bases (rank 256 and a flat remainder) that the optimizers invert for
            factors wider than 2048 with their defaults (``KroneckerOptions.truncate_above``,
            ``truncation_rank``).
        extractor: the extraction, called as :func:`curvlab.extract` (the default) is, with
            ``(model, loss_fn, inputs, targets, **options)``; any function returning an
            :class:`~curvlab.extract.Extraction` of the batch (e.g. a sharded one whose square
            roots are :class:`~curvlab.distributed.ShardedSqrt`).

    Returns:
        ``xarray.Dataset`` with dimensions layer × approximation (× eig); see
        :func:`curvlab.compare.measure`.
    """
    names, damping, top_k, num_eigenvalues, strategies = check_comparison(
        approximations, damping=damping, damping_strategies=damping_strategies, top_k=top_k,
        num_eigenvalues=num_eigenvalues, eigh=eigh)
    stats = extractor(
        model,
        loss_fn,
        inputs,
        targets,
        fisher=fisher,
        mc_samples=mc_samples,
        stats=("sqrt", "kfac", "tkfac"),
        kfac_flavours=needed_kfac_flavours(names, fisher),
        tkfac_conv=tkfac_conv,
        seed=seed,
        engine=engine,
        kfac_approx=kfac_approx,
        skip_unsupported=skip_unsupported,
        max_bytes=max_bytes,
    )
    wrap = None
    if progress:
        from functools import partial

        from tqdm.auto import tqdm

        wrap = partial(tqdm, desc="compare", unit="layer")
    attrs = merged_attrs({"mc_samples": mc_samples, "seed": "none" if seed is None else seed, "tkfac_conv": tkfac_conv,
                          "loss": describe_loss(loss_fn)}, attrs)
    return measure_extraction(stats, names, damping=damping, damping_strategies=strategies, top_k=top_k,
                              num_eigenvalues=num_eigenvalues, eigh=eigh, attrs=attrs, progress=wrap)


def measure_extraction(
    stats: Extraction,
    names: Iterable[str],
    *,
    damping: float,
    damping_strategies: Mapping[str, str | DampingStrategy],
    top_k: int = 10,
    num_eigenvalues: int = 256,
    eigh: EighPolicy | None = None,
    given: Mapping[str, Mapping[str, KroneckerApproximation]] | None = None,
    attrs: Mapping[str, object] | None = None,
    progress: Callable | None = None,
) -> xr.Dataset:
    """The second half of :func:`compare`, for a caller that ran the extraction itself (settings
    checked by :func:`check_comparison`): every block's approximations ``names`` (those that
    apply to it) measured against its exact block, after the objects ``given`` for it (layer →
    name → an already built approximation, e.g. an optimizer's, measured as it is; its damping
    strategy in ``damping_strategies``)."""
    names = list(names)
    given = given or {}
    approx = {layer: LayerApproximations(block, [n for n in names if applies(n, block)], given.get(layer), eigh=eigh)
              for layer, block in stats.items()}
    return measure(
        stats,
        approx,
        damping=damping,
        damping_strategies=damping_strategies,
        top_k=top_k,
        num_eigenvalues=num_eigenvalues,
        attrs=merged_attrs({"factor_eigh": describe_eigh(eigh, names, stats), "batch_loss": stats.loss.item(),
                            **extraction_attrs(stats, names)}, attrs),
        progress=progress,
    )


def check_comparison(
    approximations: Iterable[str],
    *,
    damping: float = 1e-3,
    damping_strategies: Mapping[str, str | DampingStrategy] | None = None,
    top_k: int = 10,
    num_eigenvalues: int = 256,
    eigh: EighPolicy | None = None,
) -> tuple[list[str], float, int, int, dict[str, str | DampingStrategy]]:
    """The settings of :func:`compare` checked before any extraction (a caller that trains first,
    as ``curvlab report`` does, checks them before that too): ``(names, damping, top_k,
    num_eigenvalues, strategies)``, every approximation's damping strategy filled in.

    Each approximation is damped once by its strategy on a tiny synthetic block, so that a
    combination the strategy does not define (``"nor"`` for anything but TKFAC/TEKFAC,
    ``"factored"`` for the diagonal) is refused here, in milliseconds, and not after the
    extraction, with the same message.
    """
    if isinstance(approximations, str):
        raise ValueError(
            f"curvlab.compare: approximations={approximations!r} must be a collection of names, "
            f"e.g. ({approximations!r},)"
        )
    if eigh is not None and not isinstance(eigh, EighPolicy):
        raise ValueError(f"curvlab.compare: eigh={eigh!r} must be a curvlab.approx.EighPolicy (None: full bases)")
    names = list(dict.fromkeys(spec(a, "curvlab.compare").name for a in approximations))  # each once, in order
    if not names:
        raise ValueError("curvlab.compare: approximations=() names none; measure at least one (default: all)")
    damping, top_k, num_eigenvalues = check_settings(damping=damping, top_k=top_k, num_eigenvalues=num_eigenvalues)
    given = {spec(a, "curvlab.compare (damping_strategies)").name: s for a, s in (damping_strategies or {}).items()}
    unused = sorted(set(given) - set(names))
    if unused:  # a typo fell back to the default damping, silently
        raise ValueError(f"curvlab.compare: damping_strategies names {', '.join(unused)}, which approximations "
                         f"leaves out ({', '.join(names)})")
    for name, strategy in given.items():  # before the extraction, not after it
        try:
            get_damping(strategy)
        except (TypeError, ValueError) as err:
            raise ValueError(f"curvlab.compare: damping_strategies[{name!r}]: {err}") from None
    strategies = strategies_for(names, given)
    block = _synthetic_block(names)
    grad = torch.ones(block.layout.shape, dtype=torch.float64)
    for name in given:  # the defaults are defined for their approximation
        try:
            approximate(block, name).inv_mat_mul(grad, damping, strategies[name])
        except (TypeError, ValueError) as err:
            raise ValueError(f"curvlab.compare: damping_strategies[{name!r}]: {err}") from None
    return names, damping, top_k, num_eigenvalues, strategies


def _synthetic_block(names: Iterable[str]) -> LayerStats:
    """The statistics of a 2 × (2 + bias) linear block from 3 examples of fixed, made-up inputs
    and output gradients, with every KFAC flavour ``names`` need (no model runs, no random state
    is touched)."""
    x = torch.tensor([[1.0, -0.5, 1.0], [0.25, 2.0, 1.0], [-1.5, 0.75, 1.0]], dtype=torch.float64)[..., None]
    g = torch.tensor([[[0.5, -1.0], [1.25, 0.5], [-0.75, 1.5]], [[-1.0, 0.25], [0.5, 0.75], [1.0, -0.5]]],
                     dtype=torch.float64)[..., None]  # [C, N, d_out, T]
    flavours = needed_kfac_flavours(names, "exact")
    opts = ExtractOptions(fisher="exact", stats=("sqrt", "kfac", "tkfac"), kfac_flavours=flavours)
    data = KroneckerData(x, torch.cat([g] * len(flavours)),
                         {f: slice(2 * i, 2 * i + 2) for i, f in enumerate(flavours)})
    return kronecker_stats(Block("synthetic", "Linear", BlockLayout(2, 3, True, (2, 2)), None, None), data, opts,
                           "autograd")


class LayerApproximations(Mapping[str, KroneckerApproximation]):
    """One block's approximations by name, each built in float64 (``approximate`` of the block's
    statistics, converted) when read; ``given`` objects (already built, e.g. an optimizer's)
    come first, as they are.

    Read inside the layer's :func:`curvlab.reuse.shared_work` scope (as
    :func:`~curvlab.compare.measure` does), the objects share the root converted to float64, the
    decompositions of the factors they have in common and the rotations of the root into the
    same basis: EKFAC's scaling ``s*`` is the one the comparison measures KFAC's basis with, and
    TEKFAC's TKFAC's.  Built objects are not kept (a ResNet-18's, in float64, are gigabytes), nor,
    read in this mapping's order, the decompositions of factors that no approximation from the one
    read on decomposes (a Linear(8192, ·)'s input factor's basis: 512 MiB).
    ``eigh``: how those that eigen-decompose Kronecker factors do it (default: fully; its
    ``dtype`` is replaced by float64).
    """

    def __init__(self, stats: LayerStats, names: Iterable[str],
                 given: Mapping[str, KroneckerApproximation] | None = None, eigh: EighPolicy | None = None) -> None:
        self._stats = stats
        self._given = dict(given or {})
        self._names = list(dict.fromkeys([*self._given, *names]))
        self._eigh = {} if eigh is None else {"eigh": dataclasses.replace(eigh, dtype=torch.float64)}

    def __getitem__(self, name: str) -> KroneckerApproximation:
        if name in self._given:
            return self._given[name]
        if name not in self._names:
            raise KeyError(name)
        # converted once per shared_work scope, however many of the layer's objects are built
        stats64 = reuse(("in_float64_stats", id(self._stats)), lambda: (self._stats, _in_float64(self._stats)))[1]
        self._forget_before(name, stats64)
        return approximate(stats64, name, **(self._eigh if spec(name).decomposes_factors else {}))

    def _forget_before(self, name: str, stats64: LayerStats) -> None:
        """Drop from the scope the decompositions of the factors that the approximations before
        ``name`` decomposed and none from ``name`` on does (read out of order, a dropped one is
        computed again)."""
        at = self._names.index(name)
        later = {id(t) for n in self._names[at:] if n not in self._given for t in decomposed_factors(n, stats64)}
        for n in self._names[:at]:
            if n in self._given:
                continue
            for factor in decomposed_factors(n, stats64):
                known = recall(factor, "digest")  # its name (_in_float64's copies are named)
                if id(factor) not in later and known is not None:
                    forget(known)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def describe_eigh(eigh: EighPolicy | None, names: Iterable[str] | None = None,
                  blocks: Mapping[str, LayerStats] | None = None) -> str:
    """The dataset's ``factor_eigh`` attribute: how the factors were eigen-decomposed — as
    applied: a truncation only where one of the measured approximations ``names`` takes the
    policy (those that decompose Kronecker factors; KFOC's and the diagonal's bases are always
    full) and, given ``blocks``, a factor of theirs is wider than ``truncate_above``."""
    if eigh is None or eigh.truncate_above is None:
        return "full"
    asked = f"truncation above {eigh.truncate_above} to rank {eigh.rank}"
    names = None if names is None else list(names)
    takers = None if names is None else [n for n in names if spec(n).decomposes_factors]
    if takers is not None and not takers:
        return f"full (the {asked} applies to none of the measured approximations: {', '.join(names)})"
    if blocks is not None:
        measured = takers if takers is not None else [n for n in APPROXIMATIONS if spec(n).decomposes_factors]
        sizes = {size for block in blocks.values() if any(applies(n, block) for n in measured)
                 for size in block.layout.shape}
        if not any(eigh.truncates(size) for size in sizes):
            return f"full (the {asked} applies to no factor: none is wider than {eigh.truncate_above})"
    text = (f"truncated above {eigh.truncate_above} to rank {eigh.rank} plus a flat remainder "
            f"(randomized, {eigh.power_iterations} power iterations, oversampling {eigh.oversampling}, seed {eigh.seed})")
    others = [] if names is None else [n for n in names if n not in takers]
    return text + (f"; {', '.join(takers)} only ({', '.join(others)}: full)" if others else "")


def _in_float64(stats: LayerStats) -> LayerStats:
    """``stats`` with what approximations are built from in float64 (the root by
    :func:`~curvlab.compare.metrics.in_float64`), each named (:func:`curvlab.reuse.name_values`):
    the approximations' copies of a factor are then keyed without hashing its values."""
    copies: list[tuple[Tensor, Tensor]] = []  # (source, its copy): one copy for equal sources
    token = object()  # names only these copies: it lives as long as a name holding it

    def f64(x):
        if x is None:
            return None
        for source, copy in copies:  # the flavours' A (BackPACK computes it per extension)
            alike = (source.shape, source.dtype, source.device) == (x.shape, x.dtype, x.device)
            if source is x or alike and torch.equal(source, x):
                return copy
        copies.append((x, name_values(x.to(dtype=torch.float64), ("float64", token, len(copies)))))
        return copies[-1][1]

    tkfac = stats.tkfac
    return dataclasses.replace(
        stats,
        grad=f64(stats.grad),
        sqrt=None if stats.sqrt is None else in_float64(stats.sqrt),
        # (train-mode BatchNorm: EKFAC's and TEKFAC's s* come from it; in float32 they were 1e-7 off)
        convention_sqrt=None if stats.convention_sqrt is None else in_float64(stats.convention_sqrt),
        kfac={flavour: KroneckerFactors(f64(f.A), f64(f.G)) for flavour, f in stats.kfac.items()},
        tkfac=None if tkfac is None else dataclasses.replace(
            tkfac, delta=f64(tkfac.delta), delta_phi=f64(tkfac.delta_phi), delta_psi=f64(tkfac.delta_psi)
        ),
        kfe_scaling=f64(stats.kfe_scaling),
    )


def extraction_attrs(stats: Extraction, names: Sequence[str]) -> dict[str, str]:
    """Dataset attributes of an extraction measured by the approximations ``names``: why BackPACK
    did not run, what was left out, the block sizes they are measured up to, what they are built from."""
    return {
        "engine_reason": stats.engine_reason or "none",
        "skipped_parameters": ",".join(stats.skipped) or "none",
        "measured_up_to": measurement_limits(names),
        "built_from": built_from(names, stats.flavour),
    }


def describe_loss(loss_fn: nn.Module) -> str:
    """The loss as the Dataset records it: its type, reduction and a label smoothing it uses."""
    smoothing = getattr(loss_fn, "label_smoothing", 0.0)
    return f"{type(loss_fn).__name__}(reduction={loss_fn.reduction}" + (f", label_smoothing={smoothing:g})" if smoothing else ")")
