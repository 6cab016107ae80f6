"""What a training run is: its configuration and how its optimizer is built."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from curvlab.app.augment import AUGMENTATIONS
from curvlab.app.data import canonical_name
from curvlab.app.launch import check_batch_split
from curvlab.app.messages import flag
from curvlab.app.models import COUPLED_BATCH, MODES
from curvlab.app.options import check_label_smoothing, options_attr
from curvlab.app.train.schedule import LR_SCHEDULES
from curvlab.approx.registry import spec
from curvlab.eager import eager_optimizer
from curvlab.model_blocks import KRONECKER_LAYERS
from curvlab.optim import OPTIMIZERS as KRONECKER
from curvlab.optim import KroneckerOptions

#: Optimizers ``curvlab train`` knows: torch's SGD and Adam, then curvlab's registry.
OPTIMIZERS = ("sgd", "adam", *KRONECKER)
#: The options torch's optimizers take (every other optimizer option is a Kronecker optimizer's).
FIRST_ORDER = {"sgd": ("lr", "momentum", "weight_decay"), "adam": ("lr", "weight_decay")}
#: How the output files record an option the run does not use (its value would mislead).
NOT_USED = "not used by "


#: Datasets of handwritten digits: a mirrored image is another glyph (crop-flip is warned of).
GLYPHS = ("digits", "mnist")


@dataclass(frozen=True)
class TrainConfig(KroneckerOptions):
    """One training run (every field is recorded in the output files).

    The optimizer's hyper-parameters are the fields of :class:`curvlab.optim.KroneckerOptions`
    (inherited, with their defaults); ``momentum`` and ``weight_decay`` apply to SGD too, ``lr``
    to all (defaults: :func:`default_lr` and :func:`default_momentum` of the optimizer).
    ``probe_every = 0`` disables probing.  ``augment`` (:mod:`curvlab.app.augment`) transforms the
    training batches; ``lr_schedule`` and ``warmup_epochs`` (:mod:`curvlab.app.train.schedule`)
    set every group's ``lr`` before each step.  ``figures``: redraw ``training.png`` (and with probes
    ``probe.png``) after every epoch (:mod:`curvlab.app.train.figures`).
    """

    lr: float | None = None  # type: ignore[assignment]
    momentum: float | None = None  # type: ignore[assignment]
    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    optimizer: str = "tekfac"
    epochs: int = 10
    batch_size: int = 128
    label_smoothing: float = 0.0
    augment: str = "none"
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    probe_every: int = 0
    probe_batch_size: int | None = None  # None: 128, or fewer so the exact square roots fit in 4 GiB (at most the training set)
    probe_fisher: str = "exact"
    probe_approximations: tuple[str, ...] = ("kflr", "ekfac", "tkfac", "tekfac")
    probe_mode: str = "eval"
    train_size: int | None = None
    test_size: int | None = None
    progress: bool = True
    figures: bool = True
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"curvlab train: optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        for name in ("epochs", "batch_size", "probe_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"curvlab train: {name}={getattr(self, name)} must be positive")
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"curvlab train: {name}={getattr(self, name)} must be positive (None: the whole set)")
        object.__setattr__(self, "label_smoothing", check_label_smoothing("curvlab train", self.label_smoothing))
        for name, value, choices in (("augment", self.augment, AUGMENTATIONS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value not in choices:
                raise ValueError(f"curvlab train: {name}={value!r}; choose one of {choices}")
        if self.augment == "crop-flip" and canonical_name(self.dataset) in GLYPHS:
            warnings.warn(
                f"curvlab train: augment='crop-flip' mirrors images left to right, which turns a digit into another "
                f"glyph; 'crop' alone is the augmentation for {canonical_name(self.dataset)} (crop-flip is for "
                "natural images: cifar10, fashion-mnist)", UserWarning, stacklevel=2)
        if self.warmup_epochs < 0:
            raise ValueError(f"curvlab train: warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"curvlab train: warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if self.probe_every < 0:
            raise ValueError(f"curvlab train: probe_every={self.probe_every} must be >= 0")
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.optimizer))
        if self.momentum is None:
            object.__setattr__(self, "momentum", default_momentum(self.optimizer))
        if self.data_dir is not None:  # recorded resolved: a resume from elsewhere names the same data
            object.__setattr__(self, "data_dir", str(Path(self.data_dir).expanduser().resolve()))
        if isinstance(self.probe_approximations, str):
            raise ValueError(
                f"curvlab train: probe_approximations={self.probe_approximations!r} must be a collection "
                f"of names, e.g. ({self.probe_approximations!r},)"
            )
        for name in self.probe_approximations:
            spec(name, "curvlab train: probe_approximations")
        if self.probe_mode not in MODES:
            raise ValueError(f"curvlab train: probe_mode={self.probe_mode!r}; choose one of {MODES}")
        object.__setattr__(self, "probe_approximations", tuple(self.probe_approximations))
        try:
            super().__post_init__()
        except ValueError as err:
            raise ValueError(str(err).replace("curvlab.optim", "curvlab train")) from None

    @property
    def out_dir(self) -> Path:
        """Folder of the run's files."""
        return Path(self.out)

    def optimizer_options(self) -> KroneckerOptions:
        """The Kronecker optimizers' options of this run."""
        return KroneckerOptions(**{f.name: getattr(self, f.name) for f in fields(KroneckerOptions)})

    def unused_options(self) -> set[str]:
        """The optimizer options this run does not use: under SGD/Adam all but theirs (and the
        damping when probing, the probe's λ), under a Kronecker method those it ignores
        (:meth:`curvlab.optim.KroneckerOptions.unused`)."""
        if self.optimizer in FIRST_ORDER:
            used = {*FIRST_ORDER[self.optimizer], *(("damping",) if self.probe_every else ())}
            return {f.name for f in fields(KroneckerOptions)} - used
        method = KRONECKER[self.optimizer]
        return self.unused(rescales=method.rescales, has_basis=method.has_basis_option)

    def as_attrs(self) -> dict[str, object]:
        """The configuration as netCDF-safe attributes (prefixed ``config_``); an option the run
        does not use is recorded as ``"not used by <optimizer>"``."""
        out = {}
        unused = self.unused_options()
        for key, value in asdict(self).items():
            if key in unused:
                value = NOT_USED + self.optimizer
            elif isinstance(value, (tuple, list)):
                value = ",".join(map(str, value))
            elif isinstance(value, dict):
                value = options_attr(value)
            elif value is None:
                value = "none"
            elif isinstance(value, bool):
                value = int(value)
            out[f"config_{key}"] = value
        return out


