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
by inclusion–exclusion over the spatial dimensions (a line, then the corners counted twice): the
lines' products in one batched GEMM per dimensions they lie along, the blocks gathered from all
products by index (:class:`_Plan`, made once per shape and device).  So a call issues a fixed
number of ops, about 45 for 3×3 taps (ResNet-18's statistics step, KFAC, N = 32: 3 402 top-level
ops against 9 778 block by block, ``benchmarks/results/profile_cpu_resnet18.md``; on a GPU each is
a kernel launch), and builds no index on the host (on a GPU, a copy that waits for the device: 36
a call block by block).

Flops: ``⌈Π(2k − 1)/2⌉`` GEMMs of at most ``2·C²·N·Π(S + k − 1)`` against the patches' Gram's
``(C·Πk)²·N·Π(S_out)`` (BLAS ``syrk``), and no ``Πk``-fold copy of the input into patches.
Measured (one CPU thread, float32, 3×3 taps, padding 1, freed memory reused; this project's
Intel Xeon, the other core busy), against the patches' copy and their Gram as
:func:`curvlab.gram.gram` forms it: ResNet-18's at N = 128 (framed, each block written into its
place → sliced where it reads fewer columns, a row of blocks at a time): 64 channels at 32×32
142 ms (framed either way), 128 at 16×16 135 → 117, 256 at 8×8 174 → 124, 512 at 4×4 277 → 144
(its patches 297), 512 at 2×2 160 → 63 (its patches 86).  Earlier, on the AMD EPYC, against the
patches: 16 channels at 32×32, N = 64 (the CNN benchmark) 50 → 11 ms; 64 at 32×32 788 → 241.
:func:`applies` takes the shifts below 0.8 of the patches' flops.  Gathered by index instead of
block by block (AMD EPYC, one thread, interleaved medians): ResNet-18's KFAC extraction on the
CPU at N = 128 with freed memory reused 24.2 → 24.1 s, at N = 8 1.78 → 1.82 s (2.02 → 2.15 s with
glibc's default allocator: the 512-channel layers' larger temporaries and transposed copies).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab import device_routes
from curvlab.model_blocks import TRANSPOSED_CONV_LAYERS

#: Lay the input out with its first dimension sliced where that reads below this share of the
#: framed layout's columns: its two GEMM operands lie further apart in memory, which costs 10–14 %
#: of the GEMM's rate at 64 channels (:func:`_laid_out`).
SLICED_BELOW = 0.9
#: Take the shifts where their flops are below this share of the patches' Gram's (see above)…
CHEAPER_BELOW = 0.8
#: …and the patches' Gram is worth it: below, the border terms' Python costs about what the
#: shifts save (3 channels at 32×32, N = 64: 3.2 ms either way).
MIN_FLOPS = 2**27
#: On the CPU the blocks are assembled a few rows at a time, in at most this many bytes: glibc's
#: default malloc maps a temporary above 32 MiB afresh on every call, whose pages fault in (512
#: channels of 3×3 taps at 4×4, N = 8: all rows at once 175 ms, two at a time 128 ms)
ASSEMBLED_BYTES = 3 * 2**23


