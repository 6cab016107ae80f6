"""Work that several computations in one scope share: inside :func:`shared_work`, what
:func:`reuse` computes is computed once per key.

:func:`curvlab.compare.measure` opens one scope per layer.  Its approximations decompose the same
factors (KFAC, KFLR and EKFAC the input factor ``A``; TKFAC and TEKFAC ``δΦ`` and ``δΨ``) and
rotate the same float64 root into the same bases (KFAC's ``s*`` is EKFAC's scaling, and measured
twice).  For a ResNet-18's 512 × 4608 convolutions each of those is tens of seconds.

Keys name their inputs exactly: tensors by their values (:func:`digest`), other objects by
identity, kept alive by the value stored with them.  So a reused result is the one a fresh
computation would give.  Outside a scope nothing is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_SCOPE: ContextVar[dict | None] = ContextVar("curvlab_shared_work", default=None)


@contextlib.contextmanager
def shared_work() -> Iterator[None]:
    """A scope in which :func:`reuse` computes each key once (a nested scope starts empty)."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def sharing() -> bool:
    """Whether a :func:`shared_work` scope is open (callers skip hashing their inputs if not)."""
    return _SCOPE.get() is not None


def reuse(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``; inside :func:`shared_work`, the value it gave there for ``key``."""
    memo = _SCOPE.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def digest(tensor: Tensor) -> tuple:
    """A key for ``tensor``'s values: dtype, shape, device and a hash of its bytes."""
    data = tensor.detach().contiguous().view(torch.uint8).cpu().numpy()
    return (tensor.dtype, tuple(tensor.shape), tensor.device, hashlib.blake2b(data, digest_size=32).digest())
