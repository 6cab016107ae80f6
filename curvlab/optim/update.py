"""The parts of a step that do not depend on the curvature: finiteness, KL clipping, weight
decay, momentum, and the first-order (SGD) update of every other parameter."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from curvlab.approx import DampingStrategy, KroneckerApproximation
from curvlab.approx.inverse import column_inners
from curvlab.block import Block
from curvlab.optim.state import BlockState
from curvlab.stats import LayerStats


def all_finite(grads: Iterable[Tensor], loss: Any, losses: Iterable[Tensor], stats: Iterable[LayerStats]) -> bool:
    """Whether every gradient, the loss and the step's statistics are finite (one sync)."""
    values = finiteness_terms(grads, loss, losses, stats)
    return values is not None and _finite(values)


def finiteness_terms(
    grads: Iterable[Tensor], loss: Any, losses: Iterable[Tensor] = (), stats: Iterable[LayerStats] = ()
) -> list[Tensor] | None:
    """One scalar per tensor that is finite iff the tensor is (``None``: ``loss`` is a
    non-finite Python number).

    A tensor is taken as finite when the sum of its absolute values is (a sum overflows only for
    entries near the dtype's maximum, as harmful as ``inf``), all of them in one op
    (``torch._foreach_norm``: on a GPU one launch for every gradient and statistic).  Of the
    Gram-type statistics (``A``, ``G``, ``δΦ``, ``δΨ``: sums of outer products) only the diagonal
    is taken — a non-finite entry of ``Σ_k v_k v_kᵀ`` implies a non-finite diagonal entry — so
    the check costs O(D), not O(D²), for a D × D factor; kept as rows, their trace.
    """
    tensors = [g.coalesce().values() if g.is_sparse else g for g in grads]  # nn.Embedding(sparse=True)
    tensors += losses
    if isinstance(loss, Tensor):
        tensors.append(loss.detach())
    elif isinstance(loss, (int, float)) and not math.isfinite(loss):
        return None
    values = []
    for ls in stats:
        grams = [g for f in ls.kfac.values() for g in (f.A, f.G)]
        if ls.tkfac is not None:
            tensors.append(ls.tkfac.delta)
            grams += [ls.tkfac.delta_phi, ls.tkfac.delta_psi]
        if ls.kfe_scaling is not None:
            tensors.append(ls.kfe_scaling)
        for g in grams:
            if isinstance(g, Tensor):
                tensors.append(g.diagonal())
            else:  # GramRows
                values.append(g.trace())
    return [*torch._foreach_norm(tensors, 1), *values] if tensors else values


def _finite(values: Sequence[Tensor]) -> bool:
    """Whether every scalar in ``values`` is finite: their sum in float64 is (±inf and NaN
    propagate into it; sums of finite float32/float64 scalars overflow it only near float64's
    maximum).  A stack, a sum and one sync, however many values."""
    if not values:
        return True
    device = values[0].device
    if any(v.device != device for v in values):
        values = [v.to(device) for v in values]
    return math.isfinite(torch.stack(values).sum(dtype=torch.float64).item())


def kl_clip_factor(v_g: Tensor, kl_clip: float) -> Tensor:
    """``ν = min(1, √(κ / Σ_b lr_b² ⟨∇̃_b, ∇_b⟩))`` (1 where the sum is not positive)."""
    tiny = torch.finfo(v_g.dtype).tiny
    return torch.where(v_g > 0, (kl_clip / v_g.clamp_min(tiny)).sqrt().clamp(max=1.0), torch.ones_like(v_g))


def momentum_direction(update: Tensor, own: bool, buffer: Tensor | None, momentum: float) -> tuple[Tensor, Tensor | None]:
    """Heavy-ball momentum (torch's SGD convention): ``m ← μ m + u`` (``m = u`` at first).

    ``own``: whether ``update`` is a fresh tensor that may become the buffer (then ``μ m + u``
    is computed into it, one pass and no allocation).  Returns the direction to apply and the
    new buffer (``None`` when ``μ = 0``); ``buffer`` itself is not modified, so an update
    refused afterwards leaves it as it was.
    """
    if momentum == 0:
        return update, None
    if buffer is None:
        buffer = update if own else update.clone()
    elif own:
        buffer = update.add_(buffer, alpha=momentum)
    else:
        buffer = buffer.mul(momentum).add_(update)
    return buffer, buffer


