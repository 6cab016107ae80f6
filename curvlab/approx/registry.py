"""The registry of approximations: name → how to build it, its default damping, what it needs.

:data:`APPROXIMATIONS`, :data:`DEFAULT_DAMPING` and :func:`approximate` are all read from
:data:`REGISTRY`, so an approximation is added in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from curvlab.approx.base import KroneckerApproximation
from curvlab.approx.diagonal import Diagonal
from curvlab.approx.eigh import narrow
from curvlab.approx.ekfac import EKFAC
from curvlab.approx.kfac import KFAC
from curvlab.approx.kfoc import KFOC
from curvlab.approx.tekfac import TEKFAC
from curvlab.approx.tkfac import TKFAC
from curvlab.stats import LayerStats


@dataclass(frozen=True)
class ApproximationSpec:
    """One named approximation.

    Attributes:
        name: its name (``"kfac"``, …).
        build: ``LayerStats`` (+ options) → the approximation object.
        default_damping: the damping strategy of its inverse — the optimizers' default, and so
            what the comparison measures unless told otherwise.
        kfac_flavour: the flavour of KFAC factors it is built from (``None``: the block's own
            flavour, or none at all).
        kinds: the block kinds it applies to (``"kronecker"``, ``"parameter"``; see
            :mod:`curvlab.model_blocks`).
        max_params: the comparison measures it on blocks of at most this many parameters
            (``None``: any) in the coordinates it fits them in (:func:`fitted_params`); KFOC's
            Lanczos iteration costs ``K·P·(d_out + D)`` a step, hours on a ResNet-18's
            512-channel convolutions in full.
        decomposes_factors: ``build`` takes ``eigh=`` (an :class:`~curvlab.approx.EighPolicy`):
            it eigen-decomposes Kronecker factors, which the optimizers may truncate.
        factors: which of a block's statistics it eigen-decomposes (see :func:`decomposed_factors`):
            ``"kfac"`` (the KFAC factors of its flavour, else of the block's), ``"tkfac"`` (δΦ, δΨ)
            or ``None``.
    """

    name: str
    build: Callable[..., KroneckerApproximation]
    default_damping: str
    kfac_flavour: str | None = None
    kinds: frozenset[str] = frozenset({"kronecker"})
    max_params: int | None = None
    decomposes_factors: bool = False
    factors: str | None = None


def _kfac(flavour: str, name: str) -> Callable[..., KroneckerApproximation]:
    def build(stats: LayerStats, **options: Any) -> KroneckerApproximation:
        if "flavour" in options:
            raise ValueError(
                f"approximate: {name!r} fixes the flavour ('kfac': 'mc', 'kflr': 'exact'); "
                "use KFAC.from_stats(stats, flavour=...) for other factors"
            )
        return KFAC.from_stats(stats, flavour=flavour, name=name, **options)

    return build


# Damping [C] for KFAC/KFLR (Martens & Grosse's factored π-damping) and EKFAC (exact damping in
# its eigenbasis); [R] TKFAC's "nor" damping for TKFAC and TEKFAC; KFOC, a reference never
# inverted by an optimizer: factored.
REGISTRY: dict[str, ApproximationSpec] = {
    spec.name: spec
    for spec in (
        ApproximationSpec("kfac", _kfac("mc", "kfac"), "factored", kfac_flavour="mc", decomposes_factors=True,
                          factors="kfac"),
        ApproximationSpec("kflr", _kfac("exact", "kflr"), "factored", kfac_flavour="exact", decomposes_factors=True,
                          factors="kfac"),
        ApproximationSpec("ekfac", EKFAC.from_stats, "exact", decomposes_factors=True, factors="kfac"),
        ApproximationSpec("tkfac", TKFAC.from_stats, "nor", decomposes_factors=True, factors="tkfac"),
        ApproximationSpec("tekfac", TEKFAC.from_stats, "nor", decomposes_factors=True, factors="tkfac"),
        ApproximationSpec("kfoc", KFOC.from_stats, "factored", max_params=2**17),
        ApproximationSpec("diagonal", Diagonal.from_stats, "exact", kinds=frozenset({"kronecker", "parameter"})),
    )
}

#: Names accepted by :func:`approximate`.
APPROXIMATIONS = tuple(REGISTRY)

#: Default damping strategy of each approximation's inverse.
DEFAULT_DAMPING: Mapping[str, str] = {name: spec.default_damping for name, spec in REGISTRY.items()}


def spec(name: str, who: str = "approximate") -> ApproximationSpec:
    """The registry entry of ``name`` (case-insensitive); a clear error for anything else."""
    key = name.lower() if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"{who}: unknown approximation {name!r}; choose one of {APPROXIMATIONS}")
    return REGISTRY[key]


def needed_kfac_flavours(names: Iterable[str], fisher: str) -> tuple[str, ...]:
    """KFAC factor flavours the approximations ``names`` need besides the reference
    ``fisher`` (which EKFAC's basis and KFOC's start use)."""
    flavours = {fisher} | {spec(n).kfac_flavour for n in names if spec(n).kfac_flavour}
    return tuple(sorted(flavours))


def decomposed_factors(name: str, stats: LayerStats) -> tuple:
    """The factors of ``stats`` that approximation ``name`` (built with its defaults)
    eigen-decomposes for its basis: KFAC's, KFLR's and EKFAC's KFAC factors, TKFAC's and TEKFAC's
    ``δΦ``, ``δΨ``; none for the others (KFOC reads ``A`` as its start, undecomposed)."""
    entry = spec(name)
    if entry.factors == "tkfac":
        ts = stats.tkfac
        return () if ts is None else tuple(t for t in (ts.delta_phi, ts.delta_psi) if t is not None)
    if entry.factors == "kfac":
        factors = stats.kfac.get(entry.kfac_flavour or stats.flavour)
        return () if factors is None else (factors.A, factors.G)
    return ()


def applies(name: str, stats: LayerStats) -> bool:
    """Whether the comparison measures approximation ``name`` on the block of ``stats``: its kind
    (``"kronecker"``, ``"parameter"``) is one the approximation applies to, and the block, in the
    coordinates the comparison fits it in (:func:`fitted_params`), is not larger than the
    approximation's ``max_params``."""
    entry = spec(name)
    if stats.kind not in entry.kinds:
        return False
    return entry.max_params is None or stats.num_params <= entry.max_params or fitted_params(stats) <= entry.max_params


def fitted_params(stats: LayerStats) -> int:
    """``d_out·r``, the parameters of a Kronecker block in the span of its batch's ``r`` input
    rows, where the comparison works in that span (:func:`curvlab.approx.eigh.span_basis`: a batch
    narrower than the layer, ResNet-18's ``layer4`` at the report's N = 9: 144 rows of 4608);
    else the block's ``P = d_out·D``."""
    rows = None if stats.kind != "kronecker" or stats.sqrt is None else stats.sqrt.input_rows()
    if rows is None or not narrow(*rows.shape):
        return stats.num_params
    return stats.sqrt.shape[0] * rows.shape[0]


def measurement_limits(names: Iterable[str] | None = None) -> str:
    """The ``max_params`` limits of the approximations ``names`` (default: the registry's), as
    text (``"kfoc: P ≤ 131072"``; ``P`` counted as :func:`fitted_params` does)."""
    chosen = [spec(n) for n in (REGISTRY if names is None else names)]
    return "; ".join(f"{s.name}: P ≤ {s.max_params}" for s in chosen if s.max_params is not None) or "none"


def built_from(names: Iterable[str], fisher: str) -> str:
    """The flavour of the statistics each approximation ``names`` is built from, as text
    (``"kfac: mc; kflr: exact; ekfac: empirical"``): KFAC's and KFLR's are fixed, every other's
    is the reference ``fisher``'s — so under ``fisher="mc"`` KFAC is measured against the labels
    it was sampled from, and under ``"empirical"`` KFAC and KFLR against another flavour."""
    return "; ".join(f"{spec(n).name}: {spec(n).kfac_flavour or fisher}" for n in names)


def approximate(stats: LayerStats | Mapping[str, LayerStats], name: str, **options: Any) -> Any:
    """Build the approximation ``name`` of the block described by ``stats``.

    Args:
        stats: the block's extracted statistics — or a whole extraction (block name →
            statistics), which gives one object per block the approximation applies to.
        name: one of :data:`APPROXIMATIONS`.
        options: passed to the class's ``from_stats`` (e.g. ``basis="kfac"`` for TEKFAC,
            ``init="identity"`` / ``tol`` for KFOC, ``scaling`` for EKFAC/TEKFAC).

    Raises:
        ValueError: unknown ``name``, or a statistic it needs was not extracted (the message
            names the layer, the approximation and what to request from ``curvlab.extract``).
    """
    entry = spec(name)
    if isinstance(stats, Mapping):
        return {block: entry.build(s, **options) for block, s in stats.items() if s.kind in entry.kinds}
    if not isinstance(stats, LayerStats):
        raise TypeError(
            f"approximate: expected one block's LayerStats or an extraction (block name → LayerStats), "
            f"got {type(stats).__name__}"
        )
    if stats.kind not in entry.kinds:
        raise ValueError(
            f"approximate: {entry.name!r} does not apply to block {stats.name!r}, a {stats.kind} block "
            f"({stats.module_type}); it applies to {sorted(entry.kinds)} blocks (parameter blocks: 'diagonal')"
        )
    return entry.build(stats, **options)

