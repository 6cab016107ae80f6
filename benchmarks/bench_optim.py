"""Optimizer step cost, side by side in one process: SGD, Adam, curvlab's KFAC/EKFAC/TKFAC/TEKFAC
and ASDL's K-FAC and EKFAC (:mod:`peers`), with equal intervals and damping.

For every model (:data:`common.MODELS`: the MLP at N=128 and N=1024, the CNN benchmark, 3c3d,
ResNet-18) on a pool of random batches, every peer (``peers.build``: statistics every
``--stats-interval`` steps, inverse/eigen refresh every ``--refresh-interval``, damping
``--damping``, heavy-ball momentum 0.9, no KL clipping) runs its warm-up (steps 0 … S), then each
kind of its step is timed by pinning the schedule position:

* ``plain`` (k = 1), ``stats`` (k = S: statistics, and for EKFAC/TEKFAC the rescaling),
  ``refresh`` (k = R; after the schedule's R/S − 1 statistics steps, untimed, where they take at
  most ``--replay-seconds``: the refresh folds in the rows they leave, see
  :func:`schedule_before_refresh`) — first-order peers have plain steps only;
* **amortised** = (1·refresh + (R/S − 1)·stats + (R − R/S)·plain)/R, from the medians;
* ``fwd+bwd`` (zero_grad, forward, backward), ``gemm`` (a 1024³ float32 matmul: the GEMM rate
  r of this run) and ``rotations`` (the four GEMMs ``U_outᵀ X U_in``/``U_out Y U_inᵀ`` of every
  block with full random bases), ``root backward`` (the sampled loss's backward to every
  block's output after an untimed forward and backward: the torch work a statistics step adds,
  :func:`root_backward_fn`).

Every row is measured once per repeat, rows in a rotated order (interleaved), one torch thread by
default; medians.  Floor of EKFAC/TEKFAC: fwd+bwd plus their two rotations of every block,
``Σ 4·d_out·D·(d_out + D)`` flops, at the rate those GEMMs run at in this run (the ``rotations``
row; the same flops at the 1024³ rate ``r`` are shown too).  Targets (the table says met or
missed): curvlab KFAC, TKFAC ≤ ASDL K-FAC; EKFAC, TEKFAC ≤ ASDL EKFAC and ≤ 1.2× their floor;
TEKFAC ≤ 1.05× EKFAC (all amortised); a statistics step ≤ 3× fwd+bwd.  Also timed: the inverse
form's two GEMMs with the bias column in ``A`` and as ASDL does (bias by ``G⁻¹`` alone), and a
refresh's float32 ``eigh`` of the factors (the schedule's floor of EKFAC/TEKFAC, see NOTES).
``bench_refresh.py`` times the 8193×8193 refresh.

Usage::

    python benchmarks/bench_optim.py --models mlp,mlp-1024,cnn,resnet18 --repeats 5 --model-repeats resnet18=1 \
        --out benchmarks/results/optim_cpu.json
    python benchmarks/bench_optim.py --device cuda --threads 0 --models resnet18 --out benchmarks/results/optim_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import common
import peers
from common import ModelSpec, Row

from curvlab.app.allocator import keep_freed_memory  # noqa: E402  (after common: repository on sys.path)
from curvlab.extract.maths import (  # noqa: E402  (after common: repository on sys.path)
    kfe_by_chunks, kfe_scaling_costs, partial_trace_costs, shares_per_sample_products, traces_by_chunks)
from curvlab.optim.options import KroneckerOptions  # noqa: E402

#: Factors above this get curvlab's truncated eigenbasis of TRUNCATION_RANK columns (the
#: optimizers' defaults).
TRUNCATE_ABOVE = KroneckerOptions().truncate_above
TRUNCATION_RANK = KroneckerOptions().truncation_rank

CURVLAB = [f"curvlab-{m}" for m in peers.CURVLAB_METHODS]
SECOND_ORDER = [*CURVLAB, "asdl-kfac", "asdl-ekfac"]
TARGET_FLOOR, TARGET_TEKFAC, TARGET_STATS = 1.2, 1.05, 3.0
#: GPU target: every curvlab optimizer's amortised step on ResNet-18/CIFAR (N=128) vs SGD.
TARGET_GPU_RESNET = 1.3
#: bootstrap resamples behind every verdict's ``met_in_resamples``
RESAMPLES = 1000


def block_sizes(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[int, int, int]], list[bool], list[str],
                                                         list[tuple[nn.Module, tuple[int, ...]] | None]]:
    """``(d_out, D, T)`` of every block curvlab preconditions (``T``: output locations),
    whether each has a bias (the last column of its matrix form), its module's name, and its
    convolution and input shape (``[N, C, *S]``, ``N`` the batch of ``x``) where curvlab's
    extraction forms ``A`` from the input by shifts (``curvlab.extract.conv_gram``), else None."""
    from curvlab.extract import conv_gram
    from curvlab.model_blocks import CONV_LAYERS
    from curvlab.optim import KFAC

    copy_ = copy.deepcopy(model)
    blocks = KFAC(copy_, lr=0.0).blocks()
    modules = dict(copy_.named_modules())
    locations: dict[str, int] = {}
    inputs: dict[str, tuple[int, ...]] = {}

    def record(name: str, inp: Tensor, out: Tensor) -> None:
        locations[name], inputs[name] = out[0, 0].numel(), (x.shape[0], *inp.shape[1:])

    hooks = [modules[b.name].register_forward_hook(lambda m, i, out, name=b.name: record(name, i[0], out))
             for b in blocks]
    with torch.no_grad():
        copy_(x[:1])
    for h in hooks:
        h.remove()
    shifted = [(modules[b.name], inputs[b.name]) if isinstance(modules[b.name], CONV_LAYERS)
               and conv_gram.applies(modules[b.name], inputs[b.name]) else None for b in blocks]
    return ([(*b.layout.shape, locations[b.name]) for b in blocks], [b.bias is not None for b in blocks],
            [b.name for b in blocks], shifted)


def shifted_flops(convs: list[tuple[nn.Module, tuple[int, ...]] | None]) -> list[int | None]:
    """:func:`curvlab.extract.conv_gram.flops` by shifts of each of :func:`block_sizes`' convolutions."""
    from curvlab.extract import conv_gram

    return [None if c is None else conv_gram.flops(*c)[0] for c in convs]


def basis_width(n: int, truncated: bool) -> int:
    """Columns of the eigenbasis of an ``n × n`` factor: ``n``, or with ``truncated`` curvlab's
    rank above ``truncate_above``."""
    return min(n, TRUNCATION_RANK) if truncated and n > TRUNCATE_ABOVE else n


def rotation_flops(sizes: list[tuple[int, int, int]], truncated: bool = False) -> int:
    """The two rotations of every block (four GEMMs): ``Σ 4·d_out·D·(d_out + D)`` with full bases;
    with ``truncated``, the preconditioning in curvlab's bases ``U_out [d_out, k_out]``,
    ``U_in [D, k_in]`` by the cheapest route known (:func:`truncated_apply_flops`)."""
    total = 0
    for d_out, d_in, _ in sizes:
        k_out, k_in = basis_width(d_out, truncated), basis_width(d_in, truncated)
        total += truncated_apply_flops(d_out, d_in, k_out, k_in)
    return total


