"""Checks that a model and loss can be extracted, with errors that name the culprit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)


class UnsupportedModelError(ValueError):
    """The model contains a module curvlab cannot extract statistics for."""


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


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that perform operations (no children), with their paths."""
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def check_model(model: nn.Module, skip_unsupported: bool) -> list[tuple[str, nn.Module]]:
    """Validate every module; return the (path, module) pairs whose statistics are extracted.

    Raises:
        UnsupportedModelError: naming the module path, its type and what is supported.
    """
    from curvlab.extract.extension import supported_backprop_types  # the extension uses this module

    backprop_types = tuple(supported_backprop_types())
    supported_names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    layers = []
    for name, module in model.named_modules():
        where = f"module {name or '<root>'!r} ({type(module).__name__})"
        own_params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if list(module.children()):
            if own_params:
                raise UnsupportedModelError(
                    f"curvlab.extract: {where} holds parameters of its own and uses them in its "
                    f"forward; curvlab supports parameters only inside {supported_names} modules"
                )
            continue
        if not isinstance(module, backprop_types):
            raise UnsupportedModelError(
                f"curvlab.extract: {where} cannot be backpropagated through by BackPACK's "
                "second-order extensions; supported module types: "
                + ", ".join(t.__name__ for t in backprop_types)
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"curvlab.extract: {where} is in train mode, which couples the examples of a "
                "batch (no per-example Fisher); call model.eval() for the extraction"
            )
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise UnsupportedModelError(
                    f"curvlab.extract: {where} has groups={module.groups}; only groups=1 is "
                    "supported"
                )
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise UnsupportedModelError(
                    f"curvlab.extract: {where} uses padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r}; only numeric zero padding is supported"
                )
        if isinstance(module, SUPPORTED_LAYERS):
            if module.weight.requires_grad:
                layers.append((name, module))
            continue
        if own_params and not skip_unsupported:
            raise UnsupportedModelError(
                f"curvlab.extract: {where} has trainable parameters but is not supported; "
                f"supported layers: {supported_names}. Pass skip_unsupported=True to leave its "
                "parameters out, or freeze them (requires_grad=False)"
            )
    if not layers:
        raise UnsupportedModelError(
            f"curvlab.extract: the model has no trainable {supported_names} layer"
        )
    return layers


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