def applies(conv: nn.Module, shape: Sequence[int]) -> bool:
    """Whether the extraction takes :func:`input_gram` for ``conv`` on an input of ``shape``
    (``[N, C, *S]``): not transposed, stride 1, dilation 1, zero padding, one group, several taps, and below
    :data:`CHEAPER_BELOW` of the patches' Gram's flops (:func:`flops`) but not below :data:`MIN_FLOPS`."""
    if (isinstance(conv, TRANSPOSED_CONV_LAYERS) or any(s != 1 for s in conv.stride)
            or any(d != 1 for d in conv.dilation) or conv.groups != 1
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
    plan = _plan(n, tuple(size), tuple(kernel), tuple(map(tuple, pads)), inp.device, inp.dtype)
    flat, image = _laid_out(inp, plan.frame)

    # the products: F_δ over every image position (in a sliced layout, along its first dimension
    # over the positions with a partner), then the border lines' (a tap's left-out lines with
    # their partners δ on), those along the same dimensions in one batch
    items = inp.new_empty(2 * plan.items, c, c)  # and their transposes after them
    for f, (lo, hi, offset) in zip(items, plan.shifts):
        if hi <= lo:
            f.zero_()
        else:
            torch.mm(flat[:, lo:hi], flat[:, lo + offset:hi + offset].T, out=f)
    for start, count, lines, partners in plan.lines:
        on_lines = flat.index_select(1, lines).view(c, count, -1).transpose(0, 1)
        on_partners = flat.index_select(1, partners).view(c, count, -1).permute(1, 2, 0)
        torch.bmm(on_lines, on_partners, out=items[start:start + count])

    # block (a, b) of the Gram for taps a ≤ b: F_{b − a} less the lines tap a leaves out
    # (inclusion–exclusion over the dimensions); block (b, a) the transposes of the same; a
    # diagonal block made symmetric (its border terms summed in another order on either side).
    # Gathered from the products, then into place in one copy (each block put into its place by
    # index, or transposed there, took 1.2–1.4× as long: scattered writes); on the CPU a few rows
    # of blocks at a time (:data:`ASSEMBLED_BYTES`)
    taps = math.prod(kernel)
    items[plan.items:].copy_(items[:plan.items].mT)
    d = c * taps
    gram = inp.new_empty(d + ones, d + ones)
    rows = taps  # of blocks at a time
    if device_routes.cpu_tuned(inp):
        rows = max(1, min(taps, ASSEMBLED_BYTES // (taps * c * c * inp.element_size())))
    for first in range(0, taps, rows):
        last = min(taps, first + rows)
        blocks = items.index_select(0, plan.primary[first * taps:last * taps])  # (a, b) at (a − first)·Πk + b
        for terms in plan.corrections:
            at = slice(terms.by_row[first], terms.by_row[last])
            if at.start < at.stop:
                into = terms.blocks[at] - first * taps if first else terms.blocks[at]
                blocks.index_add_(0, into, items.index_select(0, terms.items[at]), alpha=terms.sign)
        diagonal = blocks[first::taps + 1]
        diagonal.copy_(diagonal + diagonal.mT).mul_(0.5)
        gram[:d, :d].view(c, taps, c, taps)[:, first:last].copy_(blocks.view(-1, taps, c, c).permute(2, 0, 3, 1))
    if ones:  # the patch sums (every tap's window of the image, summed over the examples), the count
        sums = (image.sum(1).reshape(c, -1) @ plan.window).reshape(d)
        gram[:d, d] = sums
        gram[d, :d] = sums
        gram[d, d].fill_(plan.count)
    return gram


@dataclass(frozen=True)
class _Frame:
    """Where :func:`_laid_out` puts an input: in every channel's row of ``columns``, example ``n``'s
    image position ``p`` at ``edge + n·example_step + Σ p_s·steps[s]`` and zeros in between (the
    last column too: the partner of nothing, where a batch of line products pads a shorter one)."""

    edge: int
    steps: tuple[int, ...]
    example_step: int
    body: tuple[int, ...]  # the columns from ``edge`` as dimensions: [N, S₁ + e₁, …] or [S₁, N, S₂ + e₂, …]
    sliced: bool

    @property
    def columns(self) -> int:
        return 2 * self.edge + math.prod(self.body) + 1

    def column(self, example: Tensor, position: Tensor) -> Tensor:
        """The columns of ``example`` (``[L]``) at image ``position`` (``[L, dims]``)."""
        return self.edge + example * self.example_step + (position * torch.tensor(self.steps)).sum(1)


def _frame(n: int, size: Sequence[int], kernel: Sequence[int]) -> _Frame:
    """The layout :func:`_layout` picks for ``n`` images of ``size`` and taps ``kernel``: every line
    followed by ``e = k − 1`` zeros (one gap serves both neighbours), the whole by ``edge`` zeros on
    both sides.  Framed: columns ordered ``[N, S₁ + e₁, S₂ + e₂, …]``.  Sliced: ``[S₁, N, S₂ + e₂,
    …]``, no gap along the first dimension, whose positions with a partner are then one slice of
    the columns."""
    sliced = _layout(size, kernel)[0]
    gaps = [0 if sliced and s == 0 else k - 1 for s, k in enumerate(kernel)]
    framed = [s + e for s, e in zip(size, gaps)]
    steps = [math.prod(framed[s + 1:]) for s in range(len(size))]  # within one example…
    example_step, body = math.prod(framed), (n, *framed)
    if sliced:  # …but along the first dimension, over all of them
        example_step, steps[0], body = steps[0], steps[0] * n, (framed[0], n, *framed[1:])
    edge = sum(e * st for e, st in zip(gaps, steps))
    return _Frame(edge, tuple(steps), example_step, body, sliced)


def _laid_out(inp: Tensor, frame: _Frame) -> tuple[Tensor, Tensor]:
    """``inp`` (``[N, C, *S]``) as ``[C, frame.columns]`` (:class:`_Frame`), where a shift of the
    image is a flat offset whose products off the image meet a zero; and the image in it as a view
    ``[C, N, *S]``."""
    n, c, *size = inp.shape
    flat = inp.new_empty(c, frame.columns)
    body = flat[:, frame.edge:frame.columns - frame.edge - 1].view(c, *frame.body)
    framed = body.transpose(1, 2) if frame.sliced else body
    image = framed[(slice(None), slice(None), *(slice(0, s) for s in size))]
    image.copy_(inp.transpose(0, 1))
    flat[:, :frame.edge].zero_()  # the zeros, not the whole tensor's
    flat[:, frame.columns - frame.edge - 1:].zero_()
    for s, extent in enumerate(size):
        if framed.shape[2 + s] > extent:
            framed.narrow(2 + s, extent, framed.shape[2 + s] - extent).zero_()
    return flat, image


@dataclass(frozen=True)
class _Terms:
    """Items added to blocks with ``sign``, sorted by block; ``by_row[a]`` the first of those in
    tap row ``a`` (blocks ``a·Πk`` on)."""

    items: Tensor
    blocks: Tensor
    by_row: tuple[int, ...]
    sign: float


@dataclass(frozen=True)
class _Plan:
    """What :func:`input_gram` gathers where, for one input shape, taps and padding: index
    tensors on the input's device."""

    frame: _Frame
    #: every F_δ's ``(first column, end, δ's offset)`` in the laid-out input
    shifts: tuple[tuple[int, int, int], ...]
    #: ``(first item, count, columns, partner columns)`` of the border lines' products (after the
    #: F_δ in the items), a batch per dimensions the lines lie along, each padded to the longest
    #: with the zero column
    lines: tuple[tuple[int, int, Tensor, Tensor], ...]
    items: int
    #: the blocks from the items (the F_δ, the line products, then the transposes of all, for the
    #: blocks below the diagonal): each block's F_δ (row-major), the line products added and taken
    primary: Tensor
    corrections: tuple[_Terms, _Terms]
    #: ``[ΠS, Πk]``: 1 where the tap reads the image position (the bias row's patch sums)
    window: Tensor
    count: int


@functools.lru_cache(maxsize=64)
def _plan(n: int, size: tuple[int, ...], kernel: tuple[int, ...], pads: tuple[tuple[int, int], ...],
          device: torch.device, dtype: torch.dtype) -> _Plan:
    dims = len(size)
    frame = _frame(n, size, kernel)
    out = _locations(size, kernel, pads)

    # F_δ for each shift δ lexicographically ≥ 0 (F_{−δ} = F_δᵀ: no block reads it)
    margin = [k - 1 for k in kernel]
    deltas = [v for v in itertools.product(*(range(-e, e + 1) for e in margin)) if v >= tuple(-u for u in v)]
    shifts = []
    for delta in deltas:
        lo, hi = 0, math.prod(frame.body)
        if frame.sliced:
            lo, hi = max(0, -delta[0]) * frame.steps[0], (size[0] - max(0, delta[0])) * frame.steps[0]
        shifts.append((frame.edge + lo, frame.edge + hi, sum(v * st for v, st in zip(delta, frame.steps))))

    # every block a ≤ b: its F_δ and the border lines' products it adds or takes (keyed by the
    # dimensions along which the lines lie, the lines, δ; None where no line has a partner);
    # block (b, a) the same transposed
    taps = list(itertools.product(*(range(k) for k in kernel)))
    left_out = [[_outside(i - lo, out_s, s) for i in range(k)]
                for k, (lo, _), out_s, s in zip(kernel, pads, out, size)]
    pairs: dict[tuple, tuple[Tensor, Tensor] | None] = {}
    gathers: dict[int, list[tuple[int, tuple, bool]]] = {0: [], 1: [], -1: []}  # sign → [(block, key, transposed)]
    for a, tap in enumerate(taps):
        excluded = [left_out[s][i] for s, i in enumerate(tap)]
        for b in range(a, len(taps)):
            delta = tuple(o - i for o, i in zip(taps[b], tap))
            terms = [(delta, 0)]
            for subset in _nonempty_subsets([s for s in range(dims) if excluded[s]]):
                key = (subset, tuple(excluded[s] for s in subset), delta)
                if key not in pairs:
                    pairs[key] = _line_pairs(frame, n, size, *key)
                if pairs[key] is not None:
                    terms.append((key, 1 if len(subset) % 2 == 0 else -1))
            for key, sign in terms:
                gathers[sign].append((a * len(taps) + b, key, False))
                if a != b:
                    gathers[sign].append((b * len(taps) + a, key, True))

    # the items: the F_δ, then the line products, one batch per dimensions the lines lie along
    # (lengths there differ by the partners off the image, or the lines a tap leaves out)
    keys = sorted((k for k, v in pairs.items() if v is not None), key=lambda k: k[0])
    item = {**{delta: i for i, delta in enumerate(deltas)}, **{k: len(deltas) + i for i, k in enumerate(keys)}}
    lines = []
    for _, group in itertools.groupby(keys, key=lambda k: k[0]):
        group = list(group)
        length = max(len(pairs[k][0]) for k in group)
        padded = [torch.nn.functional.pad(column, (0, length - len(column)), value=frame.columns - 1)
                  for k in group for column in pairs[k]]
        lines.append((item[group[0]], len(group), torch.cat(padded[::2]).to(device), torch.cat(padded[1::2]).to(device)))

    # the window each tap reads, as image positions
    grid = torch.cartesian_prod(*(torch.arange(s) for s in size)).reshape(-1, dims)
    window = torch.stack([torch.stack([~torch.isin(grid[:, s], torch.tensor(left_out[s][i], dtype=torch.long))
                                       for s, i in enumerate(tap)]).all(0) for tap in taps], 1)

    def index(values) -> Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=device)

    terms = []
    for sign, entries in gathers.items():
        entries.sort(key=lambda entry: entry[0])
        blocks = [block for block, _, _ in entries]
        by_row = tuple(bisect.bisect_left(blocks, a * len(taps)) for a in range(len(taps) + 1))
        terms.append(_Terms(index(item[k] + len(item) * t for _, k, t in entries), index(blocks), by_row, float(sign)))
    primary, *corrections = terms  # every block once (sign 0), in order: their F_δ
    return _Plan(frame, tuple(shifts), tuple(lines), len(item), primary.items, tuple(corrections),
                 window.to(device=device, dtype=dtype), n * math.prod(out))


def _line_pairs(frame: _Frame, n: int, size: tuple[int, ...], subset: tuple[int, ...],
                lines: tuple[tuple[int, ...], ...], delta: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """The columns of every image position ``p`` whose coordinates along ``subset`` are among
    ``lines`` (any along the others) and whose partner ``p + δ`` is on the image, of every
    example, and of those partners; ``None`` where there is none."""
    coords = [torch.tensor(lines[subset.index(s)], dtype=torch.long) if s in subset else torch.arange(s_)
              for s, s_ in enumerate(size)]
    grid = torch.cartesian_prod(torch.arange(n), *coords).reshape(-1, 1 + len(size))
    example, position = grid[:, 0], grid[:, 1:]
    partner = position + torch.tensor(delta)
    on_image = ((partner >= 0) & (partner < torch.tensor(size))).all(1)
    if not on_image.any():
        return None
    return frame.column(example[on_image], position[on_image]), frame.column(example[on_image], partner[on_image])


def _locations(size: Sequence[int], kernel: Sequence[int], pads: list[tuple[int, int]]) -> list[int]:
    """Output locations along each dimension of a stride-1, dilation-1 convolution."""
    return [s + lo + hi - k + 1 for s, k, (lo, hi) in zip(size, kernel, pads)]


def _outside(first: int, count: int, size: int) -> tuple[int, ...]:
    """Image positions ``[0, size)`` outside the window ``[first, first + count)`` a tap reads."""
    return tuple(p for p in range(size) if not first <= p < first + count)


def _nonempty_subsets(items: list[int]) -> list[tuple[int, ...]]:
    return [s for r in range(1, len(items) + 1) for s in itertools.combinations(items, r)]
