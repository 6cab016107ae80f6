"""Per-example square roots of the parameter blocks of modules that act on each example alone —
a norm layer (a BatchNorm normalising with its running statistics, GroupNorm, LayerNorm), a
grouped or depthwise convolution — from their input and the gradient at their output.

Where the examples are not coupled, the layers' batched vjps give every root column's gradient at
a module's output for all examples at once (one vjp per column); each example's parameter
gradient then follows from the module's own input: a norm layer's ``Σ g·x̂`` and ``Σ g`` (``x̂``
its input normalised, by torch's own functional norm without the affine part), a convolution's
``Σ_t g_t x_tᵀ`` within each group.  The generic route backpropagates once per column *and
example* through the whole network instead (:mod:`.recording`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extract.autograd import layer_io
from curvlab.model_blocks import CONV_LAYERS, own_weight


def is_local(module: nn.Module) -> bool:
    """Whether ``module``'s parameter gradients follow, example by example, from its input and
    output gradient here: a norm layer with affine parameters (a BatchNorm only where it
    normalises with its running statistics), or a grouped convolution (its weight a parameter of
    its own)."""
    if isinstance(module, _BatchNorm):
        return module.affine and not module.training and module.running_mean is not None
    if isinstance(module, nn.GroupNorm):
        return module.affine
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return isinstance(module, CONV_LAYERS) and module.groups > 1 and own_weight(module) is not None


def batched(module: nn.Module, inp: Tensor, out: Tensor, n: int) -> bool:
    """Whether a call saw the ``n`` examples as its input's and output's leading dimension (a
    LayerNorm on a sequence-first ``[T, N, D]`` tensor, or a convolution on one unbatched input,
    takes the generic route; a sequence-first tensor whose ``T`` equals ``N`` is refused at the
    model's Linear layers, by the probing vjp, unless no Kronecker layer sees it)."""
    dims = len(module.kernel_size) + 2 if isinstance(module, CONV_LAYERS) else None
    return inp.dim() >= 2 and inp.shape[0] == n and out.shape[0] == n and dims in (None, inp.dim())


def local_roots(module: nn.Module, inp: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Each column's and example's gradient of ``module``'s ``weight`` and ``bias``,
    ``[J, N, *parameter.shape]``, from its input ``[N, …]`` and the gradients at its output
    ``g [J, N, …]``."""
    dtype = module.weight.dtype
    g, inp = g.to(dtype), inp.to(dtype)
    if isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
        if isinstance(module, _BatchNorm):
            xhat = F.batch_norm(inp, module.running_mean, module.running_var, training=False, eps=module.eps)
            dims = tuple(range(3, g.dim()))  # [J, N, C, *spatial]: over the positions
        elif isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(inp, module.num_groups, eps=module.eps)
            dims = tuple(range(3, g.dim()))
        else:  # [J, N, *positions, *normalized_shape]
            xhat = F.layer_norm(inp, module.normalized_shape, eps=module.eps)
            dims = tuple(range(2, g.dim() - len(module.normalized_shape)))
        roots = {"weight": g * xhat, "bias": g}
        return {attr: root.sum(dims) if dims else root for attr, root in roots.items()
                if getattr(module, attr) is not None}
    x = layer_io.unfold_input(module, inp)  # [N, C_in·prod(k), T], rows as weight.flatten(1) per group
    n, d, t = x.shape
    groups, c_out, j = module.groups, module.out_channels, g.shape[0]
    x = x.reshape(n, groups, d // groups, t)
    per_group = g.reshape(j, n, groups, c_out // groups, t)
    roots = {"weight": torch.einsum("jngot,ngit->jngoi", per_group, x).reshape(j, n, *module.weight.shape)}
    if module.bias is not None:
        roots["bias"] = per_group.sum(-1).reshape(j, n, c_out)
    return roots
