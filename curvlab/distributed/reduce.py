"""From each rank's local statistics to the statistics of the global batch — in one place.

Each rank runs the ordinary :func:`curvlab.extract` on its shard, so every statistic carries the
*local* loss normalisation.  The single-process reference is the curvature of the loss of the
*global* batch (the concatenation of the shards in rank order).  With ``L = R Σ_n ℓ_n`` and the
reduction factor ``R = 1/count`` (``mean``: ``count`` = examples for CrossEntropyLoss, elements
for MSELoss and BCEWithLogitsLoss) or ``R = 1`` (``sum``), rank ``r``'s statistics are corrected exactly by

* ``ρ_r = R_global / R_local = count_r / Σ_s count_s`` (``mean``) or ``1`` (``sum``) — the loss
  scale; everything linear in the loss: the gradient matrix and the loss value;
  everything quadratic in the backpropagated root: KFAC's ``G``, TKFAC's ``δ``, ``δΦ``, ``δΨ``,
  EKFAC's ``kfe_scaling``;
* ``√ρ_r`` — the square root's columns (``F = V Vᵀ``), see :func:`curvlab.distributed.sqrt.scaled`;
* ``ω_r = n_r / Σ_s n_s`` — KFAC's ``A``, an average over the shard's ``n_r`` inputs: ``N_r·T_r``
  locations under the ``"expand"`` convention, ``N_r`` examples under ``"reduce"`` (sequences of
  other lengths on other ranks weigh by their tokens); each rank sends ``n_r A_r`` and ``n_r``,
  and the sum is divided after the ``all_reduce``.

and then summed over the ranks.  All these sums travel in one flattened ``all_reduce`` (one per
dtype) for every statistic of every layer; the square roots stay sharded
(:class:`~curvlab.distributed.sqrt.ShardedSqrt`).  The micro-batches an optimizer step
accumulates in one process are combined by the same weights (:func:`combine_statistics`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlab.distributed import collectives as coll
from curvlab.distributed.sqrt import ShardedSqrt, scaled
from curvlab.extract.validate import ELEMENTWISE_LOSSES
from curvlab.gram import GramRows, dense, stack_rows


@dataclass(frozen=True)
class Shards:
    """How the global batch is split over the ranks of a group.

    Attributes:
        rank: this process's rank in the group.
        examples: ``N_r`` of every rank.
        loss_counts: terms each rank's loss averages over (CE: ``N_r``; MSE, BCE: elements).
        columns: ``K_r``, square-root columns of every rank (``C·N_r``).
        reduction: the loss reduction, ``"mean"`` or ``"sum"``.
    """

    rank: int
    examples: tuple[int, ...]
    loss_counts: tuple[int, ...]
    columns: tuple[int, ...]
    reduction: str

    @property
    def world_size(self) -> int:
        return len(self.examples)

    @property
    def num_examples(self) -> int:
        """N, the size of the global batch."""
        return sum(self.examples)

    def loss_scale(self, rank: int | None = None) -> float:
        """``ρ_r``: global over local loss normalisation (1 for a ``sum`` reduction)."""
        r = self.rank if rank is None else rank
        if self.reduction == "sum":
            return 1.0
        return self.loss_counts[r] / sum(self.loss_counts)


def local_loss_count(loss_fn: nn.Module, inputs: Tensor, targets: Tensor) -> int:
    """The number of terms a ``mean`` reduction of ``loss_fn`` divides by on this shard (a
    cross-entropy target equal to ``ignore_index`` is not one)."""
    if isinstance(loss_fn, ELEMENTWISE_LOSSES):
        return targets.numel()
    if not targets.is_floating_point():
        return int((targets != loss_fn.ignore_index).sum())
    return targets[:, 0].numel()  # class probabilities [N, C, ...]: one term per example and position


def _reduced(block) -> list[tuple[Tensor, str]]:
    """``(tensor, weight)`` of every statistic of ``block`` that is summed over the ranks, in a
    fixed order (``weight``: ``"loss"`` → ρ_r, ``"inputs"`` → ω_r, see :func:`_inputs`)."""
    out: list[tuple[Tensor, str]] = []
    if block.grad is not None:
        out.append((block.grad, "loss"))
    for flavour in sorted(block.kfac):
        factors = block.kfac[flavour]
        out += [(factors.A, "inputs"), (factors.G, "loss")]
    if block.tkfac is not None:
        ts = block.tkfac
        out += [(ts.delta, "loss"), (ts.delta_phi, "loss"), (ts.delta_psi, "loss")]
    if block.kfe_scaling is not None:
        out.append((block.kfe_scaling, "loss"))
    return out


def _inputs(block) -> int:
    """The inputs ``A`` averages over: ``N·T`` locations (``"expand"``) or ``N`` examples."""
    return block.num_examples * (block.num_locations if block.kfac_approx == "expand" else 1)


def reduced_numel(local: Mapping[str, object]) -> int:
    """Numbers this rank contributes to the statistics' ``all_reduce`` (equal on all ranks)."""
    return sum(t.numel() + (kind == "inputs") for block in local.values() for t, kind in _reduced(block))


