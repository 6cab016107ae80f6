"""``curvlab.extract``: one forward and one BackPACK backward → per-layer statistics."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from curvlab.extract.session import DEFAULT_STATS, ExtractionSession
from curvlab.extract.stats import LayerStats


class Extraction(dict[str, LayerStats]):
    """Block name → :class:`LayerStats`, plus the batch's loss value and sizes.

    Attributes:
        loss: the mini-batch loss (detached).
        flavour: the reference flavour.
        num_examples: N.
    """

    loss: Tensor
    flavour: str
    num_examples: int


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    fisher: str = "exact",
    mc_samples: int = 1,
    stats: Iterable[str] = DEFAULT_STATS,
    kfac_flavours: Iterable[str] | None = None,
    tkfac_conv: str = "exact",
    separate_bias: bool = False,
    eigenbases: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    skip_unsupported: bool = False,
    seed: int | None = None,
) -> Extraction:
    """Curvature statistics of every ``nn.Linear`` and ``nn.Conv2d`` block of ``model``.

    One forward and one backward pass through curvlab's BackPACK extension.  Block ``F`` of the
    chosen flavour is the curvature of the loss *as ``loss_fn`` computes it*:
    ``L = R Σ_n ℓ_n`` with ``R = 1/N`` (CE, mean), ``1/(N·C)`` (MSE, mean: torch averages over
    every element) or 1 (sum), and

    * ``exact``: the GGN ``Σ_n J_nᵀ ∇²_f L J_n`` (= the Fisher for CE and MSE);
    * ``mc``: its unbiased Monte-Carlo estimate with ``mc_samples`` labels drawn from the model;
    * ``empirical``: ``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with the true labels (biased as curvature).

    Args:
        model: the network; its parameters and ``.grad`` are left as they were.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` instance (reduction mean or sum).
        inputs, targets: one mini-batch (moved to the model's device).
        fisher: flavour of the block and of every statistic except extra KFAC factors.
        mc_samples: labels sampled per example for the ``mc`` flavour.
        stats: any of ``"sqrt"`` (per-sample gradient matrices, ``N·C·P`` numbers),
            ``"kfac"`` (KFAC factors), ``"tkfac"`` (δ, δΦ, δΨ), ``"kfe"`` (rescaling in the
            ``eigenbases`` given).
        kfac_flavours: flavours whose KFAC factors to compute (default: ``(fisher,)``); several
            flavours share the one backward pass as a stacked root (``"mc"`` gives KFAC,
            ``"exact"`` KFLR).
        tkfac_conv: conv TKFAC statistics as exact partial traces (``"exact"``) or KFC-style.
        separate_bias: blocks ``"<layer>.weight"`` and ``"<layer>.bias"`` instead of one
            block ``"<layer>"`` with the bias as last input column.
        eigenbases: block name → ``(U_out, U_in)`` for ``"kfe"``.
        skip_unsupported: leave out parameters of unsupported layers instead of raising.
        seed: seeds the MC sampling without touching the global random state.

    Returns:
        :class:`Extraction`: block name → :class:`LayerStats`.
    """
    session = ExtractionSession(
        model,
        loss_fn,
        fisher=fisher,
        mc_samples=mc_samples,
        stats=stats,
        kfac_flavours=kfac_flavours,
        tkfac_conv=tkfac_conv,
        separate_bias=separate_bias,
        eigenbases=eigenbases,
        skip_unsupported=skip_unsupported,
    )
    param = next(p for _, m in session.layers for p in m.parameters())
    inputs, targets = inputs.to(param.device), targets.to(param.device)
    params = [p for p in model.parameters()]
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    devices = [param.device] if param.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.enable_grad(), session, warnings.catch_warnings():
                # The first layer's input needs no gradient; torch warns about that for the
                # full backward hooks BackPACK relies on.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss = loss_fn(model(inputs), targets)
                loss.backward()
            result = Extraction(session.results())
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    result.loss = loss.detach()
    result.flavour = fisher
    result.num_examples = inputs.shape[0]
    return result
