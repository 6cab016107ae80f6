"""The machinery every curvlab optimizer shares (:class:`KroneckerOptimizer`).

Each ``nn.Linear``/``nn.Conv1d/2d/3d``/``nn.ConvTranspose1d/2d/3d``/``nn.Embedding`` block ``W̄ = [W b]``
(:class:`curvlab.block.Block`) is preconditioned with the damped inverse of a
:mod:`curvlab.approx` object built from running averages of statistics the extraction computes
inside the user's own backward pass.  A method
says only which typed per-block state it keeps (:mod:`curvlab.optim.state`) and its default
damping.  A step (``k`` = :attr:`~KroneckerOptimizer.steps_done`, from 0)::

    opt.zero_grad()
    with opt.track(loss_fn):    # statistics steps only: the extraction, for this backward
        loss_fn(model(x), y).backward()
    opt.step()

``track`` asks for statistics when ``k % stats_interval == 0`` (or while a block has none), and
for EKFAC/TEKFAC for ``s* = Σ_k (U_outᵀ M_k U_in)²`` in the current basis when
``k % scale_interval == 0`` but ``k % eigen_interval != 0`` (a schedule with none such — ``scale_interval``
a multiple of ``eigen_interval`` — is warned about: it never rescales); otherwise it attaches nothing.
Several ``track`` blocks before one ``step()`` (micro-batches) give the statistics of their
concatenated batch (:func:`curvlab.optim.tracking.accumulated`).
``step()`` then, in this order:

1. skips the step (state untouched, one ``RuntimeWarning`` per streak) if a gradient, the loss or
   a statistic is not finite (a param group's non-finite or negative ``lr``, ``momentum`` or
   ``weight_decay`` is a ``ValueError``); a plain step (no statistics, nothing to refresh, one
   process) checks the blocks' gradients through their updates in 6, in the same reduction;
2. updates every block's state (running averages ``X ← β X + (1 − β) X_batch``; EKFAC/TEKFAC
   also ``s ← β s + (1 − β) s*``);
3. refreshes it when ``k % eigen_interval == 0`` (or nothing is built yet): KFAC/TKFAC rebuild
   the inverted object from the averaged factors, EKFAC/TEKFAC eigendecompose them (the one
   robust ``psd_eigh``, or a truncated eigenbasis for factors above ``truncate_above``) and reset
   ``s`` to the Kronecker eigenvalues in the new basis — in ``factor_dtype`` (float32 by default);
4. preconditions ``∇̃ = approx.inv_mat_mul(∇W̄, damping, damping_strategy)`` with exactly the
   object :meth:`~KroneckerOptimizer.approximations` returns (first order, warned once, while a
   block has no statistics); the object keeps its damped inverse (KFAC/TKFAC with Kronecker
   damping: the two damped factor inverses, two GEMMs a step; otherwise the eigenbasis, four).
   The same map is applied to ``∇W̄``'s weight and bias columns as they are
   (``inv_mat_mul_columns``), and the update, momentum included, stays in those column blocks;
5. KL-clips ``∇̃_b ← ν ∇̃_b``, ``ν = min(1, √(kl_clip / Σ_b lr_b² ⟨∇̃_b, ∇_b⟩))``;
6. adds weight decay ``u = ∇̃ + wd·W̄``, heavy-ball momentum ``m ← μ m + u`` and applies
   ``W̄ ← W̄ − lr·m`` — unless an update is not finite: then no parameter or momentum changes,
   the step is skipped with a warning naming it, and only this step's statistics are kept.

Under data parallelism (a ``DistributedDataParallel`` model, or a plain model and an initialised
process group) the statistics of 1 are averaged over the ranks first and the refreshes of 3 are
spread over them (:mod:`curvlab.optim.distributed`), so every rank takes one process's step on
the concatenated batch.

Every other parameter (layers the extraction only passes through; layers whose weight is frozen
or in no group) gets ``torch.optim.SGD``'s update.  A block's weight and bias columns of the
preconditioned update take their own parameter's param group (``lr``, ``momentum``,
``weight_decay``: e.g. no weight decay on biases); a trainable bias in no group is part of the
statistics but not updated.  The statistics are those
of the loss as the user computes it, of the flavour ``fisher`` (MC sampling draws from torch's
global RNG: save ``torch.get_rng_state()`` with :meth:`~KroneckerOptimizer.state_dict` for a
bit-identical resume).  Cost per ``d_out × D`` block: ``4 d_out D (d_out + D)`` flops a step for
the two rotations (half that in the inverse form; ``O(d_out D k)`` on a truncated side of rank
``k``); ``O(N T D²)`` a statistics step (on one process, a factor from fewer samples than its
width ``D`` keeps their rows, ``O(N T D)``, until the refresh folds them in: :mod:`curvlab.optim.state`);
one ``O(D³)`` eigh or Cholesky per factor a refresh (``O(D² k)`` truncated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.approx import DampingStrategy, KroneckerApproximation, KroneckerProduct, get_damping
from curvlab.block import Block
from curvlab.eager import eager_optimizer
from curvlab.extract import ExtractOptions
from curvlab.extract.autograd.backprop import allow_compiled_forwards
from curvlab.model_blocks import (
    KRONECKER_LAYERS,
    ModelBlocks,
    UnsupportedModelError,
    check_materialised,
    model_blocks,
)
from curvlab.optim.distributed import DataParallel, data_parallel, statistics_engine, unwrap
from curvlab.optim.options import GROUP_OPTIONS, KroneckerOptions, check_groups
from curvlab.optim.serialization import load_block_state, load_block_states, save_block_states
from curvlab.optim.state import BlockState, CurvatureState
from curvlab.optim.tracking import Pending, Plan, accumulated, plan_step, tracked_pass
from curvlab.optim.update import NOT_FINITE, BlockStep, all_finite, finiteness_terms, sgd_update_, update_blocks_

#: options that may be set on a running optimizer (``opt.kl_clip = 1e-2``), from its next step on
SETTABLE_OPTIONS = frozenset({"stat_decay", "stats_interval", "eigen_interval", "scale_interval", "kl_clip",
                              "mc_samples"})


def too_wide(module: nn.Module, options: KroneckerOptions) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` with more than ``truncate_above`` embeddings (and
    ``truncate_above`` set): its input factor, the diagonal of token frequencies, is a dense
    ``V × V`` matrix to curvlab's approximations, which would replace it by a truncated
    eigenbasis (a randomized range finder over ``V²`` entries: gigabytes for a word vocabulary,
    and the top token frequencies with the rest flat, not the diagonal).  Such a layer takes the
    first-order update; ``truncate_above=0`` (no factor truncated) preconditions it whole."""
    return isinstance(module, nn.Embedding) and 0 < options.truncate_above < module.num_embeddings


