"""Steppers for the optimizer benchmark: curvlab's optimizers and their peers behind one interface.

A *stepper* owns a model, its optimizer and a source of mini-batches, and runs whole training
steps (``zero_grad``, forward, backward, the curvature work the schedule asks for, the
preconditioning and the update).  Its schedule position can be pinned, so that a benchmark can
time each kind of step separately, as ``bench_optim.py`` does for curvlab by setting
``opt.steps_done``::

    s = build("asdl-kfac", copy.deepcopy(model), nn.CrossEntropyLoss(), (x, y), lr=1e-6)
    s.warm_up()                          # steps 0 … stats_interval: every state exists
    plain = lambda: s.step_at(s.positions["plain"])      # k = 1
    stats = lambda: s.step_at(s.positions["stats"])      # k = stats_interval
    refresh = lambda: s.step_at(s.positions["refresh"])  # k = refresh_interval

Peers (:data:`PEERS`, built by :func:`build` or their own builder):

* ``sgd`` (momentum 0.9) and ``adam``: ``torch.optim`` references;
* ``curvlab-kfac``, ``-ekfac``, ``-tkfac``, ``-tekfac``: ``curvlab.optim`` with statistics every
  ``stats_interval`` steps, eigen/inverse refresh every ``refresh_interval`` (``scale_interval``
  = ``stats_interval``), KL clipping off unless ``kl_clip`` is given (the optimizers' own default
  is 1e-3; ASDL has none, see below);
* ``asdl-kfac``, ``asdl-ekfac``: ASDL (``asdfghjkl`` 0.1a5, a benchmark-only dependency that
  ``curvlab`` itself never imports) gradient makers followed by ``torch.optim.SGD`` with the same
  heavy-ball momentum as curvlab.

How the ASDL peers are configured, and where they cannot match curvlab
----------------------------------------------------------------------

ASDL's ``NaturalGradientMaker`` does the forward and backward itself; on a curvature step
(``k % curvature_upd_interval == 0``) its fisher maker runs the forward and, with its hooks, one
backward of the sampled loss (``"fisher_mc"``, 1 sample), then a hook-free backward of the loss
for the gradient (``"fisher_emp"``: a single backward of the loss, with the hooks).  It writes the preconditioned gradient into ``.grad``; the
update is ``torch.optim.SGD(lr, momentum)``: ``m ← μ m + ∇̃``, ``θ ← θ − lr·m``, exactly curvlab's
update (torch's heavy-ball convention, no dampening, no weight decay).

``asdl-kfac`` — ``KfacGradientMaker(model, PreconditioningConfig(data_size=N, damping=λ,
curvature_upd_interval=stats_interval, preconditioner_upd_interval=refresh_interval,
ema_decay=1 − stat_decay, ignore_modules=norm layers), fisher_type="fisher_mc", n_mc_samples=1)``
(``fisher="mc"``, curvlab's default flavour).

* ``ema_decay`` must be set: without it ASDL keeps no running average and inverts the factors
  of the current batch on *every* curvature step (``preconditioner_upd_interval`` is then
  ignored).  With it, the factors are averaged every ``stats_interval`` steps and inverted every
  ``refresh_interval`` steps, as curvlab does.  ASDL's average starts from zero without bias
  correction (its first value is ``ema_decay·A₀``, so the early factors are too small relative to
  the damping), curvlab's from the first batch; ``stat_decay=0`` (``ema_decay=1``) makes both use
  the latest batch only.  This changes the numbers, not the cost.
* Factors: ``A = (1/N) Σ a aᵀ`` (float32, ``d_in × d_in``; the bias is *not* appended: ASDL
  preconditions the bias gradient with ``(G + √λ/π I)⁻¹`` alone), ``G = (1/N) Σ g gᵀ`` of the
  per-example gradients of the sampled loss, i.e. the same scale as curvlab's (Fisher of the mean
  loss).  Inverse: ``cholesky`` + ``cholesky_inverse`` in float32 of ``A + π√λ I`` and
  ``G + √λ/π I`` with ``π = √((tr A/d_A)/(tr G/d_G))`` — Martens & Grosse's factored damping,
  the same as curvlab KFAC's default ``"factored"`` (curvlab: the same float32 Cholesky inverses,
  bias column included).  Plain step: ``G⁻¹ ∇W A⁻¹`` (two GEMMs) in both; ASDL's GEMMs are
  784 wide on the MLP, curvlab's 785 (the bias column), which runs slower on this CPU.
* Batch/layer norms are excluded (``ignore_modules``), so that both precondition the same
  Linear/Conv2d blocks and update norms with plain SGD (``precondition_norms=True`` gives ASDL's
  default unit-wise blocks).

``asdl-ekfac`` — ``EkfacGradientMaker`` with four fixes (class :class:`AsdlEkfacGradientMaker`).
On a convolution it computes another quantity than curvlab's EKFAC: its
rescaling sums over the ``N·T`` locations, ``s = Σ_{n,t} (U_Gᵀ g_{n,t} āᵀ_{n,t} U_A)²``, where
curvlab's ``s*`` is the diagonal of ``QᵀFQ`` from the per-example gradients ``M_n = Σ_t g_t āᵀ_t``
(cross-location terms kept; QA24: steps 0.08–0.24 apart on convolutions, each equal to its own
formula to 3e-15; on a Linear layer the two agree to 2e-16).  The fixes:

1. ASDL's ``EkfacGradientMaker`` calls ``precondition(use_inv=True)``, which skips every KFE block
   (``KFE.has_inv`` is False): the gradient is left untouched (its ``_precondition`` override
   that would pass ``use_inv=False`` is never called).  The subclass calls it with
   ``use_inv=False``.
2. ``KFE.mvp`` rotates with ``U_B ∇ U_A`` and back with ``U_B (·) U_A`` instead of ``U_Bᵀ ∇ U_A``
   and ``U_B (·) U_Aᵀ``: with fix 1 alone the direction is not EKFAC's (verified by
   :func:`check`).  The subclass applies the transposed rotations — the same four GEMMs.
   ``kfe_fix=False`` keeps ASDL's rotations (same cost).
3. The ``torch.cuda.nvtx.range`` calls inside ASDL raise on a CPU-only torch; they are replaced
   by a no-op context in the ASDL modules (:func:`import_asdl`; profiler annotations only).
4. For convolutions with fewer unfolded rows than columns (ResNet-18's last stage), ASDL's KFE
   bases call ``.view`` on a permuted tensor, which raises; :func:`import_asdl` replaces the two
   methods by the same maths with ``.reshape``.

What cannot be made equal:

* ASDL's EKFAC keeps no running averages and no separate refresh: on every curvature step it
  computes the eigenbases of *this batch's* factors (``eigh`` of ``XᵀX`` and ``gᵀg`` in float32,
  or an SVD of the ``N × d`` data when ``N < d``) and the scaling ``s`` in them; between curvature
  steps it preconditions with those.  ``ema_decay`` cannot be used (its accumulation adds the new
  eigenbasis to the old one and concatenates the scale tuples), so ``refresh_interval`` has no
  effect: an ASDL EKFAC "refresh" step is a curvature step.  curvlab EKFAC averages ``A``, ``G``
  and ``s`` and eigendecomposes the averages (float64) every ``refresh_interval`` steps.
* ASDL's ``EkfacGradientMaker`` only accepts ``fisher_type="fisher_emp"``.  The subclass skips that
  check, so ``fisher="mc"`` (the default of both ASDL builders, ``fisher_type="fisher_mc"``, to
  match curvlab's default) works with one MC sample (the KFE is computed in the sampled backward;
  the gradient comes from a second, hook-free backward).  ``fisher="empirical"``
  (``"fisher_emp"``) is ASDL's supported setting (one backward: a cheaper statistics step);
  compare it with curvlab's ``fisher="empirical"``.  The builders take curvlab's flavour names
  (``"mc"``, ``"exact"``, ``"empirical"``) or ASDL's.
* Damping: ``∇̃ = U_B ((U_Bᵀ ∇W U_A) ⊘ (s + λ)) U_Aᵀ`` — curvlab EKFAC's default ``"exact"``
  damping.  The bias is its own block, preconditioned with ``U_B`` and its own scale.
* KL clipping: ASDL has none.  It is off here for every second-order peer unless ``kl_clip`` is
  given; then the ASDL steppers apply curvlab's rule (``ν = min(1, √(c / Σ lr² ⟨∇̃, ∇⟩))`` over the
  preconditioned parameters, before momentum), at the cost of a copy of the raw gradients.

Only cross-entropy losses (``nn.CrossEntropyLoss``, mean reduction) are supported by the ASDL
steppers.  Run ``python benchmarks/peers.py --check`` for the self-check (each peer
preconditions; ASDL K-FAC and fixed EKFAC equal their formulas and curvlab's on a small layer;
the float64 checks run curvlab with ``factor_dtype="float64"``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

Batch = tuple[Tensor, Tensor]
#: A fixed batch ``(x, y)`` or a function returning the next one (called once per step).
BatchSource = Batch | Callable[[], Batch]

CURVLAB_METHODS = ("kfac", "ekfac", "tkfac", "tekfac")
PEERS = ("sgd", "adam", *(f"curvlab-{m}" for m in CURVLAB_METHODS), "asdl-kfac", "asdl-ekfac")
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Stepper:
    """One optimizer on one model, run a whole training step at a time.

    Attributes:
        name: the peer's name (one of :data:`PEERS`).
        model: the model it trains (in place: pass a copy).
        optimizer: the ``torch.optim`` optimizer that applies the update.
        stats_interval, refresh_interval: the schedule (1 and 1 for first-order peers).
        positions: a step index of each kind, ``{"plain": 1, "stats": stats_interval,
            "refresh": refresh_interval}`` (for a first-order peer all are plain steps).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stats_interval: int = 1
    refresh_interval: int = 1

    def __init__(self, model: nn.Module, loss_fn: nn.Module, batch: BatchSource) -> None:
        self.model, self.loss_fn = model, loss_fn
        self._next = batch if callable(batch) else (lambda: batch)

    # -- schedule ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The step index ``k`` the next :meth:`step` runs as (settable: pins the schedule)."""
        raise NotImplementedError

    @position.setter
    def position(self, k: int) -> None:
        raise NotImplementedError

    def kind(self, k: int) -> str:
        """``"refresh"``, ``"stats"`` or ``"plain"``: what step ``k`` does."""
        if k % self.refresh_interval == 0 and self.refresh_interval > 1:
            return "refresh"
        if k % self.stats_interval == 0 and self.stats_interval > 1:
            return "stats"
        return "plain"

    @property
    def positions(self) -> dict[str, int]:
        return {"plain": 1, "stats": self.stats_interval, "refresh": self.refresh_interval}

    # -- steps ------------------------------------------------------------------------------

    def step(self) -> None:
        """One training step at :attr:`position`, which then advances by one."""
        raise NotImplementedError

    def step_at(self, k: int) -> None:
        """``position = k``, then :meth:`step` (call repeatedly to time one kind of step)."""
        self.position = k
        self.step()

    def warm_up(self) -> None:
        """Steps ``0 … stats_interval`` from the current state (the first refresh, then a
        statistics step), so that every kind of step finds its state; position ends at
        ``stats_interval + 1``."""
        self.position = 0
        for _ in range(self.stats_interval + 1):
            self.step()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, position={self.position})"


