"""``curvlab.distributed.extract`` and ``curvlab.distributed.compare``: the sharded-batch entry points."""

from __future__ import annotations

import traceback
import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import xarray as xr
from torch import Tensor, nn

import curvlab.extract as _extract
from curvlab.approx import APPROXIMATIONS, DEFAULT_DAMPING, applies, approximate, needed_kfac_flavours
from curvlab.compare import measure
from curvlab.compare.api import DEFAULT_APPROXIMATIONS, extraction_attrs
from curvlab.distributed import collectives as coll
from curvlab.distributed.reduce import Shards, local_loss_count, reduce_statistics, reduced_numel

#: Relative tolerance of the check that every rank holds the same parameters.
PARAMETER_CHECK_RTOL = 1e-12


class RankFailedError(RuntimeError):
    """Another rank of the group failed its local extraction (its message is included)."""


def _fingerprint(model: nn.Module) -> list[float]:
    """Four numbers that differ, with overwhelming probability, between different parameters."""
    count, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            q = p.detach().double()
            count += q.numel()
            s1 += q.sum().item()
            s2 += q.square().sum().item()
            s3 += (i + 1) * q.sum().item() + (q.flatten() * torch.linspace(-1, 1, q.numel(), dtype=q.dtype, device=q.device)).sum().item()
    return [count, s1, s2, s3]


def _signature(loss_fn: nn.Module, options: Mapping[str, object], blocks: Iterable[str]) -> float:
    """A checksum of what every rank must agree on: the loss, the options, the block names."""
    simple = (bool, int, float, str, type(None), tuple)
    text = repr((
        type(loss_fn).__name__,
        getattr(loss_fn, "reduction", None),
        sorted((k, v if isinstance(v, simple) else type(v).__name__) for k, v in options.items()),
        list(blocks),
    ))
    return float(zlib.crc32(text.encode()))


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    local_inputs: Tensor,
    local_targets: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    seed: int | None = None,
    **options: object,
) -> _extract.Extraction:
    """:func:`curvlab.extract` of the global batch whose shards the ranks of ``group`` hold.

    Collective: every rank calls it with its own shard (the global batch is the concatenation of
    the shards in rank order) and the same model parameters, loss and options.

    Args:
        model, loss_fn: as for :func:`curvlab.extract`; the parameters must agree on every rank
            (checked).
        local_inputs, local_targets: this rank's shard (at least one example).
        group: the process group (``None``: the default group).
        seed: MC sampling is seeded with ``seed + rank`` (``None``: each rank's global random
            state — seed it differently on every rank, or the ranks' samples share their random
            numbers).  MC statistics are therefore *not* those of one process on the whole batch.
        options: the other keyword arguments of :func:`curvlab.extract` (``fisher``,
            ``mc_samples``, ``stats``, ``kfac_flavours``, ``tkfac_conv``, ``separate_bias``,
            ``eigenbases``, ``skip_unsupported``).

    Returns:
        block name → ``LayerStats`` of the global batch (see
        :mod:`curvlab.distributed.reduce` for the scaling), identical on every rank, with square
        roots as :class:`~curvlab.distributed.ShardedSqrt`.  Attributes ``loss`` (of the global
        batch), ``flavour``, ``num_examples`` (N) and ``shards`` (:class:`Shards`).

    Raises:
        RankFailedError: on the ranks whose own extraction succeeded when another rank's failed
            (every rank raises; the failing ranks re-raise their own exception).
        ValueError: on every rank when the ranks disagree (parameters, options, blocks) or a
            shard is empty.
    """
    coll.require_initialized()
    rank, size = coll.rank_of(group), coll.size_of(group)
    device = next(model.parameters()).device
    local_seed = None if seed is None else seed + rank
    error: BaseException | None = None
    local = None
    n_r = int(local_inputs.shape[0])
    try:
        if n_r == 0:
            raise ValueError(f"curvlab.distributed: rank {rank} holds an empty shard")
        local = _extract.extract(model, loss_fn, local_inputs, local_targets, seed=local_seed, **options)
    except Exception as exc:  # reported to every rank below, so that none waits for this one
        error = exc
    blocks = list(local) if local is not None else []
    roots = [b.sqrt for b in local.values() if b.sqrt is not None] if local is not None else []
    meta = [
        float(error is None),
        float(n_r),
        float(local_loss_count(loss_fn, local_inputs, local_targets)),
        float(roots[0].num_columns if roots else 0),
        float(reduced_numel(local) if local is not None else 0),
        _signature(loss_fn, options, blocks),
        *_fingerprint(model),
    ]
    table = coll.all_gather_floats(meta, device, group).cpu()

    failed = [r for r in range(size) if table[r, 0] == 0]
    if failed:
        messages: list[object] = [None] * size
        mine = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
        dist.all_gather_object(messages, mine, group=group)
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailedError(f"curvlab.distributed.extract: local extraction failed on {detail}")

    _check_agreement(table, rank)
    examples = tuple(int(v) for v in table[:, 1].tolist())
    shards = Shards(
        rank=rank,
        examples=examples,
        loss_counts=tuple(int(v) for v in table[:, 2].tolist()),
        columns=tuple(int(v) for v in table[:, 3].tolist()),
        reduction=loss_fn.reduction,
    )
    stats, loss = reduce_statistics(local, local.loss, shards, group)
    result = _extract.Extraction(stats)
    result.loss = loss
    result.flavour = local.flavour
    result.engine, result.engine_reason, result.skipped = local.engine, local.engine_reason, local.skipped
    result.num_examples = shards.num_examples
    result.shards = shards
    return result