def _refuse_sparse_decay(walk: "StepWalk", who: str) -> None:
    """Raise before anything changes where a first-order parameter with a sparse gradient
    (``nn.Embedding(sparse=True)``) is in a group with weight decay: torch's SGD refuses it, and
    it raised after the blocks' updates were applied, leaving half a step."""
    for group, params in walk.first_order:
        if group["weight_decay"] != 0 and any(p.grad is not None and p.grad.is_sparse for p in params):
            raise ValueError(f"{who}: a parameter with a sparse gradient (nn.Embedding(sparse=True)) is in a param "
                             f"group with weight_decay={group['weight_decay']}, which torch's SGD update of it cannot "
                             "add; give it a group with weight_decay=0, or use a dense embedding")


def _gradients_left(walk: StepWalk) -> bool:
    """Whether a preconditioned parameter holds a gradient: ``None`` or zeros everywhere after a
    ``zero_grad`` (the model's or the optimizer's)."""
    grads = [p.grad for block, _, _ in walk.blocks for p in block.parameters() if p.grad is not None]
    return bool(grads) and bool(torch.stack([g.ne(0).any() for g in grads]).any())


class StepWalk(NamedTuple):
    """What a step visits: each preconditioned block with its state and the param groups of its
    parameters (weight, bias), and each param group with its first-order parameters (groups
    without any left out)."""

    blocks: list[tuple[Block, BlockState, list[dict[str, Any]]]]
    first_order: list[tuple[dict[str, Any], list[Tensor]]]


