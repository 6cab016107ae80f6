"""The machinery every curvlab optimizer shares (:class:`KroneckerOptimizer`).

The optimizers precondition each supported layer (``nn.Linear``, ``nn.Conv2d``) with the damped
inverse of a :mod:`curvlab.approx` object built from running averages of statistics that
:class:`~curvlab.extract.ExtractionSession` computes inside the user's own backward pass.  There is
no second implementation of any approximation here: the subclasses only say *which* statistics
they average and *which* ``curvlab.approx`` constructor turns the averages into the object whose
``inv_mat_mul`` preconditions the gradient.

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
   ``RuntimeWarning``: parameters, running averages, bases, momentum buffers and the step counter
   stay exactly as they were.
2. **Running averages** (every statistics step): ``X ← β X + (1 − β) X_batch`` with
   ``β = stat_decay``; the first statistics initialise the average (no zero bias).
3. **Eigen refresh** (``k % eigen_interval == 0``, or a block with statistics but no basis yet):
   the eigen-decomposition of the averaged factors (``psd_eigh``: float64, negative eigenvalues
   clamped; on failure retried once with a small jitter and a warning).  KFAC/TKFAC: the inverted
   object is rebuilt from the averages (Martens & Grosse's inverse interval).  EKFAC/TEKFAC: the
   eigenbasis ``U_out ⊗ U_in`` is replaced and ``s`` is reset to the Kronecker eigenvalues in it.
4. **Rescaling** (EKFAC/TEKFAC, every ``scale_interval`` steps that are not refresh steps):
   ``s ← β s + (1 − β) s*_batch`` with ``s*_batch = Σ_k (U_outᵀ M_k U_in)²`` computed by the
   extraction inside the BackPACK pass in the current basis.
5. **Preconditioning** of every block ``W̄ = [W b]``:
   ``∇̃ = approx.inv_mat_mul(∇W̄, damping, damping_strategy)`` where ``approx`` is exactly the object
   :meth:`KroneckerOptimizer.approximations` returns (objects are cached until their statistics
   change, and so are their damped eigenvalues).  A block without statistics yet uses
   ``∇̃ = ∇W̄`` (first-order; warned once).
6. **KL clipping** (``kl_clip`` not ``None``): ``ν = min(1, √(kl_clip / Σ_b lr_b² ⟨∇̃_b, ∇_b⟩))``
   over the preconditioned blocks (``lr_b`` the block's group lr), ``∇̃_b ← ν ∇̃_b``.
7. **Weight decay**: ``u_b = ∇̃_b + wd · W̄_b``.
8. **Momentum** (heavy ball, torch's SGD convention): ``m_b ← μ m_b + u_b`` (``m_b = u_b`` at
   first), else ``m_b = u_b`` when ``μ = 0``.
9. **Update**: ``W̄_b ← W̄_b − lr · m_b``.

Every parameter that is not part of a preconditioned block (layers BackPACK only passes through,
e.g. an eval-mode ``nn.BatchNorm1d``; Linear/Conv2d layers whose weight is frozen or in no param
group) gets the first-order update of ``torch.optim.SGD`` with its group's lr, momentum and weight
decay (steps 7–9 with ``∇̃ = ∇``; no KL clipping).

Blocks and groups: a layer is preconditioned iff its weight is in one of the optimizer's param
groups; the whole block ``[W b]`` then uses the weight's group hyperparameters.  A bias that is
trainable but in no group is part of the statistics (the extraction decides the block) but is not
updated.

Scale: the statistics are those of the loss exactly as the user computes it (a mean reduction
gives the Fisher of the mean loss), of the flavour ``fisher`` (``"mc"`` by default; MC sampling
draws from torch's global RNG, so saving ``torch.get_rng_state()`` with :meth:`state_dict` makes
a resumed run bit-identical on CPU).

Cost, per block with ``W̄ ∈ R^{d_out × D}`` and a batch of N examples (T output locations):
every step two rotations, ``4 d_out D (d_out + D)`` flops (``inv_mat_mul``); a statistics
step in addition ``O(N T D²)`` for ``δΦ`` and the KFE rotation of the inputs (inside the
extraction); a refresh one ``eigh`` of each factor, ``O(D³)`` in float64.  For ``D`` larger than
``N`` these exceed the forward and backward pass itself.  On CPU, a model whose softmax
saturates makes the float32 statistics underflow into subnormal numbers, which are an order of
magnitude slower; ``torch.set_flush_denormal(True)`` avoids that.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.approx import DAMPING_STRATEGIES, DEFAULT_DAMPING, DampingStrategy, KroneckerApproximation, get_damping
from curvlab.approx.base import psd_eigh
from curvlab.extract import ExtractionSession, LayerStats
from curvlab.extract.stats import FLAVOURS
from curvlab.layout import BlockLayout

#: Relative size of the diagonal jitter added when an eigen-decomposition fails.
EIGH_JITTER = 1e-6


@dataclass
class Block:
    """One preconditioned layer: ``W̄ = [W b]`` (see :mod:`curvlab.layout`)."""

    name: str
    module: nn.Module
    layout: BlockLayout
    weight: Tensor
    bias: Tensor | None  # the bias column's parameter (None: no bias column)
    update_bias: bool  # whether the bias is in one of the param groups
    group: dict[str, Any]


@dataclass
class _Pending:
    """Statistics recorded by :meth:`KroneckerOptimizer.track` for the next :meth:`step`."""

    step: int
    results: dict[str, LayerStats]
    losses: list[Tensor] = field(default_factory=list)


def block_layout(module: nn.Module) -> BlockLayout:
    """The layout the extraction gives a Linear/Conv2d layer (bias as the last column)."""
    weight = module.weight
    has_bias = module.bias is not None and module.bias.requires_grad
    d_in = weight[0].numel()  # Linear: in_features; Conv2d: C_in·kh·kw
    return BlockLayout(weight.shape[0], d_in + int(has_bias), has_bias, tuple(weight.shape))


def ema_(state: dict[str, Any], key: str, new: Tensor, decay: float) -> None:
    """``state[key] ← decay · state[key] + (1 − decay) · new`` (initialised with ``new``)."""
    old = state.get(key)
    if old is None:
        state[key] = new.detach().clone()
    else:
        old.lerp_(new.to(old.dtype), 1.0 - decay)  # one pass; exactly ``new`` for decay 0


def accumulate_kfac(state: dict[str, Any], stats: LayerStats, flavour: str, decay: float) -> None:
    """Running averages of the KFAC factors ``A``, ``G`` of ``flavour``."""
    factors = stats.kfac[flavour]
    ema_(state, "A", factors.A, decay)
    ema_(state, "G", factors.G, decay)


def accumulate_trace(state: dict[str, Any], stats: LayerStats, decay: float) -> None:
    """Running averages of TKFAC's *unnormalised* ``δ``, ``δΦ``, ``δΨ`` (normalising before
    averaging would break ``tr K̂ = tr F``)."""
    ts = stats.tkfac
    ema_(state, "delta", ts.delta.reshape(()), decay)
    ema_(state, "delta_phi", ts.delta_phi, decay)
    ema_(state, "delta_psi", ts.delta_psi, decay)


def robust_eigh(mat: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """:func:`curvlab.approx.base.psd_eigh`; on failure retried with a small diagonal jitter."""
    try:
        return psd_eigh(mat)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        jitter = EIGH_JITTER * (mat.diagonal().abs().mean().item() + torch.finfo(mat.dtype).tiny)
        warnings.warn(
            f"curvlab.optim: eigen-decomposition of {what} failed ({err}); retrying with "
            f"{jitter:.3g}·I added",
            RuntimeWarning,
            stacklevel=3,
        )
        eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
        return psd_eigh(mat + jitter * eye)


class _MemoDamping(DampingStrategy):
    """A damping strategy that remembers ``s + Δ`` per approximation object.

    The objects the optimizers invert are immutable and replaced whenever their statistics
    change, so between two changes every step would recompute the same damped eigenvalues;
    this wrapper computes them once with the wrapped strategy (weakly keyed by the object).
    """

    name = "memo"

    def __init__(self, inner: str | DampingStrategy) -> None:
        self.inner = get_damping(inner)
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def increment(self, approx: KroneckerApproximation, damping: float | Tensor) -> Tensor:
        return self.inner.increment(approx, damping)

    def damped_eigenvalues(self, approx: KroneckerApproximation, damping: float | Tensor) -> Tensor:
        hit = self._cache.get(approx)
        if hit is not None and (hit[0] is damping or (isinstance(damping, (int, float)) and hit[0] == damping)):
            return hit[1]
        value = self.inner.damped_eigenvalues(approx, damping)
        self._cache[approx] = (damping, value)
        return value


class KroneckerOptimizer(Optimizer):
    """Base class of :class:`~curvlab.optim.KFAC`, :class:`~curvlab.optim.EKFAC`,
    :class:`~curvlab.optim.TKFAC` and :class:`~curvlab.optim.TEKFAC` (see the module docstring
    for the step, in order).

    Args:
        model: the network; its supported layers are found by type.
        params: parameters or param groups (default ``model.parameters()``), as for any torch
            optimizer; ``lr``, ``momentum`` and ``weight_decay`` may be set per group.
        lr: learning rate.
        momentum: heavy-ball momentum ``μ`` (0 disables the buffer).
        weight_decay: L2 coefficient added to the update (``u = ∇̃ + wd·θ``).
        damping: ``λ`` passed to ``inv_mat_mul`` (one value for all blocks; settable).
        damping_strategy: a name in :data:`curvlab.approx.DAMPING_STRATEGIES` or a
            :class:`~curvlab.approx.DampingStrategy`; default ``DEFAULT_DAMPING`` of the method.
        stat_decay: ``β`` of the running averages of the statistics and of ``s``.
        stats_interval: steps between statistics (factor) updates.
        eigen_interval: steps between eigen-decompositions (KFAC/TKFAC: inverse refreshes).
        scale_interval: steps between rescalings ``s`` (EKFAC/TEKFAC only).
        kl_clip: KL clipping threshold; ``None`` disables clipping.
        fisher: Fisher flavour of the statistics: ``"mc"`` (default), ``"exact"`` or
            ``"empirical"``.
        mc_samples: MC samples per example for ``fisher="mc"``.
    """

    #: Key of the method in :data:`curvlab.approx.DEFAULT_DAMPING`.
    method: ClassVar[str] = ""
    #: Whether the method keeps an eigenbasis with a free scaling ``s`` (EKFAC, TEKFAC).
    eigen_corrected: ClassVar[bool] = False
    #: Whether its approximation carries TKFAC's trace split (needed by ``"nor"`` damping).
    trace_factored: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        damping_strategy: str | DampingStrategy | None = None,
        stat_decay: float = 0.95,
        stats_interval: int = 10,
        eigen_interval: int = 100,
        scale_interval: int = 10,
        kl_clip: float | None = 1e-3,
        fisher: str = "mc",
        mc_samples: int = 1,
    ) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
        if lr < 0:
            raise ValueError(f"{who}: lr={lr} must be non-negative")
        if momentum < 0:
            raise ValueError(f"{who}: momentum={momentum} must be non-negative")
        if weight_decay < 0:
            raise ValueError(f"{who}: weight_decay={weight_decay} must be non-negative")
        if damping < 0:
            raise ValueError(f"{who}: damping={damping} must be non-negative")
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"{who}: stat_decay={stat_decay} must be in [0, 1)")
        for what, val in (
            ("stats_interval", stats_interval),
            ("eigen_interval", eigen_interval),
            ("scale_interval", scale_interval),
        ):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{who}: {what}={val!r} must be a positive int")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"{who}: kl_clip={kl_clip} must be positive (None disables it)")
        if fisher not in FLAVOURS:
            raise ValueError(f"{who}: fisher={fisher!r}; choose one of {FLAVOURS}")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"{who}: mc_samples={mc_samples!r} must be a positive int")
        if damping_strategy is None:
            damping_strategy = DEFAULT_DAMPING[self.method]
        if isinstance(damping_strategy, str) and damping_strategy not in DAMPING_STRATEGIES:
            raise ValueError(
                f"{who}: damping_strategy={damping_strategy!r}; choose one of {DAMPING_STRATEGIES}"
            )
        get_damping(damping_strategy)  # validates objects too
        if damping_strategy == "nor" and not self.trace_factored:
            raise ValueError(
                f"{who}: damping_strategy='nor' (TKFAC's damping) needs the trace split of "
                "TKFAC/TEKFAC; use 'factored', 'exact' or 'trace-relative'"
            )

        self.model = model
        self._blocks_cache: list[Block] | None = None
        super().__init__(
            model.parameters() if params is None else params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
        )
        self.damping = damping
        self.damping_strategy = damping_strategy  # also builds the memoising wrapper
        self.stat_decay = stat_decay
        self.stats_interval = stats_interval
        self.eigen_interval = eigen_interval
        self.scale_interval = scale_interval
        self.kl_clip = kl_clip
        self.fisher = fisher
        self.mc_samples = mc_samples
        #: Number of steps taken (skipped steps do not count).
        self.steps_done = 0
        self._pending: _Pending | None = None
        self._approx: dict[str, KroneckerApproximation] = {}
        self._warned_first_order = False
        self._skip_streak = 0  # consecutive skipped steps

    @property
    def damping_strategy(self) -> str | DampingStrategy:
        """The damping strategy ``inv_mat_mul`` is called with (a name or a strategy object)."""
        return self._damping_strategy

    @damping_strategy.setter
    def damping_strategy(self, strategy: str | DampingStrategy) -> None:
        self._damping_impl = _MemoDamping(strategy)  # validates
        self._damping_strategy = strategy

    # ------------------------------------------------------------------ what subclasses define

    def stat_kinds(self) -> tuple[str, ...]:
        """Statistics (names of :data:`curvlab.extract.extension.STATISTICS`) of a stats step."""
        raise NotImplementedError

    def _accumulate(self, state: dict[str, Any], stats: LayerStats) -> None:
        """Update the running averages in ``state`` with one step's statistics."""
        raise NotImplementedError

    def _has_stats(self, state: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _has_inverse(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` holds what :meth:`_build` needs (a basis / an inverse snapshot)."""
        raise NotImplementedError

    def _refresh(self, state: dict[str, Any], block: Block) -> KroneckerApproximation | None:
        """Eigen refresh of one block from its running averages (step 3); may return the new
        object (cached for the next steps) or ``None`` (built lazily by :meth:`_build`)."""
        raise NotImplementedError

    def _build(self, state: dict[str, Any], block: Block) -> KroneckerApproximation:
        """The ``curvlab.approx`` object the next step inverts, from ``state``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ blocks

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102 (torch's)
        super().add_param_group(param_group)
        self._blocks_cache = None
        if hasattr(self, "_approx"):
            self._approx.clear()

    def blocks(self) -> list[Block]:
        """The preconditioned blocks: Linear/Conv2d layers whose trainable weight is in a group."""
        if self._blocks_cache is None:
            group_of = {p: g for g in self.param_groups for p in g["params"]}
            blocks = []
            for name, module in self.model.named_modules():
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    continue
                weight = module.weight
                if not weight.requires_grad or weight not in group_of:
                    continue
                layout = block_layout(module)
                bias = module.bias if layout.bias_column else None
                blocks.append(
                    Block(name, module, layout, weight, bias, bias is not None and bias in group_of, group_of[weight])
                )
            self._blocks_cache = blocks
        return self._blocks_cache

    def _block_params(self) -> set[Tensor]:
        out: set[Tensor] = set()
        for b in self.blocks():
            out.add(b.weight)
            if b.bias is not None:
                out.add(b.bias)
        return out

    # ------------------------------------------------------------------ statistics

    def _due(self, interval: int) -> bool:
        return self.steps_done % interval == 0

    def _plan(self) -> tuple[set[str], dict[str, tuple[Tensor, Tensor]]] | None:
        """What the backward of the current step must compute (``None``: nothing)."""
        blocks = self.blocks()
        stats: set[str] = set()
        if self._due(self.stats_interval) or any(not self._has_stats(self.state[b.weight]) for b in blocks):
            stats.update(self.stat_kinds())
        bases: dict[str, tuple[Tensor, Tensor]] = {}
        if self.eigen_corrected and self._due(self.scale_interval) and not self._due(self.eigen_interval):
            for b in blocks:
                st = self.state[b.weight]
                if self._has_inverse(st):
                    bases[b.name] = (st["u_out"], st["u_in"])
            if bases:
                stats.add("kfe")
        return (stats, bases) if stats else None

    @contextlib.contextmanager
    def track(self, loss_fn: nn.Module) -> Iterator[None]:
        """Context for this step's forward and backward pass.

        On a statistics step, curvlab's BackPACK extension is attached to the model for the
        ``with`` block only (:class:`~curvlab.extract.ExtractionSession`) and the statistics of
        the one ``loss.backward()`` in it are kept for the next :meth:`step`; the loss value is
        recorded for the finiteness check.  On every other step it does nothing (no hooks).

        If the loss of a statistics step is not finite, BackPACK's MC sampling raises inside
        ``backward()``; that error is suppressed (with a warning: the rest of the block does not
        run) and the next :meth:`step` is skipped.  Any other error propagates.

        Args:
            loss_fn: the loss module used in the block (``nn.CrossEntropyLoss``/``nn.MSELoss``).
        """
        plan = self._plan()
        if plan is None:
            self._pending = None
            yield
            return
        stats, bases = plan
        session = ExtractionSession(
            self.model,
            loss_fn,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            stats=stats,
            eigenbases=bases,
            skip_unsupported=True,
        )
        losses: list[Tensor] = []
        handle = loss_fn.register_forward_hook(lambda _m, _i, out: losses.append(out.detach()))
        try:
            with session, warnings.catch_warnings():
                # BackPACK's full backward hook on a first layer whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        except Exception:
            # A non-finite loss makes BackPACK's MC sampling fail inside backward(): that error
            # is the non-finite loss, which step() skips.  Anything else propagates.
            if not losses or all(bool(torch.isfinite(v).all()) for v in losses):
                raise
            if not self._skip_streak:
                warnings.warn(
                    f"{type(self).__name__}: the loss is not finite; the statistics backward failed "
                    "and the next step() will be skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._pending = _Pending(self.steps_done, {}, losses)
            return
        finally:
            handle.remove()
        self._pending = _Pending(self.steps_done, session.results(), losses)

    # ------------------------------------------------------------------ the preconditioner

    def _approximation(self, block: Block) -> KroneckerApproximation | None:
        approx = self._approx.get(block.name)
        if approx is None:
            state = self.state[block.weight]
            if not self._has_inverse(state):
                return None
            approx = self._build(state, block)
            self._approx[block.name] = approx
        return approx

    def approximations(self) -> dict[str, KroneckerApproximation]:
        """Block name → the ``curvlab.approx`` object a :meth:`step` taken now inverts with
        ``inv_mat_mul(grad, self.damping, self.damping_strategy)`` (blocks with statistics only).

        This is exactly what the next step inverts unless that step brings new statistics that
        change it (a refresh step, or a rescaling step of EKFAC/TEKFAC): call it after
        :meth:`step` to see what the following step will use.  The objects are never modified
        in place by later steps.
        """
        out = {}
        for b in self.blocks():
            approx = self._approximation(b)
            if approx is not None:
                out[b.name] = approx
        return out

    def _invalidate(self, block: Block) -> None:
        self._approx.pop(block.name, None)

    # ------------------------------------------------------------------ step

    @staticmethod
    def _grad_matrix(block: Block) -> Tensor | None:
        if block.weight.grad is None:
            return None
        g = block.weight.grad.flatten(1)
        if block.bias is None:
            return g
        bias_grad = block.bias.grad
        col = torch.zeros_like(g[:, :1]) if bias_grad is None else bias_grad.unsqueeze(1)
        return torch.cat([g, col], 1)

    @staticmethod
    def _param_matrix(block: Block) -> Tensor:
        w = block.weight.flatten(1)
        return w if block.bias is None else torch.cat([w, block.bias.unsqueeze(1)], 1)

    def _all_finite(self, loss: Any, pending: _Pending | None) -> bool:
        """Whether every gradient, the loss and this step's statistics are finite.

        One reduction per tensor and one device sync: a tensor is taken as finite when its sum
        is (a sum overflows only for entries near the dtype's maximum, as harmful as ``inf``).
        Of the Gram-type statistics (``A``, ``G``, ``δΦ``, ``δΨ``: sums of outer products) only
        the diagonal is summed — a non-finite entry of ``Σ_k v_k v_kᵀ`` implies a non-finite
        diagonal entry — so the check costs O(D), not O(D²), for a D × D factor.
        """
        values = [p.grad.sum() for g in self.param_groups for p in g["params"] if p.grad is not None]
        if isinstance(loss, Tensor):
            values.append(loss.detach().sum())
        elif isinstance(loss, (int, float)) and not math.isfinite(loss):
            return False
        if pending is not None:
            values.extend(v.sum() for v in pending.losses)
            for ls in pending.results.values():
                for f in ls.kfac.values():
                    values.extend((f.A.diagonal().sum(), f.G.diagonal().sum()))
                if ls.tkfac is not None:
                    ts = ls.tkfac
                    values.extend((ts.delta.sum(), ts.delta_phi.diagonal().sum(), ts.delta_psi.diagonal().sum()))
                if ls.kfe_scaling is not None:
                    values.append(ls.kfe_scaling.sum())
        if not values:
            return True
        device = values[0].device
        sums = torch.stack([v.to(device=device, dtype=torch.float64) for v in values])
        return bool(torch.isfinite(sums).all().item())

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
        if not self._all_finite(loss, pending):
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

        blocks = self.blocks()
        refresh_due = self._due(self.eigen_interval)
        for b in blocks:
            state = self.state[b.weight]
            ls = pending.results.get(b.name) if pending is not None else None
            if ls is not None:
                if ls.kfac or ls.tkfac is not None:
                    self._accumulate(state, ls)
                if ls.kfe_scaling is not None and self._has_inverse(state):
                    # out of place: an object handed out by approximations() keeps its own s
                    s = state["scaling"]
                    state["scaling"] = torch.lerp(ls.kfe_scaling.to(s.dtype), s, self.stat_decay)
                    self._invalidate(b)
            if self._has_stats(state) and (refresh_due or not self._has_inverse(state)):
                approx = self._refresh(state, b)
                if approx is None:
                    self._invalidate(b)
                else:
                    self._approx[b.name] = approx

        self._update_blocks(blocks)
        self._update_first_order(self._block_params())
        self.steps_done += 1
        return loss

    def _update_blocks(self, blocks: list[Block]) -> None:
        # (block, direction, preconditioned): preconditioned directions are fresh tensors that
        # may be modified in place; first-order ones may be views of .grad.
        directions: list[tuple[Block, Tensor, bool]] = []
        vg: Tensor | None = None
        first_order = []
        for b in blocks:
            grad = self._grad_matrix(b)
            if grad is None:
                continue
            approx = self._approximation(b)
            if approx is None:
                first_order.append(b.name)
                directions.append((b, grad, False))
                continue
            direction = approx.inv_mat_mul(grad, self.damping, self._damping_impl)
            directions.append((b, direction, True))
            if self.kl_clip is not None:
                term = torch.dot(direction.flatten(), grad.flatten()) * (b.group["lr"] ** 2)
                vg = term if vg is None else vg + term.to(vg.device)
        if first_order and not self._warned_first_order:
            warnings.warn(
                f"{type(self).__name__}: no curvature statistics yet for {first_order}; using the "
                "first-order (SGD) update until statistics exist — call the forward and backward "
                "inside `with opt.track(loss_fn):`",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_first_order = True
        nu = None
        if vg is not None:
            tiny = torch.finfo(vg.dtype).tiny
            nu = torch.where(
                vg > 0, (self.kl_clip / vg.clamp_min(tiny)).sqrt().clamp(max=1.0), torch.ones_like(vg)
            )
        for b, update, own in directions:
            group = b.group
            if nu is not None and own:
                update.mul_(nu.to(update.device))
            wd = group["weight_decay"]
            if wd != 0:
                theta = self._param_matrix(b)
                update = update.add_(theta, alpha=wd) if own else update.add(theta, alpha=wd)
                own = True
            momentum = group["momentum"]
            if momentum != 0:
                state = self.state[b.weight]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = update if own else update.clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(update)
                update = buf
            lr = group["lr"]
            dw = b.layout.in_features - int(b.bias is not None)
            if b.weight.is_contiguous():
                b.weight.view(b.weight.shape[0], -1).add_(update[:, :dw], alpha=-lr)
            else:  # e.g. channels_last
                b.weight.add_(update[:, :dw].reshape(b.weight.shape), alpha=-lr)
            if b.bias is not None and b.update_bias:
                b.bias.add_(update[:, dw], alpha=-lr)

    def _update_first_order(self, block_params: set[Tensor]) -> None:
        """``torch.optim.SGD`` (dampening 0, no Nesterov) for every other parameter."""
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or p in block_params:
                    continue
                d = p.grad
                if wd != 0:
                    d = d.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = d.clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (per-parameter running averages, bases, scalings, momentum
        buffers) plus ``"curvlab"``: the step counter and the damping."""
        sd = super().state_dict()
        sd["curvlab"] = {"steps_done": self.steps_done, "damping": self.damping}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; cached approximation objects are rebuilt lazily."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.steps_done = int(extra["steps_done"])
            self.damping = extra["damping"]
        self._blocks_cache = None
        self._approx.clear()
        self._pending = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(blocks={[b.name for b in self.blocks()]}, damping={self.damping}, "
            f"damping_strategy={self.damping_strategy!r}, stat_decay={self.stat_decay}, "
            f"intervals=(stats {self.stats_interval}, eigen {self.eigen_interval}, "
            f"scale {self.scale_interval}), kl_clip={self.kl_clip}, fisher={self.fisher!r}, "
            f"groups={len(self.param_groups)})"
        )


class EigenCorrectedOptimizer(KroneckerOptimizer):
    """Shared state of EKFAC and TEKFAC: ``u_out``, ``u_in`` (the eigenbasis) and ``scaling``
    (``s``) per block, plus what the damping needs; ``s`` is averaged by :meth:`step`."""

    eigen_corrected = True

    def _has_inverse(self, state: dict[str, Any]) -> bool:
        return "u_out" in state