class FirstOrderStepper(Stepper):
    """``torch.optim`` SGD/Adam: ``zero_grad``, forward, backward, ``step()``."""

    def __init__(self, name: str, model: nn.Module, loss_fn: nn.Module, batch: BatchSource,
                 optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, loss_fn, batch)
        self.name, self.optimizer, self._k = name, optimizer, 0

    @property
    def position(self) -> int:
        return self._k

    @position.setter
    def position(self, k: int) -> None:
        self._k = int(k)

    def kind(self, k: int) -> str:
        return "plain"

    def step(self) -> None:
        x, y = self._next()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
        self.optimizer.step()
        self._k += 1


class CurvlabStepper(Stepper):
    """A ``curvlab.optim`` optimizer: ``zero_grad``; forward and backward inside ``track``;
    ``step()``.  :attr:`position` is ``opt.steps_done``."""

    def __init__(self, name: str, model: nn.Module, loss_fn: nn.Module, batch: BatchSource,
                 optimizer: Any) -> None:
        super().__init__(model, loss_fn, batch)
        self.name, self.optimizer = name, optimizer
        self.stats_interval = optimizer.stats_interval
        self.refresh_interval = optimizer.eigen_interval

    @property
    def position(self) -> int:
        return self.optimizer.steps_done

    @position.setter
    def position(self, k: int) -> None:
        self.optimizer.steps_done = int(k)

    def step(self) -> None:
        x, y = self._next()
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        with opt.track(self.loss_fn):
            self.loss_fn(self.model(x), y).backward()
        opt.step()