def momentum_directions(columns: Sequence[tuple[Tensor, bool, Tensor | None, float]]) -> list[tuple[Tensor, Tensor | None]]:
    """:func:`momentum_direction` of every ``(update, own, buffer, momentum)``; those whose fresh
    update takes ``μ m`` in (own, with a buffer, ``μ ≠ 0``: every preconditioned column after the
    first step) in one ``torch._foreach_add_`` per ``μ`` (on a GPU a few launches for all)."""
    moved: list[tuple[Tensor, Tensor | None] | None] = [None] * len(columns)
    by_momentum: dict[float, list[int]] = {}
    for i, (update, own, buffer, momentum) in enumerate(columns):
        if own and buffer is not None and momentum != 0:
            by_momentum.setdefault(momentum, []).append(i)
        else:
            moved[i] = momentum_direction(update, own, buffer, momentum)
    for momentum, at in by_momentum.items():
        updates = [columns[i][0] for i in at]
        torch._foreach_add_(updates, [columns[i][2] for i in at], alpha=momentum)
        for i, update in zip(at, updates):
            moved[i] = (update, update)
    return moved  # type: ignore[return-value]


def decayed(update: Tensor, param: Tensor, weight_decay: float, own: bool) -> Tensor:
    """``u + wd·θ``: into ``update`` where it is ``own`` (a fresh tensor), else a new tensor —
    never ``update`` itself then, so that momentum may write into the result."""
    if own:
        return update.add_(param, alpha=weight_decay) if weight_decay != 0 else update
    return update.add(param, alpha=weight_decay)


