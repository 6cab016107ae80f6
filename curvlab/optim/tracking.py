"""What the backward pass of a step must compute, and the ``track`` context that computes it.

On a statistics step the extraction (:class:`curvlab.extract.ExtractionSession`) is attached to
the model for the user's own forward and backward pass only; on every other step nothing is
attached at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.distributed.reduce import combine_statistics, local_loss_count
from curvlab.extract import ExtractionSession, ExtractOptions
from curvlab.extract.session import LossNotSeenError
from curvlab.model_blocks import ModelBlocks
from curvlab.optim.options import KroneckerOptions
from curvlab.optim.state import CurvatureState, Eigenbasis
from curvlab.stats import LayerStats


@dataclass
class Plan:
    """The statistics one step's backward pass computes (empty: nothing is attached)."""

    statistics: set[str] = field(default_factory=set)
    eigenbases: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def plan_step(
    states: Mapping[str, CurvatureState], step: int, options: KroneckerOptions, uncalled: Set[str] = frozenset()
) -> Plan:
    """What the backward of step ``step`` computes for blocks with the curvature ``states``:
    their statistics every ``stats_interval`` steps (or while one has none yet, unless its layer
    was not called in the last statistics pass: ``uncalled``), and the rescaling ``s*`` in each
    eigenbasis every ``scale_interval`` steps that refresh nothing."""
    plan = Plan()
    waiting = (not s.has_statistics for name, s in states.items() if name not in uncalled)
    if step % options.stats_interval == 0 or any(waiting):
        for s in states.values():
            plan.statistics.update(s.statistics)
    if step % options.scale_interval == 0 and step % options.eigen_interval != 0:
        for name, s in states.items():
            basis = s.eigenbasis() if isinstance(s, Eigenbasis) else None
            if basis is not None:
                plan.eigenbases[name] = basis
        if plan.eigenbases:
            plan.statistics.add("kfe")
    return plan


@dataclass
class Pending:
    """What :func:`track` recorded for the next ``step()``."""

    step: int
    results: dict[str, LayerStats]
    losses: list[Tensor] = field(default_factory=list)
    #: terms each loss value averages over (``mean``: examples for CE, elements for MSE and BCE), which
    #: data-parallel ranks need to weight their statistics exactly
    loss_terms: list[int] = field(default_factory=list)
    #: the loss module's reduction (``"mean"`` or ``"sum"``)
    reduction: str = "mean"
    #: the passes (micro-batches) of the step combined in it
    passes: int = 1


@contextlib.contextmanager
def tracked_pass(
    model: nn.Module, loss_fn: nn.Module, options: ExtractOptions, blocks: ModelBlocks, step: int, *, who: str,
    quiet: bool, skip_uncalled: bool = False,
) -> Iterator[Pending]:
    """Run the ``with`` block as step ``step``'s forward and backward pass with the extraction
    of ``options`` attached; the yielded :class:`Pending` holds its statistics afterwards.

    The engine is the session's (``options.engine``; ``"auto"``: BackPACK for a model whose
    forward is a plain chain of modules it covers, else the autograd engine, which records the
    user's forward pass with module hooks and runs its vjps when the loss is computed — the
    user's ``loss.backward()`` still gives the gradient).

    If the loss is not finite, the MC sampling raises (BackPACK: inside ``backward()``; autograd
    engine: at the loss call); that error is suppressed (warned unless ``quiet``: the rest of the
    block does not run) and the statistics stay empty, so the step is skipped.  Any other error
    propagates.
    """
    pending = Pending(step, {}, reduction=getattr(loss_fn, "reduction", "mean"))
    session = ExtractionSession(model, loss_fn, options, blocks=blocks, skip_uncalled=skip_uncalled)
    try:
        with session:
            yield pending
    except LossNotSeenError as err:  # BackPACK's hooks failed in the backward of a loss they did not see
        raise RuntimeError(f"{who}: loss_fn was not called inside `with opt.track(loss_fn):`; {_SAME_LOSS}") from err
    except Exception:
        if session.loss is None or bool(torch.isfinite(session.loss).all()):
            raise
        if not quiet:
            warnings.warn(
                f"{who}: the loss is not finite; the statistics backward failed and the next "
                "step() will be skipped",
                RuntimeWarning,
                stacklevel=5,
            )
        pending.losses = [session.loss]
        return
    if session.loss is None:
        raise RuntimeError(f"{who}: loss_fn was not called inside `with opt.track(loss_fn):`; {_SAME_LOSS}")
    if not session.backward_seen:
        raise RuntimeError(f"{who}: no backward pass went through the loss inside `with opt.track(loss_fn):`; "
                           "call loss.backward() inside the block")
    pending.losses = [session.loss]
    if session.loss_inputs is not None and session.loss_inputs[0].numel() == 0:
        # an empty batch (a data-parallel rank's empty shard): the backward ran, as DDP needs on
        # every rank, without statistics; a NaN loss (a "sum"'s 0 too) skips the step on every rank
        if not quiet:
            warnings.warn(f"{who}: an empty batch; the next step() will be skipped", RuntimeWarning, stacklevel=5)
        pending.losses = [torch.full_like(session.loss, torch.nan)]
        return
    if session.loss_inputs is not None:
        pending.loss_terms = [local_loss_count(loss_fn, *session.loss_inputs)]
    pending.results = session.results()


_SAME_LOSS = ("compute the loss with that same instance, loss_fn(model(x), y) — another loss module or "
              "a function such as F.cross_entropy is not seen by the extraction")


def accumulated(first: Pending, then: Pending) -> Pending:
    """One step's statistics from two passes of it (micro-batches: ``track`` blocks before one
    ``step()``), as one pass on their concatenated batch would give them; a pass whose loss was
    not finite leaves no statistics (the step is skipped)."""
    losses = first.losses + then.losses
    if not all(bool(torch.isfinite(v).all()) for v in losses):
        return dataclasses.replace(then, results={}, losses=losses, passes=first.passes + then.passes)
    if not (first.loss_terms and then.loss_terms):
        raise RuntimeError("curvlab.optim: micro-batches need loss_fn(input, target) calls to be weighed")
    parts = [(first.results, first.loss_terms[-1]), (then.results, then.loss_terms[-1])]
    total = sum(count for _, count in parts)
    # the loss of the concatenated batch, weighted as its statistics (a "sum" reduction adds)
    weights = [1.0] * 2 if first.reduction == "sum" else [count / total for _, count in parts]
    loss = sum(w * (p.losses[-1] if p.losses else torch.nan) for w, p in zip(weights, (first, then)))
    return dataclasses.replace(
        then, results=combine_statistics(parts, first.reduction), losses=[loss], loss_terms=[total],
        passes=first.passes + then.passes,
    )
