"""Gram-type products ``Σ_r w_r x_r x_rᵀ`` of rows — every KFAC factor and TKFAC partial trace —
computed as this project's CPU measured fastest, and :class:`GramRows`, such a product kept as its
rows until a consumer forms it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab import device_routes
from curvlab.block import ALIGNED_MIN_WIDTH, ROW_ALIGNMENT
from curvlab.mkl import syrk, syrk_, syrk_supports


@dataclass
class GramRows:
    """``Σ_r w_r x_r x_rᵀ`` kept as its rows ``x_r`` (``rows``, ``[R, d]``) and weights ``w_r ≥ 0``
    (``weights``, ``[R]``).

    What an extraction with ``gram_rows=True`` hands over instead of a statistic with fewer rows
    than columns (``R < d``: the rows are smaller than the matrix), or one that
    :func:`add_gram_` adds into a matrix by BLAS ``syrk`` (:func:`syrk_accumulates`): a consumer
    that only accumulates the statistic — curvlab's optimizers, which read their running averages
    only at a refresh — forms the sum over many batches in one product instead of one rank-``R``
    update of a ``d × d`` matrix per batch, or adds a batch into its average where it lies.
    """

    rows: Tensor
    weights: Tensor

    @property
    def shape(self) -> torch.Size:
        """``(d, d)``, the shape of the matrix."""
        d = self.rows.shape[1]
        return torch.Size((d, d))

    def dense(self) -> Tensor:
        """The ``d × d`` matrix."""
        return gram(self.rows, weights=self.weights)

    def trace(self) -> Tensor:
        """``Σ_r w_r ‖x_r‖²`` (non-finite exactly when a row or weight is, short of overflow)."""
        # the norms without a squared copy of the rows (785 wide from 1024 rows: 0.48 → 0.14 ms)
        return self.weights @ torch.linalg.vector_norm(self.rows, dim=1).square()


def dense(value: Tensor | GramRows) -> Tensor:
    """A Gram-type statistic as its matrix, whether formed or kept as rows."""
    return value.dense() if isinstance(value, GramRows) else value


def stack_rows(rows: list[Tensor]) -> Tensor:
    """Batches' rows as one ``[R, d]`` tensor in their memory layout: rows stored along ``R`` (a
    convolution's patches) stay so — ``torch.cat`` would transpose them into a row-major copy
    (ResNet-18's 4608-wide ``A`` from two batches of 2048 rows: 218 → 44 ms)."""
    if len(rows) == 1:
        return rows[0]
    if all(r.stride(0) == 1 for r in rows):
        return torch.cat([r.mT for r in rows], 1).mT
    return torch.cat(rows)


#: The narrowest statistic :func:`gram_or_rows` hands over as its rows: below, the ``d × d``
#: matrix and its running average cost less than keeping rows and folding them in later (20 ×
#: ``Linear(16, 16)`` at N = 4, every statistic kept as rows: KFAC's statistics step 6.67 →
#: 6.09 ms, TEKFAC's 10.83 → 10.21, interleaved, one thread; the 8193-wide factor from 64 rows
#: that rows are kept for is far above it).
KEEP_ROWS_MIN_WIDTH = 64


def gram_or_rows(
    rows: Tensor, scale: float = 1.0, weights: Tensor | None = None, keep_rows: bool = False
) -> Tensor | GramRows:
    """:func:`gram`, or with ``keep_rows`` the rows themselves (:class:`GramRows`, not copied), for at
    least :data:`KEEP_ROWS_MIN_WIDTH` columns, where they are fewer than the columns, or where
    :func:`syrk_accumulates` them, ``d ≥ 256`` and they are at most twice as many.  More rows than
    that cost more to pass over (the finiteness check's trace of a convolution's patches,
    65 536 × 145 stored along R: ~20 ms) than the ``d × d`` matrix's copy and ``lerp_`` they save;
    narrower matrices are cheap either way, and ``syrk`` with its checks cost more there (the MLP
    N=128's statistics steps, whose 64–128-wide ``G`` and 65-wide ``A`` took it: 0.2–0.3 ms more a
    step, measured in one process)."""
    r, d = rows.shape
    if keep_rows and d >= KEEP_ROWS_MIN_WIDTH and (r < d or (256 <= d and r <= 2 * d and syrk_accumulates(rows))):
        return GramRows(rows, rows.new_full((r,), scale) if weights is None else weights * scale)
    return gram(rows, scale, weights)


def gram(rows: Tensor, scale: float = 1.0, weights: Tensor | None = None) -> Tensor:
    """``scale · Σ_r w_r x_r x_rᵀ`` for the rows ``x_r`` of ``rows`` (``[R, d]``): one BLAS
    ``syrk`` where :func:`_by_syrk` says so (rows stored along ``R``), else one GEMM.

    When ``d`` is not a multiple of 16 (:data:`curvlab.block.ROW_ALIGNMENT`; the bias column
    makes it odd), the columns of row-major ``rows`` are padded to a multiple of 16 (zeros, or
    the room :meth:`curvlab.block.Block.inputs` leaves beside each row) where that measured
    faster on this project's CPU (MKL, one thread, timed inside training steps, after a real
    backward): with fewer rows than columns
    (``R < d``: an output-bound GEMM with unaligned rows; an 8193-wide factor from 64 rows:
    394 → 253 ms with the running average's update; 785 wide from 128 rows: 2.32 → 1.93 ms), and
    for 700 ≤ d ≤ 2400 (from 1024 rows: 705 wide 15.4 → 14.2 ms, 785 wide 19.3 → 15.8, 801 wide
    22.1 → 16.3, 1025 wide 30.5 → 29.5; 1153 wide from 4096 rows 189 → 143, 2305 wide from 2048
    rows 311 → 284).  Elsewhere the copy of ``rows`` costs more than it saves (1024 rows: 129
    wide 0.54 → 0.65 ms, 577 wide 7.9 → 8.0, 641 wide 11.5 → 12.6; 289 wide from 65536 rows 128 →
    180; 4609 wide from 1024 rows 653 → 684), and below :data:`curvlab.block.ALIGNED_MIN_WIDTH`.
    The result is a view of the padded product (not copied: a fresh ``d × d`` copy costs a third
    of the GEMM).
    """
    r, d = rows.shape
    if weights is None and _by_syrk(rows):
        return syrk(rows, scale)
    # rows stored along R (a convolution's patches, [D, N·T] memory) are not padded: MKL reads
    # both operands along R already, and a padded copy would cost more
    row_major = rows.stride(1) == 1
    pad = -d % ROW_ALIGNMENT if row_major and d >= ALIGNED_MIN_WIDTH and (r < d or 700 <= d <= 2400) else 0
    if pad:
        rows = _widened(rows, d + pad)
    # The scale goes into the smaller operand (or into the weights): an ``addmm`` with
    # ``alpha=scale, beta=0`` took 3.40 ms against 2.36 for ``mm`` of the scaled rows
    # (800 wide from 128 rows, inside a step), and scaling the output 3.23.
    if weights is not None:
        out = symmetric_product(rows * (weights * scale)[:, None], rows)
    elif scale == 1.0:
        out = symmetric_product(rows, rows)
    elif r <= d:
        out = symmetric_product(rows * scale, rows)
    else:
        out = symmetric_product(rows, rows).mul_(scale)
    return out[:d, :d] if pad else out


def _by_syrk(rows: Tensor) -> bool:
    """Whether :func:`gram` takes BLAS ``syrk`` (:func:`curvlab.mkl.syrk`): rows stored along ``R`` (a
    convolution's patches or output gradients, ``[D, N·T]`` memory) that :func:`syrk_accumulates`.
    Measured against :func:`symmetric_product` (this project's CPU, one thread, float32): 145 wide
    from 65 536 rows 30.3 → 17.4 ms, 64 from 131 072 15.0 → 10.1, 289 from 16 384 18.4 → 13.1,
    1152 from 32 768 434 → 357, 2304 from 8192 426 → 417; slower 28 wide (2.07 → 2.30) and 4608
    from 2048 (462 → 729), and for row-major rows (785 wide from 1024: 8.7 → 9.6)."""
    return rows.stride(0) == 1 and rows.shape[0] >= rows.shape[1] and syrk_accumulates(rows)


def syrk_accumulates(rows: Tensor, copied: bool = False) -> bool:
    """Whether :func:`add_gram_` adds the Gram of ``rows`` (``[R, d]``) into its matrix by BLAS
    ``syrk`` (:func:`curvlab.mkl.syrk_`): ``64 ≤ d ≤ 2400`` and ``R ≥ d`` (from ``d ≥ 256``,
    ``2R ≥ d``), rows stored along ``R`` or row-major with a leading dimension that is a multiple
    of 16 (:data:`curvlab.block.ROW_ALIGNMENT`) — any row-major rows where they are ``copied``
    (scaled by unequal weights into an aligned copy first).
    Against :func:`gram` and a ``lerp_`` into the matrix (this project's CPU, one thread, float32):
    785 wide from 1024 row-major rows with leading dimension 800 (:meth:`curvlab.block.Block.inputs`)
    6.87 → 4.91 ms; at leading dimension 785 the ``syrk`` was slower than :func:`gram`'s panels
    (8.7 → 9.6 ms with its mirror).  Against :func:`add_gram_`'s panels from ``d/2`` to ``d`` rows
    (weighted, the rows a running average folds in): 785 wide from 392 rows 1.69 → 1.52 ms, from
    588 rows 2.62 → 2.33, 1153 from 576 5.64 → 4.63, 2305 from 1152 39.8 → 34.6, 257 from 128
    0.10 → 0.08; narrower, the one ``addmm_`` is faster (65 wide from 64 rows: 9.5 against 22 µs)."""
    r, d = rows.shape
    aligned = rows.stride(0) == 1 or rows.stride(0) % ROW_ALIGNMENT == 0 or (copied and rows.stride(1) == 1)
    return 64 <= d <= 2400 and (r >= d or 256 <= d <= 2 * r) and aligned and syrk_supports(rows)


def symmetric_product(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for ``[R, d]`` operands whose product is symmetric (a Gram ``aᵀa``, or
    ``Σ_n X_nᵀ (O_n X_n)`` with symmetric ``O_n``).

    Where the GEMM is compute-bound (``R, d ≥ 256``, CPU), only the upper triangle is
    multiplied, a panel of columns at a time (at most 8 panels, each ≥ 128 wide), and mirrored:
    ~56–62 % of the flops, as BLAS's ``syrk`` does, which torch does not expose.  Measured on
    this project's CPU (MKL, one thread): 8192 rows × 2304 wide 588 → 356 ms, 131072 × 576 (a
    convolution's ``A``) 573 → 432 ms, 2048 × 4608 725 → 594 ms, 512 × 1152 14.6 → 10.2 ms.
    From fewer rows the product is bound by writing its output and the mirror's copy made it
    slower (128 × 4608 72 → 84 ms, 64 × 8208 262 → 412): one GEMM there, and on other devices
    (not measured).
    """
    r, d = a.shape
    if not device_routes.cpu_tuned(a) or min(r, d) < 256:
        return a.mT @ b
    return _by_upper_panels(a.new_empty(d, d), a, b, beta=None)


def add_gram_(out: Tensor, rows: Tensor, weights: Tensor, beta: float) -> Tensor:
    """``out ← β·out + Σ_r w_r x_r x_rᵀ`` on the upper triangle of a symmetric ``out`` (``[d, d]``,
    rows contiguous) for rows ``[R, d]`` and weights ``w_r ≥ 0``: a running average taking in rows
    (:class:`GramRows`).  The upper triangle is all that is read; the lower one is left stale
    (:func:`curvlab.mkl.mirror_upper_` restores it before the average is read whole).

    Routes: :func:`curvlab.mkl.syrk_` where :func:`syrk_accumulates` (the rows scaled by ``√w``
    unless the weights are one number); on the CPU from ``d ≥ 256`` a panel of rows at a time,
    one ``addmm_`` into ``out`` each (as :func:`symmetric_product` multiplies: no ``d × d`` product
    is written and then added; 785 wide from 256 rows 2.80 → 2.11 ms, from 384 rows 4.50 → 3.58,
    this project's CPU, one thread); else one ``addmm_``."""
    d = out.shape[0]
    uniform = syrk_supports(rows) and torch.equal(weights, weights[:1].expand_as(weights))  # CPU: no sync
    if syrk_accumulates(rows, copied=not uniform):
        if uniform:
            return syrk_(out, rows, weights[0].item(), beta)
        return syrk_(out, _scaled_rows(rows, weights.sqrt().to(rows.dtype)), 1.0, beta)
    scaled = rows * weights[:, None]
    if not device_routes.cpu_tuned(out) or d < 256:
        return out.addmm_(scaled.mT, rows, beta=beta)
    return _by_upper_panels(out, scaled, rows, beta)


def _scaled_rows(rows: Tensor, scale: Tensor) -> Tensor:
    """``scale[r] · rows[r]`` in the memory layout of ``rows``, row-major rows with a leading
    dimension rounded up to a multiple of 16 (:data:`curvlab.block.ROW_ALIGNMENT`), as ``syrk``
    reads them fastest."""
    r, d = rows.shape
    if rows.stride(0) == 1:  # stored along R
        return (rows.mT * scale).mT
    return torch.mul(rows, scale[:, None], out=rows.new_empty(r, -(-d // ROW_ALIGNMENT) * ROW_ALIGNMENT)[:, :d])


def _by_upper_panels(out: Tensor, a: Tensor, b: Tensor, beta: float | None) -> Tensor:
    """``out ← aᵀb`` (``beta`` None: mirrored below) or ``out ← β·out + aᵀb`` on the upper
    triangle, for a symmetric result: a panel of rows at a time (at most 8 panels, each ≥ 128
    wide)."""
    d = out.shape[0]
    width = max(128, -(-d // (8 * ROW_ALIGNMENT)) * ROW_ALIGNMENT)
    for i in range(0, d, width):
        if beta is None:
            panel = a[:, i:i + width].mT @ b[:, i:]  # rows i…i+width of the upper triangle
            out[i:i + width, i:] = panel
            out[i + width:, i:i + width] = panel[:, width:].mT
        else:  # updated where it lies
            out[i:i + width, i:].addmm_(a[:, i:i + width].mT, b[:, i:], beta=beta)
    return out


def _widened(rows: Tensor, width: int) -> Tensor:
    """``rows`` with columns appended up to ``width``: the columns its storage already holds
    beside each row where it has them (:meth:`curvlab.block.Block.inputs` leaves room — the
    ``d × d`` block of the Gram does not depend on them), else zeros in a padded copy."""
    r, d = rows.shape
    end = rows.storage_offset() + (r - 1) * rows.stride(0) + width
    if rows.stride(1) == 1 and rows.stride(0) >= width and end <= rows.untyped_storage().nbytes() // rows.element_size():
        return rows.as_strided((r, width), (rows.stride(0), 1))
    return torch.nn.functional.pad(rows, (0, width - d))
