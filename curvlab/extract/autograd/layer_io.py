"""The layer side of the engine: which modules it supports, their unfolded inputs ``x``, their
output gradients in the ``[.., N, d_out, T]`` layout, and the contraction into ``M``.

Representations (``N`` examples, ``T`` positions sharing the weight):

* ``nn.Linear`` on ``[N, *, D]``: ``x = [N, D, T]`` with ``T = prod(*)`` (1 for ``[N, D]``).
* ``nn.Conv1d/2d/3d`` (``groups=1``): ``x`` = the ``unfold`` patches ``[N, C_in·prod(k), T]``,
  rows ordered like ``weight.flatten(1)``, ``T`` = output locations; any padding mode.
* ``nn.Embedding`` on ``[N, *]`` token ids: its input is one-hot, ``D = num_embeddings``, so the
  engine keeps the **indices** ``x = [N, T]`` (int64) instead.  The weight's matrix form is
  ``Wᵀ`` (``[embedding_dim, num_embeddings]``, output × input as for Linear); tokens equal to
  ``padding_idx`` get no gradient in torch and contribute nothing here.  Its input factor
  ``A = 1/(N·T) Σ onehot onehotᵀ`` is diagonal (token frequencies): :func:`dense_inputs` builds
  the one-hot ``[N, D, T]`` when a dense ``x`` is wanted.

Never included: the bias (no row of ones in ``x``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = (nn.Linear, *CONV_TYPES, nn.Embedding)


def kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv"`` or ``"embedding"``; raises for anything else."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, CONV_TYPES):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    raise ValueError(
        f"autograd engine: {type(module).__name__} is not a supported target "
        f"(supported: {', '.join(t.__name__ for t in SUPPORTED)})"
    )


def check_target(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` for target modules whose weight the engine cannot represent."""
    k = kind(module)
    if k == CONV and module.groups != 1:
        raise ValueError(f"autograd engine: {name!r}: grouped convolution (groups={module.groups}) unsupported")
    if k == EMBEDDING and (module.max_norm is not None or module.scale_grad_by_freq):
        raise ValueError(f"autograd engine: {name!r}: Embedding with max_norm or scale_grad_by_freq unsupported")


def default_targets(model: nn.Module) -> dict[nn.Module, str]:
    """Every supported module of ``model`` → its path (first path if registered twice)."""
    out: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED) and module not in out:
            out[module] = name
    return out


def dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, D)`` of the weight's matrix form (bias excluded)."""
    k = kind(module)
    if k == LINEAR:
        return module.out_features, module.in_features
    if k == CONV:
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)
    return module.embedding_dim, module.num_embeddings


def unfold_input(module: nn.Module, inp: Tensor) -> Tensor:
    """The layer input in the engine's representation (see the module docstring)."""
    k = kind(module)
    n = inp.shape[0]
    if k == LINEAR:
        return inp.reshape(n, -1, inp.shape[-1]).transpose(1, 2).contiguous()
    if k == EMBEDDING:
        return inp.reshape(n, -1)
    return _unfold_conv(module, inp)


def _unfold_conv(conv: nn.Module, inp: Tensor) -> Tensor:
    nd = len(conv.kernel_size)
    if inp.dim() != nd + 2:
        raise ValueError(f"autograd engine: {type(conv).__name__} needs batched input, got {tuple(inp.shape)}")
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inp = F.pad(inp, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    if nd == 2:  # BackPACK's route (backpack.utils.conv.unfold_input)
        return F.unfold(inp, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    # Any dimension: a grouped convolution with one-hot kernels picks the patch entries,
    # output channel c·prod(k) + j = input channel c at kernel offset j (row-major).
    size = math.prod(conv.kernel_size)
    c_in = inp.shape[1]
    eye = torch.eye(size, dtype=inp.dtype, device=inp.device).reshape(size, 1, *conv.kernel_size)
    weight = eye.repeat(c_in, *([1] * (nd + 1)))
    conv_fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = conv_fn(inp, weight, None, conv.stride, padding, conv.dilation, groups=c_in)
    return out.flatten(2)


def grads_to_layout(module: nn.Module, grad: Tensor, lead: int = 1) -> Tensor:
    """Output gradients ``[*lead, *z.shape]`` → ``[*lead, N, d_out, T]``."""
    if kind(module) == CONV:
        return grad.flatten(lead + 2)
    n, d_out = grad.shape[lead], grad.shape[-1]
    return grad.reshape(*grad.shape[:lead], n, -1, d_out).transpose(-1, -2)


def dense_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` as a dense ``[N, D, T]`` tensor (Embedding: one-hot, padding tokens zero)."""
    if kind(module) != EMBEDDING:
        return x
    dense = F.one_hot(x, module.num_embeddings).transpose(1, 2)
    if module.padding_idx is not None:
        dense = dense * (x != module.padding_idx).unsqueeze(1)
    return dense.to(module.weight.dtype)


def contract(module: nn.Module, x: Tensor, g: Tensor, per_example: bool) -> Tensor:
    """``M = Σ_t g xᵀ``: ``g [K, N, d_out, T]`` → ``[K, N, d_out, D]`` (``per_example``) or,
    summed over the examples too, ``[K, d_out, D]``.  Embedding: a scatter-add over token ids."""
    if kind(module) != EMBEDDING:
        return torch.einsum("knot,ndt->knod" if per_example else "knot,ndt->kod", g, x)
    k, n, d_out, t = g.shape
    if module.padding_idx is not None:
        g = g * (x != module.padding_idx)[None, :, None, :]
    vocab = module.num_embeddings
    if per_example:
        index = x[None, :, None, :].expand(k, n, d_out, t)
        return g.new_zeros(k, n, d_out, vocab).scatter_add_(3, index, g)
    flat = g.permute(0, 2, 1, 3).reshape(k, d_out, n * t)
    index = x.reshape(1, 1, n * t).expand(k, d_out, n * t)
    return g.new_zeros(k, d_out, vocab).scatter_add_(2, index, flat)