class AsdlStepper(Stepper):
    """An ASDL gradient maker (forward, backward, curvature, preconditioning of ``.grad``)
    followed by ``torch.optim.SGD``.  :attr:`position` is ``grad_maker.state["step"]``."""

    def __init__(self, name: str, model: nn.Module, loss_fn: nn.Module, batch: BatchSource,
                 grad_maker: Any, optimizer: torch.optim.Optimizer, stats_interval: int,
                 refresh_interval: int) -> None:
        super().__init__(model, loss_fn, batch)
        self.name, self.grad_maker, self.optimizer = name, grad_maker, optimizer
        self.stats_interval, self.refresh_interval = stats_interval, refresh_interval

    @property
    def position(self) -> int:
        return self.grad_maker.state["step"]

    @position.setter
    def position(self, k: int) -> None:
        self.grad_maker.state["step"] = int(k)

    def step(self) -> None:
        x, y = self._next()
        gm, opt = self.grad_maker, self.optimizer
        opt.zero_grad(set_to_none=True)
        gm.kl_lr = opt.param_groups[0]["lr"]
        gm.setup_loss_call(self.loss_fn, gm.setup_model_call(self.model, x), y)
        if gm.do_update_curvature(self.position):
            with warnings.catch_warnings():
                # ASDL registers module (non-full) backward hooks; torch warns on every call
                warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
                gm.forward_and_backward()
        else:
            gm.forward_and_backward()
        opt.step()


