"""``curvlab.compare``: how good is each approximation of each layer's Fisher block?"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import xarray as xr
from torch import Tensor, nn

from curvlab.approx import APPROXIMATIONS, DEFAULT_DAMPING, approximate
from curvlab.compare.measure import measure
from curvlab.extract import extract

DEFAULT_APPROXIMATIONS = APPROXIMATIONS


def needed_kfac_flavours(approximations: Iterable[str], fisher: str) -> tuple[str, ...]:
    """KFAC factor flavours the approximations need: mc for KFAC, exact for KFLR, the
    reference flavour for EKFAC's basis (and KFOC's start)."""
    flavours = {fisher}
    if "kfac" in approximations:
        flavours.add("mc")
    if "kflr" in approximations:
        flavours.add("exact")
    return tuple(sorted(flavours))


def compare(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    approximations: Iterable[str] = DEFAULT_APPROXIMATIONS,
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
) -> xr.Dataset:
    """Measure every approximation of every Linear/Conv2d block against the exact block.

    One extraction (one forward, one backward) gives the square roots and factors; the
    approximations are the objects of :mod:`curvlab.approx` that the optimizers invert.

    Args:
        model, loss_fn, inputs, targets: as for :func:`curvlab.extract`.
        approximations: names from :data:`curvlab.approx.APPROXIMATIONS`.
        fisher: flavour of the reference block (``exact``, ``mc``, ``empirical``).
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

    Returns:
        ``xarray.Dataset`` with dimensions layer × approximation (× eig); see
        :func:`curvlab.compare.measure.measure`.
    """
    names = [a.lower() for a in approximations]
    for name in names:
        if name not in APPROXIMATIONS:
            raise ValueError(f"curvlab.compare: unknown approximation {name!r}; choose from {APPROXIMATIONS}")
    strategies = {**DEFAULT_DAMPING, **(damping_strategies or {})}
    stats = extract(
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
    )
    approx = {layer: {n: approximate(block, n) for n in names} for layer, block in stats.items()}
    wrap = None
    if progress:
        from functools import partial

        from tqdm.auto import tqdm

        wrap = partial(tqdm, desc="compare", unit="layer")

    return measure(
        stats,
        approx,
        damping=damping,
        damping_strategies=strategies,
        top_k=top_k,
        num_eigenvalues=num_eigenvalues,
        attrs={
            "mc_samples": mc_samples,
            "seed": "none" if seed is None else seed,
            "tkfac_conv": tkfac_conv,
            "loss": type(loss_fn).__name__ + f"(reduction={loss_fn.reduction})",
            "batch_loss": stats.loss.item(),
            **(attrs or {}),
        },
        progress=wrap,
    )