class KroneckerOptimizer(eager_optimizer(Optimizer)):  # (torch's, without importing torch._dynamo: curvlab.eager)
    """Base class of :class:`~curvlab.optim.KFAC`, :class:`~curvlab.optim.EKFAC`,
    :class:`~curvlab.optim.TKFAC` and :class:`~curvlab.optim.TEKFAC` (see the module docstring
    for the step, in order).

    Args:
        model: the network; its Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers are found by type.
        params: parameters or param groups (default ``model.parameters()``), as for any torch
            optimizer; ``lr``, ``momentum`` and ``weight_decay`` may be set per group.
        options: a :class:`~curvlab.optim.KroneckerOptions`; keyword arguments (``lr=0.1``,
            ``damping=1e-2``, …: its fields, with their defaults and meaning) override it.
        distributed: data parallelism over ``torch.distributed`` ranks
            (:mod:`curvlab.optim.distributed`): ``None`` detects it (a
            ``DistributedDataParallel`` model, or an initialised group of several ranks),
            ``False`` turns it off, ``True`` requires it, a
            :class:`~curvlab.optim.distributed.DataParallel` configures it.

    Attributes:
        options: the hyper-parameters (read-only; ``damping`` and ``damping_strategy`` are
            settable on the optimizer).
        steps_done: steps taken (skipped steps, and calls with no gradient at all, do not count).
        block_states: block name → :class:`BlockState` (curvature state and momentum).
    """

    #: Key of the method in :data:`curvlab.approx.DEFAULT_DAMPING`.
    method: ClassVar[str] = ""
    #: Whether its approximation carries TKFAC's trace split (needed by ``"nor"`` damping).
    trace_factored: ClassVar[bool] = False
    #: Whether the ``basis`` option applies (TEKFAC only).
    has_basis_option: ClassVar[bool] = False
    #: Whether it rescales ``s`` in its eigenbasis between refreshes (EKFAC, TEKFAC).
    rescales: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        options: KroneckerOptions | None = None,
        distributed: DataParallel | bool | None = None,
        **overrides: Any,
    ) -> None:
        who = type(self).__name__
        check_materialised(model, who)
        opts = self._options(options, overrides)
        if self.rescales and opts.scale_interval % opts.eigen_interval == 0:
            # every rescaling step refreshes, and a refresh resets s to the Kronecker eigenvalues
            warnings.warn(
                f"{who}: scale_interval={opts.scale_interval} is a multiple of eigen_interval={opts.eigen_interval}, "
                "so every rescaling step refreshes the eigenbasis, which resets s to the Kronecker eigenvalues: "
                "s is never rescaled and the step is the Kronecker baseline's in the eigenbasis; for the "
                "eigenvalue correction refresh less often than you rescale (eigen_interval > scale_interval, "
                "as the defaults 100 and 10)",
                UserWarning,
                stacklevel=2,
            )
        self._parallel = data_parallel(model, distributed, who)
        if self._parallel is not None:  # ranks taking different steps would diverge, or hang
            # (a plain model's collectives of other sizes would abort in gloo, not raise)
            structure = [(name, tuple(p.shape), p.requires_grad) for name, p in unwrap(model).named_parameters()]
            self._parallel.check_agree({"method": self.method, "options": dataclasses.asdict(opts), "parameters": structure},
                                       f"{who}: the ranks disagree on the method, its options or the model's "
                                       "parameters (names, shapes, which are trainable); construct the same "
                                       "model and optimizer on every rank")
        self._engine = statistics_engine(model, opts.engine, who)
        self.model = model = unwrap(model)  # blocks named as in one process
        self._blocks: list[Block] | None = None
        self._warned_unsupported: set[str] = set()
        self._trainable: list[bool] = []
        self._tracked = ModelBlocks()  # the preconditioned layers, for the statistics pass
        self._group_of: dict[Tensor, dict[str, Any]] = {}
        self._walk: StepWalk | None = None
        self.options = opts
        super().__init__(
            model.parameters() if params is None else params,
            {name: getattr(opts, name) for name in GROUP_OPTIONS},
        )
        self.steps_done = 0
        self.block_states: dict[str, BlockState] = {}
        self._dormant: dict[str, dict[str, Any]] = {}  # saved states of layers frozen at loading
        self._uncalled: set[str] = set()  # blocks whose layer the last statistics pass did not call
        self._pending: Pending | None = None
        self._warned_first_order = False
        self._skip_streak = 0  # consecutive skipped steps
        self._inside_track = False
        self._warned_untracked = False
        # on a statistics step, from a track block's end to the next one or step(): hooks that see
        # a backward outside the blocks (its gradient in the step, its examples not in the statistics)
        self._watching: list[torch.utils.hooks.RemovableHandle] = []
        self._outside: str | None = None
        self._warned_outside = False

    # ------------------------------------------------------------------ options

    def __getattr__(self, name: str) -> Any:
        # stat_decay, stats_interval, eigen_interval, scale_interval, kl_clip, fisher, ...
        options = self.__dict__.get("options")
        if options is not None and name in GROUP_OPTIONS:  # in use: the param groups' (a scheduler's)
            values = {group[name] for group in self.param_groups}
            if len(values) == 1:
                return values.pop()
            raise AttributeError(f"{type(self).__name__}: the param groups have different {name} values "
                                 f"{sorted(values)}; read opt.param_groups[i][{name!r}]")
        if options is not None and name in KroneckerOptions.__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """An option set on the optimizer takes effect, checked as the constructor checks it: ``lr``,
        ``momentum`` and ``weight_decay`` in every param group, the schedule's options
        (:data:`SETTABLE_OPTIONS`) from the next step; the others shape the state and are refused
        (they were taken, and ignored)."""
        if name not in KroneckerOptions.__dataclass_fields__ or isinstance(getattr(type(self), name, None), property):
            return super().__setattr__(name, value)
        checked = self._options(self.options, {name: value})
        if name in GROUP_OPTIONS:
            for group in self.param_groups:
                group[name] = getattr(checked, name)
        elif name in SETTABLE_OPTIONS:
            self.options = checked
        else:
            raise AttributeError(f"{type(self).__name__}: {name} is fixed when the optimizer is built (its "
                                 "statistics and state depend on it); build a new optimizer")

    @property
    def damping(self) -> float:
        """``λ`` passed to ``inv_mat_mul`` (one value for all blocks; settable)."""
        return self.options.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.options = self._options(self.options, {"damping": value})

    @property
    def damping_strategy(self) -> str | DampingStrategy:
        """The damping strategy ``inv_mat_mul`` is called with (a name or a strategy object)."""
        return self.options.damping_strategy

    @damping_strategy.setter
    def damping_strategy(self, strategy: str | DampingStrategy) -> None:
        self.options = self._options(self.options, {"damping_strategy": strategy})

    def _options(self, options: KroneckerOptions | None, overrides: dict[str, Any]) -> KroneckerOptions:
        """``options`` with ``overrides``, checked for this method (as the constructor and the
        setters take them)."""
        try:
            return KroneckerOptions.make(options, overrides).for_method(
                self.method, trace_factored=self.trace_factored, has_basis=self.has_basis_option
            )
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("curvlab.optim", type(self).__name__)) from None

    # ------------------------------------------------------------------ what methods define

    def new_state(self, block: Block) -> CurvatureState:
        """The empty curvature state this method keeps for ``block``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ blocks

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102 (torch's)
        super().add_param_group(param_group)
        try:  # refused here, as torch's optimizers do, rather than at the first step
            check_groups(self.param_groups, type(self).__name__)
        except ValueError:
            self.param_groups.pop()  # and not kept: the optimizer stays as it was
            raise
        self._blocks = None

    def blocks(self) -> list[Block]:
        """The preconditioned blocks: Linear/Conv1d/2d/3d/ConvTranspose1d/2d/3d layers and
        Embeddings within ``truncate_above`` (:func:`too_wide`), as found by
        :func:`curvlab.model_blocks.model_blocks`, whose trainable weight is in a group — found
        again when a parameter of a group is frozen or unfrozen."""
        trainable = [p.requires_grad for g in self.param_groups for p in g["params"]]
        if self._blocks is None or trainable != self._trainable:
            self._trainable = trainable
            self._group_of = {p: g for g in self.param_groups for p in g["params"]}
            try:
                found = model_blocks(self.model, skip_unsupported=True)
            except UnsupportedModelError:  # nothing curvlab supports: every update is first order
                found = ModelBlocks(skipped=[n for n, p in self.model.named_parameters() if p.requires_grad])
            self._tracked, self._too_wide = ModelBlocks(), []
            for module, path in found.layers.items():
                if too_wide(module, self.options):
                    names = (name for name, _ in module.named_parameters(recurse=False))
                    self._too_wide += [f"{path}.{name}" if path else name for name in names]
                elif module.weight in self._group_of:
                    blocks = found.of_layer[module]
                    self._tracked.layers[module], self._tracked.of_layer[module] = path, blocks
                    self._tracked.blocks.extend(blocks)
            self._blocks = list(self._tracked.blocks)
            self._block_params = {p for b in self._blocks for p in b.parameters()}
            # a trainable bias in no group: part of its block's statistics, never updated
            self._ungrouped = frozenset(p for p in self._block_params if p not in self._group_of)
            self._walk = None
            self._warn_first_order(found)
        return self._blocks

    def _warn_first_order(self, found: ModelBlocks) -> None:
        """Warn once per parameter that gets the first-order update for want of a Kronecker block,
        grouped by why (:class:`~curvlab.model_blocks.ModelBlocks` lists each kind); norm layers'
        first-order update is documented, not warned about (every ResNet has them)."""
        why = {
            "of modules without a Kronecker structure curvlab preconditions (a grouped or depthwise "
            "convolution, an LSTM, a weight-normalised layer)": found.unstructured,
            "shared by several modules": found.tied,
            "the bias of a layer whose weight is frozen (requires_grad=False) or shared": found.lone_biases,
            "of nn.MultiheadAttention, which applies its projections in torch's functional attention "
            "(curvlab.kronecker_attention(model), before building the optimizer, makes them nn.Linear modules, "
            "preconditioned)":
                found.packed + found.enclosed,
            "of the model's own modules, used in their own forward (a cls token, a position embedding, a weight "
            "passed to F.linear or F.conv2d: an nn.Linear or nn.Conv2d module is preconditioned)": found.own,
            "left out as unsupported": found.skipped,
            f"of nn.Embedding layers with more than truncate_above={self.options.truncate_above} embeddings "
            "(their input factor would be a dense V × V matrix, truncated; truncate_above=0 preconditions them "
            "whole)": self._too_wide,
        }
        updated = {n for n, p in self.model.named_parameters() if p in self._group_of}  # (this optimizer's)
        # a param group's tensors outside the model (a loss's temperature; or another model's, by mistake)
        mine = set(self.model.parameters())
        why["not parameters of the model the optimizer was given (another module's, e.g. a loss's; or another "
            "model's, by mistake)"] = foreign = [
            f"param group {i}: tensor {j} {tuple(p.shape)}" for i, g in enumerate(self.param_groups)
            for j, p in enumerate(g["params"]) if p not in mine and p.requires_grad]
        updated.update(foreign)
        parts, new = [], []
        for reason, names in why.items():
            names = [n for n in dict.fromkeys(names)
                     if n in updated and n not in self._warned_unsupported and n not in new]
            if names:
                parts.append(f"{reason}: {names}")
                new += names
        if parts:
            warnings.warn(
                f"{type(self).__name__}: {len(new)} parameter(s) have no Kronecker block and get the first-order "
                f"(SGD) update, as norm layers' affine parameters do — {'; '.join(parts)} (see curvlab.model_blocks)",
                UserWarning,
                stacklevel=4,
            )
            self._warned_unsupported.update(new)

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps defaults, state and param groups only: a copy without model, options or
        # curvature state that failed at its first step
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it holds its model and its statistics "
            "hooks; save opt.state_dict() and load it into an optimizer built on the (copied) model"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with ``set_to_none`` (the default) without its profiler range
        and its dynamo guard, a share of a small model's step.  It also drops statistics that no
        ``step()`` used (a step a GradScaler skipped): micro-batches accumulate between a
        ``zero_grad()`` and a ``step()``, as their gradients do."""
        self._pending = None
        self._stop_watching()
        self._outside = None
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _step_walk(self) -> StepWalk:
        """What every step walks, gathered once per :meth:`blocks` (a step's Python bookkeeping
        is a visible share of a small model's step): each block with its state and param group,
        and each group's first-order parameters."""
        blocks = self.blocks()
        if self._walk is None:
            # a bias in no group (never updated) is given its weight's
            per_block = [(b, self._state(b), [self._group_of.get(p, self._group_of[b.weight]) for p in b.parameters()])
                         for b in blocks]
            first_order = [(g, params) for g in self.param_groups
                           if (params := [p for p in g["params"] if p not in self._block_params])]
            self._walk = StepWalk(per_block, first_order)
        return self._walk

    def _update_blocks(self, walk: StepWalk, also_check: list[Tensor]) -> str | None:
        steps = []
        for b, state, groups in walk.blocks:
            grad = b.grad_columns()
            if grad is not None:
                steps.append(BlockStep(b, grad, state.curvature.build(), state, groups))
        first_order = [] if self._warned_first_order else [s.block.name for s in steps if s.approximation is None]
        if first_order:
            warnings.warn(
                f"{type(self).__name__}: no curvature statistics yet for {first_order}; using the "
                "first-order (SGD) update until statistics exist — call the forward and backward "
                "inside `with opt.track(loss_fn):` (a layer not called on the statistics steps, or "
                "whose output reaches only another loss, keeps this update)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_first_order = True
        return update_blocks_(steps, self.options.damping, self.options.damping_strategy, self.options.kl_clip,
                              self._ungrouped, also_check)

    def _decompose(self, built: KroneckerApproximation) -> None:
        """Compute the eigendecomposition the next step's damped inverse of ``built`` will need
        (KFAC/TKFAC under a damping that is not a Kronecker product; nothing otherwise), so that a
        data-parallel refresh broadcasts it instead of every rank recomputing it."""
        strategy = get_damping(self.options.damping_strategy)
        if isinstance(built, KroneckerProduct) and strategy.kronecker_shifts(built, self.options.damping) is None:
            built.eigenbasis(compressed=True)  # cached by the object

    def _state(self, block: Block) -> BlockState:
        state = self.block_states.get(block.name)
        # another layer at the block's path (a replaced head): its own state, as torch's optimizers
        # give a new parameter
        replaced = state is not None and not state.belongs_to(block.weight)
        # a new block, or one whose bias was frozen or unfrozen (its matrix form changed): its
        # statistics and momentum start afresh
        if state is None or replaced or state.curvature.layout != block.layout:
            state = self.block_states[block.name] = self._new_state(block)
            entry = self._dormant.pop(block.name, None)
            if entry is not None and not replaced:  # a layer frozen when its state was loaded, trainable again
                try:
                    load_block_state(state, entry, block.weight.device, f"{type(self).__name__}: block {block.name!r}")
                except ValueError:  # its bias frozen or unfrozen since: afresh, as the rule above
                    state = self.block_states[block.name] = self._new_state(block)
        return state

    def _new_state(self, block: Block) -> BlockState:
        """A fresh state of ``block``, its weight's."""
        return BlockState(self.new_state(block), owner=block.weight)

    def _not_preconditioned(self) -> set[str]:
        """Paths of the model's Kronecker-type layers that have no block now (frozen, in no group, or
        an embedding above ``truncate_above``)."""
        current = {b.name for b in self.blocks()}
        return {path for path, m in self.model.named_modules() if isinstance(m, KRONECKER_LAYERS)} - current

    # ------------------------------------------------------------------ statistics

    def _due(self, interval: int) -> bool:
        return self.steps_done % interval == 0

    @contextlib.contextmanager
    def track(self, loss_fn: nn.Module) -> Iterator[None]:
        """Context for this step's forward and backward pass with ``loss_fn``: on a statistics
        step the extraction is attached for the block only and its statistics kept for
        :meth:`step` (a non-finite loss fails the statistics pass: warned, and the step is
        skipped); on every other step it does nothing (no hooks).  :meth:`step` comes after the
        block, which hands it the statistics when it ends."""
        with self._tracked_step(loss_fn):
            self._inside_track = True
            try:
                yield
            finally:
                self._inside_track = False

    @contextlib.contextmanager
    def _tracked_step(self, loss_fn: nn.Module) -> Iterator[None]:
        if self._engine != "backpack":  # also steps without statistics: a compiled model's first call
            allow_compiled_forwards()
        walk = self._step_walk()
        plan = self._plan(walk)
        # an earlier pass of this step (micro-batches before one step()): accumulated below, while
        # its gradients are (a model.zero_grad() after a step a GradScaler skipped drops them)
        earlier = self._pending if self._pending is not None and self._pending.step == self.steps_done else None
        if earlier is not None and not _gradients_left(walk):
            earlier = None
        self._pending = None
        if not plan.statistics:
            yield
            return
        self._stop_watching()  # (this block's own backward is tracked)
        if earlier is None and not self._warned_outside and _gradients_left(walk):
            self._outside = ("held gradients before its first `with opt.track(loss_fn):` block (a backward outside "
                             "one, or no zero_grad() after the last step: call it before each step's first block)")
        micro_batch = earlier.passes if earlier is not None else 0
        seed = (self._parallel.sampling_seed(self.steps_done, micro_batch)
                if self._parallel and self.options.fisher == "mc" else None)
        opts = ExtractOptions(fisher=self.options.fisher, mc_samples=self.options.mc_samples, seed=seed,
                              stats=plan.statistics, eigenbases=plan.eigenbases, skip_unsupported=True,
                              engine=self._engine, kfac_approx=self.options.kfac_approx,
                              non_finite="propagate",  # a non-finite batch: NaN statistics, the step skipped
                              gram_rows=self._parallel is None)  # the ranks average matrices
        # a layer this forward does not call (a branch used on other steps) keeps its statistics
        # and, without a gradient, its parameters, as torch's optimizers leave them — on one
        # process (the ranks average the same blocks' statistics)
        block_done = False
        if self._parallel is not None:
            self._parallel.start_of_pass(self.steps_done, micro_batch + 1)
        try:
            with tracked_pass(self.model, loss_fn, opts, self._tracked, self.steps_done, who=type(self).__name__,
                              quiet=bool(self._skip_streak), skip_uncalled=self._parallel is None) as pending:
                yield
                block_done = True
        except Exception as exc:
            # the user's block ran through on this rank and the statistics pass failed: every
            # rank raises (an error inside the block is the user's, and raises as it would)
            if self._parallel is None or not block_done:
                raise
            self._parallel.end_of_pass(exc, self.steps_done, micro_batch + 1)
        if self._parallel is not None:
            self._parallel.end_of_pass(None, self.steps_done, micro_batch + 1)
        self._pending = pending if earlier is None else accumulated(earlier, pending)
        if self._pending.results:  # a layer never called would otherwise make every step a statistics step
            self._uncalled = {b.name for b, _, _ in walk.blocks} - set(self._pending.results)
        if not self._warned_outside:
            self._watch_gradients(walk)

    def _watch_gradients(self, walk: StepWalk) -> None:
        """Until the next track block or :meth:`step`: note a backward that accumulates into a
        preconditioned parameter's gradient (one Python call per parameter and backward, on
        statistics steps only)."""
        def seen(_: Tensor) -> None:
            self._outside = ("accumulated a backward pass outside `with opt.track(loss_fn):` into its gradients "
                             "(run each micro-batch's forward and backward inside its own track block)")
        self._watching = [p.register_post_accumulate_grad_hook(seen)
                          for block, _, _ in walk.blocks for p in block.parameters() if p.requires_grad]

    def _stop_watching(self) -> None:
        for handle in self._watching:
            handle.remove()
        self._watching = []

    def _warn_outside(self) -> None:
        """Once: a statistics step whose gradient holds examples its statistics do not."""
        if self._outside is not None and not self._warned_outside:
            warnings.warn(
                f"{type(self).__name__}: step {self.steps_done}, a statistics step, {self._outside}: those "
                "examples are in the step's gradient but not in its curvature statistics (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_outside = True
        self._outside = None

    # ------------------------------------------------------------------ the preconditioner

    def approximations(self) -> dict[str, KroneckerApproximation]:
        """Block name → the ``curvlab.approx`` object a :meth:`step` taken now inverts with
        ``inv_mat_mul(grad, self.damping, self.damping_strategy)`` (blocks with statistics only).

        This is exactly what the next step inverts unless that step brings new statistics that
        change it (a refresh step, or a rescaling step of EKFAC/TEKFAC): call it after
        :meth:`step` to see what the following step will use.  The objects are never modified
        in place by later steps.
        """
        built = {b.name: self._state(b).curvature.build() for b in self.blocks()}
        return {name: approx for name, approx in built.items() if approx is not None}

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step (order in the module docstring).

        Args:
            closure: optional; re-evaluates the model and returns the loss (it may use
                :meth:`track` itself).

        Returns:
            The closure's loss, if any.
        """
        if self._inside_track:  # its statistics, taken when the block ends, would be another step's
            raise RuntimeError(f"{type(self).__name__}.step() was called inside `with opt.track(loss_fn):`; "
                               "call it after the block")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_groups(self.param_groups, type(self).__name__)
        self._stop_watching()
        self._warn_outside()
        pending, self._pending = self._pending, None
        if pending is not None and pending.step != self.steps_done:
            pending = None  # recorded for a different step: stale
        if pending is None and self._parallel is None and all(
                p.grad is None for g in self.param_groups for p in g["params"]):
            return loss  # nothing to update, as torch's optimizers skip parameters without a gradient;
            # not a step: counted, it would move the statistics and refresh schedule
        # A plain step (no statistics, nothing to refresh, one process) checks the gradients of
        # the blocks through their updates: the damped inverse is positive definite, so a
        # non-finite gradient entry makes its preconditioned update non-finite.
        walk = self._step_walk()
        _refuse_sparse_decay(walk, type(self).__name__)
        if pending is None and not self._warned_untracked and self._due(self.options.stats_interval) and any(
                state.curvature.has_statistics for _, state, _ in walk.blocks):
            warnings.warn(
                f"{type(self).__name__}: step {self.steps_done} was due for curvature statistics, but no "
                "`with opt.track(loss_fn):` block ran its forward and backward; the earlier statistics are "
                "kept (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_untracked = True
        plain = pending is None and self._parallel is None and not self._stale(walk)
        if plain:
            first_order = [p.grad for _, params in walk.first_order for p in params if p.grad is not None]
            also_check = finiteness_terms(first_order, loss)
            if also_check is None:
                return self._skip("non-finite loss", "the optimizer state left unchanged", loss)
        else:
            also_check = []
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            finite = all_finite(grads, loss, pending.losses if pending else (), pending.results.values() if pending else ())
            if self._parallel is not None:  # statistics (and a plain model's gradients) averaged over the ranks
                params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
                statistics_step = pending is not None or bool(self._plan(walk).statistics)
                pending, finite = self._parallel.synchronize(pending, params, finite, local_loss=loss is not None,
                                                             step=self.steps_done, statistics_step=statistics_step)
            if not finite:
                return self._skip("non-finite loss, gradient or statistic", "the optimizer state left unchanged", loss)
            for b, state, _ in walk.blocks:
                stats = pending.results.get(b.name) if pending is not None else None
                if stats is not None:
                    state.curvature.update(stats, self.options.stat_decay)
            stale = self._stale(walk)
            if self._parallel is not None:  # each rank decomposes its share, then they swap them
                self._parallel.refresh(stale, self._decompose)
            else:
                for curvature in stale:
                    curvature.refresh()
        refused = self._update_blocks(walk, also_check)
        if refused is not None:
            if refused == NOT_FINITE:
                refused = (f"non-finite update{' (or gradient, or loss)' if plain else ''} "
                           f"(lr={', '.join(format(g['lr'], 'g') for g in self.param_groups)}, "
                           f"damping={self.options.damping:g})")
            return self._skip(refused, "no parameter changed" + ("" if plain else "; the step's statistics are kept"),
                              loss)
        self._skip_streak = 0
        for group, params in walk.first_order:
            sgd_update_(params, group, self.state)
        self.steps_done += 1
        return loss

    def _plan(self, walk: StepWalk) -> Plan:
        """What this step's statistics pass computes (the same on every rank)."""
        return plan_step({b.name: state.curvature for b, state, _ in walk.blocks}, self.steps_done, self.options,
                         self._uncalled)

    def _stale(self, walk: StepWalk) -> list[CurvatureState]:
        """The curvature states this step refreshes: all with statistics every
        ``eigen_interval`` steps, otherwise those with statistics and nothing built yet."""
        due = self._due(self.options.eigen_interval)
        states = (state.curvature for _, state, _ in walk.blocks)
        return [c for c in states if c.has_statistics and (due or c.build() is None)]

    def _skip(self, what: str, kept: str, loss: Any) -> Any:
        if not self._skip_streak:  # once per run of skips: a diverged model skips every step
            warnings.warn(
                f"{type(self).__name__}: {what} at step {self.steps_done}; the step is skipped and {kept}",
                RuntimeWarning,
                stacklevel=3,
            )
        self._skip_streak += 1
        return loss

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (first-order momentum buffers, param groups) plus ``"curvlab"``:
        the step counter, the damping and every block's typed state as named tensors."""
        sd = super().state_dict()
        sd["curvlab"] = {
            "steps_done": self.steps_done,
            "damping": self.options.damping,
            "blocks": {**self._dormant, **save_block_states(self.block_states)},
            "uncalled": sorted(self._uncalled),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; also reads the per-parameter layout curvlab 0.1 wrote.

        As torch's optimizers take the groups' ``lr``, ``momentum`` and ``weight_decay`` from the
        state, this takes ``damping`` (which may change during training) from it; the other
        options stay the constructor's."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None) or {}
        self._blocks = None
        fresh = {b.name: self._new_state(b) for b in self.blocks()}
        state_dict["state"], dormant = load_block_states(
            fresh, extra.get("blocks"), state_dict.get("state", {}), self, self._not_preconditioned()
        )
        super().load_state_dict(state_dict)
        self._blocks = None  # torch replaced the param group dicts
        self.block_states, self._dormant = fresh, dict(dormant)
        self._uncalled = set(extra.get("uncalled", ()))
        if "steps_done" in extra:
            self.steps_done = int(extra["steps_done"])
            self.damping = extra["damping"]
        self._pending = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(blocks={[b.name for b in self.blocks()]}, groups={len(self.param_groups)}, {self.options})"