# --------------------------------------------------------------------------------------------
# ASDL: import with the no-op NVTX, and the gradient makers
# --------------------------------------------------------------------------------------------

_NOOP_NVTX = types.SimpleNamespace(
    range=lambda *a, **k: contextlib.nullcontext(),
    range_push=lambda *a, **k: None,
    range_pop=lambda *a, **k: None,
    mark=lambda *a, **k: None,
)
_ASDL_NVTX_MODULES = (
    "asdl.utils",
    "asdl.operations.operation",
    "asdl.precondition.natural_gradient",
    "asdl.precondition.shampoo",
)
_asdl_classes: dict[str, type] = {}


def import_asdl() -> types.ModuleType:
    """``import asdl`` (``pip install asdfghjkl``) with ``torch.cuda.nvtx`` replaced by a no-op
    in its modules (ASDL's NVTX ranges raise on a CPU-only torch)."""
    try:
        with warnings.catch_warnings():  # asdl.precondition.psgd uses the deprecated torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            asdl = importlib.import_module("asdl")
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "the ASDL peers need asdfghjkl (benchmark-only): "
            ".venv/bin/pip install --constraint <(echo torch==2.13.0) asdfghjkl"
        ) from err
    for name in _ASDL_NVTX_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name).nvtx = _NOOP_NVTX
    _fix_conv_kfe()
    return asdl


def _fix_conv_kfe() -> None:
    """ASDL's conv ``cov_kfe_A``/``cov_kfe_B`` take an SVD of the unfolded data when there are
    fewer rows (``N·T``) than columns, after ``.view`` of a permuted tensor, which raises (e.g.
    ResNet-18's last stage at N=128: 128·16 < 4608); the same with ``.reshape``."""
    from asdl.operations.conv import Conv2d

    def basis(data: Tensor, cov: Callable[[], Tensor]) -> Tensor:
        n, width, out_size = data.shape
        if n * out_size < width:
            return torch.linalg.svd(data.permute(0, 2, 1).reshape(n * out_size, -1), full_matrices=True)[2].T
        return torch.linalg.eigh(cov())[1]

    Conv2d.cov_kfe_A = classmethod(lambda cls, module, in_data: basis(in_data, lambda: cls.cov_kron_A(module, in_data)))
    Conv2d.cov_kfe_B = classmethod(lambda cls, module, out_grads: basis(out_grads, lambda: cls.cov_kron_B(module, out_grads)))


