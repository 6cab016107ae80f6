"""The layer side of the engine: which modules it supports, their unfolded inputs ``x``, their
output gradients in the ``[.., N, d_out, T]`` layout, and the contraction into ``M``.

Representations (``N`` examples, ``T`` positions sharing the weight):

* ``nn.Linear`` on ``[N, *, D]``: ``x = [N, D, T]`` with ``T = prod(*)`` (1 for ``[N, D]``).
* ``nn.Conv1d/2d/3d`` (``groups=1``): ``x`` = the ``unfold`` patches ``[N, C_in·prod(k), T]``,
  rows ordered like ``weight.flatten(1)``, ``T`` = output locations; any padding mode.
* ``nn.ConvTranspose1d/2d/3d`` (``groups=1``): the same for the convolution it is — over its
  input with ``stride − 1`` zeros between entries, padded by ``dilation·(k − 1) − padding`` (and
  ``output_padding`` after), the kernel flipped — rows ordered like
  ``weight.transpose(0, 1).flatten(1)`` (BackPACK's ``unfold_by_conv_transpose``).
* ``nn.Embedding`` on ``[N, *]`` token ids: its input is one-hot, ``D = num_embeddings``, so the
  engine keeps the **indices** ``x = [N, T]`` (int64) instead.  The weight's matrix form is
  ``Wᵀ`` (``[embedding_dim, num_embeddings]``, output × input as for Linear); tokens equal to
  ``padding_idx`` get no gradient in torch and contribute nothing here.  Its input factor
  ``A = 1/(N·T) Σ onehot onehotᵀ`` is diagonal (token frequencies): :func:`dense_inputs` builds
  the one-hot ``[N, D, T]`` when a dense ``x`` is wanted.

Never included: the bias (no row of ones in ``x``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab import device_routes
from curvlab.block import Block, planes_first
from curvlab.extract import conv_gram, maths
from curvlab.gram import GramRows
from curvlab.model_blocks import CONV_LAYERS, KRONECKER_LAYERS, TRANSPOSED_CONV_LAYERS

if TYPE_CHECKING:
    from curvlab.extract.autograd.results import LayerCall

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"


def kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv"`` or ``"embedding"``; raises for anything else."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, (*CONV_LAYERS, *TRANSPOSED_CONV_LAYERS)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    raise ValueError(
        f"autograd engine: {type(module).__name__} is not a supported target "
        f"(supported: {', '.join(t.__name__ for t in KRONECKER_LAYERS)})"
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
        if isinstance(module, KRONECKER_LAYERS) and module not in out:
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
    """The layer input in the engine's representation (see the module docstring).

    A dense ``x [N, D, T]`` is a view: of the input itself for Linear (``[N, T, D]`` memory,
    rows of ``D``), of ``[D, N, T]`` memory for convolutions (:func:`_unfold_conv`).  The
    statistics read either without another copy (``A``'s Gram GEMM, the rotation ``X U_in``).
    It is in the weight's dtype: under autocast a bfloat16 input to a float32 layer is cast here,
    when read (a copy for Linear, in the unfold's own copy for convolutions)."""
    k = kind(module)
    n = inp.shape[0]
    if k == LINEAR:
        return inp.reshape(n, -1, inp.shape[-1]).transpose(1, 2).to(module.weight.dtype)
    if k == EMBEDDING:  # int32 indices too, as nn.Embedding takes them (one_hot and scatter need int64)
        return inp.reshape(n, -1).long()
    return _unfold_conv(module, inp)


def check_input(name: str, module: nn.Module, inp: Tensor, version: int, num_examples: int) -> None:
    """Raise ``ValueError`` for an input :func:`unfold_input` cannot take or whose leading dimension
    is not the batch size ``num_examples``, and (:func:`check_unmodified`) for one modified in place
    since the call — before anything is unfolded."""
    check_unmodified(name, inp, version)
    k = kind(module)
    if k == CONV:
        _check_batched(module, inp, f"{name!r} ({type(module).__name__})")
    n = inp.shape[0] if inp.dim() > int(k == LINEAR) else None
    if n == 1 and num_examples > 1:
        raise ValueError(
            f"curvlab (autograd engine): {name!r} saw an input with leading dimension 1 while the loss has "
            f"{num_examples} examples: its output is broadcast over the batch (e.g. a position embedding "
            "wpe(torch.arange(T)[None])), so no example has inputs of its own; call it on the batch "
            "(wpe(pos.expand(N, -1)): the same values, a Kronecker block per example)"
        )
    if n != num_examples:
        raise ValueError(
            f"curvlab (autograd engine): {name!r} saw an input with leading dimension {n}, not the batch "
            f"size {num_examples}: curvlab needs the batch as every layer input's leading dimension — not a "
            "sequence-first [T, N, ...] tensor (e.g. batch_first=False), nor a [N·T, D] reshape, nor an "
            "input without a batch dimension whose output is broadcast over the batch (e.g. a position "
            "embedding wpe(torch.arange(T)): call it on the batch, wpe(pos.expand(N, -1)), the same values)"
        )


def check_unmodified(name: str, inp: Tensor, version: int) -> None:
    """Inputs are kept by reference: refuse one modified in place after the call (``version``:
    its ``_version`` then)."""
    if inp._version != version:
        raise ValueError(
            f"curvlab (autograd engine): the input of {name!r} was modified in place after the call "
            "(e.g. an in-place activation on it); its value is needed"
        )


def _unfold_conv(conv: nn.Module, inp: Tensor) -> Tensor:
    """The patches of ``inp`` as a strided view ``[C_in, *k, N, *out]`` of the (padded) input,
    gathered in one copy into ``[D, N, T]`` memory: the copy then reads and writes runs along the
    output locations (ResNet-18's 64-channel 32×32 layer at N = 128: 192 ms, against 402 ms into
    ``[N, T, D]`` memory), and ``A``'s Gram GEMM reads both operands along ``N·T``.  With a bias
    (on the CPU) one more plane, of ones, follows them: :meth:`curvlab.block.Block.inputs` takes
    ``[x; 1]`` as a view (:func:`curvlab.block.ones_plane_after`) instead of copying the patches."""
    _check_batched(conv, inp, type(conv).__name__)
    transposed = isinstance(conv, TRANSPOSED_CONV_LAYERS)
    inp = _stuffed(conv, inp) if transposed else _padded(conv, inp)
    n, c_in, *spatial = inp.shape
    step, *space = inp.stride()[1:]
    out = _locations(conv, inp)
    patches = inp.as_strided(
        (c_in, *conv.kernel_size, n, *out),
        (step, *(st * d for st, d in zip(space, conv.dilation)), inp.stride(0),
         *(st * s for st, s in zip(space, (1,) * len(out) if transposed else conv.stride))),
        inp.storage_offset(),
    )
    d, t = c_in * math.prod(conv.kernel_size), math.prod(out)
    ones = conv.bias is not None and device_routes.cpu_tuned(inp)
    if not ones and inp.dtype == conv.weight.dtype and not transposed:
        return patches.reshape(d, n, t).permute(1, 0, 2)  # a view where it can be (1×1, stride 1)
    # the copy casts an autocast input; with a bias, a plane of ones follows the patches:
    # Block.inputs' bias row, without a second copy of them
    planes = inp.new_empty(d + ones, n, t, dtype=conv.weight.dtype)
    into = planes[:d].view(patches.shape)
    if transposed:  # tap i of the convolution it equals reads weight tap k − 1 − i: copied tap by
        # tap into its place (a flip first was one more copy of the patches, 20 % of the statistics)
        for tap in itertools.product(*(range(k) for k in conv.kernel_size)):
            into[(slice(None), *(k - 1 - i for i, k in zip(tap, conv.kernel_size)))].copy_(patches[(slice(None), *tap)])
    else:
        into.copy_(patches)
    if ones:
        planes[d] = 1
    return planes[:d].permute(1, 0, 2)


def _check_batched(conv: nn.Module, inp: Tensor, who: str) -> None:
    """Raise ``ValueError`` (naming ``who``) unless ``inp`` is a batch of the convolution's inputs."""
    if inp.dim() != len(conv.kernel_size) + 2:
        raise ValueError(f"autograd engine: {who} needs batched input, got {tuple(inp.shape)}")


def _padded(conv: nn.Module, inp: Tensor) -> Tensor:
    """The convolution's input with its padding applied (any padding mode)."""
    if isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(inp, conv._reversed_padding_repeated_twice, mode=mode)
    return inp


def _locations(conv: nn.Module, padded: Tensor) -> list[int]:
    """The output size along each spatial dimension for the ``padded`` input (a transposed
    convolution's: its zero-stuffed input, a stride-1 convolution's)."""
    strides = (1,) * len(conv.stride) if isinstance(conv, TRANSPOSED_CONV_LAYERS) else conv.stride
    return [(size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(padded.shape[2:], conv.kernel_size, strides, conv.dilation)]


def _stuffed(conv: nn.Module, inp: Tensor) -> Tensor:
    """A transposed convolution's input as the stride-1 convolution's that it is: ``stride − 1``
    zeros between entries, padded by ``dilation·(k − 1) − padding`` (cut where negative), and
    ``output_padding`` more after."""
    n, c, *spatial = inp.shape
    stuffed = inp.new_zeros(n, c, *[(size - 1) * s + 1 for size, s in zip(spatial, conv.stride)])
    stuffed[(slice(None), slice(None), *(slice(None, None, s) for s in conv.stride))] = inp
    pads = []
    for k, p, d, extra in reversed(list(zip(conv.kernel_size, conv.padding, conv.dilation, conv.output_padding))):
        pads += [d * (k - 1) - p, d * (k - 1) - p + extra]
    return F.pad(stuffed, pads)


def check_transposed_output(name: str, conv: nn.Module, inp: Tensor, output: Tensor) -> None:
    """Refuse a transposed convolution called with ``output_size``: its output is not the one its
    ``output_padding`` gives, which the patches are cut for."""
    if not isinstance(conv, TRANSPOSED_CONV_LAYERS) or inp.dim() != len(conv.kernel_size) + 2:
        return
    expected = [(size - 1) * s - 2 * p + d * (k - 1) + extra + 1 for size, k, s, p, d, extra in zip(
        inp.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.output_padding)]
    if list(output.shape[2:]) != expected:
        padding = tuple(o - e + x for o, e, x in zip(output.shape[2:], expected, conv.output_padding))
        raise ValueError(
            f"curvlab: {name!r} ({type(conv).__name__}) was called with output_size, giving "
            f"{tuple(output.shape[2:])} where its output_padding={conv.output_padding} gives {tuple(expected)}; "
            f"curvlab reads the layer's own settings: set its output_padding={padding} and call it without "
            "output_size (the same output)"
        )


class ConvInputs:
    """A convolution block's inputs ``x`` (``[N, D, T]``: the patches, with the block's row of ones
    for a bias column) kept as the layer's input until a statistic reads them
    (:class:`curvlab.extract.maths.LazyInputs`).

    :meth:`per_sample` forms the products ``M_{c,n} = Σ_t g_{c,n} x_nᵀ`` without the patches where
    they are not unfolded yet and that measured faster: each chunk's weight gradients by torch's
    convolution backward with the examples as groups (``torch.nn.grad.conv{1,2,3}d_weight``) for
    kernels of several taps, ``D ≥ 64`` and ``T ≥ 1024`` on the CPU.  Timed inside ResNet-18's
    TKFAC statistics steps at N = 128 (this project's CPU, one thread, float32) against the
    patches' copy and a batched GEMM: the 64-channel 3×3 convolutions at 32×32 (``D`` = 576)
    219–339 → 152–172 ms each; slower for the 3-channel stem at 32×32 (13 → 19 ms), the
    128-channel ones at 16×16 (64–77 → 86–89 ms a chunk) and, measured alone, a 1×1 convolution
    (16 → 41 ms) and 64 locations (386 → 762 ms).  Measured alone at 32×32, N = 64, 3×3: 16 → 32
    channels (``D`` = 144, the CNN benchmark's second convolution) 19.7 → 6.0 ms, 16 → 16 17.7 →
    3.4, 16 → 64 24.2 → 9.7, 12 → 32 (``D`` = 108) 13.6 → 11.6, 8 → 16 (``D`` = 72) 8.1 → 2.4, 8 → 64
    12.4 → 8.6.  TKFAC's and TEKFAC's per-sample routes read nothing else, so those layers are
    never unfolded for them.
    """

    def __init__(self, block: Block, call: "LayerCall") -> None:
        self.block, self.call = block, call
        conv, inp = call.module, call.inp
        self.locations = _locations(conv, _padded(conv, inp[:1]))
        self.shape = torch.Size((inp.shape[0], block.layout.in_features, math.prod(self.locations)))
        self._dense: Tensor | None = None

    def dense(self) -> Tensor:
        if self._dense is None:
            n, _, t = self.shape
            x = self.call.unfolded() if self.block.weight is not None else self.call.inp.new_empty(n, 0, t)
            self._dense = self.block.inputs(x)
        return self._dense

    def gram(self, scale: float, keep_rows: bool) -> Tensor | GramRows:
        conv, inp = self.call.module, self.call.inp
        if self.block.weight is None or not conv_gram.applies(conv, inp.shape):
            return maths.input_gram(self.dense(), scale, keep_rows)
        check_unmodified(self.call.name, inp, self.call.version)
        gram = conv_gram.input_gram(inp.to(conv.weight.dtype), conv.kernel_size, conv_gram.padding(conv), self.block.bias is not None)
        return gram.mul_(scale)

    def per_sample(self, g: Tensor, examples: slice) -> Tensor:
        conv = self.call.module
        if (self._dense is not None or self.block.weight is None or math.prod(conv.kernel_size) == 1
                or self.shape[1] < 64 or self.shape[2] < 1024 or not device_routes.cpu_tuned(g)):
            return maths.per_sample_products(g, self.dense()[examples])
        check_unmodified(self.call.name, self.call.inp, self.call.version)
        weight_grad = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[
            len(conv.kernel_size) - 1]
        x = _padded(conv, self.call.inp[examples].to(conv.weight.dtype))
        b, c_in, *spatial = x.shape
        d_out = conv.out_channels
        per_column = [
            weight_grad(x.reshape(1, b * c_in, *spatial), (b * d_out, c_in, *conv.kernel_size),
                        column.reshape(1, b * d_out, *self.locations), conv.stride, 0, conv.dilation, b).view(b, d_out, -1)
            for column in g
        ]
        m = maths.stack_columns(per_column)  # [C, B, d_out, C_in·prod(k)]
        return torch.cat([m, g.sum(3, keepdim=True)], 3) if self.block.bias is not None else m

    def at_positions(self, examples: Tensor, positions: Tensor) -> Tensor:
        return self.dense()[examples, :, positions].unsqueeze(-1)


class EmbeddingInputs:
    """An ``nn.Embedding`` block's inputs ``x`` (``[N, V, T]``: one-hot token ids, padding tokens
    zero) kept as the token ids ``[N, T]`` (:class:`curvlab.extract.maths.LazyInputs`): the
    Gram is the diagonal of token counts (``N·T`` adds where the one-hot rows' Gram takes
    ``N·T·V²/2`` multiply-adds), the per-sample products ``M_{c,n}`` a scatter-add
    (:func:`contract`); the one-hot ``x`` is built only where a statistic reads it whole.
    Statistics steps of ``Embedding(2048, 128)`` → tanh → ``Linear(128, 128)`` →
    ``Linear(128, 2048)`` at N = 16, T = 64 (this project's CPU, one thread), against the one-hot
    rows: KFAC 659 → 528 ms, EKFAC 839 → 586 ms (a forward and backward: 95 ms)."""

    def __init__(self, module: nn.Module, ids: Tensor) -> None:
        self.module, self.ids = module, ids
        self.shape = torch.Size((ids.shape[0], module.num_embeddings, ids.shape[1]))
        self._dense: Tensor | None = None

    def dense(self) -> Tensor:
        if self._dense is None:
            self._dense = dense_inputs(self.module, self.ids)
        return self._dense

    def gram(self, scale: float, keep_rows: bool) -> Tensor:
        ids, dtype = self.ids.reshape(-1), self.module.weight.dtype
        pad = self.module.padding_idx
        # (index_add_, not bincount or a mask: neither waits for the device to size its result)
        counts = ids.new_ones(ids.shape, dtype=dtype) if pad is None else (ids != pad).to(dtype)
        return torch.diag(counts.new_zeros(self.shape[1]).index_add_(0, ids, counts).mul_(scale))

    def per_sample(self, g: Tensor, examples: slice) -> Tensor:
        return contract(self.module, self.ids[examples], g, per_example=True)

    def at_positions(self, examples: Tensor, positions: Tensor) -> "EmbeddingInputs | None":
        # at most a sample per token (a root column per term: the MC or empirical Fisher); with
        # more (the exact Fisher's column per class), the T = 1 routes' dense one-hot rows cost more
        # than the token-id routes (TKFAC 3.5 s against 0.16 s, a root of 268 MB against 4 MB, at
        # V = 2048 with 64 columns a term)
        if examples.numel() > self.ids.numel():
            return None
        return EmbeddingInputs(self.module, self.ids[examples, positions].unsqueeze(1))


def cat_positions(xs: list[Tensor]) -> Tensor:
    """Several calls' inputs ``[N, D, T_i]`` as more positions ``[N, D, ΣT_i]``, kept in the
    memory layout :func:`unfold_input` gives them (no copy for one call)."""
    if len(xs) == 1:
        return xs[0]
    order = (1, 0, 2) if planes_first(xs[0]) else (0, 2, 1)  # [D, N, T] or [N, T, D] memory
    return torch.cat([x.permute(order) for x in xs], order.index(2)).permute(order)


def joined(parts: Sequence[Tensor], dim: int) -> Tensor:
    """``parts`` concatenated along ``dim``; a single part as it is (``torch.cat`` would copy it:
    ~25 ms a layer of ResNet-18 at N = 128)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def grads_to_layout(module: nn.Module, grad: Tensor, lead: int = 1) -> Tensor:
    """Output gradients ``[*lead, *z.shape]`` → ``[*lead, N, d_out, T]``, in the weight's dtype
    (under autocast a layer's output, so its gradient, can be bfloat16 where its input is not)."""
    grad = grad.to(module.weight.dtype)
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
