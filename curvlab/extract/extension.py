"""curvlab's BackPACK extension: one backward pass, every requested statistic.

:class:`CurvatureStatistics` is a second-order BackPACK extension.  At the loss it starts a
square root of the loss Hessian — exact, Monte-Carlo, empirical, or several of them side by side
as one stacked root — and BackPACK's own derivatives carry it back through the network.  At
every Kronecker layer (``nn.Linear``, ``nn.Conv1d/2d/3d``) the thin module extensions below hand
the layer input and the backpropagated root to :mod:`curvlab.extract.layer_stats`, the route both
engines share; at an eval-mode BatchNorm its derivatives' parameter Jacobians give the parameter
blocks' per-sample square roots.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from backpack.core.derivatives.adaptive_avg_pool_nd import (
    AdaptiveAvgPool1dDerivatives,
    AdaptiveAvgPool2dDerivatives,
    AdaptiveAvgPool3dDerivatives,
)
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.conv_transpose1d import ConvTranspose1DDerivatives
from backpack.core.derivatives.conv_transpose2d import ConvTranspose2DDerivatives
from backpack.core.derivatives.conv_transpose3d import ConvTranspose3DDerivatives
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGNExact
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.block import Block
from curvlab.extract.autograd.loss_roots import check_root_fits, empirical_root, exact_root, loss_terms, mc_root
from curvlab.extract.autograd import layer_io
from curvlab.extract.layer_stats import KroneckerData, kronecker_stats, parameter_stats
from curvlab.extract.options import ExtractOptions
from curvlab.extract.validate import SUPPORTED_LOSSES, checked_loss_inputs
from curvlab.stats import LayerStats

#: Attribute on a block's first parameter where the extension leaves its results.
SAVEFIELD = "_curvlab_stats"


class BackpackUnsupportedError(ValueError):
    """The BackPACK engine met something at run time it cannot handle (e.g. several loss terms
    per example), said in ``reason``; ``engine="auto"`` retries with the autograd engine."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"curvlab (BackPACK engine): {reason}; use engine='autograd' (or 'auto')")
        self.reason = reason


class _LossRoot(ModuleExtension):
    """Starts the backpropagated root at the loss: the stacked roots of every flavour (the exact
    one from BackPACK's ``derivatives``, or, ``None`` or where targets equal ``ignore_index``,
    from :func:`exact_root`)."""

    def __init__(self, derivatives: Any | None) -> None:
        super().__init__()
        self.derivatives = derivatives

    def backpropagate(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped):  # type: ignore[override]
        if module.input0.dim() != 2:
            what = (": BackPACK's losses take [N, C]" if module.input0.dim() == 1
                    else " has several loss terms per example")
            raise BackpackUnsupportedError(f"model output of shape {tuple(module.input0.shape)}{what}")
        output = module.input0
        if ext.batch_size is not None and output.shape[0] != ext.batch_size:  # [N·T, C] rows of N examples
            raise BackpackUnsupportedError(
                f"the loss has {output.shape[0]} rows for the model's {ext.batch_size} examples, several loss "
                "terms per example")
        finite = checked_loss_inputs(module, output, getattr(module, "input1", None), ext.options.non_finite)
        terms = loss_terms(module, output, module.input1)
        if finite:
            check_root_fits(output, terms, ext.options.flavours, ext.options.mc_samples)
        roots, segments, start = [], {}, 0
        for flavour in ext.options.flavours:
            if not finite:  # non_finite="propagate": NaN statistics, no sampling from NaN logits
                columns = {"exact": output.shape[1], "mc": ext.options.mc_samples}.get(flavour, 1)
                root = output.new_full((columns, *output.shape), float("nan"))
            elif flavour == "exact":
                # BackPACK's own root counts every example, a target equal to ignore_index too
                root = (exact_root(module, output, terms) if self.derivatives is None or terms.kept is not None
                        else self.derivatives.sqrt_hessian(module, g_inp, g_out))
            elif flavour == "mc":  # BackPACK's draws, without its float32 cancellation for MSE
                root = mc_root(module, output, terms, ext.options.mc_samples)
            else:  # from the loss itself: the backward may start from c·L (a GradScaler)
                root = empirical_root(module, output, module.input1, terms)
            segments[flavour] = slice(start, start + root.shape[0])
            start += root.shape[0]
            roots.append(root)
        ext.segments = segments
        return torch.cat(roots, 0) if len(roots) > 1 else roots[0]


class _KroneckerLayer(MatToJacMat):
    """Linear/Conv: compute this layer's statistics, then backpropagate the root."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__(derivatives, params=["weight"])

    def weight(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped: Tensor) -> list[LayerStats]:
        return ext.layer_statistics(module, backproped)


class _ParameterBlocks(MatToJacMat):
    """A module whose parameters are parameter blocks (BatchNorm in eval mode): their per-sample
    square roots from the derivatives' parameter Jacobians; the root passes on."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__(derivatives, params=["weight", "bias"])

    def weight(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped: Tensor) -> LayerStats | None:
        return ext.parameter_statistics(module, "weight", g_inp, g_out, backproped, self.derivatives)

    def bias(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped: Tensor) -> LayerStats | None:
        return ext.parameter_statistics(module, "bias", g_inp, g_out, backproped, self.derivatives)


class _PoolInInputDtype(MatToJacMat):
    """Average pools: BackPACK builds their transposed-convolution Jacobian in the default
    dtype, which fails for float64 models; it is built in the input's dtype here."""

    def backpropagate(self, ext, module: nn.Module, g_inp, g_out, backproped):  # type: ignore[override]
        default = torch.get_default_dtype()
        torch.set_default_dtype(module.input0.dtype)
        try:
            return super().backpropagate(ext, module, g_inp, g_out, backproped)
        finally:
            torch.set_default_dtype(default)


