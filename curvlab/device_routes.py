"""Which routes a computation takes on its device: those tuned for the CPU, or the plain ones.

On the CPU curvlab takes routes measured faster there: MKL's ``syrk`` and in-place Cholesky
inverse (:mod:`curvlab.mkl`), Grams by upper panels, rows padded off 4 KiB strides, a
convolution's patches with their bias plane, its input Gram a few rows of blocks at a time, its
per-sample products by a grouped weight gradient, small products in a loop.  Every other device
(a GPU) takes the plain torch ops, fewer and larger kernels.  :func:`cpu_tuned` decides it in one
place, so that the tests run those other routes on the CPU too, against the same dense
references (``tests/conftest.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cpu_tuned(where: Tensor | torch.device) -> bool:
    """Whether a computation on ``where`` (a tensor, or its device) takes the CPU's routes."""
    return (where if isinstance(where, torch.device) else where.device).type == "cpu"
