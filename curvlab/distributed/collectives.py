"""The few ``torch.distributed`` patterns curvlab's distributed analysis is built from.

Nothing here implements communication: every function is a thin wrapper over one or two
``torch.distributed`` collectives (``all_gather``, ``all_reduce``, ``broadcast``,
``batch_isend_irecv``), adding only what they lack for curvlab's data:

* shards of different sizes (ranks may hold different numbers of examples): padded to the
  largest shard for ``all_gather`` and trimmed again;
* bucketing: many small tensors reduced with one ``all_reduce`` per dtype and device;
* group-relative ranks (a sub-group's rank ``r`` is translated to its global rank for
  point-to-point operations).

All tensors live on the caller's device: CPU tensors with gloo, CUDA tensors with nccl.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class RankFailedError(RuntimeError):
    """Another rank of the group failed its local part of a collective call (its message is
    included)."""


def raise_failed(error: BaseException | None, group: dist.ProcessGroup | None, who: str) -> None:
    """Raise on every rank once the ranks have met (a collective of the caller's, e.g. a table
    with a flag per rank) and found that one failed: its own ``error`` on a failing rank,
    :class:`RankFailedError` with the failing ranks' messages on the others — so that none waits
    in a later collective for a rank that has stopped."""
    messages: list[object] = [None] * size_of(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(messages, mine, group=group)
    if error is not None:
        raise error
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    raise RankFailedError(f"{who}: failed on {failed}")


def require_initialized() -> None:
    """Raise a helpful error when no default process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "curvlab.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) on every rank first (gloo on CPU, nccl on GPU)"
        )


def rank_of(group: dist.ProcessGroup | None) -> int:
    """This process's rank within ``group`` (``None``: the default group)."""
    return dist.get_rank(group)


def size_of(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``group``."""
    return dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group``'s rank ``group_rank`` (peers of point-to-point operations)."""
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_gather_rows(tensor: Tensor, counts: Sequence[int], group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order.

    Rank ``r`` contributes ``counts[r]`` rows (the other dims agree); shards are padded with
    zeros to the largest count for the collective and trimmed afterwards.
    """
    rank = rank_of(group)
    if tensor.shape[0] != counts[rank]:
        raise ValueError(
            f"curvlab.distributed: rank {rank} holds {tensor.shape[0]} rows, expected {counts[rank]}"
        )
    if len(counts) == 1:
        return tensor
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def all_reduce_sum(tensors: Sequence[Tensor], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Sum each tensor over the ranks, with one ``all_reduce`` per (dtype, device) bucket.

    Returns new tensors (the inputs are not modified), in the order given.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for indices in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        if size_of(group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            out[i] = part.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def all_reduce_one(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``tensor`` summed over the ranks (a new tensor)."""
    out = tensor.clone().contiguous()
    if size_of(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def broadcast_from_first(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Group rank 0's ``tensor`` on every rank (a new tensor; shapes must agree)."""
    if size_of(group) == 1:
        return tensor
    out = tensor.detach().clone().contiguous()
    dist.broadcast(out, src=global_rank(group, 0), group=group)
    return out


def exchange(send: Sequence[Tensor], to: int, recv_shapes: Sequence[Sequence[int]], source: int,
             like: Tensor, group: dist.ProcessGroup | None) -> list[Tensor]:
    """Send ``send`` to group rank ``to`` while receiving tensors of ``recv_shapes`` from
    group rank ``source`` (one ``batch_isend_irecv``; ``to == source`` is allowed)."""
    recv = [like.new_empty(tuple(shape)) for shape in recv_shapes]
    ops = []
    for t in send:
        ops.append(dist.P2POp(dist.isend, t.contiguous(), global_rank(group, to), group))
    for t in recv:
        ops.append(dist.P2POp(dist.irecv, t, global_rank(group, source), group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return recv


def plain(value: object) -> object:
    """``value`` as what two ranks can compare by repr: numbers, strings, tuples and mappings of
    them as they are; any other object by its type's name (its repr may hold an address)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): plain(value[k]) for k in sorted(value, key=str)}
    return type(value).__name__


def check_agree(what: object, device: torch.device, group: dist.ProcessGroup | None, message: str) -> None:
    """Raise ``ValueError(message)`` on every rank of ``group`` unless every rank passed an equal
    ``what`` (compared by a checksum of :func:`plain`'s repr: one small ``all_gather``); the
    message then names the first difference from rank 0 (``options.damping: 0.01 on rank 0,
    0.02 on rank 1``; every rank's ``what`` gathered, on that path only)."""
    mine = plain(what)
    checksum = float(zlib.crc32(repr(mine).encode()))
    table = all_gather_floats([checksum], device, group)
    if (table != table[0]).any():
        other = int((table[:, 0] != table[0, 0]).nonzero()[0])
        every: list[object] = [None] * size_of(group)
        dist.all_gather_object(every, mine, group=group)
        path, first, theirs = _first_difference(every[0], every[other])
        raise ValueError(f"{message}; first difference: {path or 'the value'}: {first!r} on rank 0, {theirs!r} on "
                         f"rank {other}")


def _first_difference(a: object, b: object, path: str = "") -> tuple[str, object, object]:
    """Where two :func:`plain` values first differ: the path (``options.damping``,
    ``parameters[2]``) and the two values there — a tuple of records read record by record, a
    record (``('2.weight', (3, 4), True)``) whole."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key, "(absent)") != b.get(key, "(absent)"):
                return _first_difference(a.get(key, "(absent)"), b.get(key, "(absent)"), f"{path}.{key}" if path else key)
    if (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
            and all(isinstance(v, (tuple, dict)) for v in a + b)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path, a, b


def all_gather_floats(values: Sequence[float], device: torch.device,
                      group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's ``values`` (same length everywhere) as a float64 ``[R, len]`` tensor."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(size_of(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts)