#: Kronecker layer types of the BackPACK engine.
KRONECKER_DERIVATIVES: dict[type[nn.Module], Any] = {
    nn.Linear: LinearDerivatives,
    nn.Conv1d: Conv1DDerivatives,
    nn.Conv2d: Conv2DDerivatives,
    nn.Conv3d: Conv3DDerivatives,
    nn.ConvTranspose1d: ConvTranspose1DDerivatives,
    nn.ConvTranspose2d: ConvTranspose2DDerivatives,
    nn.ConvTranspose3d: ConvTranspose3DDerivatives,
}


@functools.cache
def _module_extensions() -> dict[type, ModuleExtension]:
    """Module type → module extension (stateless, so built once per process)."""
    passthrough = {}
    # Every other layer: reuse BackPACK's square-root backpropagation (Jacobian-transpose
    # products); BatchNorm's parameters become parameter blocks.
    for cls, module_ext in SqrtGGNExact()._BackpropExtension__module_extensions.items():  # type: ignore[attr-defined]
        if cls in KRONECKER_DERIVATIVES or cls in SUPPORTED_LOSSES:
            continue
        has_params = bool(module_ext._ModuleExtension__params)  # type: ignore[attr-defined]
        if issubclass(cls, _BatchNorm):
            passthrough[cls] = _ParameterBlocks(module_ext.derivatives)
        elif cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
            passthrough[cls] = _PoolInInputDtype(module_ext.derivatives)
        else:
            passthrough[cls] = MatToJacMat(module_ext.derivatives) if has_params else module_ext
    # BackPACK has these derivatives but SqrtGGNExact does not register them.
    for cls, derivatives in (
        (nn.AdaptiveAvgPool1d, AdaptiveAvgPool1dDerivatives),
        (nn.AdaptiveAvgPool2d, AdaptiveAvgPool2dDerivatives),
        (nn.AdaptiveAvgPool3d, AdaptiveAvgPool3dDerivatives),
    ):
        passthrough.setdefault(cls, _PoolInInputDtype(derivatives()))
    return {
        **passthrough,
        nn.MSELoss: _LossRoot(MSELossDerivatives()),
        nn.CrossEntropyLoss: _LossRoot(CrossEntropyLossDerivatives()),
        # (BackPACK's BCE root takes one output per example and targets 0 or 1 only)
        nn.BCEWithLogitsLoss: _LossRoot(None),
        **{cls: _KroneckerLayer(derivatives()) for cls, derivatives in KRONECKER_DERIVATIVES.items()},
    }


class CurvatureStatistics(SecondOrderBackpropExtension):
    """BackPACK extension computing curvlab's per-block statistics in one backward pass.

    Args:
        options: what to compute.
        layers: Kronecker layer → its blocks.
        parameter_blocks: parameter → its parameter block (BatchNorm affine parameters).
    """

    def __init__(
        self, options: ExtractOptions, layers: Mapping[nn.Module, list[Block]], parameter_blocks: Mapping[Tensor, Block]
    ) -> None:
        super().__init__(savefield=SAVEFIELD, fail_mode="ERROR", module_exts=dict(_module_extensions()))
        self.options = options
        self.layers = layers
        self.parameter_blocks = parameter_blocks
        self.segments: dict[str, slice] = {}
        #: the leading dimension of the model's input (set by the pass), where it is known
        self.batch_size: int | None = None

    def __call__(self, module: nn.Module, g_inp: tuple, g_out: tuple) -> None:
        if self.batch_size == 0 and self.options.non_finite == "propagate":
            return  # an empty batch (a rank's empty shard): its backward runs without statistics, as the autograd engine's
        super().__call__(module, g_inp, g_out)

    def accumulate_backpropagated_quantities(self, existing: Tensor, other: Tensor) -> Tensor:
        return existing + other

    def layer_statistics(self, module: nn.Module, root: Tensor) -> list[LayerStats]:
        """Statistics of the blocks of one Kronecker layer from its input and the root at its
        output (``[C_total, N, *output.shape[1:]]``); none for a layer without blocks."""
        if module not in self.layers:
            return []
        layer_io.check_transposed_output(self.layers[module][0].name, module, module.input0, module.output)
        x = layer_io.unfold_input(module, module.input0).detach()  # [N, D, T]
        g = layer_io.grads_to_layout(module, root).detach()  # [C, N, d_out, T]
        return [
            kronecker_stats(block, KroneckerData(block.inputs(x), g, self.segments), self.options, "backpack")
            for block in self.layers[module]
        ]

    def parameter_statistics(
        self, module: nn.Module, name: str, g_inp, g_out, root: Tensor, derivatives: Any
    ) -> LayerStats | None:
        """A parameter block's per-sample square root ``[K, *shape]`` (``K = C·N``)."""
        block = self.parameter_blocks.get(getattr(module, name))
        if block is None or "sqrt" not in self.options.stats:
            return None
        seg = self.segments[self.options.fisher]
        columns = derivatives.param_mjp(name, module, g_inp, g_out, root[seg], sum_batch=False)
        n = columns.shape[1]
        return parameter_stats(block, columns.flatten(0, 1).detach(), self.options, "backpack", n, 1, False)


def supported_backprop_types() -> Sequence[type]:
    """Module types the extension can backpropagate through."""
    return tuple(_module_extensions())
