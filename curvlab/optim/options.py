"""The hyper-parameters of curvlab's optimizers, defined once (:class:`KroneckerOptions`).

The optimizers, ``curvlab train``'s configuration and command line, and the analyses all read
the fields, defaults, help texts and checks from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from curvlab._options import OptionSet, check_int, check_number
from curvlab.approx import DAMPING_STRATEGIES, DEFAULT_DAMPING, DampingStrategy, EighPolicy, get_damping
from curvlab.approx.tekfac import TEKFAC_BASES
from curvlab.extract.options import ENGINES, KFAC_APPROX
from curvlab.stats import FLAVOURS


#: dtypes accepted by ``factor_dtype``.
FACTOR_DTYPES = ("float32", "float64")


def _option(default: object, help: str, **cli: object) -> object:
    """A field with its help text (and command-line hints: ``type``, ``choices``, ``metavar``)."""
    return field(default=default, metadata={"help": help, **cli})


#: how kl_clip is turned off, as its refusal says (the command line's 0 stands for it)
KL_CLIP_OFF = " (None disables it)"


@dataclass(frozen=True)
class KroneckerOptions(OptionSet):
    """Hyper-parameters of :class:`~curvlab.optim.KFAC`, ``EKFAC``, ``TKFAC`` and ``TEKFAC``.

    ``lr``, ``momentum`` and ``weight_decay`` are the defaults of the param groups (each group
    may set its own); the others apply to the whole optimizer.  Every value is checked here:
    non-finite numbers, negative rates and empty intervals are refused with the field's name.
    """

    lr: float = _option(0.1, "learning rate", type=float)
    # 0 by default: KL clipping already sets the length of a clipped step, and heavy-ball momentum
    # 0.9 on top (kfac-pytorch's recipe) made the default steps about ten times that — on MNIST's
    # MLP, 4 epochs of TEKFAC reached a test accuracy of 0.900 against 0.977 without it (SGD
    # 0.975, 3 seeds); the same on digits, MNIST's CNN and CIFAR-10's (README, "Training defaults")
    momentum: float = _option(0.0, "heavy-ball momentum μ on the preconditioned direction (0 disables it)", type=float)
    weight_decay: float = _option(0.0, "L2 coefficient added to the update (u = ∇̃ + wd·θ)", type=float)
    damping: float = _option(1e-3, "damping λ of the inverse (> 0)", type=float)
    damping_strategy: str | DampingStrategy | None = _option(
        None, "how λ enters the inverse; default: the method's own (curvlab.approx.DEFAULT_DAMPING)",
        choices=DAMPING_STRATEGIES,
    )
    stat_decay: float = _option(0.95, "β of the running averages of the statistics and of s, in [0, 1)", type=float)
    stats_interval: int = _option(10, "steps between curvature statistics", type=int)
    eigen_interval: int = _option(100, "steps between eigen-decompositions (KFAC/TKFAC: inverse refreshes)", type=int)
    scale_interval: int = _option(10, "steps between rescalings of s (EKFAC/TEKFAC)", type=int)
    kl_clip: float | None = _option(1e-3, "KL clipping threshold; None (CLI: 0) disables clipping", type=float)
    fisher: str = _option("mc", "Fisher flavour of the statistics", choices=FLAVOURS)
    mc_samples: int = _option(1, "labels sampled per example for fisher='mc'", type=int)
    basis: str = _option("trace", "TEKFAC's eigenbasis: trace-weighted, or KFAC's (ablation)", choices=TEKFAC_BASES)
    # autograd by default: its statistics step measured 3-10 % faster than BackPACK's on the MLP
    # and CNN benchmarks, side by side (benchmarks/README.md); both give the same statistics
    engine: str = _option(
        "autograd", "statistics engine: autograd (any differentiable forward), BackPACK, or auto (BackPACK "
        "where it runs the model)", choices=ENGINES,
    )
    kfac_approx: str = _option(
        "expand", "weight-sharing convention of the Kronecker factors (convolutions, Linear on [N, T, D])",
        choices=KFAC_APPROX,
    )
    factor_dtype: str = _option(
        "float32", "dtype of the running statistics, their eigen-decompositions and damped inverses "
        "(float64: the exact reference; eigh failures are retried with jitter in both)", choices=FACTOR_DTYPES,
    )
    truncate_above: int = _option(
        2048, "factors larger than this get a truncated eigenbasis (top truncation_rank eigenpairs by a "
        "randomized range finder, the rest of the spectrum flat at its mean); 0: never", type=int,
    )
    truncation_rank: int = _option(256, "rank of a truncated eigenbasis", type=int)

    owner = "curvlab.optim"

    def __post_init__(self) -> None:
        who = self.owner
        for name in GROUP_OPTIONS:  # numpy scalars and one-element tensors too (as torch's), kept as Python floats
            object.__setattr__(self, name, check_number(who, name, _scalar(getattr(self, name)), minimum=0.0, strict=False))
        object.__setattr__(self, "damping", check_number(who, "damping", self.damping, minimum=0.0, strict=True))
        if not self.momentum < 1.0:  # (checked non-negative and finite above)
            raise ValueError(f"{who}: momentum={self.momentum} must be in [0, 1) (at 1 or more the steps never shrink)")
        object.__setattr__(self, "stat_decay", check_number(who, "stat_decay", self.stat_decay, minimum=0.0, strict=False))
        if not self.stat_decay < 1.0:
            raise ValueError(f"{who}: stat_decay={self.stat_decay} must be in [0, 1)")
        for name in ("stats_interval", "eigen_interval", "scale_interval", "mc_samples"):
            object.__setattr__(self, name, check_int(who, name, getattr(self, name), 1))
        if self.kl_clip is not None:
            clip = check_number(who, "kl_clip", self.kl_clip, minimum=0.0, strict=True, hint=KL_CLIP_OFF)
            object.__setattr__(self, "kl_clip", clip)
        self.check_choices(who, fisher=FLAVOURS, engine=ENGINES, kfac_approx=KFAC_APPROX, factor_dtype=FACTOR_DTYPES,
                           basis=TEKFAC_BASES)
        for name in ("truncate_above", "truncation_rank"):
            object.__setattr__(self, name, check_int(who, name, getattr(self, name), int(name == "truncation_rank")))
        if self.damping_strategy is not None:
            if isinstance(self.damping_strategy, str) and self.damping_strategy not in DAMPING_STRATEGIES:
                raise ValueError(
                    f"{who}: damping_strategy={self.damping_strategy!r}; choose one of {DAMPING_STRATEGIES}"
                )
            get_damping(self.damping_strategy)  # objects are checked too

    def eigh_policy(self) -> EighPolicy:
        """How the optimizers decompose and invert their factors (:class:`curvlab.approx.EighPolicy`)."""
        return EighPolicy(
            dtype=getattr(torch, self.factor_dtype),
            truncate_above=self.truncate_above or None,
            rank=self.truncation_rank,
        )

    def unused(self, *, rescales: bool, has_basis: bool) -> set[str]:
        """The options a method ignores: ``scale_interval`` unless it rescales ``s`` (EKFAC,
        TEKFAC), ``basis`` unless it has one to choose (TEKFAC), ``mc_samples`` unless the Fisher
        is sampled (``fisher="mc"``)."""
        return {name for name, used in (("scale_interval", rescales), ("basis", has_basis),
                                        ("mc_samples", self.fisher == "mc")) if not used}

    def for_method(self, method: str, *, trace_factored: bool, has_basis: bool) -> "KroneckerOptions":
        """These options for the optimizer ``method``: its default damping strategy filled in;
        TKFAC's ``"nor"`` damping only for the trace-factored methods, ``basis`` for TEKFAC.
        The other options a method ignores (:meth:`unused`) are taken, so that one schedule can
        be given to every method."""
        if self.basis != "trace" and not has_basis:
            raise ValueError(f"curvlab.optim: basis={self.basis!r} applies to TEKFAC only")
        strategy = DEFAULT_DAMPING[method] if self.damping_strategy is None else self.damping_strategy
        if strategy == "nor" and not trace_factored:
            raise ValueError(
                "curvlab.optim: damping_strategy='nor' (TKFAC's damping) needs the trace split of "
                "TKFAC/TEKFAC; use 'factored', 'exact' or 'trace-relative'"
            )
        return replace(self, damping_strategy=strategy)


#: torch.optim.SGD's group options the Kronecker optimizers do not have, with their neutral values
#: (a group is a plain dict that takes any key: set otherwise, they would be ignored silently).
FOREIGN_GROUP_OPTIONS = {"maximize": False, "nesterov": False, "dampening": 0}


def _scalar(value: object) -> object:
    """A group option's value as torch's optimizers take it: a one-element tensor as its float."""
    return float(value) if isinstance(value, Tensor) and value.numel() == 1 else value


#: the options a param group may set, each with its bound (a value in [0, bound))
GROUP_OPTIONS = {"lr": math.inf, "momentum": 1.0, "weight_decay": math.inf}
#: the options that are one value for all blocks
OPTIMIZER_WIDE = frozenset(f.name for f in fields(KroneckerOptions)) - GROUP_OPTIONS.keys()


def check_groups(groups: Sequence[Mapping[str, Any]], who: str) -> None:
    """Every param group's ``lr``, ``momentum`` and ``weight_decay`` is a non-negative finite
    number (groups are plain dicts: a user or a scheduler may have set anything), none asks
    for an option of torch's SGD these optimizers do not have (:data:`FOREIGN_GROUP_OPTIONS`), and
    none sets an optimizer-wide option (:data:`OPTIMIZER_WIDE`: ``damping`` in a group was
    accepted and ignored)."""
    for i, group in enumerate(groups):
        for name, neutral in FOREIGN_GROUP_OPTIONS.items():
            if group.get(name, neutral) != neutral:
                raise ValueError(f"{who}: param group {i}: {name}={group[name]!r} is an option of torch.optim.SGD "
                                 f"that curvlab's optimizers do not have (they minimise, with heavy-ball momentum)")
        wide = sorted(k for k in group if k in OPTIMIZER_WIDE)
        if wide:  # accepted and ignored, it would look applied
            raise ValueError(f"{who}: param group {i} sets {wide}: one value for all blocks, an option of the "
                             "optimizer, not of a param group; pass it to the optimizer (opt.damping can be "
                             "set between steps)")
        for name, above in GROUP_OPTIONS.items():
            value = group.get(name)
            if type(value) is float and 0.0 <= value < above:  # the common case, checked every step
                continue
            value = _scalar(value)
            check_number(f"{who}: param group {i}", name, value, minimum=0.0, strict=False)
            if not value < above:
                raise ValueError(f"{who}: param group {i}: {name}={value} must be in [0, {above:g})")
