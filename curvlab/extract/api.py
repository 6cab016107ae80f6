"""``curvlab.extract``: one forward and one BackPACK backward → per-layer statistics."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from curvlab.extract.options import ExtractOptions
from curvlab.extract.session import ExtractionSession
from curvlab.stats import LayerStats


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
    options: ExtractOptions | None = None,
    **overrides: object,
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
        options: what to compute, an :class:`~curvlab.extract.ExtractOptions`; its fields can
            also be given as keyword arguments (``fisher="mc"``, ``stats=("kfac",)``, ``seed=0``,
            …), which override ``options``.

    Returns:
        :class:`Extraction`: block name → :class:`LayerStats`.
    """
    session = ExtractionSession(model, loss_fn, options, **overrides)
    param = next(p for blocks in session.blocks.values() for p in blocks[0].parameters())
    inputs, targets = inputs.to(param.device), targets.to(param.device)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
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
    result.flavour = session.options.fisher
    result.num_examples = inputs.shape[0]
    return result
