"""``curvlab train`` on several processes: what differs from one process, in one place.

Launched with ``torchrun --nproc-per-node R -m curvlab train ...`` or ``curvlab train --nproc R``
(:mod:`curvlab.app.launch`), every rank runs :func:`curvlab.app.train.loop.train` with

* the same model (built under ``seed``; ``DistributedDataParallel`` broadcasts rank 0's and
  averages the gradients), the optimizer data-parallel (:mod:`curvlab.optim.distributed`);
* the **same global batches as one process**: each epoch's order is drawn from the same seeded
  generator and every global batch of ``--batch-size`` examples is split over the ranks in rank
  order (:meth:`~curvlab.app.launch.Ranks.shard`, the DistributedSampler-equivalent), each rank's
  loss weighted by its share of the batch (unequal shards too), so each step is one process's step
  on the whole batch, up to rounding and MC sampling (seeded per rank) — but for train-mode
  BatchNorm, which normalises every shard by its own statistics (said at the start); a trailing
  batch with fewer examples than ranks is skipped;
* metrics of the whole batch and test set (losses, counts and the finiteness of each step summed
  over the ranks: one small ``all_reduce`` a step, so every rank agrees when a run diverges);
  the test set is evaluated sharded;
* the probe's extraction sharded over the ranks (:func:`curvlab.distributed.extract`: the same
  result as one process for the exact and empirical flavours);
* files written by rank 0 only; the checkpoint holds every rank's random state (and its CUDA
  device's), and every rank loads it on ``--resume`` (with another number of processes the run
  continues on the same global batches, with rank 0's random state on every rank).

Ranks other than 0 reseed their global random generator with ``seed + rank`` after the model is
built (dropout and other random layers then differ between the shards, as they would between
the examples of one process).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlab.app.data import epoch_batch_sizes
from curvlab.app.launch import Ranks
from curvlab.extract.autograd import couples_examples


def say_skipped_batch(num_train: int, batch_size: int, ranks: Ranks) -> None:
    """Rank 0 says when each epoch's trailing batch has fewer examples than ranks, which every
    rank skips (a rank without an example has no loss): one process would have taken that step."""
    last = epoch_batch_sizes(num_train, batch_size)[1]
    if ranks.is_main and last < ranks.world_size:
        print(f"curvlab train: the last batch of every epoch ({last} of {num_train} training examples in batches "
              f"of {batch_size}) has fewer examples than the {ranks.world_size} processes and is skipped, a step "
              "one process would take; choose --train-size or --batch-size so that it is not", file=sys.stderr)


def steps_per_epoch(num_train: int, batch_size: int, world_size: int) -> int:
    """The optimizer steps of an epoch: one a batch, but for a trailing batch too small to give
    every one of ``world_size`` ranks an example (:func:`say_skipped_batch`)."""
    return -(-num_train // batch_size) - (epoch_batch_sizes(num_train, batch_size)[1] < world_size)


def data_parallel(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` on several ranks (``model`` itself on one);
    rank 0 says so when the model's BatchNorm normalises with batch statistics, each rank's by its
    shard's: the run then takes other steps than one process's."""
    if not ranks.distributed:
        return model
    if ranks.is_main and couples_examples(model):
        print("curvlab train: the model's BatchNorm normalises each process's shard of a batch by the shard's own "
              "statistics (as DistributedDataParallel does without SyncBatchNorm): this run does not take one "
              "process's steps on the whole batch", file=sys.stderr)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device this rank trains on: on several ranks with CUDA its own GPU, the one
    :func:`~curvlab.app.launch.join_process_group` made current (``cuda:LOCAL_RANK``), whatever
    index ``--device`` names — ``cuda:0`` put every rank on GPU 0, which nccl refuses.  The
    configuration keeps ``--device`` as given: the checkpoint compares it on every rank."""
    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def reseed(seed: int, ranks: Ranks) -> None:
    """Ranks other than 0 draw from ``seed + rank`` from here on."""
    if ranks.rank:
        torch.manual_seed(seed + ranks.rank)


def extractor(ranks: Ranks) -> Callable | None:
    """The probe's extraction on several ranks (``None``: one process's)."""
    if not ranks.distributed:
        return None
    from curvlab.distributed import extract

    return partial(extract, group=None)


def step_totals(ranks: Ranks, loss: Tensor, correct: float, examples: int, device: torch.device) -> tuple[float, float, int, bool]:
    """The global batch's summed loss, correct predictions, examples, and whether its loss is finite
    on every rank (one ``all_reduce`` on several ranks)."""
    finite = bool(torch.isfinite(loss))
    total, hits, seen, bad = ranks.sum([loss.item() * examples, correct, examples, float(not finite)], device)
    return total, hits, int(seen), bad == 0


def evaluate_sharded(evaluate: Callable[..., tuple[float, float]], ranks: Ranks, model: nn.Module, loss_fn: nn.Module,
                     x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """``evaluate`` of the whole ``(x, y)``, each rank evaluating its shard."""
    if not ranks.distributed:
        return evaluate(model, loss_fn, x, y, batch_size, device)
    xs, ys = ranks.shard(x, y)
    n = xs.shape[0]
    loss, accuracy = evaluate(model, loss_fn, xs, ys, batch_size, device) if n else (0.0, 0.0)
    total, hits, count = ranks.sum([loss * n, accuracy * n, n], device)
    return total / count, hits / count


def rng_states(ranks: Ranks, device: torch.device) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """Every rank's global random state and, on CUDA, its device's (which a model's Dropout draws
    from there), each in rank order, on every rank (``None`` on one process; the CUDA list
    ``None`` off CUDA)."""
    if not ranks.distributed:
        return None, None
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states: list = [None] * ranks.world_size
    dist.all_gather_object(states, (torch.get_rng_state(), cuda))
    cpu_states, cuda_states = (list(s) for s in zip(*states))
    return cpu_states, (cuda_states if cuda is not None else None)


def restore_rng(checkpoint: dict, ranks: Ranks, device: torch.device) -> None:
    """This rank's random states from ``checkpoint`` (rank 0's if it holds another number of
    ranks): the global one and, on CUDA, its device's."""
    states = checkpoint.get("rank_rng")
    same = states is not None and len(states) == ranks.world_size
    torch.set_rng_state(states[ranks.rank] if same else checkpoint["rng"])
    cuda = checkpoint.get("rank_cuda_rng")
    if device.type == "cuda" and same and cuda is not None and len(cuda) == ranks.world_size:
        torch.cuda.set_rng_state(cuda[ranks.rank], device)