def _asdl_makers() -> tuple[type, type]:
    """``(AsdlKfacGradientMaker, AsdlEkfacGradientMaker)``, defined on first use (so that
    importing this module does not need ASDL)."""
    if not _asdl_classes:
        import_asdl()
        from asdl import EkfacGradientMaker, KfacGradientMaker
        from asdl.matrices import SHAPE_KFE
        from asdl.precondition.natural_gradient import NaturalGradientMaker

        class _KLClip:
            """curvlab's KL clipping on ASDL's preconditioned ``.grad`` (off when
            ``kl_clip`` is None): ``ν = min(1, √(c / Σ lr² ⟨∇̃, ∇⟩))``."""

            kl_clip: float | None = None
            kl_lr: float = 0.0

            def _clipped_params(self) -> list[Tensor]:
                return [p for m in self.modules_for_curvature for p in m.parameters()
                        if p.requires_grad and p.grad is not None]

            def precondition(self, vectors=None, grad_scale=None, use_inv=True):
                if self.kl_clip is None:
                    return self._precondition_all(vectors, grad_scale, use_inv)
                params = self._clipped_params()
                raw = [p.grad.clone() for p in params]
                out = self._precondition_all(vectors, grad_scale, use_inv)
                vg = sum(torch.dot(p.grad.flatten(), g.flatten()) for p, g in zip(params, raw)) * self.kl_lr ** 2
                if float(vg) > 0:
                    nu = min(1.0, (self.kl_clip / float(vg)) ** 0.5)
                    for p in params:
                        p.grad.mul_(nu)
                return out

            def _precondition_all(self, vectors, grad_scale, use_inv):
                return NaturalGradientMaker.precondition(self, vectors, grad_scale, use_inv)

        class AsdlKfacGradientMaker(_KLClip, KfacGradientMaker):
            """ASDL's ``KfacGradientMaker`` (unchanged) with optional KL clipping."""

        class AsdlEkfacGradientMaker(_KLClip, EkfacGradientMaker):
            """ASDL's ``EkfacGradientMaker`` that preconditions: ``use_inv=False`` (ASDL passes
            True, which skips every KFE block), the transposed rotations of EKFAC
            (``kfe_fix``), and any ``fisher_type`` (ASDL only accepts ``"fisher_emp"``)."""

            def __init__(self, model, config, fisher_type="fisher_mc", n_mc_samples=1, kfe_fix=True, **kw):
                if fisher_type == "fisher_mc" and n_mc_samples != 1:
                    raise ValueError("ASDL EKFAC with fisher_mc needs n_mc_samples=1 (ASDL sums the "
                                     "eigenbases of several samples)")
                # EkfacGradientMaker.__init__ only adds the fisher_emp check
                NaturalGradientMaker.__init__(self, model, config, fisher_type=fisher_type,
                                              fisher_shape=SHAPE_KFE, n_mc_samples=n_mc_samples, **kw)
                self.kfe_fix = kfe_fix

            def _precondition_all(self, vectors, grad_scale, use_inv):
                return NaturalGradientMaker.precondition(self, vectors, grad_scale, use_inv=False)

            def _precondition_module(self, module, shape=None, vectors=None, vec_weight=None,
                                     vec_bias=None, grad_scale=None, use_inv=True):
                if not self.kfe_fix or shape != SHAPE_KFE or vectors is not None or vec_weight is not None:
                    return super()._precondition_module(module, shape, vectors, vec_weight, vec_bias,
                                                        grad_scale, use_inv)
                kfe = self._get_module_symmatrix(module, shape)
                if kfe is None:
                    raise ValueError(f"ASDL EKFAC: no KFE for {module} yet (run a curvature step)")
                eps = self.config.damping
                ua, ub = kfe.Ua, kfe.Ub
                scale = self.grad_scale if grad_scale is None else grad_scale
                gw = module.weight.grad
                if scale != 1:
                    gw.mul_(scale)
                g2 = gw.view(ub.shape[0], -1)
                rot = ub.T.mm(g2).mm(ua)
                rot /= kfe.scale[0] + eps
                gw.copy_(ub.mm(rot).mm(ua.T).view_as(gw))
                bias = getattr(module, "bias", None)
                if bias is not None and bias.requires_grad and bias.grad is not None:
                    if scale != 1:
                        bias.grad.mul_(scale)
                    b = ub.T.mv(bias.grad)
                    b /= kfe.scale[1] + eps
                    bias.grad.copy_(ub.mv(b))

        _asdl_classes["kfac"] = AsdlKfacGradientMaker
        _asdl_classes["ekfac"] = AsdlEkfacGradientMaker
    return _asdl_classes["kfac"], _asdl_classes["ekfac"]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _batch_size(batch: BatchSource) -> int:
    x, _ = batch() if callable(batch) else batch
    return int(x.shape[0])


def sgd_step(model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *, lr: float,
             momentum: float = 0.9, **_: Any) -> FirstOrderStepper:
    """``torch.optim.SGD(lr, momentum)``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return FirstOrderStepper("sgd", model, loss_fn, batch, opt)


def adam_step(model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *, lr: float,
              **_: Any) -> FirstOrderStepper:
    """``torch.optim.Adam(lr)`` (default betas)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return FirstOrderStepper("adam", model, loss_fn, batch, opt)


def curvlab_step(method: str, model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *,
                 lr: float, damping: float = 1e-2, stats_interval: int = 10,
                 refresh_interval: int = 100, momentum: float = 0.9, stat_decay: float = 0.95,
                 kl_clip: float | None = None, fisher: str = "mc",
                 **options: Any) -> CurvlabStepper:
    """``curvlab.optim.<METHOD>(model, lr, damping, stats_interval, eigen_interval=refresh_interval,
    scale_interval=stats_interval, kl_clip, fisher, momentum, stat_decay, **options)``."""
    from curvlab.optim import OPTIMIZERS

    if method not in OPTIMIZERS:
        raise ValueError(f"unknown curvlab method {method!r}; choose one of {tuple(OPTIMIZERS)}")
    opt = OPTIMIZERS[method](
        model, lr=lr, momentum=momentum, damping=damping, stat_decay=stat_decay,
        stats_interval=stats_interval, eigen_interval=refresh_interval, scale_interval=stats_interval,
        kl_clip=kl_clip, fisher=fisher, **options,
    )
    return CurvlabStepper(f"curvlab-{method}", model, loss_fn, batch, opt)


