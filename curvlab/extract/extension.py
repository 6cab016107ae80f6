"""curvlab's BackPACK extension: one backward pass, every requested statistic.

:class:`CurvatureStatistics` is a second-order BackPACK extension.  At the loss it starts a
square root of the loss Hessian — exact, Monte-Carlo, empirical, or several of them side by side
as one stacked root — and BackPACK's own derivatives carry it back through the network.  At
every ``nn.Linear`` and ``nn.Conv2d`` the thin module extensions below hand the layer input and
the backpropagated root to :mod:`curvlab.extract.statistics`, where the maths lives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives
from backpack.extensions.mat_to_mat_jac_base import MatToJacMat
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGNExact
from backpack.utils.conv import unfold_input
from torch import Tensor, nn

from curvlab.block import Block
from curvlab.extract import maths
from curvlab.extract.options import ExtractOptions
from curvlab.extract.validate import check_loss_inputs
from curvlab.stats import LayerStats

#: Attribute on ``module.weight`` where the extension leaves a layer's results.
SAVEFIELD = "_curvlab_stats"


class _LossRoot(ModuleExtension):
    """Starts the backpropagated root at the loss: the stacked roots of every flavour."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__()
        self.derivatives = derivatives

    def backpropagate(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped):  # type: ignore[override]
        output = module.input0
        finite = bool(torch.isfinite(output).all())
        if finite or ext.options.non_finite == "raise":
            check_loss_inputs(module, output, getattr(module, "input1", None))
        roots, segments, start = [], {}, 0
        for flavour in ext.options.flavours:
            if not finite:  # non_finite="propagate": NaN statistics, no sampling from NaN logits
                columns = {"exact": output.shape[1], "mc": ext.options.mc_samples}.get(flavour, 1)
                root = output.new_full((columns, *output.shape), float("nan"))
            elif flavour == "exact":
                root = self.derivatives.sqrt_hessian(module, g_inp, g_out)
            elif flavour == "mc":
                root = self.derivatives.sqrt_hessian_sampled(
                    module, g_inp, g_out, mc_samples=ext.options.mc_samples
                )
            else:  # empirical: √R ∇ℓ_n = ∇_{f_n} L / √R, with L = R Σ_n ℓ_n
                grad = g_inp[0].detach()
                root = (grad / math.sqrt(_reduction_factor(module))).unsqueeze(0)
            segments[flavour] = slice(start, start + root.shape[0])
            start += root.shape[0]
            roots.append(root)
        ext.segments = segments
        return torch.cat(roots, 0) if len(roots) > 1 else roots[0]


def _reduction_factor(loss: nn.Module) -> float:
    """``R`` in ``L = R Σ_n ℓ_n``: 1 for sum, 1/N for CE mean, 1/numel for MSE mean."""
    if loss.reduction == "sum":
        return 1.0
    inp = loss.input0
    return 1.0 / (inp.shape[0] if isinstance(loss, nn.CrossEntropyLoss) else inp.numel())


class _KroneckerLayer(MatToJacMat):
    """Linear/Conv2d: compute this layer's statistics, then backpropagate the root."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__(derivatives, params=["weight"])

    def weight(self, ext: "CurvatureStatistics", module: nn.Module, g_inp, g_out, backproped: Tensor) -> list[LayerStats]:
        return ext.layer_statistics(module, backproped)


@functools.cache
def _module_extensions() -> dict[type, ModuleExtension]:
    """Module type → module extension (stateless, so built once per process)."""
    passthrough = {}
    # Every other layer: reuse BackPACK's square-root backpropagation (Jacobian-transpose
    # products); layers with parameters only pass the root on (their parameters are skipped).
    for cls, module_ext in SqrtGGNExact()._BackpropExtension__module_extensions.items():  # type: ignore[attr-defined]
        if cls in (nn.Linear, nn.Conv2d, nn.MSELoss, nn.CrossEntropyLoss):
            continue
        has_params = bool(module_ext._ModuleExtension__params)  # type: ignore[attr-defined]
        passthrough[cls] = MatToJacMat(module_ext.derivatives) if has_params else module_ext
    return {
        **passthrough,
        nn.MSELoss: _LossRoot(MSELossDerivatives()),
        nn.CrossEntropyLoss: _LossRoot(CrossEntropyLossDerivatives()),
        nn.Linear: _KroneckerLayer(LinearDerivatives()),
        nn.Conv2d: _KroneckerLayer(Conv2DDerivatives()),
    }


class CurvatureStatistics(SecondOrderBackpropExtension):
    """BackPACK extension computing curvlab's per-layer statistics in one backward pass."""

    def __init__(self, options: ExtractOptions, layers: dict[nn.Module, list[Block]]) -> None:
        super().__init__(savefield=SAVEFIELD, fail_mode="ERROR", module_exts=dict(_module_extensions()))
        self.options = options
        self.layers = layers
        self.segments: dict[str, slice] = {}

    def accumulate_backpropagated_quantities(self, existing: Tensor, other: Tensor) -> Tensor:
        return existing + other

    def layer_statistics(self, module: nn.Module, root: Tensor) -> list[LayerStats]:
        """Statistics of the blocks of one Linear/Conv2d layer from its input and the root at
        its output."""
        if isinstance(module, nn.Conv2d):
            x = unfold_input(module, module.input0)  # [N, C_in·kh·kw, T]
            g = root.flatten(3)  # [C, N, d_out, T]
        else:
            x = module.input0.unsqueeze(-1)
            g = root.unsqueeze(-1)
        x, g = x.detach(), g.detach()
        return [self._block(block, block.inputs(x), g) for block in self.layers[module]]

    def _block(self, block: Block, x: Tensor, g_all: Tensor) -> LayerStats:
        opts = self.options
        g = g_all[self.segments[opts.fisher]]
        out = LayerStats(block.name, block.module_type, block.layout, opts.fisher, x.shape[0], x.shape[2])
        if "sqrt" in opts.stats:
            out.sqrt = maths.square_root(x, g)
        if "kfac" in opts.stats:
            out.kfac = {f: maths.kfac_factors(x, g_all[self.segments[f]]) for f in opts.factor_flavours}
        if "tkfac" in opts.stats:
            form = maths.tkfac_kfc if opts.tkfac_conv == "kfc" and x.shape[2] > 1 else maths.tkfac_exact
            out.tkfac = form(x, g)
        if "kfe" in opts.stats and block.name in opts.eigenbases:
            u_out, u_in = opts.eigenbases[block.name]
            out.kfe_scaling = maths.kfe_scaling(x, g, u_out, u_in)
        return out


def supported_backprop_types() -> Sequence[type]:
    """Module types the extension can backpropagate through."""
    return tuple(_module_extensions())
