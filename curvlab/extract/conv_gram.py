"""A convolution's input Gram ``Σ_{n,t} x_{n,t} x_{n,t}ᵀ`` (KFAC's ``A`` before its scale) from the
layer input itself, without its patches ``x`` — for stride 1, dilation 1, zero padding.

Entry ``(c, i), (c', i')`` of the Gram (``i``, ``i'`` kernel taps) sums ``u[c, p] · u[c', p + δ]``
over the image positions ``p`` the tap ``i`` reads, with ``δ = i' − i``.  Over *every* image
position that sum is one GEMM per shift ``δ`` (``F_δ``; ``F_{−δ} = F_δᵀ``, so half of them): the
input is laid out once as ``[C, N·Π(S + k − 1)]``, every image line followed by ``k − 1`` zeros
(one gap serves both neighbours), where a shift is a flat offset and its products off the image
meet a zero.  On small images most of those products are such zeros; there the first spatial
dimension goes before the examples, without gaps, ``[C, S₁·N·Π_{>1}(S + k − 1)]``, and a shift
by ``δ₁`` multiplies only the ``S₁ − |δ₁|`` positions with a partner, one slice of the columns.
A tap leaves out a few border lines of the image (padding below ``k − 1``); those are subtracted
by inclusion–exclusion over the spatial dimensions (a line, then the corners counted twice),
each a GEMM over the line.

Flops: ``⌈Π(2k − 1)/2⌉`` GEMMs of at most ``2·C²·N·Π(S + k − 1)`` against the patches' Gram's
``(C·Πk)²·N·Π(S_out)`` (BLAS ``syrk``), and no ``Πk``-fold copy of the input into patches.
Measured (one CPU thread, float32, 3×3 taps, padding 1, freed memory reused; this project's
Intel Xeon, the other core busy), against the patches' copy and their Gram as
:func:`curvlab.gram.gram` forms it: ResNet-18's at N = 128 (framed, each block written into its
place → sliced where it reads fewer columns, a row of blocks at a time): 64 channels at 32×32
142 ms (framed either way), 128 at 16×16 135 → 117, 256 at 8×8 174 → 124, 512 at 4×4 277 → 144
(its patches 297), 512 at 2×2 160 → 63 (its patches 86).  Earlier, on the AMD EPYC, against the
patches: 16 channels at 32×32, N = 64 (the CNN benchmark) 50 → 11 ms; 64 at 32×32 788 → 241.
:func:`applies` takes the shifts below 0.8 of the patches' flops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Lay the input out with its first dimension sliced where that reads below this share of the
#: framed layout's columns: its two GEMM operands lie further apart in memory, which costs 10–14 %
#: of the GEMM's rate at 64 channels (:func:`_laid_out`).
SLICED_BELOW = 0.9
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
    an input of ``shape`` (``[N, C, *S]``) in the layout it takes (:func:`_layout`), and
    the upper triangle of the patches' Gram (``syrk``'s); the border terms and the bias row left
    out."""
    n, c, *size = shape
    kernel = conv.kernel_size
    out = _locations(size, kernel, padding(conv))
    d = c * math.prod(kernel)
    return 2 * c * c * n * _layout(size, kernel)[1], d * (d + 1) * n * max(0, math.prod(out))


