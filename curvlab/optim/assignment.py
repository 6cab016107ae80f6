"""Which rank refreshes which block — the work assignment, kept apart from the communication.

A refresh step eigen-decomposes every block's factors (``O(d_out³ + D³)`` flops a block).  Under
data parallelism every rank holds the same averaged factors, so one rank can decompose a block
and hand the result to the others (:mod:`curvlab.optim.distributed`).  As KAISA (Pauloski et
al. 2021, kfac-pytorch's ``KAISAAssignment``) does, blocks are assigned greedily by cost:
largest first, each to the rank with the least work so far (the LPT rule; its makespan is at most
``4/3`` of the optimum).  The assignment is a pure function of the block sizes, so every rank
computes the same one without communicating.

The unit is a block (its ``refresh()`` decomposes both factors, and EKFAC/TEKFAC build their
eigenbasis from both), not a single factor as in KAISA: with fewer blocks than ranks some ranks
idle; ``max_rank_cost / total`` (:func:`balance`) says how well the work spreads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from curvlab.block import BlockLayout


def refresh_cost(layout: BlockLayout) -> int:
    """Flops, up to a constant, of one block's eigen refresh: ``d_out³ + D³``."""
    d_out, d_in = layout.shape
    return d_out**3 + d_in**3


def assign_greedy(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of every item: largest cost first (ties: lower index first), each to the
    least-loaded rank so far (ties: lower rank).

    Args:
        costs: cost of every item (non-negative).
        world_size: number of ranks (≥ 1).

    Returns:
        ``owners[i]``, the rank of item ``i``.
    """
    if world_size < 1:
        raise ValueError(f"curvlab.optim: world_size={world_size} must be positive")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def balance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> Mapping[int, float]:
    """Total cost per rank of an assignment."""
    load = {r: 0.0 for r in range(world_size)}
    for cost, rank in zip(costs, owners):
        load[rank] += cost
    return load
