"""Work that several computations in one scope share: inside :func:`shared_work`, what
:func:`reuse` computes is computed once per key.

:func:`curvlab.compare.measure` opens one scope per layer.  Its approximations decompose the same
factors (KFAC, KFLR and EKFAC the input factor ``A``; TKFAC and TEKFAC ``δΦ`` and ``δΨ``) and
rotate the same float64 root into the same bases (KFAC's ``s*`` is EKFAC's scaling, and measured
twice).  For a ResNet-18's 512 × 4608 convolutions each of those is tens of seconds.

Keys name their inputs exactly: tensors by their values (:func:`digest`), other objects by
identity, kept alive by the value stored with them.  So a reused result is the one a fresh
computation would give.  Outside a scope :func:`reuse` keeps nothing.

Hashing a 4608-wide float64 factor costs about as much as copying it three times, and the
approximations of one layer see the same values as distinct tensors (each keeps its own copy).
So a scope also remembers facts about tensors (:func:`remember`, :func:`recall`: until the
tensor is modified in place), and a tensor made from named values by a known computation is
named after them (:func:`name_values`): its :func:`digest` is then that name, not a hash.

In any scope, :func:`keep` and :func:`kept` hold what is derived from a tensor — until it is
modified in place, for as long as it lives (a truncated basis's transposed copy, which every step
applies; the fact that a basis passed a check).
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

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


def forget(name: Hashable) -> None:
    """Inside :func:`shared_work`: drop what :func:`reuse` keeps under keys that mention ``name``
    (named values, :func:`name_values`, at any depth of a key), e.g. a factor's decompositions once
    no later computation of the scope needs them; a later :func:`reuse` computes them again."""
    memo = _SCOPE.get()
    if memo is not None:
        for key in [k for k in memo if _mentions(k, name)]:
            del memo[key]


def _mentions(key: Hashable, name: Hashable) -> bool:
    return key == name or isinstance(key, tuple) and any(_mentions(k, name) for k in key)


def digest(tensor: Tensor) -> tuple:
    """A key for ``tensor``'s values: dtype, shape, device and a hash of its bytes — or, inside
    :func:`shared_work`, the name given to them (:func:`name_values`) or the hash taken before
    (the tensor unchanged since)."""
    known = recall(tensor, "digest")
    if known is not None:
        return known
    data = tensor.detach().contiguous().view(torch.uint8).cpu().numpy()
    key = (tensor.dtype, tuple(tensor.shape), tensor.device, hashlib.blake2b(data, digest_size=32).digest())
    remember(tensor, "digest", key)
    return key


def name_values(tensor: Tensor, name: Hashable) -> Tensor:
    """``tensor``, whose values ``name`` names exactly (e.g. ``("eigenvectors", digest(M))``:
    a deterministic function of named values), as its :func:`digest` inside this scope."""
    remember(tensor, "digest", name)
    return tensor


def remember(tensor: Tensor, fact: str, value: Hashable) -> None:
    """Inside :func:`shared_work`: ``value`` is ``fact`` of ``tensor``'s current values (forgotten
    when the tensor is modified in place); outside, nothing."""
    memo, version = _SCOPE.get(), _version(tensor)
    if memo is None or version is None:
        return
    entry = memo.get(("facts", id(tensor)))
    if entry is None or entry[0]() is not tensor:  # a weak reference: an id is not reused while it lives
        entry = memo[("facts", id(tensor))] = (weakref.ref(tensor), {})
    entry[1][fact] = (version, value)


def recall(tensor: Tensor, fact: str) -> Hashable | None:
    """What :func:`remember` noted as ``fact`` of ``tensor`` in this scope, if the tensor is
    unchanged since; else ``None``."""
    memo = _SCOPE.get()
    entry = None if memo is None else memo.get(("facts", id(tensor)))
    if entry is None or entry[0]() is not tensor:
        return None
    version, value = entry[1].get(fact, (None, None))
    return value if version is not None and version == _version(tensor) else None


def keep(tensor: Tensor, what: str, value: T) -> T:
    """Note ``value`` as ``what`` of ``tensor``'s current values, in any scope, for as long as the
    tensor lives (:func:`kept` gives it back until the tensor is modified in place; nothing is
    noted of an inference-mode tensor, which has no version).  For what objects applied many
    times derive from tensors they do not own: a truncated basis's transposed copy, the fact that
    a basis passed a check.  Returns ``value``."""
    version = _version(tensor)
    if version is not None:
        _KEPT.setdefault(tensor, {})[what] = (version, value)
    return value


def kept(tensor: Tensor, what: str) -> object | None:
    """What :func:`keep` noted as ``what`` of ``tensor``, if the tensor is unchanged since."""
    version, value = _KEPT.get(tensor, {}).get(what, (None, None))
    return value if version is not None and version == _version(tensor) else None


_KEPT = WeakTensorKeyDictionary()  # tensor → {what: (its version, the value)}


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version  # bumped by every in-place change
    except RuntimeError:  # an inference-mode tensor tracks none: nothing is remembered of it
        return None