#: curvlab's Fisher flavours → ASDL's ``fisher_type`` (ASDL's own names are accepted as well).
ASDL_FISHER = {"mc": "fisher_mc", "exact": "fisher_exact", "empirical": "fisher_emp"}


def _asdl_fisher(fisher: str) -> str:
    if fisher in ASDL_FISHER.values():
        return fisher
    if fisher not in ASDL_FISHER:
        raise ValueError(f"fisher={fisher!r}; choose one of {tuple(ASDL_FISHER)}")
    return ASDL_FISHER[fisher]


def _asdl_config(model: nn.Module, batch: BatchSource, loss_fn: nn.Module, damping: float,
                 stats_interval: int, refresh_interval: int, ema_decay: float | None,
                 precondition_norms: bool) -> Any:
    from asdl import PreconditioningConfig

    if not isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn.reduction != "mean":
        raise ValueError("the ASDL steppers support nn.CrossEntropyLoss(reduction='mean') only")
    kw: dict[str, Any] = {}
    if ema_decay is not None:
        kw["ema_decay"] = ema_decay
    return PreconditioningConfig(
        data_size=_batch_size(batch), damping=damping, curvature_upd_interval=stats_interval,
        preconditioner_upd_interval=refresh_interval,
        ignore_modules=None if precondition_norms else list(NORM_LAYERS), **kw,
    )


def asdl_kfac_step(model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *, lr: float,
                   damping: float = 1e-2, stats_interval: int = 10, refresh_interval: int = 100,
                   momentum: float = 0.9, stat_decay: float = 0.95, kl_clip: float | None = None,
                   fisher: str = "mc", precondition_norms: bool = False,
                   **_: Any) -> AsdlStepper:
    """ASDL ``KfacGradientMaker`` (``ema_decay = 1 − stat_decay``: factors averaged every
    ``stats_interval`` steps, inverted every ``refresh_interval``) + ``SGD(lr, momentum)``."""
    kfac_cls, _ = _asdl_makers()
    cfg = _asdl_config(model, batch, loss_fn, damping, stats_interval, refresh_interval,
                       1.0 - stat_decay, precondition_norms)
    gm = kfac_cls(model, cfg, fisher_type=_asdl_fisher(fisher), n_mc_samples=1)
    gm.kl_clip = kl_clip
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return AsdlStepper("asdl-kfac", model, loss_fn, batch, gm, opt, stats_interval, refresh_interval)


def asdl_ekfac_step(model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *, lr: float,
                    damping: float = 1e-2, stats_interval: int = 10, refresh_interval: int = 100,
                    momentum: float = 0.9, kl_clip: float | None = None,
                    fisher: str = "mc", kfe_fix: bool = True,
                    precondition_norms: bool = False, **_: Any) -> AsdlStepper:
    """ASDL EKFAC (:class:`AsdlEkfacGradientMaker`: eigenbases and scaling of the current batch
    every ``stats_interval`` steps; ``refresh_interval`` only labels the schedule) +
    ``SGD(lr, momentum)``."""
    _, ekfac_cls = _asdl_makers()
    cfg = _asdl_config(model, batch, loss_fn, damping, stats_interval, refresh_interval, None,
                       precondition_norms)
    gm = ekfac_cls(model, cfg, fisher_type=_asdl_fisher(fisher), n_mc_samples=1, kfe_fix=kfe_fix)
    gm.kl_clip = kl_clip
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return AsdlStepper("asdl-ekfac", model, loss_fn, batch, gm, opt, stats_interval, refresh_interval)


