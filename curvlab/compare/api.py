"""``curvlab.compare``: how good is each approximation of each layer's Fisher block?"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import xarray as xr
from torch import Tensor, nn

from curvlab.approx import APPROXIMATIONS, DEFAULT_DAMPING, approximate, needed_kfac_flavours
from curvlab.approx.registry import spec
from curvlab.compare.dataset import check_settings, measure
from curvlab.extract import Extraction, extract

DEFAULT_APPROXIMATIONS = APPROXIMATIONS


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
    extractor: Callable[..., Extraction] = extract,
) -> xr.Dataset:
    """Measure every approximation of every Linear/Conv2d block against the exact block.

    One extraction (one forward, one backward) gives the square roots and factors; the
    approximations are the objects of :mod:`curvlab.approx` that the optimizers invert.
    This is the one comparison path: :func:`curvlab.distributed.compare` runs it with a sharded
    ``extractor``.

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
        extractor: the extraction, called as :func:`curvlab.extract` (the default) is, with
            ``(model, loss_fn, inputs, targets, **options)``; any function returning an
            :class:`~curvlab.extract.Extraction` of the batch (e.g. a sharded one whose square
            roots are :class:`~curvlab.distributed.ShardedSqrt`).

    Returns:
        ``xarray.Dataset`` with dimensions layer × approximation (× eig); see
        :func:`curvlab.compare.measure`.
    """
    if isinstance(approximations, str):
        raise ValueError(
            f"curvlab.compare: approximations={approximations!r} must be a collection of names, "
            f"e.g. ({approximations!r},)"
        )
    names = [spec(a, "curvlab.compare").name for a in approximations]
    check_settings(damping=damping, top_k=top_k, num_eigenvalues=num_eigenvalues)
    strategies = {**DEFAULT_DAMPING, **(damping_strategies or {})}
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