def truncated_apply_flops(d_out: int, d: int, k_out: int, k_in: int) -> int:
    """GEMM flops of ``Σ s[a, b] P_a X P_b`` (``curvlab.approx.spectral.diagonal_apply``) on a
    ``d_out × D`` block with bases of ``k_out``, ``k_in`` columns, by the cheapest route known.
    Full bases: the four rotations, ``4·d_out·D·(d_out + D)``.  One side truncated: its
    complement's values differ along the other, full side, so their part is a dense map of that
    side (``F = U diag(s[:, k]) Uᵀ``, prepared once per inverse): ``F X`` plus the rank-``k``
    part's four thin GEMMs — or the full side's two rotations and the truncated side's two thin
    ones, where cheaper.  Both truncated: the output side's rank-``k_out`` part and its
    complement, each through the input side's thin GEMMs.  (Tables summarised before 2026-12-07
    counted the rank-``k`` parts alone, which no route reaches where a side is truncated:
    ResNet-18's plain step 16.5 GFLOP, where the cheapest route is 25.9.)"""
    if k_out == d_out and k_in == d:
        return 4 * d_out * d * (d_out + d)
    if k_out == d_out:
        return min(4 * d_out * d_out * d + 4 * d_out * d * k_in,
                   2 * d_out * d_out * d + 4 * d_out * d * k_in + 4 * d_out * d_out * k_in)
    if k_in == d:
        return min(6 * k_out * d_out * d + 4 * k_out * d * d + 4 * d_out * d * d,
                   2 * d_out * d * d + 4 * k_out * d * d + 4 * k_out * d_out * d)
    return 6 * d_out * k_out * d + 4 * k_out * k_in * d + 4 * d_out * k_in * d


def folded_at_refresh(rows: int, width: int, pushes: int | None) -> bool:
    """Whether curvlab keeps a Gram's ``rows`` (``[rows, width]`` a batch) until the refresh: a
    running average keeps rows while twice their count is below its width
    (``curvlab.optim.state``), so with ``pushes`` statistics steps between refreshes that never
    fold them, their Gram is the refresh's work (the CNN's 8193-wide ``A`` from 64 rows).
    ``pushes`` None: never (results before this was counted)."""
    return pushes is not None and 2 * rows * pushes < width


def statistics_flops(method: str, sizes: list[tuple[int, int, int]], n: int, truncated: bool = False,
                     root: bool = True, pushes: int | None = None, shifted: list[int | None] | None = None) -> int:
    """GEMM flops a statistics step of ``method`` adds to a plain forward+backward (one MC
    column): the sampled root's backward through every layer (unless ``root`` is False: when it
    is measured, the ``root backward`` row), the statistics (``kfac``: A, G;
    ``tkfac``: δΦ, δΨ — exact partial traces, the cheaper route for convolutions; EKFAC/TEKFAC
    also the rescaling: the rotations ``X U_in``, ``U_outᵀ g`` and their product, or for a
    convolution, where cheaper, every ``M_k`` and its rotation — TEKFAC forming each ``M_k`` once
    where both take the per-sample route), and the step's
    preconditioning (two GEMMs in the inverse form, four in the eigenbasis).  With
    ``truncated``, the rescaling and the preconditioning in curvlab's truncated bases (the
    factors themselves are still formed in full: their running averages are what the truncated
    eigenbasis is computed from; a Gram the refresh folds, :func:`folded_at_refresh`, is not
    counted).  ``shifted``: per block, the flops of ``A`` from the input by shifts where curvlab
    takes them (:func:`shifted_flops`), else None (the patches' Gram)."""
    def grams(rows: int, *widths: int) -> int:  # a Gram or any symmetric product: its upper triangle
        return sum(rows * w * (w + 1) for w in widths if not folded_at_refresh(rows, w, pushes))

    total = 0
    for i, (d_out, d, t) in enumerate(sizes):
        rows = n * t
        k_out, k_in = basis_width(d_out, truncated), basis_width(d, truncated)
        if root:
            total += 2 * rows * d_out * d  # the root's backward through the layer
        if method in ("kfac", "ekfac"):
            by_shifts = shifted[i] if shifted else None
            total += grams(rows, d_out) + (grams(rows, d) if by_shifts is None else by_shifts)
        elif t == 1:
            total += grams(n, d, d_out)
        else:  # the cheaper of the extraction's two routes
            total += 2 * min(partial_trace_costs(1, n, d_out, d, t))
        if method in ("ekfac", "tekfac"):  # the rescaling: its cheaper route for convolutions
            total += (2 * n * (d * k_in + d_out * k_out + k_out * k_in) if t == 1
                      else 2 * min(kfe_scaling_costs(1, n, d_out, d, t, k_out, k_in)))
            if method == "tekfac" and shares_per_sample_products(1, n, d_out, d, t, k_out, k_in):
                total -= 2 * n * d_out * t * d  # every M_k formed once for the traces and the rescaling
            total += rotation_flops([(d_out, d, t)], truncated)
        else:
            total += inverse_form_flops([(d_out, d, t)], truncated)
    return total


def refresh_flops(sizes: list[tuple[int, int, int]], n: int, pushes: int) -> int:
    """GEMM flops a refresh adds to its statistics step beyond the LAPACK ``eigh`` of the factors
    up to ``truncate_above`` (the "eigh" row): the randomized eigh of every larger factor as the
    optimizers' policy runs it (``curvlab.approx.eigh.randomized_eigh``: ``q + 2`` products of the
    ``width × width`` factor with ``w = rank + oversampling`` columns, the Rayleigh quotient ``QᵀMQ`` and
    the basis ``QW``), and the Gram of the rows a running average kept since the last refresh
    (:func:`folded_at_refresh`: the ``pushes`` statistics steps' batches and the refresh's own,
    counted by its upper triangle as the statistics' Grams are)."""
    policy = KroneckerOptions().eigh_policy()
    total = 0
    for d_out, d, t in sizes:
        for width in (d_out, d):
            if policy.truncates(width):
                w = min(width, policy.rank + policy.oversampling)
                total += 2 * width * w * ((policy.power_iterations + 2) * width + w + policy.rank)
            if folded_at_refresh(n * t, width, pushes):
                total += (pushes + 1) * n * t * width * (width + 1)
    return total


def inverse_form_flops(sizes: list[tuple[int, int, int]], truncated: bool = False) -> int:
    """The inverse form's preconditioning of every block: a dense side is one GEMM, a truncated
    side (curvlab's rank above ``truncate_above``) two thin ones."""
    total = 0
    for d_out, d, _ in sizes:
        k_out, k_in = basis_width(d_out, truncated), basis_width(d, truncated)
        total += (2 * d * d_out * d_out if k_out == d_out else 4 * d * d_out * k_out)
        total += (2 * d_out * d * d if k_in == d else 4 * d_out * d * k_in)
    return total


#: the note of a "grams" row without the Grams the refresh folds (older rows held them)
GRAMS_NOTE = "the Grams a refresh folds left out"


def stats_kernels(method: str, sizes: list[tuple[int, int, int]], med: dict[str, float], rate: float,
                  truncated: bool) -> float | None:
    """Seconds a statistics step of ``method`` spends in bare kernels beyond fwd+bwd and the root's
    backward, from this run's rows: its statistics — KFAC's Grams ("grams"), EKFAC's and the
    rescaling ("rescaling"), TKFAC's partial traces ("traces"), TEKFAC's and the rescaling
    ("traces, rescaling") — and the preconditioning ("inverse GEMMs" or "rotations"; with
    truncated factors their flops at the 1024³ ``rate``).  Results from before the "traces" rows:
    TKFAC/TEKFAC as KFAC/EKFAC where every block is a Linear layer (a weighted Gram costs at
    least a plain one), None for their convolutions; None without these rows."""
    statistics = {"kfac": ("grams",), "ekfac": ("grams", "rescaling"), "tkfac": ("traces",),
                  "tekfac": ("traces, rescaling",)}[method]
    if statistics[0] not in med and method.startswith("t") and all(t == 1 for *_, t in sizes):
        statistics = {"tkfac": ("grams",), "tekfac": ("grams", "rescaling")}[method]
    if any(row not in med for row in statistics):
        return None
    kernels = sum(med[row] for row in statistics)
    if method in ("kfac", "tkfac"):
        return kernels + (inverse_form_flops(sizes, True) / rate if truncated else med["inverse GEMMs"])
    return kernels + (rotation_flops(sizes, True) / rate if truncated else med["rotations"])