def _check_agreement(table: Tensor, rank: int) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks' calls disagree."""
    def differ(col: int) -> bool:
        return bool((table[:, col] != table[0, col]).any())

    if differ(5) or differ(4):
        raise ValueError(
            "curvlab.distributed.extract: the ranks disagree on the loss, the options or the "
            "extracted blocks; call it with the same model, loss_fn and options on every rank"
        )
    fp = table[:, 6:]
    scale = fp.abs().amax(0).clamp_min(1.0)
    if ((fp - fp[0]).abs() > PARAMETER_CHECK_RTOL * scale).any():
        raise ValueError(
            "curvlab.distributed.extract: the model parameters differ between ranks (broadcast "
            "them from one rank, e.g. torch.distributed.broadcast, before the analysis)"
        )
    examples, columns = table[:, 1], table[:, 3]
    if ((columns * examples[0]) != (columns[0] * examples)).any():
        raise ValueError(
            "curvlab.distributed.extract: the ranks' square roots have different numbers of columns "
            f"per example ({columns.tolist()} columns for {examples.tolist()} examples)"
        )


def compare(
    model: nn.Module,
    loss_fn: nn.Module,
    local_inputs: Tensor,
    local_targets: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    approximations: Iterable[str] = DEFAULT_APPROXIMATIONS,
    fisher: str = "exact",
    mc_samples: int = 1,
    damping: float = 1e-3,
    damping_strategies: Mapping[str, str] | None = None,
    top_k: int = 10,
    num_eigenvalues: int = 256,
    tkfac_conv: str = "exact",
    seed: int | None = 0,
    attrs: Mapping[str, object] | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """:func:`curvlab.compare` of the global batch whose shards the ranks of ``group`` hold.

    Collective: every rank calls it with its shard; every rank returns the same Dataset, equal
    (to rounding) to ``curvlab.compare`` of one process on the concatenated batch for the
    ``exact`` and ``empirical`` flavours.  MC sampling is seeded with ``seed + rank``, so ``mc``
    results are a valid MC estimate but not the single-process one.

    Args:
        group: the process group (``None``: the default group).
        others: as for :func:`curvlab.compare`; ``progress`` shows a bar on rank 0 only.

    Returns:
        the Dataset of :func:`curvlab.compare`, with the extra attributes ``world_size``,
        ``shard_examples`` (``N_r`` per rank), ``backend`` and ``mc_seeds``.
    """
    names = [a.lower() for a in approximations]
    for name in names:
        if name not in APPROXIMATIONS:
            raise ValueError(f"curvlab.distributed.compare: unknown approximation {name!r}; choose from {APPROXIMATIONS}")
    strategies = {**DEFAULT_DAMPING, **(damping_strategies or {})}
    stats = extract(
        model,
        loss_fn,
        local_inputs,
        local_targets,
        group=group,
        seed=seed,
        fisher=fisher,
        mc_samples=mc_samples,
        stats=("sqrt", "kfac", "tkfac"),
        kfac_flavours=needed_kfac_flavours(names, fisher),
        tkfac_conv=tkfac_conv,
    )
    approx = {
        layer: {n: approximate(block, n) for n in names if applies(n, block)} for layer, block in stats.items()
    }
    wrap = None
    if progress and stats.shards.rank == 0:
        from functools import partial

        from tqdm.auto import tqdm

        wrap = partial(tqdm, desc="compare", unit="layer")
    shards = stats.shards
    return measure(
        stats,
        approx,
        damping=damping,
        damping_strategies=strategies,
        top_k=top_k,
        num_eigenvalues=num_eigenvalues,
        attrs={
            "mc_samples": mc_samples,
            "seed": "none" if seed is None else seed,
            "tkfac_conv": tkfac_conv,
            "loss": type(loss_fn).__name__ + f"(reduction={loss_fn.reduction})",
            "batch_loss": stats.loss.item(),
            **extraction_attrs(stats),
            "world_size": shards.world_size,
            "shard_examples": ",".join(str(n) for n in shards.examples),
            "backend": str(dist.get_backend(group)),
            "mc_seeds": "none (global random state per rank)" if seed is None else "seed + rank",
            **(attrs or {}),
        },
        progress=wrap,
    )