def build(name: str, model: nn.Module, loss_fn: nn.Module, batch: BatchSource, *, lr: float,
          **options: Any) -> Stepper:
    """The stepper of peer ``name`` (one of :data:`PEERS`); ``options`` go to its builder
    (``damping``, ``stats_interval``, ``refresh_interval``, ``momentum``, ``kl_clip``, …;
    options a builder does not know are ignored by SGD/Adam/ASDL, passed on by curvlab)."""
    if name == "sgd":
        return sgd_step(model, loss_fn, batch, lr=lr, **options)
    if name == "adam":
        return adam_step(model, loss_fn, batch, lr=lr, **options)
    if name.startswith("curvlab-"):
        return curvlab_step(name.removeprefix("curvlab-"), model, loss_fn, batch, lr=lr, **options)
    if name == "asdl-kfac":
        return asdl_kfac_step(model, loss_fn, batch, lr=lr, **options)
    if name == "asdl-ekfac":
        return asdl_ekfac_step(model, loss_fn, batch, lr=lr, **options)
    raise ValueError(f"unknown peer {name!r}; choose one of {PEERS}")


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def _direction(stepper: Stepper, k: int) -> dict[str, Tensor]:
    """The update direction ``−Δθ`` of a step at position ``k`` with lr 1 and no momentum
    (the stepper's momentum buffers are dropped)."""
    opt = stepper.optimizer
    saved = [(g["lr"], g.get("momentum", 0.0)) for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"], g["momentum"] = 1.0, 0.0
    for st in opt.state.values():
        st.pop("momentum_buffer", None)
    before = {n: p.detach().clone() for n, p in stepper.model.named_parameters()}
    stepper.step_at(k)
    out = {n: before[n] - p.detach() for n, p in stepper.model.named_parameters()}
    with torch.no_grad():
        for n, p in stepper.model.named_parameters():
            p.copy_(before[n])
    for g, (lr, mom) in zip(opt.param_groups, saved):
        g["lr"], g["momentum"] = lr, mom
    for st in opt.state.values():
        st.pop("momentum_buffer", None)
    return out


def _freeze(stepper: Stepper, steps: Iterator[int]) -> None:
    """Run the steps with lr 0 (statistics without moving the model)."""
    opt = stepper.optimizer
    saved = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for k in steps:
        stepper.step_at(k)
    for g, lr in zip(opt.param_groups, saved):
        g["lr"] = lr


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(verbose: bool = True) -> dict[str, float]:
    """Checks that each second-order peer preconditions, and that ASDL K-FAC / fixed EKFAC equal
    their documented formulas and curvlab's KFAC / EKFAC on one bias-free Linear layer (float64,
    one fixed batch, exact or empirical Fisher so that no MC sample differs, ``stat_decay=0``).

    Returns the relative errors / distances (also printed); raises ``AssertionError`` on failure.
    """
    torch.manual_seed(0)
    n, d_in, d_out, lam = 64, 12, 5, 1e-2
    dt = torch.float64
    x = torch.randn(n, d_in, dtype=dt)
    y = torch.randint(0, d_out, (n,))
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to(dt)
    loss_fn = nn.CrossEntropyLoss()
    w = base[0].weight.detach()
    p = torch.softmax(x @ w.T, 1)
    e = torch.nn.functional.one_hot(y, d_out).to(dt)
    grad = (p - e).T @ x / n
    A = x.T @ x / n
    G_exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)  # E[diag(p) − p pᵀ]
    res: dict[str, float] = {}

    def model() -> nn.Module:
        return _clone(base)

    # K-FAC: (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹, π = √((tr A/d_in)/(tr G/d_out)), exact Fisher
    pi = ((A.trace() / d_in) / (G_exact.trace() / d_out)).sqrt()
    r = lam ** 0.5
    ref_kfac = torch.linalg.solve(G_exact + r / pi * torch.eye(d_out, dtype=dt), grad) @ torch.linalg.inv(
        A + r * pi * torch.eye(d_in, dtype=dt))
    big = 1000
    a = asdl_kfac_step(model(), loss_fn, (x, y), lr=1.0, damping=lam, stats_interval=big,
                       refresh_interval=big, stat_decay=0.0, fisher="exact")
    _freeze(a, [0])
    d_a = _direction(a, 1)["0.weight"]
    c = curvlab_step("kfac", model(), loss_fn, (x, y), lr=1.0, damping=lam, stats_interval=big,
                     refresh_interval=big, stat_decay=0.0, fisher="exact", factor_dtype="float64")
    _freeze(c, [0])
    d_c = _direction(c, 1)["0.weight"]
    res["asdl-kfac vs formula"] = _rel(d_a, ref_kfac)
    res["curvlab-kfac vs formula"] = _rel(d_c, ref_kfac)
    res["asdl-kfac vs grad (distance)"] = _rel(d_a, grad)

    # the update: 6 steps of heavy ball (μ = 0.9) with KL clipping on both sides give the same
    # weights (the preconditioner of step 0 is kept: no later statistics)
    traj = {}
    for name in ("asdl-kfac", "curvlab-kfac"):
        st = build(name, model(), loss_fn, (x, y), lr=0.5, damping=lam, stats_interval=big,
                   refresh_interval=big, stat_decay=0.0, momentum=0.9, kl_clip=1e-3,
                   fisher="exact", **({"factor_dtype": "float64"} if name.startswith("curvlab") else {}))
        for _ in range(6):
            st.step()
        traj[name] = st.model[0].weight.detach()
    res["asdl-kfac vs curvlab-kfac, 6 steps, momentum + KL clip"] = _rel(
        traj["asdl-kfac"] - w, traj["curvlab-kfac"] - w)
    nu = min(1.0, (1e-3 / float(0.25 * (ref_kfac * grad).sum())) ** 0.5)
    res["KL clip factor of step 0 (must be < 1)"] = nu

    # EKFAC (empirical Fisher): U_G [(U_Gᵀ ∇W U_A) / (s + λ)] U_Aᵀ, s = (1/N) Σ (U_Gᵀ g)²(U_Aᵀ a)²ᵀ
    g = p - e  # per-example gradients of the summed loss w.r.t. the logits
    _, ua = torch.linalg.eigh(x.T @ x)
    _, ug = torch.linalg.eigh(g.T @ g)
    s = ((g @ ug).T ** 2) @ ((x @ ua) ** 2) / n
    ref_ekfac = ug @ ((ug.T @ grad @ ua) / (s + lam)) @ ua.T
    a = asdl_ekfac_step(model(), loss_fn, (x, y), lr=1.0, damping=lam, stats_interval=big,
                        refresh_interval=big, fisher="empirical")
    _freeze(a, [0])
    d_a = _direction(a, 1)["0.weight"]
    a_raw = asdl_ekfac_step(model(), loss_fn, (x, y), lr=1.0, damping=lam, stats_interval=big,
                            refresh_interval=big, fisher="empirical", kfe_fix=False)
    _freeze(a_raw, [0])
    d_raw = _direction(a_raw, 1)["0.weight"]
    # curvlab: refresh at step 0 (basis of this batch), rescaling at step 1 (scale_interval = 1)
    c = curvlab_step("ekfac", model(), loss_fn, (x, y), lr=1.0, damping=lam, stats_interval=1,
                     refresh_interval=big, stat_decay=0.0, fisher="empirical", factor_dtype="float64")
    _freeze(c, [0, 1])
    c.stats_interval = c.optimizer.stats_interval = c.optimizer.scale_interval = big
    d_c = _direction(c, 2)["0.weight"]
    res["asdl-ekfac (fixed) vs formula"] = _rel(d_a, ref_ekfac)
    res["curvlab-ekfac vs formula"] = _rel(d_c, ref_ekfac)
    res["asdl-ekfac (kfe_fix=False) vs formula (distance)"] = _rel(d_raw, ref_ekfac)
    res["asdl-ekfac vs grad (distance)"] = _rel(d_a, grad)
    # the stock EkfacGradientMaker leaves the gradient untouched
    import_asdl()
    from asdl import EkfacGradientMaker

    stock_model = model()
    stock = EkfacGradientMaker(stock_model, _asdl_config(stock_model, (x, y), loss_fn, lam, big, big, None, False),
                               fisher_type="fisher_emp")
    stock.setup_loss_call(loss_fn, stock.setup_model_call(stock_model, x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock.forward_and_backward()
    res["stock asdl EkfacGradientMaker vs grad"] = _rel(stock_model[0].weight.grad, grad)

    # MC peers on a two-layer MLP with bias: they precondition (direction ≠ gradient)
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d_out))
    xf, yf = x.float(), y
    for name in ("asdl-kfac", "asdl-ekfac", *(f"curvlab-{m}" for m in CURVLAB_METHODS)):
        st = build(name, _clone(mlp), loss_fn, (xf, yf), lr=1.0, damping=lam)
        _freeze(st, range(st.stats_interval + 1))
        dirs = _direction(st, st.stats_interval + 1)
        gmodel = _clone(mlp)
        loss_fn(gmodel(xf), yf).backward()
        res[f"{name} (mc, MLP) vs grad (distance)"] = min(
            _rel(dirs[k], dict(gmodel.named_parameters())[k].grad) for k in dirs)
    if verbose:
        for k, v in res.items():
            print(f"{k:55s} {v:.3g}")
    tol = 1e-8
    assert res["asdl-kfac vs formula"] < tol and res["curvlab-kfac vs formula"] < tol, res
    assert res["asdl-kfac vs curvlab-kfac, 6 steps, momentum + KL clip"] < tol, res
    assert res["KL clip factor of step 0 (must be < 1)"] < 1, res
    assert res["asdl-ekfac (fixed) vs formula"] < tol and res["curvlab-ekfac vs formula"] < tol, res
    assert res["asdl-ekfac (kfe_fix=False) vs formula (distance)"] > 1e-2, res
    assert res["stock asdl EkfacGradientMaker vs grad"] < 1e-12, res
    assert all(v > 1e-2 for k, v in res.items() if k.endswith("vs grad (distance)")), res
    return res


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="run the self-check")
    args = p.parse_args(argv)
    if args.check:
        torch.set_num_threads(1)
        check()
        print("peers: check passed")
    else:
        p.print_help()


if __name__ == "__main__":
    main()
