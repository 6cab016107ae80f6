"""Per-example square roots of the parameter blocks of modules that act on each example alone —
an eval-mode BatchNorm, a grouped or depthwise convolution — from their input and the gradient at
their output.

Where the examples are not coupled, the layers' batched vjps give every root column's gradient at
a module's output for all examples at once (one vjp per column); each example's parameter
gradient then follows from the module's own input: BatchNorm's ``Σ g·x̂`` and ``Σ g``, a
convolution's ``Σ_t g_t x_tᵀ`` within each group.  The generic route backpropagates once per
column *and example* through the whole network instead (:mod:`.recording`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extract.autograd import layer_io
from curvlab.model_blocks import CONV_LAYERS


def is_local(module: nn.Module) -> bool:
    """Whether ``module``'s parameter gradients follow, example by example, from its input and
    output gradient here: a BatchNorm normalising with its running statistics, or a grouped
    convolution (its weight a parameter of its own)."""
    if isinstance(module, _BatchNorm):
        return module.affine and not module.training and module.running_mean is not None
    return isinstance(module, CONV_LAYERS) and module.groups > 1 and isinstance(module.weight, nn.Parameter)


def local_roots(module: nn.Module, inp: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Each column's and example's gradient of ``module``'s ``weight`` and ``bias``,
    ``[J, N, *parameter.shape]``, from its input ``[N, …]`` and the gradients at its output
    ``g [J, N, …]``."""
    dtype = module.weight.dtype
    g = g.to(dtype)
    if isinstance(module, _BatchNorm):
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        xhat = (inp.to(dtype) - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        if g.dim() == 3:  # [J, N, C]: nothing to sum
            return {"weight": g * xhat, "bias": g}
        dims = tuple(range(3, g.dim()))
        return {"weight": (g * xhat).sum(dims), "bias": g.sum(dims)}
    x = layer_io.unfold_input(module, inp)  # [N, C_in·prod(k), T], rows as weight.flatten(1) per group
    n, d, t = x.shape
    groups, c_out, j = module.groups, module.out_channels, g.shape[0]
    x = x.reshape(n, groups, d // groups, t)
    per_group = g.reshape(j, n, groups, c_out // groups, t)
    roots = {"weight": torch.einsum("jngot,ngit->jngoi", per_group, x).reshape(j, n, *module.weight.shape)}
    if module.bias is not None:
        roots["bias"] = per_group.sum(-1).reshape(j, n, c_out)
    return roots