def _layout(size: Sequence[int], kernel: Sequence[int]) -> tuple[bool, int]:
    """Which layout :func:`_laid_out` takes, and the columns per example that the GEMMs of every
    shift lexicographically ≥ 0 read in it: the image framed along every dimension, or with the
    positions along the first dimension sliced to those with a partner (``|δ₁|`` fewer and no gap
    there) — where that reads below :data:`SLICED_BELOW` of the framed layout's columns."""
    shifts = math.prod(2 * k - 1 for k in kernel)
    framed = -(-shifts // 2) * math.prod(s + k - 1 for s, k in zip(size, kernel))
    inner = math.prod(s + k - 1 for s, k in zip(size[1:], kernel[1:]))
    others = shifts // (2 * kernel[0] - 1)
    # along the first dimension, δ₁ = 0 takes half the other dimensions' shifts (δ = 0 with them),
    # every δ₁ > 0 all of them
    sliced = inner * (-(-others // 2) * size[0] + others * sum(max(0, size[0] - v) for v in range(1, kernel[0])))
    return (True, sliced) if sliced < SLICED_BELOW * framed else (False, framed)


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
    sliced = _layout(size, kernel)[0]
    flat, edge, steps, image = _laid_out(inp, margin, sliced)

    # F_δ over every image position, for each shift δ lexicographically ≥ 0 (F_{−δ} = F_δᵀ; the
    # blocks read only those); along the first dimension of a sliced layout, over the positions
    # with a partner
    shifts = [v for v in itertools.product(*(range(-e, e + 1) for e in margin)) if v >= tuple(-u for u in v)]
    by_shift = dict(zip(shifts, inp.new_empty(len(shifts), c, c)))
    for delta, f in by_shift.items():
        lo, hi = 0, flat.shape[1] - 2 * edge
        if sliced:
            lo, hi = max(0, -delta[0]) * steps[0], (size[0] - max(0, delta[0])) * steps[0]
        if hi <= lo:
            f.zero_()
            continue
        offset = sum(v * st for v, st in zip(delta, steps))
        torch.mm(flat[:, edge + lo:edge + hi], flat[:, edge + lo + offset:edge + hi + offset].T, out=f)

    # block (i, i') of the Gram ← F_{i' − i}, less the lines tap i leaves out (inclusion–exclusion
    # over the dimensions); those below the diagonal the transposes of those above.  A row of
    # blocks at a time, contiguous, then copied into its place in one pass: each block written
    # into its place, every Πk-th column, took longer (512 channels of 3×3 taps at 4×4: 182 →
    # 150 ms the whole Gram).  A block below the diagonal repeats its mirror's additions of the
    # cached line products (no GEMM) rather than keeping every block above until the end
    taps = list(itertools.product(*(range(k) for k in kernel)))
    left_out = [[_outside(i - lo, out_s, s) for i in range(k)]
                for k, (lo, _), out_s, s in zip(kernel, pads, out, size)]
    cache: dict[tuple, Tensor | None] = {}

    def block(tap: tuple[int, ...], other: tuple[int, ...]) -> Tensor:
        excluded = [left_out[s][i] for s, i in enumerate(tap)]
        delta = tuple(o - i for o, i in zip(other, tap))
        total = by_shift[delta]
        for subset in _nonempty_subsets([s for s in range(dims) if excluded[s]]):
            key = (subset, tuple(excluded[s] for s in subset), delta)
            if key not in cache:
                cache[key] = _lines_product(image, subset, excluded, delta)
            if cache[key] is not None:
                total = torch.add(total, cache[key], alpha=-1.0 if len(subset) % 2 else 1.0)
        return total

    d = c * math.prod(kernel)
    gram = inp.new_empty(d + ones, d + ones)
    rows = gram[:d, :d].view(c, len(taps), c, len(taps))
    row = inp.new_empty(len(taps), c, c)
    for a, tap in enumerate(taps):
        for b, other in enumerate(taps):
            if b < a:
                row[b] = block(other, tap).T
            elif b == a:  # the border terms summed in another order on either side
                diagonal = block(tap, tap)
                torch.add(diagonal, diagonal.T, out=row[b]).mul_(0.5)
            else:
                row[b] = block(tap, other)
        rows[:, a].copy_(row.permute(1, 2, 0))
    if ones:
        _border_with_ones(gram, image, kernel, left_out, n * math.prod(out))
    return gram


def _laid_out(inp: Tensor, margin: list[int], sliced: bool) -> tuple[Tensor, int, list[int], Tensor]:
    """``inp`` (``[N, C, *S]``) as ``[C, ·]`` columns where a shift of the image is a flat offset whose
    products off the image meet a zero: every line followed by ``e = k − 1`` zeros (one gap serves
    both neighbours), the whole by ``edge`` zeros on both sides.  Framed: columns ordered ``[N,
    S₁ + e₁, S₂ + e₂, …]``.  ``sliced``: ``[S₁, N, S₂ + e₂, …]``, no gap along the first dimension,
    whose positions with a partner are then one slice of the columns.  Returns the columns,
    ``edge``, each dimension's step in them, and the image as a view ``[C, N, *S]``."""
    n, c, *size = inp.shape
    gaps = [0 if sliced and s == 0 else e for s, e in enumerate(margin)]
    framed_size = [s + e for s, e in zip(size, gaps)]
    steps = [math.prod(framed_size[s + 1:]) for s in range(len(size))]  # within one example…
    edge = sum(e * st for e, st in zip(gaps, steps))
    length = n * math.prod(framed_size)
    flat = inp.new_empty(c, edge + length + edge)
    if sliced:  # …but along the first dimension, over all of them
        steps[0] *= n
        framed = flat[:, edge:edge + length].view(c, framed_size[0], n, *framed_size[1:]).transpose(1, 2)
    else:
        framed = flat[:, edge:edge + length].view(c, n, *framed_size)
    image = framed[(slice(None), slice(None), *(slice(0, s) for s in size))]
    image.copy_(inp.transpose(0, 1))
    flat[:, :edge].zero_()
    flat[:, edge + length:].zero_()
    for s, (e, extent) in enumerate(zip(gaps, size)):  # the zeros, not the whole tensor's
        if e:
            framed.narrow(2 + s, extent, e).zero_()
    return flat, edge, steps, image


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
                region = region.index_select(1 + s, torch.tensor(keep, dtype=torch.long, device=totals.device))
        sums[(slice(None), *tap)] = region.sum(tuple(range(1, dims + 1)))
    d = gram.shape[0] - 1
    gram[:d, d] = gram[d, :d] = sums.reshape(d)
    gram[d, d] = count
