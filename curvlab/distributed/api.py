"""``curvlab.distributed.extract`` and ``curvlab.distributed.compare``: the sharded-batch entry points."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import xarray as xr
from torch import Tensor, nn

import curvlab.compare.api as _compare
import curvlab.extract as _extract
from curvlab.distributed import collectives as coll
from curvlab.distributed.reduce import Shards, local_loss_count, reduce_statistics, reduced_numel
from curvlab.extract.autograd import couples_examples

#: Relative tolerance of the check that every rank holds the same parameters.
PARAMETER_CHECK_RTOL = 1e-12


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
    """A checksum of what every rank must agree on: the loss, the options, the block names
    (objects compared as :func:`~curvlab.distributed.collectives.plain` gives them)."""
    text = repr(coll.plain((_compare.describe_loss(loss_fn), options, list(blocks))))
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
        ValueError: on every rank when the ranks disagree (parameters, options, blocks), a
            shard is empty, or the model's BatchNorm normalises with batch statistics (train mode).
    """
    coll.require_initialized()
    rank = coll.rank_of(group)
    device = next(model.parameters()).device
    local_seed = None if seed is None else seed + rank
    error: BaseException | None = None
    local = None
    n_r = int(local_inputs.shape[0])
    try:
        if couples_examples(model):
            raise ValueError(
                "curvlab.distributed: the model has BatchNorm normalising with batch statistics (train mode): "
                "each rank would normalise its shard by its own, so no sharded result is the whole batch's; "
                "measure it in eval mode (model.eval()) or in one process"
            )
        if n_r == 0:
            raise ValueError(f"curvlab.distributed: rank {rank} holds an empty shard")
        local = _extract.extract(model, loss_fn, local_inputs, local_targets, seed=local_seed, **options)
        if any(s.coupled for s in local.values()):  # what no module shows: a batch mean, F.batch_norm
            raise ValueError(
                "curvlab.distributed: the model's forward couples the examples of a batch (one example's "
                "output depends on another's input): each rank would couple its shard's only, so no sharded "
                "result is the whole batch's; measure it in one process"
            )
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
        float(zlib.crc32(repr([p.dtype for p in model.parameters()]).encode())),
        *_fingerprint(model),
    ]
    table = coll.all_gather_floats(meta, device, group).cpu()

    if not table[:, 0].all():
        coll.raise_failed(error, group, "curvlab.distributed.extract: the local extraction")

    _check_agreement(table)
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


def _check_agreement(table: Tensor) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks' calls disagree."""
    def differ(col: int) -> bool:
        return bool((table[:, col] != table[0, col]).any())

    if differ(5) or differ(4):
        raise ValueError(
            "curvlab.distributed.extract: the ranks disagree on the loss, the options or the "
            "extracted blocks; call it with the same model, loss_fn and options on every rank"
        )
    if differ(6):
        raise ValueError(
            "curvlab.distributed.extract: the model parameters' dtypes differ between ranks (e.g. float32 "
            "on some, float64 on others); convert the model the same way on every rank"
        )
    fp = table[:, 7:]
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
    attrs: Mapping[str, object] | None = None,
    progress: bool = False,
    **options: object,
) -> xr.Dataset:
    """:func:`curvlab.compare` of the global batch whose shards the ranks of ``group`` hold.

    Collective: every rank calls it with its shard; every rank returns the same Dataset, equal
    (to rounding) to ``curvlab.compare`` of one process on the concatenated batch for the
    ``exact`` and ``empirical`` flavours, except what MC sampling draws: it is seeded with
    ``seed + rank``, so the ``mc`` flavour and KFAC's factors (MC-sampled whatever the flavour;
    ``kfac`` is measured by default), and the network totals that include them, are valid MC
    estimates but not the single-process ones.  It *is*
    :func:`curvlab.compare`, run with the sharded :func:`extract`.

    Args:
        group: the process group (``None``: the default group).
        attrs: extra attributes, as for :func:`curvlab.compare`.
        progress: a progress bar on group rank 0 only.
        options: the other keyword arguments of :func:`curvlab.compare` (``approximations``,
            ``fisher``, ``mc_samples``, ``damping``, ``damping_strategies``, ``top_k``,
            ``num_eigenvalues``, ``tkfac_conv``, ``seed``).

    Returns:
        the Dataset of :func:`curvlab.compare`, with the extra attributes ``world_size``,
        ``shard_examples`` (``N_r`` per rank), ``backend`` and ``mc_seeds``.
    """
    coll.require_initialized()
    # the options only compare reads (damping, top_k, …): extract checks those it is given
    coll.check_agree({"loss": _compare.describe_loss(loss_fn), "options": options}, next(model.parameters()).device, group,
                     "curvlab.distributed.compare: the ranks disagree on the options (damping, top_k, "
                     "approximations, …); call it with the same options on every rank")
    extractions: list[_extract.Extraction] = []

    def sharded(*args: object, **kwargs: object) -> _extract.Extraction:
        extractions.append(extract(*args, group=group, **kwargs))
        return extractions[-1]

    ds = _compare.compare(model, loss_fn, local_inputs, local_targets, extractor=sharded, attrs=attrs,
                          progress=progress and coll.rank_of(group) == 0, **options)
    shards = extractions[-1].shards
    ds.attrs.update({
        "world_size": shards.world_size,
        "shard_examples": ",".join(str(n) for n in shards.examples),
        "backend": str(dist.get_backend(group)),
        "mc_seeds": "none (global random state per rank)" if ds.attrs["seed"] == "none" else "seed + rank",
        **(attrs or {}),
    })
    return ds
