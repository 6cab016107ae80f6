"""The machinery every curvlab optimizer shares (:class:`KroneckerOptimizer`).

The optimizers precondition each ``nn.Linear``/``nn.Conv2d`` block ``W̄ = [W b]``
(:class:`curvlab.block.Block`) with the damped inverse of a :mod:`curvlab.approx` object built
from running averages of statistics that the extraction computes inside the user's own backward
pass.  A method says only which typed per-block state it keeps (:mod:`curvlab.optim.state`: what
it averages and which ``curvlab.approx`` constructor turns the averages into the object whose
``inv_mat_mul`` preconditions the gradient) and its default damping.

One training step (``k`` = :attr:`KroneckerOptimizer.steps_done`, counted from 0)::

    opt.zero_grad()
    with opt.track(loss_fn):           # stats step: BackPACK hooks for this backward only
        loss = loss_fn(model(x), y)
        loss.backward()
    opt.step()

``track`` asks for statistics when ``k % stats_interval == 0`` (or while a block has none yet) and,
for the eigenvalue-corrected methods, for the rescaling ``s*`` in the current eigenbasis when
``k % scale_interval == 0`` and ``k % eigen_interval != 0``; on every other step it is a no-op
that registers no hook at all.  ``step()`` then does, in this order:

1. **Finiteness check.**  If any gradient, the loss seen by ``track`` or returned by the closure,
   or a statistic computed in this step is not finite, the step is skipped with a
   ``RuntimeWarning`` (once per streak of skips): parameters, running averages, bases,
   momentum buffers and the step counter stay exactly as they were.
2. **State update** of every block with this step's statistics (``state.update``: running
   averages ``X ← β X + (1 − β) X_batch``, ``β = stat_decay``, and for EKFAC/TEKFAC the
   rescaling ``s ← β s + (1 − β) s*``).
3. **Eigen refresh** (``k % eigen_interval == 0``, or a block with statistics but nothing built
   yet): ``state.refresh()`` — the eigen-decompositions of the averaged factors (float64, the one
   robust ``psd_eigh``).  KFAC/TKFAC: the inverted object is rebuilt from the averages (Martens &
   Grosse's inverse interval).  EKFAC/TEKFAC: the eigenbasis is replaced and ``s`` reset to the
   Kronecker eigenvalues in it.
4. **Preconditioning** of every block: ``∇̃ = approx.inv_mat_mul(∇W̄, damping, damping_strategy)``
   where ``approx`` is exactly what :meth:`KroneckerOptimizer.approximations` returns (its damped
   eigenvalues are cached until it changes).  A block without statistics yet uses ``∇̃ = ∇W̄``
   (first-order; warned once).
5. **KL clipping** (``kl_clip`` not ``None``): ``ν = min(1, √(kl_clip / Σ_b lr_b² ⟨∇̃_b, ∇_b⟩))``
   over the preconditioned blocks (``lr_b`` the block's group lr), ``∇̃_b ← ν ∇̃_b``.
6. **Weight decay** ``u_b = ∇̃_b + wd · W̄_b``, **momentum** (heavy ball, torch's SGD
   convention) ``m_b ← μ m_b + u_b``, **update** ``W̄_b ← W̄_b − lr · m_b``.

Every parameter outside a preconditioned block (layers BackPACK only passes through, e.g. an
eval-mode ``nn.BatchNorm1d``; Linear/Conv2d layers whose weight is frozen or in no param group)
gets the first-order update of ``torch.optim.SGD`` with its group's lr, momentum and weight
decay.  A layer is preconditioned iff its weight is in a param group; the whole block then uses
the weight's group; a trainable bias in no group is part of the statistics but not updated.

Scale: the statistics are those of the loss exactly as the user computes it (a mean reduction
gives the Fisher of the mean loss), of the flavour ``fisher`` (``"mc"`` by default; MC sampling
draws from torch's global RNG, so saving ``torch.get_rng_state()`` with :meth:`state_dict` makes
a resumed run bit-identical on CPU).

Cost, per block with ``W̄ ∈ R^{d_out × D}`` and a batch of N examples (T output locations):
every step two rotations, ``4 d_out D (d_out + D)`` flops (``inv_mat_mul``); a statistics
step in addition ``O(N T D²)`` for ``δΦ`` and the KFE rotation of the inputs (inside the
extraction); a refresh one ``eigh`` of each factor, ``O(D³)`` in float64.  On CPU, a model whose
softmax saturates makes the float32 statistics underflow into subnormal numbers, an order of
magnitude slower; ``torch.set_flush_denormal(True)`` avoids that.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.approx import DEFAULT_DAMPING, DampingStrategy, KroneckerApproximation
from curvlab.block import Block
from curvlab.extract import ExtractOptions
from curvlab.optim.damping_cache import CachedDamping
from curvlab.optim.options import KroneckerOptions
from curvlab.optim.serialization import load_block_states, save_block_states
from curvlab.optim.state import CurvatureState, Eigenbasis
from curvlab.optim.tracking import Pending, Plan, tracked_pass
from curvlab.optim.update import all_finite, kl_clip_factor, momentum_direction, sgd_update_

#: Layer types whose parameters form Kronecker-factored blocks.
PRECONDITIONED_LAYERS = (nn.Linear, nn.Conv2d)


class KroneckerOptimizer(Optimizer):
    """Base class of :class:`~curvlab.optim.KFAC`, :class:`~curvlab.optim.EKFAC`,
    :class:`~curvlab.optim.TKFAC` and :class:`~curvlab.optim.TEKFAC` (see the module docstring
    for the step, in order).

    Args:
        model: the network; its Linear/Conv2d layers are found by type.
        params: parameters or param groups (default ``model.parameters()``), as for any torch
            optimizer; ``lr``, ``momentum`` and ``weight_decay`` may be set per group.
        options: a :class:`~curvlab.optim.KroneckerOptions`; keyword arguments (``lr=0.1``,
            ``damping=1e-2``, …: its fields, with their defaults and meaning) override it.

    Attributes:
        options: the hyper-parameters (read-only; ``damping`` and ``damping_strategy`` are
            settable on the optimizer).
        steps_done: steps taken (skipped steps do not count).
        block_states: block name → :class:`BlockState` (curvature state and momentum).
    """

    #: Key of the method in :data:`curvlab.approx.DEFAULT_DAMPING`.
    method: ClassVar[str] = ""
    #: Whether its approximation carries TKFAC's trace split (needed by ``"nor"`` damping).
    trace_factored: ClassVar[bool] = False
    #: Whether the ``basis`` option applies (TEKFAC only).
    has_basis_option: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        options: KroneckerOptions | None = None,
        **overrides: Any,
    ) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
        try:
            opts = KroneckerOptions.make(options, overrides)
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("curvlab.optim", who)) from None
        if opts.basis != "trace" and not self.has_basis_option:
            raise ValueError(f"{who}: basis={opts.basis!r} applies to TEKFAC only")
        if opts.damping_strategy is None:
            opts = KroneckerOptions.make(opts, {"damping_strategy": DEFAULT_DAMPING[self.method]})
        if opts.damping_strategy == "nor" and not self.trace_factored:
            raise ValueError(
                f"{who}: damping_strategy='nor' (TKFAC's damping) needs the trace split of "
                "TKFAC/TEKFAC; use 'factored', 'exact' or 'trace-relative'"
            )
        self.model = model
        self._blocks: list[Block] | None = None
        self.options = opts
        super().__init__(
            model.parameters() if params is None else params,
            dict(lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay),
        )
        self._damping_cache = CachedDamping(opts.damping_strategy)
        self.steps_done = 0
        self.block_states: dict[str, BlockState] = {}
        self._pending: Pending | None = None
        self._warned_first_order = False
        self._skip_streak = 0  # consecutive skipped steps

    # ------------------------------------------------------------------ options

    def __getattr__(self, name: str) -> Any:
        # stat_decay, stats_interval, eigen_interval, scale_interval, kl_clip, fisher, ...
        options = self.__dict__.get("options")
        if options is not None and name in KroneckerOptions.__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def damping(self) -> float:
        """``λ`` passed to ``inv_mat_mul`` (one value for all blocks; settable)."""
        return self.options.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.options = KroneckerOptions.make(self.options, {"damping": value})

    @property
    def damping_strategy(self) -> str | DampingStrategy:
        """The damping strategy ``inv_mat_mul`` is called with (a name or a strategy object)."""
        return self.options.damping_strategy

    @damping_strategy.setter
    def damping_strategy(self, strategy: str | DampingStrategy) -> None:
        self.options = KroneckerOptions.make(self.options, {"damping_strategy": strategy})
        self._damping_cache = CachedDamping(strategy)

    # ------------------------------------------------------------------ what methods define

    def new_state(self, block: Block) -> CurvatureState:
        """The empty curvature state this method keeps for ``block``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ blocks

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102 (torch's)
        super().add_param_group(param_group)
        self._blocks = None

    def blocks(self) -> list[Block]:
        """The preconditioned blocks: Linear/Conv2d layers whose trainable weight is in a group."""
        if self._blocks is None:
            grouped = {p for g in self.param_groups for p in g["params"]}
            self._blocks = [
                Block.of_layer(name, module)[0]
                for name, module in self.model.named_modules()
                if isinstance(module, PRECONDITIONED_LAYERS) and module.weight.requires_grad and module.weight in grouped
            ]
        return self._blocks

    def _group(self, param: Tensor) -> dict[str, Any] | None:
        return next((g for g in self.param_groups if any(p is param for p in g["params"])), None)

    def _state(self, block: Block) -> "BlockState":
        state = self.block_states.get(block.name)
        if state is None:
            state = self.block_states[block.name] = BlockState(self.new_state(block))
        return state

    # ------------------------------------------------------------------ statistics

    def _due(self, interval: int) -> bool:
        return self.steps_done % interval == 0

    def _plan(self) -> Plan:
        """What the backward of the current step must compute."""
        plan = Plan()
        states = [self._state(b).curvature for b in self.blocks()]
        if self._due(self.options.stats_interval) or any(not s.has_statistics for s in states):
            for s in states:
                plan.statistics.update(s.statistics)
        if self._due(self.options.scale_interval) and not self._due(self.options.eigen_interval):
            for b, s in zip(self.blocks(), states):
                basis = s.eigenbasis() if isinstance(s, Eigenbasis) else None
                if basis is not None:
                    plan.eigenbases[b.name] = basis
            if plan.eigenbases:
                plan.statistics.add("kfe")
        return plan

    @contextlib.contextmanager
    def track(self, loss_fn: nn.Module) -> Iterator[None]:
        """Context for this step's forward and backward pass.

        On a statistics step, curvlab's BackPACK extension is attached to the model for the
        ``with`` block only and the statistics of the one ``loss.backward()`` in it are kept for
        the next :meth:`step`; the loss value is recorded for the finiteness check.  On every
        other step it does nothing (no hooks).  If the loss of a statistics step is not finite,
        the statistics pass fails inside ``backward()``: that error is suppressed (warned; the
        rest of the block does not run) and the next :meth:`step` is skipped.

        Args:
            loss_fn: the loss module used in the block (``nn.CrossEntropyLoss``/``nn.MSELoss``).
        """
        plan = self._plan()
        self._pending = None
        if not plan.statistics:
            yield
            return
        opts = ExtractOptions(fisher=self.options.fisher, mc_samples=self.options.mc_samples,
                              stats=plan.statistics, eigenbases=plan.eigenbases, skip_unsupported=True)
        with tracked_pass(self.model, loss_fn, opts, self.steps_done, who=type(self).__name__,
                          quiet=bool(self._skip_streak)) as pending:
            yield
        self._pending = pending

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending, self._pending = self._pending, None
        if pending is not None and pending.step != self.steps_done:
            pending = None  # recorded for a different step: stale
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not all_finite(grads, loss, pending.losses if pending else (), pending.results.values() if pending else ()):
            if not self._skip_streak:  # once per run of skips: a diverged model skips every step
                warnings.warn(
                    f"{type(self).__name__}: non-finite loss, gradient or statistic at step "
                    f"{self.steps_done}; the step is skipped and the optimizer state left unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._skip_streak += 1
            return loss
        self._skip_streak = 0

        refresh_due = self._due(self.options.eigen_interval)
        for b in self.blocks():
            curvature = self._state(b).curvature
            stats = pending.results.get(b.name) if pending is not None else None
            if stats is not None:
                curvature.update(stats, self.options.stat_decay)
            if curvature.has_statistics and (refresh_due or curvature.build() is None):
                curvature.refresh()
        self._update_blocks()
        block_params = {p for b in self.blocks() for p in b.parameters()}
        for group in self.param_groups:
            sgd_update_([p for p in group["params"] if p not in block_params], group, self.state)
        self.steps_done += 1
        return loss

    def _update_blocks(self) -> None:
        # (block, direction, preconditioned): preconditioned directions are fresh tensors that
        # may be modified in place; first-order ones may be views of .grad.
        directions: list[tuple[Block, Tensor, bool]] = []
        v_g: Tensor | None = None
        first_order = []
        for b in self.blocks():
            grad = b.grad_matrix()
            if grad is None:
                continue
            approx = self._state(b).curvature.build()
            if approx is None:
                first_order.append(b.name)
                directions.append((b, grad, False))
                continue
            direction = approx.inv_mat_mul(grad, self.options.damping, self._damping_cache)
            directions.append((b, direction, True))
            if self.options.kl_clip is not None:
                term = torch.dot(direction.flatten(), grad.flatten()) * (self._group(b.weight)["lr"] ** 2)
                v_g = term if v_g is None else v_g + term.to(v_g.device)
        if first_order and not self._warned_first_order:
            warnings.warn(
                f"{type(self).__name__}: no curvature statistics yet for {first_order}; using the "
                "first-order (SGD) update until statistics exist — call the forward and backward "
                "inside `with opt.track(loss_fn):`",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_first_order = True
        nu = None if v_g is None else kl_clip_factor(v_g, self.options.kl_clip)
        for b, update, own in directions:
            group = self._group(b.weight)
            if nu is not None and own:
                update.mul_(nu.to(update.device))
            if group["weight_decay"] != 0:
                theta = b.param_matrix()
                update = update.add_(theta, alpha=group["weight_decay"]) if own else update.add(theta, alpha=group["weight_decay"])
                own = True
            state = self.block_states[b.name]
            update, state.momentum = momentum_direction(update, own, state.momentum, group["momentum"])
            skip = {p for p in b.parameters() if self._group(p) is None}
            b.add_(update, -group["lr"], skip=skip)

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (first-order momentum buffers, param groups) plus ``"curvlab"``:
        the step counter, the damping and every block's typed state as named tensors."""
        sd = super().state_dict()
        sd["curvlab"] = {
            "steps_done": self.steps_done,
            "damping": self.options.damping,
            "blocks": save_block_states(self.block_states),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; also reads the per-parameter layout curvlab 0.1 wrote."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None) or {}
        self._blocks = None
        fresh = {b.name: BlockState(self.new_state(b)) for b in self.blocks()}
        state_dict["state"] = load_block_states(fresh, extra.get("blocks"), state_dict.get("state", {}), self)
        super().load_state_dict(state_dict)
        self.block_states = fresh
        if "steps_done" in extra:
            self.steps_done = int(extra["steps_done"])
            self.damping = extra["damping"]
        self._pending = None

    def __repr__(self) -> str:
        o = self.options
        return (
            f"{type(self).__name__}(blocks={[b.name for b in self.blocks()]}, damping={o.damping}, "
            f"damping_strategy={o.damping_strategy!r}, stat_decay={o.stat_decay}, "
            f"intervals=(stats {o.stats_interval}, eigen {o.eigen_interval}, "
            f"scale {o.scale_interval}), kl_clip={o.kl_clip}, fisher={o.fisher!r}, "
            f"groups={len(self.param_groups)})"
        )


class BlockState:
    """What the optimizer keeps per block: its curvature state and its momentum buffer."""

    __slots__ = ("curvature", "momentum")

    def __init__(self, curvature: CurvatureState, momentum: Tensor | None = None) -> None:
        self.curvature = curvature
        self.momentum = momentum
