"""What a training run is: its configuration and how its optimizer is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from curvlab import optim as curv_optim

#: Optimizers ``curvlab train`` knows; the last four are curvlab's (they invert curvlab.approx).
OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "tkfac", "tekfac")
KRONECKER = {"kfac": curv_optim.KFAC, "ekfac": curv_optim.EKFAC, "tkfac": curv_optim.TKFAC, "tekfac": curv_optim.TEKFAC}


@dataclass
class TrainConfig:
    """One training run (every field is recorded in the output files).

    ``damping`` and the intervals apply to the Kronecker optimizers; ``momentum`` to SGD and
    to them (Adam uses its own betas).  ``probe_every = 0`` disables probing.
    """

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    optimizer: str = "tekfac"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    damping: float = 1e-3
    damping_strategy: str | None = None
    stats_interval: int = 10
    eigen_interval: int = 100
    scale_interval: int = 10
    kl_clip: float | None = 1e-3
    fisher: str = "mc"
    basis: str = "trace"
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    probe_every: int = 0
    probe_batch_size: int = 128
    probe_fisher: str = "exact"
    probe_approximations: tuple[str, ...] = ("kflr", "ekfac", "tkfac", "tekfac")
    train_size: int | None = None
    test_size: int | None = None
    progress: bool = True
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"curvlab train: optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        for name in ("epochs", "batch_size", "probe_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"curvlab train: {name}={getattr(self, name)} must be positive")
        if self.probe_every < 0:
            raise ValueError(f"curvlab train: probe_every={self.probe_every} must be >= 0")
        if self.lr is None:
            self.lr = default_lr(self.optimizer)
        self.probe_approximations = tuple(self.probe_approximations)

    @property
    def out_dir(self) -> Path:
        """Folder of the run's files."""
        return Path(self.out)

    def as_attrs(self) -> dict[str, object]:
        """The configuration as netCDF-safe attributes (prefixed ``config_``)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, (tuple, list)):
                value = ",".join(map(str, value))
            elif isinstance(value, dict):
                value = ";".join(f"{k}={v}" for k, v in value.items())
            elif value is None:
                value = "none"
            elif isinstance(value, bool):
                value = int(value)
            out[f"config_{key}"] = value
        return out


def default_lr(optimizer: str) -> float:
    """A sensible starting learning rate per optimizer (tune for real studies)."""
    return {"sgd": 0.05, "adam": 1e-3}.get(optimizer, 0.1)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over all of ``model``'s parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    options: dict[str, object] = dict(
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        damping=cfg.damping,
        damping_strategy=cfg.damping_strategy,
        stats_interval=cfg.stats_interval,
        eigen_interval=cfg.eigen_interval,
        scale_interval=cfg.scale_interval,
        kl_clip=cfg.kl_clip,
        fisher=cfg.fisher,
    )
    if cfg.optimizer == "tekfac":
        options["basis"] = cfg.basis
    return KRONECKER[cfg.optimizer](model, **options)
