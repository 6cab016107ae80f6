"""Checks that a loss can be extracted, with errors that name the culprit.

Which modules of a model are supported is decided in :mod:`curvlab.model_blocks` (the blocks) and
:mod:`curvlab.extract.engines` (which engine can run them).
"""

from __future__ import annotations

from torch import nn

from curvlab.model_blocks import UnsupportedModelError

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)

__all__ = ["SUPPORTED_LOSSES", "UnsupportedModelError", "check_loss"]


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
