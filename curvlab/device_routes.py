"""Which routes a computation takes on its device: those tuned for the CPU, or the plain ones.

On the CPU curvlab takes routes measured faster there: MKL's ``syrk`` and in-place Cholesky
inverse (:mod:`curvlab.mkl`), Grams by upper panels, rows padded off 4 KiB strides, a
convolution's patches with their bias plane, its input Gram a few rows of blocks at a time, its
per-sample products by a grouped weight gradient, small products in a loop.  Every other device
(a GPU) takes the plain torch ops, fewer and larger kernels.  :func:`cpu_tuned` decides it in one
place; :func:`plain_routes` makes the CPU take the plain ones too — so that the tests check
them against the same dense references (``tests/conftest.py``), and a profile on the CPU counts
the ops and host reads a GPU's step issues (``benchmarks/profile_steps.py --as-on-gpu``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

_plain = False  # inside plain_routes()


def cpu_tuned(where: Tensor | torch.device) -> bool:
    """Whether a computation on ``where`` (a tensor, or its device) takes the CPU's routes."""
    return not _plain and (where if isinstance(where, torch.device) else where.device).type == "cpu"


@contextlib.contextmanager
def plain_routes() -> Iterator[None]:
    """Inside the block, every device takes the plain routes, the CPU as a GPU does (no MKL)."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before
