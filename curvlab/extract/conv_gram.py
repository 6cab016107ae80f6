"""A convolution's input Gram ``Σ_{n,t} x_{n,t} x_{n,t}ᵀ`` (KFAC's ``A`` before its scale) from the
layer input itself, without its patches ``x`` — for stride 1, dilation 1, zero padding.

Entry ``(c, i), (c', i')`` of the Gram (``i``, ``i'`` kernel taps) sums ``u[c, p] · u[c', p + δ]``
over the image positions ``p`` the tap ``i`` reads, with ``δ = i' − i``.  Over *every* image
position that sum is one GEMM per shift ``δ`` (``F_δ``; ``F_{−δ} = F_δᵀ``, so half of them): the
input is laid out once as ``[C, N·Π(S + k − 1)]``, every image line followed by ``k − 1`` zeros
(one gap serves both neighbours), where a shift is a flat offset and its products off the image
meet a zero.  A tap leaves out a few border lines of the image (padding below ``k − 1``); those
are subtracted by inclusion–exclusion over the spatial dimensions (a line, then the corners
counted twice), each a GEMM over the line.

Flops: ``⌈Π(2k − 1)/2⌉`` GEMMs of ``2·C²·N·Π(S + k − 1)`` against the patches' Gram's
``(C·Πk)²·N·Π(S_out)`` (BLAS ``syrk``), and no ``Πk``-fold copy of the input into patches.
Measured (one CPU thread, float32, 3×3 taps, padding 1; this project's AMD EPYC), against the
patches' copy and their Gram as :func:`curvlab.gram.gram` forms it: 16 channels at 32×32,
N = 64 (the CNN benchmark) 50 → 11 ms; ResNet-18's at N = 128: 64 channels at 32×32 788 → 241 ms,
128 at 16×16 628 → 238, 256 at 8×8 548 → 294, 512 at 4×4 637 → 505.  :func:`applies` takes the
shifts below 0.8 of the flops (at 2×2, 1.28: not taken).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Take the shifts where their flops are below this share of the patches' Gram's (see above)…
CHEAPER_BELOW = 0.8
#: …and the patches' Gram is worth it: below, the border terms' Python costs about what the
#: shifts save (3 channels at 32×32, N = 64: 3.2 ms either way).
MIN_FLOPS = 2**27


def applies(conv: nn.Module, shape: Sequence[int]) -> bool:
    """Whether the extraction takes :func:`input_gram` for ``conv`` on an input of ``shape``
    (``[N, C, *S]``): stride 1, dilation 1, zero padding, one group, several taps, and below
    :data:`CHEAPER_BELOW` of the patches' Gram's flops (:func:`flops`) but not below :data:`MIN_FLOPS`."""
    if (any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or conv.groups != 1
            or math.prod(conv.kernel_size) == 1 or len(shape) != len(conv.kernel_size) + 2):
        return False
    if conv.padding_mode != "zeros" and any(conv._reversed_padding_repeated_twice):
        return False
    by_shifts, by_patches = flops(conv, shape)
    return by_patches >= MIN_FLOPS and by_shifts < CHEAPER_BELOW * by_patches


def flops(conv: nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """``(by shifts, by patches)``: the GEMM flops of :func:`input_gram` for a stride-1 ``conv`` on
    an input of ``shape`` (``[N, C, *S]``), and the upper triangle of the patches' Gram
    (``syrk``'s); the border terms and the bias row left out."""
    n, c, *size = shape
    kernel = conv.kernel_size
    out = _locations(size, kernel, padding(conv))
    shifts = -(-math.prod(2 * k - 1 for k in kernel) // 2)
    d = c * math.prod(kernel)
    return (shifts * 2 * c * c * n * math.prod(s + k - 1 for s, k in zip(size, kernel)),
            d * (d + 1) * n * max(0, math.prod(out)))


def padding(conv: nn.Module) -> list[tuple[int, int]]:
    """``(before, after)`` zeros along each spatial dimension (``padding="same"`` included)."""
    flat = conv._reversed_padding_repeated_twice  # last dimension first, (before, after) each
    return [(flat[2 * i], flat[2 * i + 1]) for i in reversed(range(len(flat) // 2))]


def input_gram(inp: Tensor, kernel: tuple[int, ...], pads: list[tuple[int, int]], ones: bool) -> Tensor:
    """``Σ_{n,t} x_{n,t} x_{n,t}ᵀ`` of the patches ``x`` of ``inp`` (``[N, C, *S]``) for a stride-1,
    dilation-1 convolution with taps ``kernel`` and zero padding ``pads`` (``(before, after)`` per
    dimension), rows ordered like ``weight.flatten(1)``; with ``ones`` a last row and column for
    a row of ones appended to every patch (the bias): the patch sums and the count ``N·T``.
    Symmetric, ``[C·Πk (+1), C·Πk (+1)]``."""
    n, c, *size = inp.shape
    dims = len(size)
    margin = [k - 1 for k in kernel]
    out = _locations(size, kernel, pads)
    # every image followed by k − 1 zeros along each dimension, and the whole by a margin of zeros
    # on both sides: a shift is then a flat offset whose products off the image meet a zero
    framed_size = [s + e for s, e in zip(size, margin)]
    steps = [math.prod(framed_size[s + 1:]) for s in range(dims)]
    edge = sum(e * st for e, st in zip(margin, steps))
    length = n * math.prod(framed_size)
    flat = inp.new_empty(c, edge + length + edge)
    framed = flat[:, edge:edge + length].view(c, n, *framed_size)
    image = framed[(slice(None), slice(None), *(slice(0, s) for s in size))]
    image.copy_(inp.transpose(0, 1))
    flat[:, :edge].zero_()
    flat[:, edge + length:].zero_()
    for s, (e, extent) in enumerate(zip(margin, size)):  # the zeros, not the whole tensor's
        framed.narrow(2 + s, extent, e).zero_()

    # F_δ over every image position, for each shift δ (index δ + margin); F_{−δ} = F_δᵀ
    full = inp.new_empty(*(2 * e + 1 for e in margin), c, c)
    for delta in itertools.product(*(range(-e, e + 1) for e in margin)):
        if delta < tuple(-v for v in delta):
            continue  # its mirror is computed (lexicographically the larger of the pair)
        offset = sum(v * st for v, st in zip(delta, steps))
        at = tuple(v + e for v, e in zip(delta, margin))
        torch.mm(flat[:, edge:edge + length], flat[:, edge + offset:edge + length + offset].T, out=full[at])
        if any(delta):
            full[tuple(e - v for v, e in zip(delta, margin))] = full[at].T

    # block (i, i') of the Gram ← F_{i' − i}, less the lines tap i leaves out (inclusion–exclusion
    # over the dimensions); the blocks below the diagonal mirror those above
    d = c * math.prod(kernel)
    gram = inp.new_empty(d + ones, d + ones)
    blocks = gram[:d, :d].view(c, *kernel, c, *kernel)
    left_out = [[_outside(i - lo, out_s, s) for i in range(k)]
                for k, (lo, _), out_s, s in zip(kernel, pads, out, size)]
    cache: dict[tuple, Tensor | None] = {}
    taps = list(itertools.product(*(range(k) for k in kernel)))
    for a, tap in enumerate(taps):
        excluded = [left_out[s][i] for s, i in enumerate(tap)]
        subsets = _nonempty_subsets([s for s in range(dims) if excluded[s]])
        for other in taps[a:]:
            delta = tuple(o - i for o, i in zip(other, tap))
            block = full[tuple(v + e for v, e in zip(delta, margin))].clone()
            for subset in subsets:
                key = (subset, tuple(excluded[s] for s in subset), delta)
                if key not in cache:
                    cache[key] = _lines_product(image, subset, excluded, delta)
                if cache[key] is not None:
                    block.add_(cache[key], alpha=-1.0 if len(subset) % 2 else 1.0)
            if other == tap:  # the border terms summed in another order on either side
                block = (block + block.T) * 0.5
            else:
                blocks[(slice(None), *other, slice(None), *tap)] = block.T
            blocks[(slice(None), *tap, slice(None), *other)] = block
    if ones:
        _border_with_ones(gram, image, kernel, left_out, n * math.prod(out))
    return gram


def _locations(size: Sequence[int], kernel: Sequence[int], pads: list[tuple[int, int]]) -> list[int]:
    """Output locations along each dimension of a stride-1, dilation-1 convolution."""
    return [s + lo + hi - k + 1 for s, k, (lo, hi) in zip(size, kernel, pads)]


def _outside(first: int, count: int, size: int) -> tuple[int, ...]:
    """Image positions ``[0, size)`` outside the window ``[first, first + count)`` a tap reads."""
    return tuple(p for p in range(size) if not first <= p < first + count)


def _nonempty_subsets(items: list[int]) -> list[tuple[int, ...]]:
    return [s for r in range(1, len(items) + 1) for s in itertools.combinations(items, r)]


def _lines_product(image: Tensor, subset: tuple[int, ...], excluded: list[tuple[int, ...]],
                   delta: tuple[int, ...]) -> Tensor | None:
    """``Σ u[c, p] u[c', p + δ]`` over the positions ``p`` of ``image`` (``[C, N, *S]``) whose
    coordinates along ``subset`` are the ``excluded`` ones (any along the others) and with
    ``p + δ`` on the image; ``None`` where there is no such ``p``."""
    first, second = image, image
    for s, v in enumerate(delta):
        extent = image.shape[2 + s]
        if s in subset:
            lines = [p for p in excluded[s] if 0 <= p + v < extent]
            if not lines:
                return None
            at = torch.tensor(lines, device=image.device)
            first, second = first.index_select(2 + s, at), second.index_select(2 + s, at + v)
        elif v:
            if abs(v) >= extent:
                return None
            first, second = first.narrow(2 + s, max(0, -v), extent - abs(v)), second.narrow(2 + s, max(0, v), extent - abs(v))
    c = image.shape[0]
    return first.reshape(c, -1) @ second.reshape(c, -1).T


def _border_with_ones(gram: Tensor, image: Tensor, kernel: tuple[int, ...], left_out: list, count: int) -> None:
    """The last row and column of ``gram``: the patch sums ``Σ_{n,t} x_{n,t}`` and the count
    ``N·T`` (a row of ones in every patch)."""
    c, dims = image.shape[0], len(kernel)
    totals = image.sum(1)  # [C, *S]
    sums = image.new_empty(c, *kernel)
    for tap in itertools.product(*(range(k) for k in kernel)):
        excluded = [left_out[s][i] for s, i in enumerate(tap)]
        region = totals
        for s in range(dims):  # the window: the image less the lines the tap leaves out
            if excluded[s]:
                keep = [p for p in range(totals.shape[1 + s]) if p not in excluded[s]]
                region = region.index_select(1 + s, torch.tensor(keep, device=totals.device))
        sums[(slice(None), *tap)] = region.sum(tuple(range(1, dims + 1)))
    d = gram.shape[0] - 1
    gram[:d, d] = gram[d, :d] = sums.reshape(d)
    gram[d, d] = count
