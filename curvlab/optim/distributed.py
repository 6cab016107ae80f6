"""Data-parallel curvlab optimizers: statistics averaged over the ranks, refreshes spread over them.

With a ``DistributedDataParallel`` model, or a plain model once ``torch.distributed`` is
initialised, :class:`~curvlab.optim.KroneckerOptimizer` (KFAC, EKFAC, TKFAC, TEKFAC) keeps the
same state on every rank and takes the step one process would take on the concatenation of the
ranks' batches::

    model = DistributedDataParallel(net)        # or net itself, with a process group
    opt = TEKFAC(model, lr=0.1)                 # data-parallel: detected
    for x, y in shard_of_each_batch:            # the same loop as in one process
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()

What the ranks exchange (``torch.distributed`` collectives only; gloo on CPU, nccl on GPU):

* **statistics steps**: at the end of each ``track`` block and at ``step()``, one ``all_gather``
  of six numbers (where the rank is: the step, its ``track`` blocks so far; at ``step()`` the
  finiteness, ``N_r``, loss terms), then one ``all_reduce`` per dtype of every block's
  statistics of this step, flattened — KFAC's ``A``, ``G``; TKFAC's ``δ``, ``δΦ``, ``δΨ``; the
  KFE second moments ``s*`` of EKFAC/TEKFAC — with the loss.  Rank ``r``'s local statistics carry its local loss normalisation; they are
  weighted exactly as :mod:`curvlab.distributed.reduce` does for the analysis (``ρ_r`` = its share
  of the loss terms, ``N_r/N`` for ``A``), so the averages are those of the global batch also for
  unequal shards;
* **refresh steps**: the blocks to decompose are assigned to ranks greedily by cost
  (:mod:`curvlab.optim.assignment`, KAISA's rule); each rank refreshes its own blocks, then one
  ``all_gather_object`` of the result's tensor names and shapes and, per rank that owns blocks,
  one ``broadcast`` per dtype of what its refreshes built (the tensors ``refresh()`` replaced in
  the block state, plus the eigen-decomposition KFAC/TKFAC compute for a damping that is not a
  Kronecker product; with their default damping they need none); the others install them
  with ``CurvatureState.load``.  Every rank then holds bit-identical approximations;
* **gradients**: a ``DistributedDataParallel`` model averages them in its backward; for a plain
  model the optimizer averages them (one ``all_reduce`` per dtype, every step).  Either way the
  gradient is the mean of the ranks' local gradients, the global batch's gradient when the shards
  are equal (as DDP's; the statistics are exact for unequal shards too);
* **the skip decision**: a step is skipped on every rank when a loss, gradient or statistic is
  non-finite on any rank (the flag travels with the statistics or gradients; under DDP a step
  without statistics needs none unless ``step(closure)`` returns a rank-local loss).

Nothing else is communicated: the preconditioning, KL clipping and momentum run on identical
data on every rank.

Cost as the number of ranks ``R`` grows (global batch fixed): a statistics step's extraction
costs ``1/R`` per rank; its ``all_reduce`` carries ``S = Σ_blocks (D² + d_out² + …)`` numbers
whatever ``R`` (a ring moves ``2 (R−1)/R · S`` through each link); a refresh costs each rank the
eigendecompositions of its blocks — at best ``1/R`` of the total, never less than the largest
block (``optim/assignment.py``) — and every rank receives the others' results once
(``≈ (R−1)/R`` of ``Σ (D² + d_out² + d_out·D)`` for EKFAC/TEKFAC; KFAC/TKFAC send their
factors, ``Σ (D² + d_out²)``, and each rank then computes its own two Cholesky factorisations).  ``benchmarks/bench_distributed.py``
measures both.  State dicts are therefore identical on all ranks — rank 0 saves, every rank
loads the same file — and use the same block names as one process (a DDP model is unwrapped).

MC sampling (``fisher="mc"``) is seeded per rank and step: the statistics pass of step ``k`` on
rank ``r`` samples under ``torch.manual_seed(mc_seed + k·R + r)`` (the global random state is
restored afterwards), so the ranks draw independent labels and a resumed run redraws the same
ones.  The MC statistics are a valid estimate for the global batch, not one process's draw.

Requirements: every rank calls ``track``/``step`` in the same order, as many ``track`` blocks
(micro-batches) before each ``step``, with the same model structure, options and parameters
(DDP broadcasts them at construction; for a plain model, broadcast them yourself: its parameter
names, shapes and trainable flags are checked at construction).  On a statistics step a rank
with a ``track`` block more or less than the others makes every rank raise, naming where each
one is (the ranks of a DDP model, whose backward all-reduces the gradients, also meet at each
block's first call of the model, where they compare DDP's ``no_sync()`` state: a rank with one
more waits in no collective of DDP's; one that runs its forward and backward outside ``track``
on a statistics step still waits in DDP's all-reduce until the timeout).
On a step without statistics the blocks are not counted: DDP's all-reduce waits, as it does
without curvlab.  A plain model's gradients are averaged as DDP's
``find_unused_parameters`` averages them: a parameter without a gradient on a rank (a layer it
did not call) adds zero there.
A failing rank leaves the others blocked in a collective until the process group's timeout
(``init_process_group(timeout=...)``; torchrun stops the other ranks at once).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvlab.approx import KroneckerApproximation
from curvlab.distributed import collectives as coll
from curvlab.distributed.reduce import Shards, reduce_statistics
from curvlab.extract.engines import uncompiled
from curvlab.optim.assignment import assign_greedy, refresh_cost
from curvlab.optim.state import CurvatureState
from curvlab.optim.tracking import Pending
from curvlab.optim.update import all_finite


@dataclass(frozen=True)
class DataParallel:
    """How a Kronecker optimizer shares its work over a ``torch.distributed`` process group.

    Pass it as ``distributed=`` to override what is detected.

    Attributes:
        group: the process group (``None``: a DDP model's own group, else the default group).
        average_gradients: all-reduce the gradients in ``step()`` (``None``: unless the model is
            ``DistributedDataParallel``, which has averaged them already).
        mc_seed: MC sampling of step ``k`` on rank ``r`` uses the seed ``mc_seed + k·R + r``.
    """

    group: dist.ProcessGroup | None = None
    average_gradients: bool | None = None
    mc_seed: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` or a ``torch.compile`` wrapper holds, in any nesting
    (any other model as it is): blocks named as in one eager process, so state dicts carry over."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else uncompiled(model)
    return model if inner is model else unwrap(inner)


def statistics_engine(model: nn.Module, engine: str, who: str) -> str:
    """The statistics engine for ``model``: ``DistributedDataParallel(find_unused_parameters=True)``
    puts an autograd function of its own between the model's output and the loss, which
    BackPACK's hooks cannot backpropagate through — ``"auto"`` takes the autograd engine there."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and model.find_unused_parameters:
        if engine == "backpack":
            raise ValueError(
                f"{who}: engine='backpack' cannot run through DistributedDataParallel(find_unused_parameters=True)"
                " (its output passes DDP's own autograd function); use engine='autograd' or 'auto'"
            )
        return "autograd" if engine == "auto" else engine
    return engine


def data_parallel(model: nn.Module, setting: DataParallel | bool | None, who: str) -> "RankSync | None":
    """The synchronisation an optimizer over ``model`` needs, from its ``distributed`` argument.

    ``None`` (auto): data-parallel when ``model`` is ``DistributedDataParallel`` or a process group
    of more than one rank is initialised; ``False``: never; ``True``: required (an error without a
    process group); a :class:`DataParallel`: as it says.  Returns ``None`` for a single process.
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if ddp and getattr(model, "static_graph", False):
        raise ValueError(
            f"{who}: DistributedDataParallel(static_graph=True) is not supported: its gradient reduction "
            "would be queued on the statistics pass's own backward (before your loss.backward()) and the "
            "ranks' gradients would silently differ; construct DDP without static_graph"
        )
    ready = dist.is_available() and dist.is_initialized()
    if setting is False and ddp and ready and dist.get_world_size(model.process_group) > 1:
        raise ValueError(
            f"{who}: distributed=False on a DistributedDataParallel model of {dist.get_world_size(model.process_group)} "
            "ranks: each rank would precondition DDP's averaged gradient with its own statistics, and the "
            "replicas would drift apart; leave distributed=None (auto), or give the optimizer the unwrapped "
            "model to train each rank's replica on its own"
        )
    if setting is False:
        return None
    if setting is None and not (ddp or ready):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun started it, the group never made
            warnings.warn(f"{who}: WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not initialised, "
                          "so this process trains on its own data alone; call torch.distributed.init_process_group(...) "
                          "before building the optimizer (or pass distributed=False to mean it)", UserWarning, stacklevel=4)
        return None
    if not isinstance(setting, (DataParallel, bool, type(None))):
        raise TypeError(f"{who}: distributed={setting!r}; pass None (auto), True, False or a DataParallel")
    if not ready:
        raise RuntimeError(
            f"{who}: distributed={setting!r} but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (gloo on CPU, nccl on GPU)"
        )
    config = setting if isinstance(setting, DataParallel) else DataParallel()
    group = config.group if config.group is not None or not ddp else model.process_group
    average = (not ddp) if config.average_gradients is None else config.average_gradients
    if dist.get_world_size(group) == 1:
        return None
    return RankSync(unwrap(model), group, average, config.mc_seed, model if ddp else None)


class RankSync:
    """The collectives of a data-parallel optimizer over ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, average_gradients: bool, mc_seed: int,
                 ddp: nn.parallel.DistributedDataParallel | None = None) -> None:
        self.model = model  # (unwrapped; with ``ddp``, the DistributedDataParallel it runs inside)
        self.ddp = ddp
        self._start_hook = None  # start_of_pass's meeting, at the block's first call of the DDP model
        self.group = group
        self.average_gradients = average_gradients
        self.mc_seed = mc_seed
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @property
    def device(self) -> torch.device:
        """Where the collectives' buffers live: the model's device (gloo: CPU, nccl: CUDA)."""
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def check_agree(self, what: object, message: str) -> None:
        """``ValueError(message)`` on every rank unless all passed an equal ``what``."""
        coll.check_agree(what, self.device, self.group, message)

    def start_of_pass(self, step: int, passes: int) -> None:
        """Meet the other ranks when a statistics step's ``passes``-th ``opt.track`` block of step
        ``step`` first calls the ``DistributedDataParallel`` model — with a DDP model only, whose
        backward all-reduces the gradients: a rank with one block more than the others would wait
        there, in DDP's collective, until the process group's timeout, where now it meets their
        ``step()`` and every rank raises.  So does a block whose forward runs under DDP's
        ``no_sync()`` on some ranks only (a rank with one micro-batch more): the meeting is at the
        forward call, inside the user's ``no_sync()``, where DDP reads it."""
        if self.ddp is None:
            return

        def meet(ddp: nn.Module, args: tuple, kwargs: dict) -> None:
            self._end_start_hook()
            syncs = self._meet(_START_OF_PASS, step, passes, [float(ddp.require_backward_grad_sync)])[:, 0].tolist()
            if len(set(syncs)) > 1:
                under = ", ".join(str(r) for r, v in enumerate(syncs) if not v)
                raise RuntimeError(
                    f"curvlab.optim: the ranks are out of step: track block {passes} of step {step} runs under "
                    f"DistributedDataParallel's no_sync() on rank(s) {under} only; every rank must run as many "
                    "`with opt.track(loss_fn):` blocks (micro-batches) before each step(), the same ones under no_sync()"
                )

        self._start_hook = self.ddp.register_forward_pre_hook(meet, with_kwargs=True, prepend=True)

    def _end_start_hook(self) -> None:
        if self._start_hook is not None:
            self._start_hook.remove()
            self._start_hook = None

    def end_of_pass(self, error: BaseException | None, step: int, passes: int) -> None:
        """Meet the other ranks at the end of a statistics step's ``opt.track`` block (the
        ``passes``-th of step ``step``) and raise on every rank when a rank's statistics pass
        failed (e.g. a layer it did not call): otherwise the others would wait for it in the
        step's collectives until the process group's timeout."""
        self._end_start_hook()  # a block that never called the DDP model: met here only
        failed = self._meet(_END_OF_PASS, step, passes, [float(error is not None)])[:, 0]
        if failed.any():
            coll.raise_failed(error, self.group, "curvlab.optim: the statistics pass")

    def _meet(self, where: int, step: int, passes: int, values: Sequence[float]) -> Tensor:
        """The ranks' ``values`` (``[R, len]``), after checking that every rank is at the same
        point of the same step.  A statistics step's meetings — the end of each ``track`` block,
        then ``step()`` — are all one ``all_gather`` of the same length, so that a rank with one
        block more meets the others' ``step()`` and every rank raises, instead of waiting in
        mismatched collectives until the process group's timeout."""
        row = [where, step, passes, *values, *(0.0,) * (_MEETING_WIDTH - 3 - len(values))]
        table = coll.all_gather_floats(row, self.device, self.group).cpu()
        points = [tuple(int(v) for v in r) for r in table[:, :3].tolist()]
        if len(set(points)) > 1:
            where_ranks = "; ".join(f"rank {r}: {_point(*p)}" for r, p in enumerate(points))
            raise RuntimeError(
                f"curvlab.optim: the ranks are out of step ({where_ranks}): every rank must take the same "
                "steps (e.g. resume from the same checkpoint) and run as many `with opt.track(loss_fn):` "
                "blocks (micro-batches) before each step()"
            )
        return table[:, 3:]

    def sampling_seed(self, step: int, micro_batch: int = 0) -> int:
        """The MC seed of this rank's statistics pass at ``step`` (of its ``micro_batch``-th pass
        of that step, counted from 0: micro-batches draw independently)."""
        seed = self.mc_seed + step * self.world_size + self.rank
        # torch's CPU generator keeps 32 bits of a seed; a tuple of ints hashes alike in every process
        return seed if micro_batch == 0 else hash((seed, micro_batch)) & 0xFFFFFFFF

    # ------------------------------------------------------------------ a step's statistics

    def synchronize(
        self, pending: Pending | None, params: Sequence[Tensor], finite: bool, local_loss: bool, step: int,
        statistics_step: bool,
    ) -> tuple[Pending | None, bool]:
        """Average the statistics (and, for a plain model, the gradients) over the ranks and
        agree whether the step is taken.

        Args:
            pending: this rank's statistics of the step (``None`` when it collected none).
            params: the parameters the step may update (the same list on every rank): their
                gradients, where they have one, are averaged in place when required.
            finite: whether this rank's loss, gradients and statistics are all finite.
            local_loss: whether the step's finiteness depends on a rank-local loss (the
                closure's), which needs agreeing even on steps without statistics.
            step: the optimizer's step count.
            statistics_step: whether the step collects statistics (due by the plan, the same on
                every rank, or ``pending`` given): then the ranks meet, also those without a
                ``track`` block.

        Returns:
            ``(pending, finite)``: the global batch's statistics and loss, and the agreed
            decision (the same on every rank).
        """
        agreed, changed = finite, False
        if statistics_step:
            pending, agreed = self._reduce_statistics(pending, finite, step)
            changed = pending is not None
        if self.average_gradients:
            agreed = self._average_gradients(params, agreed)
            changed = True
        elif pending is None and local_loss:
            flag = torch.tensor([0.0 if agreed else 1.0], device=self.device)
            agreed = bool(coll.all_reduce_one(flag, self.group).item() == 0)
        if agreed and changed:  # the averages are the same on every rank: so is this check
            agreed = all_finite([p.grad for p in params if p.grad is not None], None,
                                pending.losses if pending else (), ())
        return pending, agreed

    def _reduce_statistics(self, pending: Pending | None, finite: bool, step: int) -> tuple[Pending | None, bool]:
        if pending is None:  # no rank ran a track block (the meeting checks that): warned by step()
            self._meet(_STEP, step, 0, [])
            return None, finite
        results = pending.results
        ok = finite and bool(results) and bool(pending.losses)
        first = next(iter(results.values()), None)
        examples = first.num_examples if first is not None else 0
        terms = pending.loss_terms[-1] if pending.loss_terms else examples
        table = self._meet(_STEP, pending.step, pending.passes, [float(ok), examples, terms])
        if not bool(table[:, 0].all()):
            return dataclasses.replace(pending, results={}), False
        shards = Shards(
            rank=self.rank,
            examples=tuple(int(v) for v in table[:, 1].tolist()),
            loss_counts=tuple(int(v) for v in table[:, 2].tolist()),
            columns=(0,) * self.world_size,
            reduction=pending.reduction,
        )
        local = {name: dataclasses.replace(ls, grad=None) for name, ls in results.items()}
        stats, loss = reduce_statistics(local, pending.losses[-1], shards, self.group)
        reduced = dataclasses.replace(pending, results=stats, losses=[loss], loss_terms=[sum(shards.loss_counts)])
        return reduced, all_finite((), None, (), stats.values())

    def _average_gradients(self, params: Sequence[Tensor], finite: bool) -> bool:
        """Replace every gradient by its mean over the ranks, as DDP does: a rank on which a
        parameter has no gradient (a layer it did not call) adds zero, and gets the mean too —
        every rank sends every parameter's slot, so the ranks' sums line up whichever layers they
        used (the gradients of the ones present alone did not: averaged into other parameters' or
        a collective mismatch); a parameter no rank has a gradient for keeps none.  Returns the
        agreed finiteness."""
        dtype = params[0].dtype if params else torch.float64  # (a rank without gradients sends the same)
        present = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if finite else 1.0],
                               dtype=dtype, device=self.device)
        slots = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        *summed, counts = coll.all_reduce_sum([*slots, present], self.group)
        for p, s, count in zip(params, summed, counts.tolist()):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = s.div_(self.world_size)
            else:
                p.grad.copy_(s).div_(self.world_size)
        return bool(counts[-1].item() == 0)

    # ------------------------------------------------------------------ a refresh step

    def refresh(self, states: Sequence[CurvatureState], prepare: Callable[[KroneckerApproximation], object]) -> None:
        """``state.refresh()`` of every state in ``states`` (the same list on every rank), each
        run by one rank and broadcast to the others; ``prepare(built)`` runs on the owner (the
        eigen-decomposition the next step needs), so that what it caches is broadcast too
        instead of being recomputed on every rank."""
        if not states:
            return
        owners = assign_greedy([refresh_cost(s.layout) for s in states], self.world_size)
        built: dict[int, dict[str, Tensor]] = {}
        for i, state in enumerate(states):
            if owners[i] == self.rank:
                built[i] = _refreshed(state, prepare)
        layout = {i: [(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in parts.items()]
                  for i, parts in built.items()}
        layouts: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(layouts, layout, group=self.group)
        device = self.device
        for owner, entries in enumerate(layouts):
            if not entries:
                continue
            # the owner installs the broadcast copies too: every rank then computes with tensors of
            # the same memory layout (eigh's are column-major), hence bit-identical steps
            for i, parts in self._broadcast(owner, entries, built, device).items():
                _install(states[i], parts)

    def _broadcast(self, owner: int, entries: dict, built: dict, device: torch.device) -> dict[int, dict[str, Tensor]]:
        """``owner``'s refreshed tensors on every rank: one broadcast per dtype."""
        items = [(i, key, shape, dtype) for i, parts in sorted(entries.items()) for key, shape, dtype in parts]
        out: dict[int, dict[str, Tensor]] = {}
        for dtype_name in sorted({d for *_, d in items}):
            dtype = getattr(torch, dtype_name)
            chosen = [it for it in items if it[3] == dtype_name]
            sizes = [_numel(shape) for _, _, shape, _ in chosen]
            if owner == self.rank:
                flat = torch.cat([built[i][key].reshape(-1).to(device) for i, key, _, _ in chosen])
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            dist.broadcast(flat, src=coll.global_rank(self.group, owner), group=self.group)
            for (i, key, shape, _), part in zip(chosen, flat.split(sizes)):
                out.setdefault(i, {})[key] = part.view(shape).clone()  # own, aligned storage
        return out


DECOMPOSITION_PREFIX = "decomposition."


# where a rank is when the ranks meet on a statistics step (see RankSync._meet)
_END_OF_PASS, _STEP, _START_OF_PASS = 0, 1, 2
_MEETING_WIDTH = 6


def _point(where: int, step: int, passes: int) -> str:
    if where == _START_OF_PASS:
        return f"start of track block {passes} of step {step}"
    if where == _END_OF_PASS:
        return f"end of track block {passes} of step {step}"
    return f"step() of step {step} after {passes} track block{'s' if passes != 1 else ''}"


def _refreshed(state: CurvatureState, prepare: Callable[[KroneckerApproximation], object]) -> dict[str, Tensor]:
    """Refresh ``state``; return what the refresh replaced in ``state.tensors()`` and the built
    approximation's cached decomposition (prefixed ``decomposition.``)."""
    before = state.tensors()  # references keep the old tensors alive, so identity is meaningful
    state.refresh()
    out = {k: v for k, v in state.tensors().items() if before.get(k) is not v}
    built = state.build()
    if built is not None:
        prepare(built)
        out.update({DECOMPOSITION_PREFIX + k: v for k, v in built.decomposition().items()})
    return out


def _install(state: CurvatureState, parts: dict[str, Tensor]) -> None:
    """Put another rank's :func:`_refreshed` result into this rank's ``state``."""
    decomposition = {k[len(DECOMPOSITION_PREFIX):]: v for k, v in parts.items() if k.startswith(DECOMPOSITION_PREFIX)}
    state.load({k: v for k, v in parts.items() if not k.startswith(DECOMPOSITION_PREFIX)})
    built = state.build()
    if built is not None:
        built.adopt_decomposition(decomposition)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