def default_lr(optimizer: str) -> float:
    """A sensible starting learning rate per optimizer (tune for real studies)."""
    return {"sgd": 0.05, "adam": 1e-3}.get(optimizer, KroneckerOptions.lr)


def default_momentum(optimizer: str) -> float:
    """Heavy-ball momentum per optimizer: 0.9 for SGD, the Kronecker optimizers' own default
    (none: their KL clipping sizes each step); Adam has none."""
    return {"sgd": 0.9}.get(optimizer, KroneckerOptions.momentum)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over all of ``model``'s parameters."""
    # torch's SGD and Adam, without importing torch._dynamo while no compiler is loaded (curvlab.eager)
    if cfg.optimizer == "sgd":
        return eager_optimizer(torch.optim.SGD)(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return eager_optimizer(torch.optim.Adam)(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return KRONECKER[cfg.optimizer](model, options=cfg.optimizer_options())


class TrainOptionError(ValueError):
    """A run cannot start as configured (a subset larger than the data, a probe batch larger than
    the training set): a usage error, as a report's batch larger than the data."""


def check_batches(cfg: TrainConfig, world_size: int, *, options: bool = False) -> None:
    """The training and probe batches give each of ``world_size`` processes an example
    (:func:`curvlab.app.launch.check_batch_split`; a trailing batch too small is skipped), and a
    train-mode probe runs in one process; ``options``: the error names the command-line options."""
    if world_size > 1 and cfg.probe_every and cfg.probe_mode == "train":
        given = "--probe-mode train" if options else "probe_mode='train'"
        raise ValueError(f"curvlab train: {given} {COUPLED_BATCH}: run it in one process or probe in eval mode")
    for name, size in (("batch_size", cfg.batch_size), ("train_size", cfg.train_size),  # (no batch would train)
                       ("probe_batch_size", cfg.probe_every and cfg.probe_batch_size)):
        check_batch_split(flag(name) if options else name, size or None, world_size)


def curvature_layers(cfg: TrainConfig) -> tuple[type[nn.Module], ...]:
    """The layer types whose curvature the run reads: every Kronecker layer when it probes,
    the preconditioned ones under a curvlab optimizer, none under SGD or Adam."""
    if cfg.probe_every:
        return (nn.Module,)
    return KRONECKER_LAYERS if cfg.optimizer in KRONECKER else ()