def rotations_fn(shapes: list[tuple[int, int, int]], device: torch.device):
    """The four GEMMs of a full-basis eigen-route preconditioning, for every block."""
    from curvlab.approx.spectral import diagonal_apply

    gen = torch.Generator().manual_seed(0)
    mats = []
    for d_out, d_in, _ in shapes:
        u_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen)).Q.to(device)
        u_in = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen)).Q.to(device)
        x, s = torch.randn(d_out, d_in, generator=gen), torch.rand(d_out, d_in, generator=gen)
        mats.append((x.to(device), u_out, u_in, s.to(device)))
    return lambda: [diagonal_apply(x, u_out, u_in, s) for x, u_out, u_in, s in mats]


def kronecker_inverse_fn(shapes: list[tuple[int, int, int]], biases: list[bool], device: torch.device,
                         bias_in_factor: bool = True):
    """The two GEMMs of an inverse-form preconditioning ``G⁻¹ X A⁻¹`` for every block: with the
    bias as the last column of ``X`` and ``A`` (curvlab), or, as ASDL's K-FAC does, ``A`` of the
    weight alone (``D − 1`` wide) and the bias preconditioned by ``G⁻¹`` alone."""
    gen = torch.Generator().manual_seed(0)

    def spd_inverse(n: int) -> Tensor:
        m = torch.randn(n, n, generator=gen)
        return torch.linalg.inv(m @ m.T / n + torch.eye(n)).to(device)

    mats = []
    for (d_out, d_in, _), bias in zip(shapes, biases):
        w = torch.randn(d_out, d_in - bias, generator=gen).to(device)
        b = torch.randn(d_out, 1, generator=gen).to(device) if bias else None
        mats.append((w, b, spd_inverse(d_out), spd_inverse(d_in if bias_in_factor else d_in - bias)))
    if bias_in_factor:
        return lambda: [g_inv @ ((w if b is None else torch.cat([w, b], 1)) @ a_inv) for w, b, g_inv, a_inv in mats]
    return lambda: [(g_inv @ (w @ a_inv), None if b is None else g_inv @ b) for w, b, g_inv, a_inv in mats]


def random_buffer(shapes: list[tuple[int, int, int]], n: int, device: torch.device) -> Tensor:
    """One buffer of random numbers that every block's inputs and output gradients fit in side by
    side (``N·T·(D + d_out)`` elements and the padding of a row-major layout): the bare-kernel
    rows take views of it, so a ResNet needs one ~300 MB buffer rather than one per block."""
    from curvlab.block import ROW_ALIGNMENT

    need = max(n * t * (d + d_out + 2 * ROW_ALIGNMENT) for d_out, d, t in shapes)
    return torch.randn(need, generator=torch.Generator().manual_seed(0)).to(device)


def grams_fn(shapes: list[tuple[int, int, int]], n: int, buffer: Tensor, pushes: int,
             convs: list[tuple[nn.Module, tuple[int, ...]] | None]):
    """KFAC's statistics as bare kernels: the Gram of every block's inputs (``[N·T, D]``, the
    bias column included) and output gradients (``[N·T, d_out]``) added into a running average
    by the faster, for that shape, of BLAS ``syrk`` (:func:`curvlab.mkl.syrk_`: the upper
    triangle) and one GEMM (``addmm_``; the only route off the CPU or without MKL), timed once
    here; rows of ``buffer`` (:func:`random_buffer`) laid out as the extraction leaves them (a
    Linear layer's rows contiguous, each padded to :data:`curvlab.block.ROW_ALIGNMENT`; a
    convolution's stored along ``N·T``); Grams the refresh folds (:func:`folded_at_refresh` with
    ``pushes`` statistics steps a period) left out; ``A`` of a convolution that curvlab forms
    from its input (``convs``, :func:`block_sizes`) by ``curvlab.extract.conv_gram`` itself on
    an input of its shape.  A weighted Gram (TKFAC's ``δΦ``, ``δΨ`` of a Linear layer) costs at
    least as much."""
    from curvlab.block import ROW_ALIGNMENT
    from curvlab.extract import conv_gram

    kernels = []
    for (d_out, d_in, t), conv in zip(shapes, convs):
        for d in (d_in, d_out):
            r = n * t
            if folded_at_refresh(r, d, pushes):
                continue
            if d == d_in and conv is not None:
                module, shape = conv
                inp = buffer[:math.prod(shape)].view(shape)
                kernels.append(lambda m=module, inp=inp: conv_gram.input_gram(
                    inp, m.kernel_size, conv_gram.padding(m), m.bias is not None))
                continue
            stride = (1, r) if t > 1 else (d + -d % ROW_ALIGNMENT, 1)  # [D, N·T] memory, or padded rows
            kernels.append(running_gram_fn(buffer.as_strided((r, d), stride)))
    return lambda: [kernel() for kernel in kernels]


def running_gram_fn(rows: Tensor) -> Callable[[], Tensor]:
    """The Gram of ``rows`` added into a running average by the faster, for their shape and
    layout, of BLAS ``syrk`` (:func:`curvlab.mkl.syrk_`: the upper triangle) and one GEMM
    (``addmm_``; the only route off the CPU or without MKL), timed once here."""
    from curvlab.mkl import syrk_, syrk_supports

    out = rows.new_zeros(rows.shape[1], rows.shape[1])
    routes = [lambda: out.addmm_(rows.mT, rows, beta=0.95, alpha=0.05)]
    if syrk_supports(rows):
        routes.append(lambda: syrk_(out, rows, 0.05, 0.95))
    return min(routes, key=lambda f: common.timed(f, rows.device, calls=2))


def rescaling_fn(shapes: list[tuple[int, int, int]], n: int, buffer: Tensor):
    """EKFAC's rescaling as bare kernels: ``Σ_k (U_outᵀ M_k U_in)²`` of every block with bases of
    curvlab's widths (truncated above ``truncate_above``; the complement terms of a truncated
    basis left out: a lower bound), by the extraction's route
    (:func:`curvlab.extract.maths.kfe_by_chunks`): a Linear layer's rotated inputs and
    roots squared and one GEMM; a convolution's ``M_k`` by one batched GEMM of contiguous
    ``[N, d_out, T]`` and ``[N, T, D]`` and then rotated, or both rotated first and then
    multiplied per sample.  Inputs and roots are views of ``buffer`` (:func:`random_buffer`)."""
    gen = torch.Generator().manual_seed(1)
    kernels = [_rescaling_kernel(block, n, buffer, gen) for block in shapes]
    return lambda: [kernel() for kernel in kernels]


def _block_views(block: tuple[int, int, int], n: int, buffer: Tensor) -> tuple[Tensor, Tensor]:
    """A block's inputs ``[N, T, D]`` and roots ``[N, d_out, T]``, contiguous views of ``buffer``."""
    d_out, d, t = block
    return buffer[: n * t * d].view(n, t, d), buffer[n * t * d: n * t * (d + d_out)].view(n, d_out, t)


