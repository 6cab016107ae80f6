"""Checks that a loss can be extracted, with errors that name the culprit.

Which modules of a model are supported is decided in :mod:`curvlab.model_blocks` (the blocks) and
:mod:`curvlab.extract.engines` (which engine can run them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.model_blocks import UnsupportedModelError

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)

__all__ = ["SUPPORTED_LOSSES", "UnsupportedModelError", "check_loss", "check_loss_inputs", "checked_loss_inputs"]


def check_loss(loss_fn: nn.Module) -> None:
    """Only CrossEntropyLoss and MSELoss, with reduction mean or sum and no extras."""
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise UnsupportedModelError(
            f"curvlab.extract: loss_fn is {type(loss_fn).__name__}; supported losses are "
            "nn.CrossEntropyLoss and nn.MSELoss (module instances, not functions)"
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise UnsupportedModelError(
            f"curvlab.extract: loss_fn.reduction={loss_fn.reduction!r}; use 'mean' or 'sum'"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (
        loss_fn.weight is not None or loss_fn.label_smoothing != 0.0
    ):
        raise UnsupportedModelError(
            "curvlab.extract: CrossEntropyLoss with class weights or label smoothing is not "
            "supported (its Fisher is not the GGN BackPACK computes)"
        )


def checked_loss_inputs(loss_fn: nn.Module, output: Tensor, targets: Tensor | None, non_finite: str) -> bool:
    """Whether ``output`` is finite, after :func:`check_loss_inputs` — which a non-finite output
    with ``non_finite="propagate"`` skips (the caller then propagates NaN statistics).  Both
    engines call this where their backward pass starts."""
    finite = bool(torch.isfinite(output.detach()).all())
    if finite or non_finite == "raise":
        check_loss_inputs(loss_fn, output, targets)
    return finite


def check_loss_inputs(loss_fn: nn.Module, output: Tensor, targets: Tensor | None) -> None:
    """What reaches the loss of an extraction: a batch, finite outputs, targets the Fisher
    counts the way the loss does (called where the backward pass starts).

    Raises:
        ValueError: an empty batch; non-finite model outputs (the curvature is undefined there)
            or MSE targets; CrossEntropyLoss targets equal to ``ignore_index`` (torch's loss
            drops those examples and averages over the rest, which curvlab's Fisher does not).
    """
    who = f"curvlab.extract ({type(loss_fn).__name__})"
    n = output.shape[0] if output.dim() else 1
    if output.numel() == 0:
        raise ValueError(f"{who}: empty batch: the loss received {n} examples and {output.numel()} outputs")
    bad = ~torch.isfinite(output.detach())
    if bool(bad.any()):
        rows = int(bad.reshape(n, -1).any(1).sum())
        raise ValueError(
            f"{who}: the model output has {int(bad.sum())} non-finite values (NaN/inf) in {rows} of "
            f"{n} examples; the Fisher is undefined there: check the inputs and the parameters"
        )
    if targets is None:
        return
    if isinstance(loss_fn, nn.MSELoss) and not bool(torch.isfinite(targets).all()):
        raise ValueError(f"{who}: the targets have non-finite values (NaN/inf)")
    if isinstance(loss_fn, nn.CrossEntropyLoss) and not targets.is_floating_point():
        ignored = int((targets == loss_fn.ignore_index).sum())
        if ignored:
            raise ValueError(
                f"{who}: {ignored} of {targets.numel()} targets equal ignore_index={loss_fn.ignore_index}; "
                "torch's loss drops them and averages over the rest, curvlab's Fisher would count "
                "them: remove those examples from the batch"
            )
