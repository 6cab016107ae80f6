"""What one extraction computes: :class:`ExtractOptions`, the one definition of its options."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from curvlab._options import OptionSet, check_int, is_flag, is_int
from curvlab.stats import FLAVOURS

#: Statistics an extraction can compute.
STATISTICS = ("sqrt", "kfac", "tkfac", "kfe")
DEFAULT_STATS = ("sqrt", "kfac", "tkfac")
TKFAC_CONV_FORMS = ("exact", "kfc")
#: Extraction engines: ``auto`` picks BackPACK when it can run the whole model.
ENGINES = ("auto", "backpack", "autograd")
#: Weight-sharing conventions of the Kronecker factors (Eschenhagen et al. 2023).
KFAC_APPROX = ("expand", "reduce")
#: Default bound on one batched vjp's temporaries in the autograd engine (bytes).
DEFAULT_MAX_BYTES = 2**30
NON_FINITE = ("raise", "propagate")


@dataclass(frozen=True)
class ExtractOptions(OptionSet):
    """Options of :func:`curvlab.extract` and :class:`~curvlab.extract.ExtractionSession`.

    Attributes:
        fisher: flavour of the block and of every statistic except extra KFAC factors:
            ``"exact"`` (GGN), ``"mc"`` (Monte-Carlo Fisher) or ``"empirical"``.
        mc_samples: labels sampled per example for the ``mc`` flavour.
        stats: any of ``"sqrt"`` (per-sample gradient matrices, ``N·C·P`` numbers),
            ``"kfac"`` (KFAC factors), ``"tkfac"`` (δ, δΦ, δΨ), ``"kfe"`` (rescaling in the
            ``eigenbases`` given).
        kfac_flavours: flavours whose KFAC factors to compute (default: ``(fisher,)``); several
            flavours share the one backward pass as a stacked root (``"mc"`` gives KFAC,
            ``"exact"`` KFLR).
        tkfac_conv: TKFAC statistics of weight-shared layers (convolutions, Linear on
            ``[N, T, D]``, tied calls) as exact partial traces of the per-sample matrices
            (``"exact"``, trace-preserving) or of the samples the Kronecker convention
            ``kfac_approx`` uses (``"kfc"``: KFC's form for expand, the pooled samples for reduce).
        separate_bias: blocks ``"<layer>.weight"`` and ``"<layer>.bias"`` instead of one
            block ``"<layer>"`` with the bias as last input column.
        eigenbases: block name → ``(U_out, U_in)`` for ``"kfe"``.
        skip_unsupported: leave out parameters of unsupported layers instead of raising.
        seed: seeds the MC sampling without touching the global random state (``None``: the
            global state is used and advanced).
        engine: ``"backpack"`` (BackPACK's extension API and its torch.fx graph converter),
            ``"autograd"`` (module hooks and batched vjps through any differentiable forward), or
            ``"auto"`` (BackPACK when it can run the whole model, else autograd); the engine used
            is recorded in every ``LayerStats.engine``.  Both give the same statistics.
        kfac_approx: weight-sharing convention of the KFAC factors: ``"expand"`` (default) or
            ``"reduce"``.
        max_bytes: bound on the temporaries of one batched vjp of the autograd engine (an
            estimate; at least one column runs at a time).
        non_finite: what a non-finite model output does: ``"raise"`` a clear error (the
            default), or ``"propagate"``: the backward pass completes with NaN statistics (for
            callers that skip such a batch, like the optimizers: under data parallelism every rank
            must finish its backward, or the others wait for it forever).
        gram_rows: hand over a KFAC factor, or TKFAC's ``δΦ``/``δΨ`` of a layer without weight
            sharing, that has fewer samples than its width as its rows
            (:class:`curvlab.gram.GramRows`) instead of the matrix: for consumers that only
            accumulate it (curvlab's optimizers fold many batches' rows in one product).
    """

    fisher: str = "exact"
    mc_samples: int = 1
    stats: frozenset[str] = frozenset(DEFAULT_STATS)
    kfac_flavours: tuple[str, ...] | None = None
    tkfac_conv: str = "exact"
    separate_bias: bool = False
    eigenbases: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    skip_unsupported: bool = False
    seed: int | None = None
    engine: str = "auto"
    kfac_approx: str = "expand"
    max_bytes: int = DEFAULT_MAX_BYTES
    non_finite: str = "raise"
    gram_rows: bool = False

    owner = "curvlab.extract"

    def __post_init__(self) -> None:
        who = "curvlab.extract"
        self.check_choices(who, fisher=FLAVOURS, non_finite=NON_FINITE, tkfac_conv=TKFAC_CONV_FORMS, engine=ENGINES,
                           kfac_approx=KFAC_APPROX)
        if isinstance(self.stats, str):
            raise ValueError(f"{who}: stats={self.stats!r} must be a collection of names, e.g. ({self.stats!r},)")
        stats = frozenset(self.stats)
        unknown = stats - set(STATISTICS)
        if unknown:
            raise ValueError(f"{who}: unknown statistics {sorted(unknown)}; choose from {STATISTICS}")
        if "kfe" in stats and not self.eigenbases:
            raise ValueError(f"{who}: stats 'kfe' needs eigenbases={{block: (U_out, U_in)}}")
        flavours = (self.fisher,) if self.kfac_flavours is None else _names(self.kfac_flavours, "kfac_flavours")
        if not flavours:  # every KFAC-based approximation would then fail, "not extracted"
            raise ValueError(f"{who}: kfac_flavours=() names no flavour; None: the fisher flavour's")
        for f in flavours:
            if f not in FLAVOURS:
                raise ValueError(f"{who}: kfac_flavours has {f!r}; choose from {FLAVOURS}")
        for name in ("mc_samples", "max_bytes"):
            object.__setattr__(self, name, check_int(who, name, getattr(self, name), 1))
        for name in ("separate_bias", "skip_unsupported", "gram_rows"):  # "False" would be true
            if not is_flag(getattr(self, name)):
                raise ValueError(f"{who}: {name}={getattr(self, name)!r} must be True or False")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"{who}: seed={self.seed!r} must be an int or None")
        object.__setattr__(self, "stats", stats)
        if self.kfac_flavours is not None:
            object.__setattr__(self, "kfac_flavours", flavours)
        object.__setattr__(self, "eigenbases", dict(self.eigenbases or {}))

    @property
    def factor_flavours(self) -> tuple[str, ...]:
        """Flavours whose KFAC factors are computed (``kfac_flavours``, default ``(fisher,)``)."""
        return (self.fisher,) if self.kfac_flavours is None else self.kfac_flavours

    @property
    def flavours(self) -> tuple[str, ...]:
        """Flavours whose roots are backpropagated, the reference flavour first."""
        extra = [f for f in self.factor_flavours if f != self.fisher]
        return (self.fisher, *extra)


def _names(value: Iterable[str] | str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError(f"curvlab.extract: {what}={value!r} must be a collection of names, e.g. ({value!r},)")
    return tuple(value)
