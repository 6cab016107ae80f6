"""Products with one side's eigenbasis ``U`` (``[n, k]``, orthonormal columns), shared by the
extraction's rescaling statistics and the approximations.

A diagonal factor — an embedding's input factor, the token frequencies — has the unit vectors
as its eigenbasis, ordered by eigenvalue (:func:`curvlab.approx.eigh.psd_eigh`): a permutation.
Rotating by it is gathering columns, where a dense ``Z U`` is a GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

#: Narrower bases are never checked for being a permutation: their GEMMs are cheap, and the
#: check reads the basis on the host (on a GPU, a wait for the device) once per basis tensor.
PERMUTATION_MIN_WIDTH = 256

_PERMUTATIONS = WeakIdKeyDictionary()  # basis → (its _version when checked, (order, inverse) or None)


def permutation_order(u: Tensor) -> Tensor | None:
    """``order`` with ``u = I[:, order]`` where the square ``u`` permutes the unit vectors (at
    least :data:`PERMUTATION_MIN_WIDTH` wide), else ``None``.  Checked once per tensor (until it
    is modified in place; a write through ``.data`` is not seen): an ``O(n²)`` pass where a
    rotation by ``u`` is a GEMM — for an embedding of 2048 tokens, 128 wide, 1 GFLOP a rotation,
    and EKFAC's rescaling rotates every example's ``M_k``."""
    orders = _orders(u)
    return None if orders is None else orders[0]


def in_basis(z: Tensor, u: Tensor) -> Tensor:
    """``Z U`` (``Z [..., r, n]``): the columns gathered where ``u`` is a permutation."""
    orders = _orders(u)
    return z @ u if orders is None else z[..., orders[0]]


def out_of_basis(c: Tensor, u: Tensor) -> Tensor:
    """``C Uᵀ`` (``C [..., r, n]``, ``u`` full): the columns put back where ``u`` is a permutation."""
    orders = _orders(u)
    return c @ u.mT if orders is None else c[..., orders[1]]


def _orders(u: Tensor) -> tuple[Tensor, Tensor] | None:
    if u.dim() != 2 or u.shape[0] != u.shape[1] or u.shape[0] < PERMUTATION_MIN_WIDTH:
        return None
    try:
        version = u._version
    except RuntimeError:  # an inference-mode tensor tracks none: checked every time
        version = None
    known = _PERMUTATIONS.get(u) if version is not None else None
    if known is not None and known[0] == version:
        return known[1]
    orders = None
    # a permutation's first column is one 1: that O(n) look turns away a dense basis, which the
    # whole check read three times (ResNet-18's comparison: 3.8 s for 84 bases up to 4608 wide)
    first = u[:, 0]
    if bool((torch.count_nonzero(first) == 1) & (first == 1).any()):
        ones = u == 1
        if bool((ones.sum(0) == 1).all() & (ones.sum(1) == 1).all() & (torch.count_nonzero(u) == u.shape[0])):
            order = ones.to(torch.int8).argmax(0)  # the row of each column's 1
            orders = (order, torch.argsort(order))
    if version is not None:
        _PERMUTATIONS[u] = (version, orders)
    return orders
