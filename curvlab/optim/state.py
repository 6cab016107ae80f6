"""Typed per-block curvature state of curvlab's optimizers.

A preconditioned block keeps one :class:`CurvatureState`, chosen by the method:

=====================  ==============================================  =========================
state                  running averages                                builds
=====================  ==============================================  =========================
:class:`RunningFactors` KFAC's ``A``, ``G``                            ``curvlab.approx.KFAC``
:class:`RunningTraces`  TKFAC's unnormalised ``δ``, ``δΦ``, ``δΨ``     ``curvlab.approx.TKFAC``
:class:`EKFACBasis`     ``A``, ``G`` + an eigenbasis with scaling ``s`` ``curvlab.approx.EKFAC``
:class:`TEKFACBasis`    ``δ, δΦ, δΨ`` (+ ``A``, ``G``) + eigenbasis     ``curvlab.approx.TEKFAC``
=====================  ==============================================  =========================

Each has ``update(stats, decay)`` (the running averages; the eigen-corrected ones also rescale
``s ← β s + (1 − β) s*`` from the batch's ``kfe_scaling``), ``refresh()`` (the eigen
refresh: through the ``curvlab.approx`` constructors only, so every approximation is built in one
place, decomposed as the state's :class:`~curvlab.approx.EighPolicy` ``eigh`` says: dtype, and a
truncated eigenbasis for large factors) and ``build()`` (the object the next step inverts;
``None`` before the first refresh).  Running averages are ``X ← β X + (1 − β) X_batch`` in
``eigh.dtype``, initialised with the first batch (no zero bias); objects handed out by
``build()`` are never modified later.  A statistic handed over as its rows
(:class:`~curvlab.gram.GramRows`, as the optimizers extract on one process) with fewer samples
than its width is kept as those rows (:class:`PendingRows`) until a refresh reads the average, or
until they would fill half the matrix: the sum over the batches since is then one product, and a
statistics step makes no pass over the ``d × d`` average; one with more samples is added into the
average's upper triangle where it lies (BLAS ``syrk``, :func:`~curvlab.gram.add_gram_`).  The
lower triangle is restored when a refresh reads the average or the state is saved
(:class:`RunningAverages`).
KFAC/TKFAC need no eigen-decomposition at all with their default (Kronecker) damping: the
objects invert ``(L + aI) ⊗ (R + bI)`` from two Cholesky factorisations, computed at the first
step that uses them and kept with the object.

``tensors()``/``load()`` give and take the state as a flat ``name → tensor`` mapping — what
:meth:`KroneckerOptimizer.state_dict` saves (loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor

from curvlab import approx
from curvlab.approx import EXACT_EIGH, EighPolicy, KroneckerApproximation
from curvlab.block import BlockLayout
from curvlab.gram import GramRows, add_gram_, stack_rows
from curvlab.mkl import mirror_upper_
from curvlab.stats import KroneckerFactors, LayerStats


def ema_(old: Tensor | None, new: Tensor, decay: float, dtype: torch.dtype | None = None) -> Tensor:
    """``decay · old + (1 − decay) · new`` in place of ``old`` (a copy of ``new`` in ``dtype``
    if ``old`` is None)."""
    if old is None:
        return new.detach().to(dtype=dtype, copy=True)
    return old.lerp_(new.to(old.dtype), 1.0 - decay)  # one pass; exactly ``new`` for decay 0


@dataclass(eq=False)
class PendingRows:
    """Batches' rows not yet in a running average ``X``, which is ``decay · X + Σ_r w_r x_r x_rᵀ``
    over ``rows`` with ``weights`` that already carry the averaging (each batch's
    ``(1 − β) β^{batches since}``; 1 for the batch that starts the average)."""

    rows: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    decay: float = 1.0

    @property
    def count(self) -> int:
        """The number of rows kept."""
        return sum(r.shape[0] for r in self.rows)

    def push(self, batch: GramRows, decay: float, first: bool, dtype: torch.dtype) -> None:
        """Average in ``batch`` (``first``: it starts the average).  Weights are scaled in place
        and kept in ``dtype``, so a state saved and loaded between two pushes folds bit-identically."""
        self.decay *= decay
        for w in self.weights:
            w.mul_(decay)
        self.rows.append(batch.rows.detach().clone())  # the extraction's buffers are not ours
        self.weights.append(batch.weights.detach().to(dtype).mul_(1.0 if first else 1.0 - decay))

    def fold(self, average: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The average with the rows folded in (``average`` updated in place on its upper
        triangle, :func:`~curvlab.gram.add_gram_`)."""
        rows, weights = self.stacked().to(dtype), torch.cat(self.weights)
        if average is None:  # the rows start the average
            return add_gram_(rows.new_empty(rows.shape[1], rows.shape[1]), rows, weights, 0.0)
        return add_gram_(average, rows, weights, self.decay)

    def stacked(self) -> Tensor:
        """The rows as one ``[R, d]`` tensor (:func:`curvlab.gram.stack_rows`)."""
        return stack_rows(self.rows)

    def tensors(self) -> dict[str, Tensor]:
        return {"rows": self.stacked(), "weights": torch.cat(self.weights),
                "decay": torch.tensor(self.decay, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> PendingRows:
        return cls([tensors["rows"]], [tensors["weights"]], float(tensors["decay"]))


class CurvatureState(ABC):
    """The curvature state of one block (see the module docstring)."""

    layout: BlockLayout
    name: str
    eigh: EighPolicy

    @abstractmethod
    def update(self, stats: LayerStats, decay: float) -> None:
        """Fold one batch's statistics into the running averages."""

    @abstractmethod
    def refresh(self) -> None:
        """Rebuild what :meth:`build` returns from the running averages (eigen-decompositions
        computed now)."""

    @abstractmethod
    def build(self) -> KroneckerApproximation | None:
        """The ``curvlab.approx`` object the next step inverts (``None`` before a refresh)."""

    @property
    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether the running averages have been initialised."""

    @property
    @abstractmethod
    def statistics(self) -> tuple[str, ...]:
        """Statistics (``curvlab.extract`` names) a statistics step must extract for it."""

    def tensors(self) -> dict[str, Tensor]:
        """The state as ``field[.sub] → tensor`` (fields that are ``None`` are left out; kept rows
        as ``pending.<statistic>.<part>``)."""
        out: dict[str, Tensor] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value
            elif isinstance(value, (CurvatureState, KroneckerApproximation)):
                out.update({f"{f.name}.{k}": v for k, v in value.tensors().items()})
            elif f.name == "pending":
                out.update({f"pending.{stat}.{k}": v for stat, p in value.items() for k, v in p.tensors().items()})
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`tensors` (on a state constructed with the same layout).

        Raises:
            ValueError: a tensor this state does not have, or an incomplete approximation.
        """
        used: set[str] = set()
        for f in fields(self):  # type: ignore[arg-type]
            prefix = f"{f.name}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            current = getattr(self, f.name)
            if f.name in tensors:  # a running statistic
                setattr(self, f.name, tensors[f.name].to(dtype=self.eigh.dtype))
                used.add(f.name)
            elif f.name == "pending":  # pending.<statistic>.<part>
                parts: dict[str, dict[str, Tensor]] = {}
                for key, value in sub.items():
                    stat, part = key.split(".", 1)
                    parts.setdefault(stat, {})[part] = value
                self.pending = {stat: PendingRows.from_tensors(p) for stat, p in parts.items()}
            elif sub and isinstance(current, CurvatureState):
                current.load(sub)
            elif sub:  # the approximation object
                options = {"eigh": self.eigh} if issubclass(self.approximation_class, approx.KroneckerProduct) else {}
                try:
                    built = self.approximation_class.from_tensors(sub, layout=self.layout, name=self.name, **options)
                except TypeError:
                    raise ValueError(
                        f"{type(self).__name__}: the saved {f.name} tensors {sorted(sub)} do not make its "
                        f"{self.approximation_class.__name__}"
                    ) from None
                if self.eigh.dtype is not None and built.dtype != self.eigh.dtype:  # saved under another factor_dtype
                    built = built.to(self.eigh.dtype)
                setattr(self, f.name, built)
            used.update(prefix + k for k in sub)
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"{type(self).__name__}: unexpected state tensors {extra}")


class RunningAverages(CurvatureState):
    """A state of running averages ``X ← β X + (1 − β) X_batch``; a batch handed over as its rows
    is kept in :attr:`pending` or added into the average's upper triangle where it lies, the lower
    one restored before the average is read (see the module docstring)."""

    #: statistic name → its rows not yet averaged in
    pending: dict[str, PendingRows]
    #: statistics whose average is up to date on its upper triangle only (:func:`~curvlab.gram.add_gram_`)
    stale_lower: set[str]

    def average_(self, name: str, new: Tensor | GramRows, decay: float) -> None:
        """``X ← β X + (1 − β) new`` for the running statistic ``name`` (rows kept for later, see
        the module docstring)."""
        dt = self.eigh.dtype
        if isinstance(new, GramRows) and (name in self.pending or 2 * new.rows.shape[0] < new.shape[0]):
            pending = self.pending.setdefault(name, PendingRows())
            pending.push(new, decay, first=getattr(self, name) is None and not pending.rows, dtype=dt)
            if 2 * pending.count >= new.shape[0]:  # half the matrix's size: fold them in now
                self._fold_pending(name)
            return
        old = getattr(self, name)
        if isinstance(new, GramRows):  # as many rows as columns at least: added in where it lies
            rows, weights = new.rows.to(dt), new.weights.to(dt)
            if old is None:
                setattr(self, name, add_gram_(rows.new_empty(new.shape), rows, weights, 0.0))
            else:
                add_gram_(old, rows, weights * (1.0 - decay), decay)
            self.stale_lower.add(name)
            return
        self.fold_(name)  # rows kept from smaller batches come first
        setattr(self, name, ema_(getattr(self, name), new, decay, dt))

    def _fold_pending(self, name: str) -> None:
        pending = self.pending.pop(name, None)
        if pending is not None:
            setattr(self, name, pending.fold(getattr(self, name), self.eigh.dtype))
            self.stale_lower.add(name)

    def fold_(self, *names: str) -> None:
        """Average in the kept rows of ``names`` (default: every statistic) and restore the lower
        triangles, before anything reads the averages."""
        for name in names or {*self.pending, *self.stale_lower}:
            self._fold_pending(name)
            if name in self.stale_lower:
                mirror_upper_(getattr(self, name))
                self.stale_lower.discard(name)

    def tensors(self) -> dict[str, Tensor]:
        # the averages whole: a state saved here and one that was not restore the same lower
        # triangle from the same upper one before they read it
        for name in list(self.stale_lower):
            mirror_upper_(getattr(self, name))
        self.stale_lower.clear()
        return super().tensors()

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.stale_lower.clear()  # what tensors() gives is whole
        super().load(tensors)


@dataclass(eq=False)
class RunningFactors(RunningAverages):
    """Running KFAC factors ``A``, ``G`` of one flavour; builds ``curvlab.approx.KFAC`` from the
    averages at the last refresh (the inverse interval of Martens & Grosse)."""

    statistics = ("kfac",)  # type: ignore[assignment]
    approximation_class: ClassVar[type] = approx.KFAC

    layout: BlockLayout
    name: str
    flavour: str
    A: Tensor | None = None
    G: Tensor | None = None
    approximation: approx.KFAC | None = None
    eigh: EighPolicy = EXACT_EIGH
    pending: dict[str, PendingRows] = field(default_factory=dict)
    stale_lower: set[str] = field(default_factory=set)

    @property
    def has_statistics(self) -> bool:
        return self.A is not None or "A" in self.pending

    def update(self, stats: LayerStats, decay: float) -> None:
        factors = stats.kfac.get(self.flavour)
        if factors is not None:
            self.average_("A", factors.A, decay)
            self.average_("G", factors.G, decay)

    def snapshot(self) -> KroneckerFactors:
        """The current averages (the tensors themselves: updated in place later, so copy what
        must not change — the approximation constructors do)."""
        self.fold_()
        return KroneckerFactors(A=self.A, G=self.G)

    def refresh(self) -> None:
        # KFAC's constructor copies (symmetrises) or truncates the factors
        f = self.snapshot()
        self.approximation = approx.KFAC(f.A, f.G, layout=self.layout, name=self.name, eigh=self.eigh)

    def build(self) -> approx.KFAC | None:
        return self.approximation


@dataclass(eq=False)
class RunningTraces(RunningAverages):
    """Running TKFAC statistics ``δ``, ``δΦ``, ``δΨ`` — averaged *unnormalised* (normalising
    first would break ``tr K̂ = tr F``); builds ``curvlab.approx.TKFAC``."""

    statistics = ("tkfac",)  # type: ignore[assignment]
    approximation_class: ClassVar[type] = approx.TKFAC

    layout: BlockLayout
    name: str
    delta: Tensor | None = None
    delta_phi: Tensor | None = None
    delta_psi: Tensor | None = None
    approximation: approx.TKFAC | None = None
    eigh: EighPolicy = EXACT_EIGH
    pending: dict[str, PendingRows] = field(default_factory=dict)
    stale_lower: set[str] = field(default_factory=set)

    @property
    def has_statistics(self) -> bool:
        return self.delta is not None

    def update(self, stats: LayerStats, decay: float) -> None:
        ts = stats.tkfac
        if ts is not None:
            self.delta = ema_(self.delta, ts.delta.reshape(()), decay, self.eigh.dtype)
            self.average_("delta_phi", ts.delta_phi, decay)
            self.average_("delta_psi", ts.delta_psi, decay)

    def refresh(self) -> None:
        # TKFAC's constructor copies (symmetrises) or truncates δΦ, δΨ; δ is a 0-dim view
        self.fold_()
        self.approximation = approx.TKFAC(
            self.delta.clone(), self.delta_phi, self.delta_psi, layout=self.layout, name=self.name, eigh=self.eigh
        )

    def build(self) -> approx.TKFAC | None:
        return self.approximation


class Eigenbasis(CurvatureState):
    """An eigenbasis with a free diagonal ``s`` (EKFAC, TEKFAC): the basis is replaced at a
    refresh (``s`` reset to the Kronecker eigenvalues in it) and ``s`` is averaged with the
    batch's ``s* = Σ_k (U_outᵀ M_k U_in)²`` on every rescaling step in between."""

    approximation: approx.EigenCorrected | None

    def rescale(self, scaling: Tensor, decay: float) -> None:
        """``s ← β s + (1 − β) s*`` (out of place: built objects keep their own ``s``); ``scaling``
        holds the sums ``Σ_k (U_outᵀ M_k U_in)²`` over each compressed entry's directions."""
        a = self.approximation
        s_star = a.compressed_mean(scaling.to(a.dtype))
        self.approximation = a.with_scaling(torch.lerp(s_star, a.scaling, decay))

    def build(self) -> approx.EigenCorrected | None:
        return self.approximation

    def eigenbasis(self) -> tuple[Tensor, Tensor] | None:
        """``(U_out, U_in)`` as stored (a truncated side: its ``k`` columns) in which the next
        rescaling must be extracted (``None``: no basis)."""
        return None if self.approximation is None else self.approximation.eigenbasis(compressed=True)


@dataclass(eq=False)
class EKFACBasis(Eigenbasis):
    """EKFAC: the eigenbasis of the running KFAC factors; builds ``curvlab.approx.EKFAC``."""

    statistics = ("kfac",)  # type: ignore[assignment]
    approximation_class: ClassVar[type] = approx.EKFAC

    layout: BlockLayout
    name: str
    factors: RunningFactors
    approximation: approx.EKFAC | None = None
    eigh: EighPolicy = EXACT_EIGH

    @property
    def has_statistics(self) -> bool:
        return self.factors.has_statistics

    def update(self, stats: LayerStats, decay: float) -> None:
        self.factors.update(stats, decay)
        if stats.kfe_scaling is not None and self.approximation is not None:
            self.rescale(stats.kfe_scaling, decay)

    def refresh(self) -> None:
        f = self.factors.snapshot()
        self.approximation = approx.EKFAC.from_factors(
            f.A, f.G, scaling="kronecker", layout=self.layout, name=self.name, eigh=self.eigh
        )


@dataclass(eq=False)
class TEKFACBasis(Eigenbasis):
    """TEKFAC [R]: the eigenbasis of the running ``δΨ``, ``δΦ`` (or, ``factors`` given, of the
    running KFAC factors — the ``basis="kfac"`` ablation); builds ``curvlab.approx.TEKFAC``."""

    approximation_class: ClassVar[type] = approx.TEKFAC

    layout: BlockLayout
    name: str
    traces: RunningTraces
    factors: RunningFactors | None = None
    approximation: approx.TEKFAC | None = None
    eigh: EighPolicy = EXACT_EIGH

    @property
    def has_statistics(self) -> bool:
        return self.traces.has_statistics and (self.factors is None or self.factors.has_statistics)

    @property
    def statistics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tkfac",) if self.factors is None else ("tkfac", "kfac")

    def update(self, stats: LayerStats, decay: float) -> None:
        self.traces.update(stats, decay)
        if self.factors is not None:
            self.factors.update(stats, decay)
        if stats.kfe_scaling is not None and self.approximation is not None:
            self.rescale(stats.kfe_scaling, decay)

    def refresh(self) -> None:
        t = self.traces
        t.fold_()
        self.approximation = approx.TEKFAC.from_trace_stats(
            t.delta, t.delta_phi, t.delta_psi,
            basis=None if self.factors is None else self.factors.snapshot(),
            scaling="kronecker", layout=self.layout, name=self.name, eigh=self.eigh,
        )


class BlockState:
    """What an optimizer keeps per block: its curvature state and its momentum buffer (kept as
    the column blocks of the block's matrix form, :meth:`curvlab.block.BlockLayout.columns`, as
    the update is computed), and the weight they belong to (``owner``, weakly: a layer replaced at
    the block's path is another weight, with a state of its own)."""

    __slots__ = ("curvature", "momentum_columns", "_owner")

    def __init__(self, curvature: CurvatureState, momentum: Tensor | None = None, owner: Tensor | None = None) -> None:
        self.curvature = curvature
        self.momentum = momentum
        self._owner = None if owner is None else weakref.ref(owner)

    def belongs_to(self, weight: Tensor) -> bool:
        """Whether this is ``weight``'s state (a state without an owner belongs to any)."""
        return self._owner is None or self._owner() is weight

    @property
    def momentum(self) -> Tensor | None:
        """The momentum buffer in matrix form ``[d_out, D]`` (a copy when it has a bias column)."""
        cols = self.momentum_columns
        return None if cols is None else cols[0] if len(cols) == 1 else torch.cat(cols, 1)

    @momentum.setter
    def momentum(self, value: Tensor | None) -> None:
        self.momentum_columns = None if value is None else self.curvature.layout.columns(value)