def _bases(block: tuple[int, int, int], gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random ``U_out [d_out, k_out]``, ``U_in [D, k_in]`` of curvlab's (truncated) widths."""
    d_out, d, _ = block
    return (torch.randn(d_out, basis_width(d_out, True), generator=gen).to(device),
            torch.randn(d, basis_width(d, True), generator=gen).to(device))


def _rescaled_products(m: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """``Σ_k (U_outᵀ M_k U_in)²`` of formed ``M [N, d_out, D]``."""
    n, d_out, d = m.shape
    return (u_out.T @ (m.view(-1, d) @ u_in).view(n, d_out, -1)).square_().sum(0)


def _rescaling_kernel(block: tuple[int, int, int], n: int, buffer: Tensor, gen: torch.Generator) -> Callable[[], Tensor]:
    """One block's share of :func:`rescaling_fn`."""
    d_out, d, t = block
    x, g = _block_views(block, n, buffer)
    u_out, u_in = _bases(block, gen, buffer.device)
    if t == 1:
        return lambda: (g[..., 0] @ u_out).square_().T @ (x[:, 0] @ u_in).square_()
    if kfe_by_chunks(1, n, d_out, d, t, u_out.shape[1], u_in.shape[1]):  # every M_k, then M_k U_in, then U_outᵀ (M_k U_in)
        return lambda: _rescaled_products(torch.bmm(g, x), u_out, u_in)
    # U_outᵀ g and x U_in, then their product per sample
    return lambda: torch.bmm(u_out.T @ g, (x.view(n * t, d) @ u_in).view(n, t, -1)).square_().sum(0)


def traces_fn(shapes: list[tuple[int, int, int]], n: int, buffer: Tensor, pushes: int, rescaling: bool = False):
    """TKFAC's exact partial traces ``δΦ = Σ_k M_kᵀM_k``, ``δΨ = Σ_k M_kM_kᵀ`` as bare kernels (a
    symmetric product counted by its upper triangle, :func:`curvlab.gram.symmetric_product`): a
    Linear layer's two weighted Grams into running averages (those the refresh folds,
    :func:`folded_at_refresh`, left out, as in :func:`grams_fn`); a convolution's by the cheaper
    of the extraction's two routes (:func:`curvlab.extract.maths.traces_by_chunks`) — Gram
    matrices over locations, or every ``M_k`` by one batched GEMM and its two products.  With
    ``rescaling`` (TEKFAC's statistics step) also every block's rescaling as in
    :func:`rescaling_fn`, from the same ``M_k`` where the extraction forms them once for both
    (:func:`curvlab.extract.maths.shares_per_sample_products`).  Inputs ``[N, T, D]`` and roots
    ``[N, d_out, T]``: contiguous views at the start of ``buffer`` (:func:`random_buffer`), a
    lower bound for the extraction's layouts."""
    from curvlab.block import ROW_ALIGNMENT
    from curvlab.gram import symmetric_product

    gen = torch.Generator().manual_seed(1)

    def weighted_gram_fn(rows: Tensor, weights: Tensor) -> Callable[[], Tensor]:
        # rows scaled by √w into rows padded to ROW_ALIGNMENT, then as grams_fn's (curvlab.gram.add_gram_)
        scaled = rows.new_zeros(rows.shape[0], rows.shape[1] + -rows.shape[1] % ROW_ALIGNMENT)[:, :rows.shape[1]]
        gram = running_gram_fn(scaled)
        return lambda: (torch.mul(rows, weights.sqrt()[:, None], out=scaled), gram())

    def by_gram(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:  # x [N, T, D], g [N, d_out, T]
        phi = symmetric_product(x.flatten(0, 1), torch.bmm(g.mT @ g, x).flatten(0, 1))
        return phi, torch.bmm(g @ torch.bmm(x, x.mT), g.mT).sum(0)

    def by_products(m: Tensor) -> tuple[Tensor, Tensor]:  # m [N, d_out, D]
        return symmetric_product(m.flatten(0, 1), m.flatten(0, 1)), torch.bmm(m, m.mT).sum(0)

    kernels = []
    for block in shapes:
        d_out, d, t = block
        x, g = _block_views(block, n, buffer)
        if rescaling and shares_per_sample_products(1, n, d_out, d, t, basis_width(d_out, True), basis_width(d, True)):
            u_out, u_in = _bases(block, gen, buffer.device)
            kernels.append(lambda x=x, g=g, u_out=u_out, u_in=u_in: (
                by_products(m := torch.bmm(g, x)), _rescaled_products(m, u_out, u_in)))
            continue
        if t == 1:
            a, gg = x[:, 0], g[..., 0]
            kernels.extend(weighted_gram_fn(rows, w) for rows, w in ((a, gg.square().sum(1)), (gg, a.square().sum(1)))
                           if not folded_at_refresh(n, rows.shape[1], pushes))
        elif traces_by_chunks(1, n, d_out, d, t):
            kernels.append(lambda x=x, g=g: by_products(torch.bmm(g, x)))
        else:
            kernels.append(lambda x=x, g=g: by_gram(x, g))
        if rescaling:
            kernels.append(_rescaling_kernel(block, n, buffer, gen))
    return lambda: [kernel() for kernel in kernels]


def root_backward_fn(model: nn.Module, loss_fn: nn.Module, batches: Iterator, block_names: list[str]):
    """``(setup, run)``: what every statistics step of a curvlab optimizer (``fisher="mc"``, one
    sample) must do in torch itself beyond a forward and the loss's backward (``setup``, untimed):
    the backward of the loss at labels drawn from the model's softmax to every block's output
    (``run``: ``torch.autograd.grad``, no weight gradients; through the norms, activations and
    skips that a GEMM count leaves out)."""
    modules = dict(model.named_modules())
    outputs: list[Tensor] = []
    graph: list[Tensor] = []
    for name in block_names:
        modules[name].register_forward_hook(lambda m, i, out: outputs.append(out))

    def setup() -> None:
        x, y = next(batches)
        outputs.clear()
        model.zero_grad(set_to_none=True)
        z = model(x)
        loss_fn(z, y).backward(retain_graph=True)
        graph[:] = [z]

    def run() -> None:
        z = graph.pop()
        sampled = torch.multinomial(z.detach().softmax(-1), 1).squeeze(-1)
        torch.autograd.grad(loss_fn(z, sampled), outputs)
        outputs.clear()

    return setup, run


def eigh_fn(shapes: list[tuple[int, int, int]], device: torch.device, truncate_above: int):
    """A refresh's unavoidable LAPACK work for EKFAC/TEKFAC: a float32 ``eigh`` of both factors of
    every block (factors above ``truncate_above``, which curvlab truncates, are left out: a lower
    bound)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [n for d_out, d_in, _ in shapes for n in (d_out, d_in) if n <= truncate_above]
    mats = [(lambda m: (m @ m.T / n).to(device))(torch.randn(n, n, generator=gen)) for n in sizes]
    return lambda: [torch.linalg.eigh(m) for m in mats]


def bench_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device,
                checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The model's rows measured and summarised; ``checkpoint`` (if given) takes the summary of
    the repeats done after each but the last (a run stopped mid-model keeps them)."""
    base = spec.build(device)
    pool = spec.batches(args.batches, device)
    loss_fn = nn.CrossEntropyLoss()
    sizes, biases, names, convs = block_sizes(base, pool[0][0])
    options = dict(damping=args.damping, stats_interval=args.stats_interval, refresh_interval=args.refresh_interval)
    steppers = {}
    for name in args.peers:
        source = itertools.cycle(pool).__next__
        steppers[name] = peers.build(name, copy.deepcopy(base), loss_fn, source, lr=args.lr, **options)
    fb_model = copy.deepcopy(base)
    fb_batches = itertools.cycle(pool)

    def fwd_bwd() -> None:
        x, y = next(fb_batches)
        fb_model.zero_grad(set_to_none=True)
        loss_fn(fb_model(x), y).backward()

    a = torch.randn(1024, 1024, device=device)
    buffer = random_buffer(sizes, spec.batch, device)
    pushes = args.refresh_interval // args.stats_interval - 1
    root_setup, root_run = root_backward_fn(copy.deepcopy(base), loss_fn, itertools.cycle(pool), names)
    rows = [Row("fwd+bwd", fwd_bwd), Row("gemm", lambda: a @ a), Row("rotations", rotations_fn(sizes, device)),
            Row("inverse GEMMs", kronecker_inverse_fn(sizes, biases, device)),
            Row("inverse GEMMs, bias by G alone", kronecker_inverse_fn(sizes, biases, device, bias_in_factor=False)),
            Row("eigh", eigh_fn(sizes, device, TRUNCATE_ABOVE)),
            Row("root backward", root_run, setup=root_setup),
            Row("grams", grams_fn(sizes, spec.batch, buffer, pushes, convs), note=GRAMS_NOTE),
            Row("rescaling", rescaling_fn(sizes, spec.batch, buffer)),
            Row("traces", traces_fn(sizes, spec.batch, buffer, pushes), note=GRAMS_NOTE),
            Row("traces, rescaling", traces_fn(sizes, spec.batch, buffer, pushes, rescaling=True), note=GRAMS_NOTE)]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK/ASDL hook warnings; non-finite steps are counted below
        for name, st in steppers.items():
            st.warm_up()
            kinds = ("plain",) if name in ("sgd", "adam") else ("plain", "stats", "refresh")
            setup = schedule_before_refresh(st, args.replay_seconds) if len(kinds) > 1 else None
            for kind in kinds:
                k = st.positions[kind]
                rows.append(Row(f"{name}:{kind}", lambda st=st, k=k: st.step_at(k),
                                setup=setup if kind == "refresh" else None,
                                note="after the schedule's statistics steps" if setup and kind == "refresh" else ""))
        slow = {}
        for row in rows:
            t = row.calibrate(device, args.min_time)
            if t > args.slow_seconds:
                slow[row.key] = t
                if not plain_step(row.key):
                    row.max_samples = args.slow_repeats
        repeats = args.model_repeats.get(spec.key, args.repeats)
        notes = {row.key: row.note for row in rows}
        shifted = shifted_flops(convs)

        def progress(r: int) -> None:
            print(f"  [{spec.key}] repeat {r + 1}/{repeats} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            if checkpoint is not None and r + 1 < repeats:
                checkpoint({**summary(), "repeats": r + 1, "cut": f"{r + 1} of {repeats} repeats"})

        def summary() -> dict:
            for row in rows:
                if row.key in slow:
                    row.note = "; ".join(filter(None, (notes[row.key], f"{len(row.samples)} sample(s) "
                                                                      f"(one call {slow[row.key]:.1f} s)")))
            return summarise_rows(spec, sizes, rows, args, shifted)

        common.measure_interleaved(rows, repeats, device, progress=progress)
    return {**summary(), "repeats": repeats}


def summarise(spec: ModelSpec, sizes, med: dict[str, float], rows: list[Row], args,
              shifted: list[int | None] | None = None) -> dict:
    period, every = args.refresh_interval, args.stats_interval
    n_stats = period // every - 1
    n_plain = period - n_stats - 1
    sgd = med["sgd:plain"]
    # a forward+backward is part of an SGD step: a median above the SGD step's (disturbed
    # samples: single ~5 s calls on a shared machine) is bounded by it
    fb = min(med["fwd+bwd"], sgd)
    rate = 2 * 1024**3 / med["gemm"]
    # the floor: fwd+bwd + the rotations at the rate those very GEMMs run at in this run
    floor = fb + med["rotations"]
    floor_at_peak = fb + rotation_flops(sizes) / rate
    truncated = any(n > TRUNCATE_ABOVE for d_out, d_in, _ in sizes for n in (d_out, d_in))
    table = {}
    for name in args.peers:
        if name in ("sgd", "adam"):
            table[name] = {"plain_s": med[f"{name}:plain"], "amortised_s": med[f"{name}:plain"]}
            continue
        p, s, r = (med[f"{name}:{k}"] for k in ("plain", "stats", "refresh"))
        table[name] = {"plain_s": p, "stats_s": s, "refresh_s": r, "amortised_s": (r + n_stats * s + n_plain * p) / period}
    for entry in table.values():
        entry["amortised/sgd"] = entry["amortised_s"] / sgd
        entry["plain/sgd"] = entry["plain_s"] / sgd
        if "stats_s" in entry:
            entry["stats/fwd+bwd"] = entry["stats_s"] / fb
            entry["refresh/sgd"] = entry["refresh_s"] / sgd
    # a plain EKFAC/TEKFAC step of curvlab: fwd+bwd and the rotations in its (truncated) bases
    plain_floor = min(floor, fb + rotation_flops(sizes, truncated=True) / rate) if truncated else floor
    # the sampled root's backward as measured (older results: the difference of a fwd+bwd+root
    # row and fwd+bwd, or without either, its GEMMs at the rate)
    root = (med["root backward"] if "root backward" in med else
            max(0.0, med["fwd+bwd+root"] - med["fwd+bwd"]) if "fwd+bwd+root" in med else None)
    # a "grams" row measured with the Grams the refresh folds (older results) gives no floor
    grams_note = next((r.note for r in rows if r.key == "grams"), "")
    refresh_grams = any(folded_at_refresh(spec.batch * t, w, n_stats) for d_out, d, t in sizes for w in (d, d_out))
    kernel_rows = {} if refresh_grams and GRAMS_NOTE not in grams_note else med
    update = sgd - fb  # every step's parameter update (momentum and weights), as an SGD step's
    for name in CURVLAB:
        if name in table:
            flops = statistics_flops(name.removeprefix("curvlab-"), sizes, spec.batch, truncated=True,
                                     root=root is None, pushes=n_stats, shifted=shifted)
            stats_floor = fb + (root or 0.0) + flops / rate
            table[name]["stats_floor/fwd+bwd"] = (stats_floor + update) / fb
            kernels = stats_kernels(name.removeprefix("curvlab-"), sizes, kernel_rows, rate, truncated)
            if kernels is not None and root is not None:
                table[name]["stats_kernels_floor/fwd+bwd"] = (fb + root + kernels + update) / fb
            table[name]["stats_gflop"] = flops / 1e9
            if name in ("curvlab-ekfac", "curvlab-tekfac"):
                # the schedule's own floor: plain steps at their floor, statistics steps at
                # theirs, a refresh adds at least the float32 eigh of its factors, the randomized
                # eigh of the truncated ones and the fold of the rows kept since the last refresh,
                # and every step updates the parameters as an SGD step does
                refresh_floor = stats_floor + med["eigh"] + refresh_flops(sizes, spec.batch, n_stats) / rate
                table[name]["amortised_floor/sgd"] = (
                    (n_plain * plain_floor + n_stats * stats_floor + refresh_floor) / period + update) / sgd
    return {
        "model": spec.key, "builtin": spec.builtin, "note": spec.note, "batch": spec.batch,
        "input_shape": list(spec.input_shape), "blocks": [list(s) for s in sizes],
        **({} if shifted is None else {"shifted_gram_flops": shifted}),
        "schedule": {"period": period, "stats_steps": n_stats, "plain_steps": n_plain},
        "fwd+bwd_s": fb, "fwd+bwd_measured_s": med["fwd+bwd"], "gemm_gflops": rate / 1e9, "rotations_s": med["rotations"],
        "rotation_gflop": rotation_flops(sizes) / 1e9, "floor_s": floor, "floor/sgd": floor / sgd,
        "truncated_rotation_gflop": rotation_flops(sizes, truncated=True) / 1e9 if truncated else None,
        "plain_floor/sgd": plain_floor / sgd,
        "floor_at_1024_gemm_rate/sgd": floor_at_peak / sgd,
        "inverse_gemms_s": med["inverse GEMMs"], "inverse_gemms_bias_by_g_s": med["inverse GEMMs, bias by G alone"],
        "eigh_s": med["eigh"], "root_backward_s": root, "grams_s": med.get("grams"),
        "rescaling_s": med.get("rescaling"), "traces_s": med.get("traces"),
        "traces_rescaling_s": med.get("traces, rescaling"),
        "peers": table,
        "rows": {r.key: {"median_s": r.median, "samples": len(r.samples), "calls": r.calls, "note": r.note,
                         "all_s": r.samples} for r in rows},
        # EKFAC/TEKFAC against their own floor: the rotations they do, in truncated bases where they
        # truncate (the full-basis floor, 4.7× SGD on the CNN, bounded nothing: their steps were below it)
        "targets": targets(table, plain_floor / sgd, gpu_resnet=args.device.startswith("cuda") and spec.key == "resnet18"),
    }


def plain_step(key: str) -> bool:
    """Whether a row is a plain step (or the fwd+bwd in them): never capped at ``--slow-repeats``
    — they make nine tenths of every amortised step and the SGD step it is divided by, and with
    3 samples each ResNet-18's TEKFAC and EKFAC plain steps, the same rotations of the same
    shapes, came out 4 % apart (2996 against 2881 ms; 2717 and 2722 ms over 8 interleaved steps)."""
    return key == "fwd+bwd" or key.endswith(":plain")


def schedule_before_refresh(st: peers.Stepper, budget: float) -> Callable[[], None] | None:
    """The statistics steps a schedule takes between two refreshes (R/S − 1, untimed), to run
    before each timed refresh: curvlab keeps a narrow batch's rows (``GramRows``) until the
    refresh folds them in, so a refresh costs what the steps before it left — in a schedule, R/S − 1
    batches.  ``None`` when they would take more than ``budget`` seconds (one statistics step
    timed now): ResNet-18's only kept rows are its last Linear's input (513 wide, 128 rows a batch),
    folded at every third batch, so its refresh folds 1–3 batches either way (at most 384 rows:
    ~0.1 GFLOP, ~1 ms of a refresh of seconds)."""
    k, n = st.positions["stats"], st.refresh_interval // st.stats_interval - 1
    started = time.perf_counter()
    st.step_at(k)
    if n < 1 or n * (time.perf_counter() - started) > budget:
        return None

    def replay() -> None:
        for _ in range(n):
            st.step_at(k)
    return replay


def summarise_rows(spec: ModelSpec, sizes, rows: list[Row], args, shifted: list[int | None] | None = None) -> dict:
    """:func:`summarise` of the rows' medians, every target with its ``met_in_resamples``: the
    share of :data:`RESAMPLES` bootstrap resamples (each row's samples drawn again with
    replacement, its median and every ratio recomputed; seed 0) in which the target is met.
    Near 0 or 1 the samples decide the verdict; in between, the rows' spread on this machine
    does not resolve it."""
    summary = summarise(spec, sizes, {r.key: r.median for r in rows}, rows, args, shifted)
    gen = random.Random(0)
    met = [0] * len(summary["targets"])
    for _ in range(RESAMPLES):
        med = {r.key: statistics.median(gen.choices(r.samples, k=len(r.samples))) for r in rows}
        for i, t in enumerate(summarise(spec, sizes, med, rows, args, shifted)["targets"]):
            met[i] += t["met"]
    for t, m in zip(summary["targets"], met):
        t["met_in_resamples"] = m / RESAMPLES
    return summary


def targets(t: dict, floor: float, gpu_resnet: bool = False) -> list[dict]:
    """Each target with its numbers and met/missed (skipped where a peer was not run)."""
    out = []

    def add(what: str, value: float, bound: float, against: str) -> None:
        out.append({"target": what, "value": value, "bound": bound, "against": against, "met": value <= bound})

    am = {k: v["amortised/sgd"] for k, v in t.items()}
    for ours, theirs in (("curvlab-kfac", "asdl-kfac"), ("curvlab-tkfac", "asdl-kfac"),
                         ("curvlab-ekfac", "asdl-ekfac"), ("curvlab-tekfac", "asdl-ekfac")):
        if ours in am and theirs in am:
            add(f"{ours} amortised ≤ {theirs}", am[ours], am[theirs], f"{theirs} amortised")
    for ours in ("curvlab-ekfac", "curvlab-tekfac"):
        if ours in am:
            own = t[ours].get("amortised_floor/sgd")
            add(f"{ours} amortised ≤ {TARGET_FLOOR}× floor", am[ours], TARGET_FLOOR * floor,
                f"{TARGET_FLOOR} × floor {floor:.2f}" + ("" if own is None else
                f"; the schedule's own floor {own:.2f} = {own / floor:.2f}× floor"))
            if own is not None and own > TARGET_FLOOR * floor:
                out[-1]["unavoidable"] = "the schedule's floor"
    if "curvlab-tekfac" in am and "curvlab-ekfac" in am:
        # at both schedules' floors: TEKFAC's exact partial traces against EKFAC's A and G
        te, ek = (t[n].get("amortised_floor/sgd") for n in ("curvlab-tekfac", "curvlab-ekfac"))
        add(f"curvlab-tekfac ≤ {TARGET_TEKFAC}× curvlab-ekfac", am["curvlab-tekfac"], TARGET_TEKFAC * am["curvlab-ekfac"],
            f"{TARGET_TEKFAC} × curvlab-ekfac" + ("" if te is None or ek is None else
            f"; at their schedules' floors {te:.2f} / {ek:.2f} = {te / ek:.3f}×"))
        if te is not None and ek is not None and te > TARGET_TEKFAC * ek:
            out[-1]["unavoidable"] = "the floors' ratio"
    for ours in CURVLAB:
        if ours in t:
            kernels = t[ours].get("stats_kernels_floor/fwd+bwd")
            add(f"{ours} statistics step ≤ {TARGET_STATS}× fwd+bwd", t[ours]["stats/fwd+bwd"], TARGET_STATS,
                f"{TARGET_STATS} × fwd+bwd (its floor: {t[ours]['stats_floor/fwd+bwd']:.2f}"
                + ("" if kernels is None else f"; with its kernels timed: {kernels:.2f}") + ")")
            if max(t[ours]["stats_floor/fwd+bwd"], kernels or 0.0) > TARGET_STATS:
                out[-1]["unavoidable"] = "its floor"
    for ours in CURVLAB:
        if gpu_resnet and ours in am:
            add(f"GPU: {ours} amortised ≤ {TARGET_GPU_RESNET}× SGD", am[ours], TARGET_GPU_RESNET, "SGD")
    return out


def markdown(res: dict) -> str:
    m, models = res["machine"], res["models"]
    s = res["settings"]
    lines = [
        f"# Optimizer step cost, side by side ({m['device']})",
        "",
        common.machine_line(m),
        "",
        f"Statistics every {s['stats_interval']} steps, inverse/eigen refresh every {s['refresh_interval']}, "
        f"damping {s['damping']}, momentum 0.9, no KL clipping, lr {s['lr']} (the models stay near their "
        f"initialisation); curvlab's statistics engine {s.get('curvlab_engine', 'auto')!r} (its default); medians of {s['repeats']} interleaved repeats"
        + (f" (summarised again from the same samples by git {res['resummarised_by']})" if res.get("resummarised_by") else "")
        + ". Amortised = (1 refresh + "
        f"{models[0]['schedule']['stats_steps']} statistics + {models[0]['schedule']['plain_steps']} plain "
        "steps)/period, as a multiple of an SGD step.",
        "",
        "## Amortised step / SGD step",
        "",
    ]
    names = res["settings"]["peers"]
    header = ["peer", *(f"{r['model']} (N={r['batch']})" for r in models)]
    body = [[n, *(f"{r['peers'][n]['amortised/sgd']:.2f}" for r in models)] for n in names]
    body.append(["floor of EKFAC/TEKFAC", *(f"{r['floor/sgd']:.2f}" for r in models)])
    body.append(["the schedule's floor of EKFAC", *(
        f"{r['peers']['curvlab-ekfac']['amortised_floor/sgd']:.2f}"
        if "amortised_floor/sgd" in r["peers"].get("curvlab-ekfac", {}) else "–"
        for r in models)])
    lines += common.md_table(header, body)
    lines += ["", "## Targets", "",
              f"\"Met in resamples\": the share of {RESAMPLES} bootstrap resamples (every row's samples drawn "
              "again with replacement, the medians and ratios recomputed) in which the target is met — near "
              "0 % or 100 % the samples decide the verdict; in between, the spread of the rows on this "
              "machine does not.", ""]
    rows = []
    for r in models:
        for t in r["targets"]:
            below = t.get("unavoidable")
            below = "the schedule's floor" if below is True else below  # results before the floors were named
            verdict = "**met**" if t["met"] else f"**missed** (bound below {below})" if below else "**missed**"
            share = f"{t['met_in_resamples']:.0%}" if "met_in_resamples" in t else "–"
            model = r["model"] + (" (cut short)" if r.get("cut") else "")
            rows.append([model, t["target"], f"{t['value']:.2f}", f"{t['bound']:.2f} ({t['against']})", verdict, share])
    lines += common.md_table(["model", "target", "value", "bound", "", "met in resamples"], rows, "llrllr")
    for r in models:
        lines += [
            "", f"## {r['model']} (N={r['batch']}): {r['note']}", "",
            *([f"**Cut short**: medians of the {r['cut']} done when the run stopped (the results are "
               "written after every repeat).", ""] if r.get("cut") else
              [f"Medians of {r['repeats']} interleaved repeat(s) for this model (`--model-repeats`).", ""]
              if r.get("repeats", s["repeats"]) != s["repeats"] else []),
            *([f"Allocator for this model: {r['malloc']} (`--reuse-from`).", ""]
              if s.get("reuse_from") and "malloc" in r else []),
            f"Blocks (d_out × D, locations T): {', '.join(f'{a}×{b} (T={t})' for a, b, t in r['blocks'])}. fwd+bwd "
            f"{r['fwd+bwd_s'] * 1e3:.2f} ms"
            + (f" (its measured median, {r['fwd+bwd_measured_s'] * 1e3:.2f} ms, is above the SGD step that contains "
               "it, so the SGD step's median bounds it)" if r.get("fwd+bwd_measured_s", 0) > r["fwd+bwd_s"] else "") +
            f", SGD step {r['peers']['sgd']['plain_s'] * 1e3:.2f} ms; GEMM rate "
            f"{r['gemm_gflops']:.0f} GFLOP/s (1024³); the two rotations of every block: {r['rotation_gflop']:.3f} "
            f"GFLOP, {r['rotations_s'] * 1e3:.2f} ms measured ({r['rotation_gflop'] / r['rotations_s']:.0f} GFLOP/s); "
            f"**floor** of EKFAC/TEKFAC (fwd+bwd + those rotations) {r['floor_s'] * 1e3:.2f} ms = "
            f"**{r['floor/sgd']:.2f}× SGD** ({r['floor_at_1024_gemm_rate/sgd']:.2f}× with the rotations at the 1024³ rate). "
            + (f"In curvlab's truncated bases the rotations are {r['truncated_rotation_gflop']:.3f} GFLOP: a plain "
               f"step's floor of {r['plain_floor/sgd']:.2f}× SGD at the 1024³ rate, which EKFAC/TEKFAC's targets are "
               "measured against. "
               if r.get("truncated_rotation_gflop") else "") +
            f"The inverse form's two GEMMs of every block: {r['inverse_gemms_s'] * 1e3:.2f} ms with the bias column in "
            f"A (curvlab), {r['inverse_gemms_bias_by_g_s'] * 1e3:.2f} ms with A of the weight alone and the bias by "
            f"G⁻¹ (ASDL's K-FAC). float32 eigh of the refreshed factors (≤ truncate_above): {r['eigh_s'] * 1e3:.2f} ms."
            + ("" if r.get("root_backward_s") is None else
               f" The sampled root's backward to every block output: {r['root_backward_s'] * 1e3:.2f} ms "
               + ("(timed alone, after an untimed forward and backward)." if "root backward" in r["rows"]
                  else "(fwd+bwd+root − fwd+bwd, medians)."))
            + ("" if r.get("grams_s") is None else
               f" KFAC's Grams (A and G of every block) into running averages: {r['grams_s'] * 1e3:.2f} ms"
               + shifted_sentence(r) + f"; EKFAC's rescaling as bare GEMMs: {r['rescaling_s'] * 1e3:.2f} ms.")
            + ("" if r.get("traces_s") is None else
               f" TKFAC's exact partial traces (δΦ, δΨ of every block) as bare kernels: {r['traces_s'] * 1e3:.2f} ms; "
               f"TEKFAC's, with the rescaling: {r['traces_rescaling_s'] * 1e3:.2f} ms."),
            "",
        ]
        body = []
        for n, e in r["peers"].items():
            ms = lambda key: f"{e[key] * 1e3:.2f}" if key in e else "–"  # noqa: E731
            x = lambda key: f"{e[key]:.2f}" if key in e else "–"  # noqa: E731
            body.append([n, ms("plain_s"), ms("stats_s"), ms("refresh_s"), ms("amortised_s"), f"**{x('amortised/sgd')}**",
                         x("plain/sgd"), x("stats/fwd+bwd"), x("stats_floor/fwd+bwd"), x("stats_kernels_floor/fwd+bwd"),
                         x("refresh/sgd")])
        lines += common.md_table(["peer", "plain ms", "stats ms", "refresh ms", "amortised ms", "amortised ×SGD",
                                  "plain ×SGD", "stats ×fwd+bwd", "its floor", "kernels timed", "refresh ×SGD"], body)
        notes = [f"{k}: {v['note']}" for k, v in r["rows"].items() if v["note"]]
        if notes:
            lines += ["", "Row notes: " + "; ".join(notes)]
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """"its floor" of a statistics step: fwd+bwd, plus the sampled root's backward as measured
(the "root backward" row: torch.autograd.grad of the loss at sampled labels to every block's
output after an untimed forward and backward, torch's own work; in results before it, the
"fwd+bwd+root" row minus the "fwd+bwd" row), plus, at the GEMM rate of this run, the flops
the step adds (bench_optim.statistics_flops: the statistics' GEMMs — a Gram or other symmetric
product counted by its upper triangle, as a syrk computes it —, EKFAC/TEKFAC's rescaling
rotations, the preconditioning), plus the parameter update every step makes as an SGD step does
(its SGD step minus fwd+bwd: momentum and weights) — no statistics step of that method can be
cheaper.  "The schedule's floor" of EKFAC/TEKFAC: every plain step at the floor, every
statistics step at its floor, a refresh adding at least the float32 eigh of its factors up to
truncate_above (the "eigh" row) and, at the GEMM rate, the randomized eigh of the larger ones as
the optimizers run it (rank 256 + 16 columns, two power iterations: four products with the
factor) and the Gram of the rows a running average kept since the last refresh
(bench_optim.refresh_flops), and every step the parameter update of an SGD step, amortised like
the measured steps; where it is above 1.2× the floor, that target cannot be met with this
schedule ("bound below the schedule's floor").  For models
with a factor above truncate_above, both floors count the GEMMs in curvlab's truncated bases
(rank 256: they cost less than the full-basis rotations) by the cheapest route known, the flat
remainder's map of the full side included (bench_optim.truncated_apply_flops), and a plain
step's floor is fwd+bwd plus those GEMMs at the 1024³ rate.

"Kernels timed": the same floor of a statistics step with its kernels as BLAS runs them in this
run instead of their flops at the 1024³ rate: fwd+bwd, the root's backward, the "grams" row
(every block's A and G on random rows laid out as the extraction leaves them, taken into a
running average by the faster of syrk and one GEMM), for EKFAC the "rescaling" row (its
rotations and per-sample products as bare GEMMs, by the route with fewer flops), for TKFAC the
"traces" row instead of the Grams (the exact partial traces δΦ, δΨ of every block by the
extraction's cheaper route: weighted Grams, Gram matrices over locations, or every M_k and its
two products), for TEKFAC the "traces, rescaling" row (both, every M_k formed once where the
extraction shares them), and the preconditioning ("inverse GEMMs" for KFAC and TKFAC,
"rotations" for EKFAC and TEKFAC; with truncated factors their flops at the 1024³ rate).
Results from before the "traces" rows give TKFAC and TEKFAC the floor of KFAC and EKFAC where
every block is a Linear layer and none for convolutions.  Narrow GEMMs and syrk run below the
1024³ rate, so this floor is the higher one; where either floor is above 3×, the statistics
target cannot be met ("bound below its floor").

The bias column: curvlab's KFAC factor A includes the bias (the exact Kronecker factor of the
whole layer, the one `curvlab report` measures); ASDL's K-FAC leaves the bias out of A and
preconditions it by G⁻¹ alone, a different approximation whose GEMMs are aligned and narrower —
the two "inverse GEMMs" rows above measure that difference on random matrices of the same shapes
(dense factors: curvlab applies factors above truncate_above in their truncated form instead).

How the peers differ (see benchmarks/peers.py): ASDL K-FAC keeps float32 running factors (no
bias column: the bias is preconditioned by G alone) and inverts them by Cholesky every refresh;
curvlab KFAC/TKFAC (float32 by default) invert the same damped Kronecker factors by Cholesky and
keep the two inverses with the approximation (two GEMMs a step). ASDL EKFAC (with four fixes)
recomputes its eigenbases and scaling from the *current batch* on every statistics step and keeps
no running averages (its "refresh" is a statistics step); curvlab EKFAC/TEKFAC average A, G (δΦ,
δΨ) and s and eigendecompose the averages every refresh. Factors larger than curvlab's
truncate_above (2048) get a truncated eigenbasis of rank 256 plus a flat remainder (e.g. the CNN's
8193-wide input factor), which also makes their rotations cheaper than the full-basis floor."""


def shifted_sentence(r: dict) -> str:
    """Which blocks' ``A`` curvlab forms from the input by shifts, with their flops and the
    patches' Gram's (empty for results without them)."""
    shifted = r.get("shifted_gram_flops") or []
    which = [i for i, f in enumerate(shifted) if f is not None]
    if not which:
        return ""
    patches = sum(r["batch"] * t * d * (d + 1) for i, (_, d, t) in enumerate(r["blocks"]) if i in which)
    return (f" (A of {len(which)} convolution(s) from their inputs by shifts, as curvlab forms it "
            f"(curvlab.extract.conv_gram): {sum(shifted[i] for i in which) / 1e9:.2f} GFLOP where their patches' "
            f"Grams are {patches / 1e9:.2f})")


def resummarise(path: str) -> dict:
    """A result file's tables recomputed by this version of :func:`summarise` from its stored
    samples (no step is re-run)."""
    res = json.loads(Path(path).read_text())
    args = argparse.Namespace(**res["settings"])
    models = []
    for old in res["models"]:
        spec = dataclasses.replace(common.MODELS[old["model"]], batch=old["batch"])
        rows = [Row(key, fn=lambda: None, calls=v["calls"], samples=list(v["all_s"]), note=v["note"])
                for key, v in old["rows"].items()]
        sizes = [tuple(b) for b in old["blocks"]]
        shifted = old.get("shifted_gram_flops")  # None: results from before curvlab took shifts
        models.append({**summarise_rows(spec, sizes, rows, args, shifted), "repeats": old["repeats"],
                       **({"malloc": old["malloc"]} if "malloc" in old else {})})
    return {**res, "models": models, "resummarised_by": common.git_commit()}


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__)
    p.add_argument("--models", default="mlp,mlp-1024,cnn,resnet18")
    p.add_argument("--peers", default=",".join(peers.PEERS))
    p.add_argument("--repeats", type=common.positive_int, default=7)
    p.add_argument("--model-repeats", default="", help="per-model repeats for slow models, e.g. resnet18=1")
    p.add_argument("--min-time", type=common.positive_float, default=0.05, help="seconds per measurement (fast rows: several calls)")
    p.add_argument("--replay-seconds", type=float, default=10.0,
                   help="replay the schedule's statistics steps before each timed refresh when they take at most this")
    p.add_argument("--slow-seconds", type=float, default=2.0,
                   help="rows slower than this get --slow-repeats samples (not the plain steps and fwd+bwd: "
                        "a sample in every repeat, they make nine tenths of the amortised step and its denominator)")
    p.add_argument("--slow-repeats", type=common.positive_int, default=3)
    p.add_argument("--stats-interval", type=common.positive_int, default=10)
    p.add_argument("--refresh-interval", type=common.positive_int, default=100,
                   help="steps between refreshes, a multiple of --stats-interval (default: %(default)s)")
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batches", type=common.positive_int, default=8, help="pool of random batches cycled through")
    p.add_argument("--reuse-from", metavar="MODEL", default=None,
                   help="glibc's default allocator for the models before MODEL (in --models order), heap "
                        "reuse (--malloc reuse) from MODEL on: small models' steps depend on where a heap "
                        "without mmap places the tensors a refresh reallocates, large models' statistics "
                        "steps on fresh mmaps faulting in; implies --malloc default at start")
    p.add_argument("--batch-size", type=common.positive_int, default=None, help="override every model's batch size (smoke tests)")
    p.add_argument("--resummarise", metavar="JSON", help="recompute the tables of a result file from its "
                   "samples (written back to it and its .md); nothing is timed")
    args = p.parse_args(argv)
    if args.resummarise:
        res = resummarise(args.resummarise)
        common.write_results(args.resummarise, res, markdown(res))
        return
    if args.refresh_interval % args.stats_interval:  # the amortised step counts a period's statistics steps
        p.error(f"--refresh-interval: {args.refresh_interval} must be a multiple of --stats-interval {args.stats_interval}")
    models = common.models(args.models)
    unknown = set(args.peers.split(",")) - set(peers.PEERS) - {""}
    if unknown:
        p.error(f"--peers: unknown {sorted(unknown)}; choose from {', '.join(peers.PEERS)}")
    if args.reuse_from is not None:
        if args.reuse_from not in [m.key for m in models]:
            p.error(f"--reuse-from: {args.reuse_from!r} is not one of --models {args.models!r}")
        args.malloc = "default"
    device, info = common.start(args, common.command_line(__file__, argv))
    args.peers = [n.strip() for n in args.peers.split(",") if n.strip()]
    try:
        args.model_repeats = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.model_repeats.split(",") if kv.strip())}
    except ValueError:
        p.error(f"--model-repeats: expected model=count[,model=count], got {args.model_repeats!r}")
    if "sgd" not in args.peers:
        args.peers.insert(0, "sgd")
    try:
        peers.import_asdl()
    except ImportError as err:
        print(f"bench_optim: {err}; running without the ASDL peers", file=sys.stderr)
        args.peers = [n for n in args.peers if not n.startswith("asdl")]
    results = []
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["curvlab_engine"] = KroneckerOptions().engine  # the optimizers' default statistics engine
    malloc = info["malloc"]

    def write(models: list[dict]) -> dict:
        res = {"machine": common.finish(dict(info)), "settings": settings, "models": models}
        common.write_results(args.out, res, markdown(res), quiet=True)
        return res

    for spec in models:
        if args.batch_size is not None:
            spec = dataclasses.replace(spec, batch=args.batch_size)
        if spec.key == args.reuse_from:
            malloc = keep_freed_memory()  # glibc's dynamic default cannot be restored: models after it keep it
            info["malloc"] = f"glibc's default before {spec.key}, from it on {malloc}"
        t0 = time.perf_counter()
        # written after every repeat: a long run that is stopped (the GPU suite's time limit)
        # keeps the models it finished and the repeats done of the one it was in
        results.append({**bench_model(spec, args, device, lambda part: write([*results, {**part, "malloc": malloc}])),
                        "malloc": malloc})
        print(f"[{spec.key}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        res = write(results)
    print(markdown(res))


if __name__ == "__main__":
    main()