def reduce_statistics(
    local: Mapping[str, object],
    loss: Tensor,
    shards: Shards,
    group: dist.ProcessGroup | None = None,
) -> tuple[dict, Tensor]:
    """The global batch's statistics from this rank's (``local``: block → ``LayerStats``).

    Collective: every rank calls it with statistics of the same blocks.

    Returns:
        ``(blocks, loss)``: block name → ``LayerStats`` of the global batch (square roots as
        :class:`ShardedSqrt`, ``num_examples = N``) and the global batch's loss.
    """
    rho = shards.loss_scale()
    tensors = []
    for block in local.values():
        for t, kind in _reduced(block):
            if kind == "loss":
                tensors.append(t * rho)
            else:  # n_r A_r and n_r: their sums' quotient is the average over all inputs
                n = _inputs(block)
                tensors += [t * n, t.new_full((1,), float(n))]
    summed = coll.all_reduce_sum([*tensors, loss.detach().reshape(1) * rho], group)
    it = iter(summed[:-1])
    out = {}
    for name, block in local.items():
        values = [next(it) if kind == "loss" else next(it) / next(it) for _, kind in _reduced(block)]
        sqrt = None if block.sqrt is None else ShardedSqrt(scaled(block.sqrt, rho ** 0.5), shards.columns, group)
        out[name] = _rebuilt(block, iter(values), shards.num_examples, sqrt)
    return out, summed[-1].reshape(())


def _rebuilt(block, values, num_examples: int, sqrt: object):
    """``block`` with the statistics of :func:`_reduced`, in its order, taken from ``values``."""
    grad = next(values) if block.grad is not None else None
    kfac = {}
    for flavour in sorted(block.kfac):
        a, g = next(values), next(values)
        kfac[flavour] = dataclasses.replace(block.kfac[flavour], A=a, G=g)
    tkfac = None
    if block.tkfac is not None:
        delta, phi, psi = next(values), next(values), next(values)
        tkfac = dataclasses.replace(block.tkfac, delta=delta, delta_phi=phi, delta_psi=psi)
    kfe = next(values) if block.kfe_scaling is not None else None
    return dataclasses.replace(
        block, num_examples=num_examples, grad=grad, sqrt=sqrt, kfac=kfac, tkfac=tkfac, kfe_scaling=kfe
    )


def combine_statistics(parts: Sequence[tuple[Mapping[str, object], int]], reduction: str) -> dict:
    """The statistics of the concatenation of batches from each batch's: ``parts`` are
    ``(blocks, loss_count)`` (block → ``LayerStats``, and the terms that batch's loss averages
    over), weighted as :func:`reduce_statistics` weighs ranks and summed in this process — the
    micro-batches of one optimizer step.  A block some batches lack (its layer not called there)
    is combined over the others.  A block's gradient is the last batch's (``.grad`` accumulates
    over the backward passes); square roots are not combined (``None``).  A statistic kept as
    :class:`~curvlab.gram.GramRows` stays rows (all batches' rows, weighted)."""
    out = {}
    for name in dict.fromkeys(n for blocks, _ in parts for n in blocks):
        having = [(blocks[name], count) for blocks, count in parts if name in blocks]
        shards = Shards(0, tuple(b.num_examples for b, _ in having), tuple(c for _, c in having),
                        (0,) * len(having), reduction)
        last = having[-1][0]
        reduced = [_reduced(b) for b, _ in having]
        if len({tuple(kind for _, kind in r) for r in reduced}) > 1:
            raise ValueError(f"curvlab: block {name!r} has statistics of different kinds in the batches combined")
        columns = zip(*reduced)
        inputs = [_inputs(b) for b, _ in having]
        sums = []
        for r, column in enumerate(columns):
            kind = column[0][1]
            if r == 0 and last.grad is not None:
                sums.append(column[-1][0])
                continue
            weights = ([shards.loss_scale(i) for i in range(len(having))] if kind == "loss"
                       else [n / sum(inputs) for n in inputs])
            sums.append(_weighted_sum([t for t, _ in column], weights))
        out[name] = dataclasses.replace(_rebuilt(last, iter(sums), shards.num_examples, None), convention_sqrt=None)
    return out


def _weighted_sum(values: Sequence[Tensor | GramRows], weights: Sequence[float]) -> Tensor | GramRows:
    if all(isinstance(v, GramRows) for v in values):
        return GramRows(stack_rows([v.rows for v in values]), torch.cat([v.weights * w for v, w in zip(values, weights)]))
    return sum(dense(v) * w for v, w in zip(values, weights))