def sgd_update_(params: Iterable[Tensor], group: dict[str, Any], state: dict[Tensor, dict[str, Any]]) -> None:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) for ``params`` of ``group``: its functional
    form, which takes all of them in a few multi-tensor ops on a GPU (``foreach``)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads, buffers = [p.grad for p in params], [state[p].get("momentum_buffer") for p in params]
    sgd(params, grads, buffers, has_sparse_grad=any(g.is_sparse for g in grads), weight_decay=group["weight_decay"],
        momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
    if group["momentum"] != 0:
        for p, buf in zip(params, buffers):
            state[p]["momentum_buffer"] = buf


def updates_finite(updates: Sequence[tuple[Tensor, float]], also: Sequence[Tensor] = ()) -> bool:
    """Whether every ``lr·u`` is finite in ``u``'s dtype (and every scalar of ``also``), with one
    reduction for all updates and one sync: the Euclidean norm of ``u``, which a non-finite entry
    makes non-finite.  A finite ``u`` whose norm overflows (in float32, ``‖u‖`` beyond 1.8e19)
    counts as not finite: no training survives such a direction.  (The norm, not the sum of
    absolute values as :func:`finiteness_terms` takes: on the CPU torch's 1-norm is not
    vectorised, 50 µs against 10 µs for a ``[128, 784]`` float32 update, a visible share of a
    small model's step.)  For ``lr ≤ 1``, ``lr·u`` overflows only where ``u`` does."""
    norms = torch._foreach_norm([u for u, _ in updates]) if updates else []  # one op for all
    return _finite([*(n if lr <= 1 else n * lr for n, (_, lr) in zip(norms, updates)), *also])


#: what :func:`update_blocks_` returns for an update that is not finite (the caller says it in full)
NOT_FINITE = "non-finite update"

#: a direction ``d = K̂⁻¹g`` counts as uphill where ``⟨d, g⟩ < −UPHILL_COSINE·‖d‖‖g‖``: never for a
#: positive definite ``K̂`` (``⟨d, g⟩ = gᵀK̂⁻¹g > 0``), so only where the damped inverse is not
#: what it is in exact arithmetic; the margin keeps a product near 0 (a tiny gradient) from
#: counting by its rounding
UPHILL_COSINE = 1e-3


def negative_guard(block_dots: Sequence[Tensor]) -> Tensor:
    """A scalar that is finite iff every block's ``⟨d, g⟩`` is finite and none is negative (the
    sum of their square roots: NaN for a negative one), checked in the update's one finiteness
    sync."""
    device = block_dots[0].device
    return torch.stack([v if v.device == device else v.to(device) for v in block_dots]).sqrt().sum()


def uphill_blocks(negative: Sequence[tuple["BlockStep", Tensor]], damping: float,
                  strategy: str | DampingStrategy) -> list["BlockStep"]:
    """Of the preconditioned blocks ``(step, ⟨d, g⟩)`` whose ``⟨d, g⟩`` is negative, those
    beyond rounding (:data:`UPHILL_COSINE`; ``d`` taken again from the kept inverse: the step's
    own was clipped and moved in place).  It happens where a float32 factor's spectrum spans more
    than float32 resolves at the damping's shift (a rank-deficient factor of inputs of scale ~1e3
    and above): its Cholesky succeeds, its inverse is not positive definite, and KL clipping,
    whose sum then turns negative, would not clip either."""
    def norm(columns: Sequence[Tensor]) -> float:
        return math.sqrt(sum(float(c.double().square().sum()) for c in columns))

    return [s for s, dot in negative if float(dot) < -UPHILL_COSINE * norm(s.grad) * norm(
        s.approximation.inv_mat_mul_columns(s.grad, damping, strategy))]


def uphill_message(steps: Sequence["BlockStep"]) -> str:
    """Why a step with uphill directions in ``steps``' blocks is skipped, and what to change."""
    dtype = str(steps[0].approximation.dtype).removeprefix("torch.")
    return (f"a preconditioned direction pointing uphill in {[s.block.name for s in steps]} (⟨K̂⁻¹g, g⟩ < 0: "
            f"the damped inverse is not positive definite in {dtype}, where a factor's spectrum spans more than "
            f"{dtype} resolves at this damping — e.g. inputs of scale 1e3 and above with fewer examples than the "
            "layer's width); use factor_dtype='float64', a larger damping, or normalised inputs")


def _any_nonzero(groups: Sequence[dict[str, Any]], option: str) -> bool:
    """Whether any of a block's param groups sets ``option`` (a loop, not a generator: this runs
    for every block of every step)."""
    for group in groups:
        if group[option] != 0:
            return True
    return False


@dataclass
class BlockStep:
    """One block's share of a step: its gradient's column blocks (:meth:`Block.grad_columns`),
    what it inverts (``None``: first order), its state (for the momentum buffer) and the param
    group of each column block's parameter (weight, bias: ``lr``, ``momentum`` and
    ``weight_decay`` apply to the preconditioned update column block by column block)."""

    block: Block
    grad: list[Tensor]
    approximation: KroneckerApproximation | None
    state: BlockState
    groups: Sequence[dict[str, Any]]


def update_blocks_(
    steps: Sequence[BlockStep],
    damping: float,
    strategy: str | DampingStrategy,
    kl_clip: float | None,
    skip: set[Tensor] | frozenset[Tensor] = frozenset(),
    also_check: Sequence[Tensor] = (),
) -> str | None:
    """Precondition, KL-clip, decay, accelerate and apply the update of every block (steps 4–6
    of :mod:`curvlab.optim.base`), leaving the parameters in ``skip`` unchanged.

    Every update is checked before any is applied — by its norm, or through its block's
    ``⟨d, g⟩`` where that is taken (:func:`negative_guard`) — in one sync with the scalars of
    ``also_check`` (:func:`finiteness_terms`): if one is not finite (an overflowing inverse, a
    huge learning rate, a non-finite gradient), or a preconditioned direction points uphill
    (:func:`uphill_blocks`), nothing changes — parameters and momentum buffers — and the reason is
    returned; ``None`` once the update is applied.
    """
    # Each block's update is kept as the column blocks of its matrix form (weight, bias), as
    # Block.grad_columns gives them.  (direction, own): preconditioned directions are fresh
    # tensors that may be modified in place; first-order ones may be views of .grad.
    directions: list[tuple[list[Tensor], bool]] = []
    v_g: Tensor | None = None
    preconditioned: list[tuple[BlockStep, Tensor]] = []  # (step, ⟨d, g⟩)
    for s in steps:
        if s.approximation is None:
            directions.append((s.grad, False))
            continue
        # computed in the approximation's dtype (factor_dtype), returned in the gradient's
        if kl_clip is None and s.approximation.inverse(damping, strategy).positive_definite:
            # ⟨d, g⟩ > 0 by construction (up to rounding below UPHILL_COSINE): nothing to guard
            directions.append((s.approximation.inv_mat_mul_columns(s.grad, damping, strategy), True))
            continue
        lrs = None if kl_clip is None else [group["lr"] for group in s.groups]
        if lrs is None or all(lr == lrs[0] for lr in lrs):
            direction, dot = s.approximation.inv_mat_mul_columns_and_inner(s.grad, damping, strategy)
            term = None if lrs is None else dot * lrs[0] ** 2
        else:  # KL clipping weighs each column block by its own group's lr²
            direction = s.approximation.inv_mat_mul_columns(s.grad, damping, strategy)
            dots = column_inners(direction, s.grad)
            dot, term = sum(dots[1:], dots[0]), sum(d * lr ** 2 for d, lr in zip(dots, lrs))
        directions.append((direction, True))
        preconditioned.append((s, dot))
        if term is not None:
            v_g = term if v_g is None else v_g + term.to(v_g.device)
    nu = None if v_g is None else kl_clip_factor(v_g, kl_clip)
    columns: list[tuple[Tensor, bool, Tensor | None, float]] = []  # every block's, for momentum
    for s, (update, own) in zip(steps, directions):
        if nu is not None and own:
            for u in update:
                u.mul_(nu.to(u.device))
        if _any_nonzero(s.groups, "weight_decay"):
            theta = s.block.param_columns()
            update = [decayed(u, t, group["weight_decay"], own) for u, t, group in zip(update, theta, s.groups)]
            own = True
        buffers = s.state.momentum_columns or [None] * len(update)
        columns += [(u, own, b, group["momentum"]) for u, b, group in zip(update, buffers, s.groups)]
    moved = iter(momentum_directions(columns))
    updates: list[tuple[BlockStep, list[Tensor], list[Tensor] | None]] = []
    for s in steps:
        block_moved = [next(moved) for _ in s.groups]
        # a column without momentum beside one with it keeps a zero buffer (a fresh start, as
        # torch's SGD makes, should its group's momentum be raised): the buffer stays one matrix
        kept = None if not _any_nonzero(s.groups, "momentum") else [
            torch.zeros_like(d) if b is None else b for d, b in block_moved]
        updates.append((s, [d for d, _ in block_moved], kept))
    guard = [negative_guard([dot for _, dot in preconditioned])] if preconditioned else []
    # A finite ⟨d, g⟩ makes d and g finite (a non-finite entry of either makes the sum ±inf or
    # NaN), and the update adds finite terms to d (ν·d, wd·θ, μ·m of an accepted step): the
    # guard checks those blocks' columns, but for an lr above 1, which may overflow lr·u alone.
    guarded = {id(s) for s, _ in preconditioned}
    lr_updates = [(u, group["lr"], id(s) in guarded) for s, us, _ in updates for u, group in zip(us, s.groups)]
    if not updates_finite([(u, lr) for u, lr, by_guard in lr_updates if not by_guard or lr > 1], [*also_check, *guard]):
        uphill = uphill_blocks([(s, dot) for s, dot in preconditioned if float(dot) < 0], damping, strategy)
        if uphill:
            return uphill_message(uphill)
        # (else a negative product by its rounding, or a non-finite update: every one's norm decides)
        if not guard or not updates_finite([(u, lr) for u, lr, _ in lr_updates], also_check):
            return NOT_FINITE
    by_lr: dict[float, tuple[list[Tensor], list[Tensor]]] = {}  # every block's parameters, one op per lr
    for s, update, buffers in updates:
        s.state.momentum_columns = buffers
        for target, part, i in s.block.update_targets(update, skip=skip):
            targets, parts = by_lr.setdefault(s.groups[i]["lr"], ([], []))
            targets.append(target)
            parts.append(part)
    for lr, (targets, parts) in by_lr.items():
        torch._foreach_add_(targets, parts, alpha=-lr)
    return None
