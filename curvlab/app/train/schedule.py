"""The learning-rate schedule of ``curvlab train``: a factor on every group's base ``lr``
(``initial_lr``, as torch's schedulers keep it), set before each step — SGD, Adam and the
Kronecker optimizers read their groups' ``lr`` at every step.

The clock is the run's progress in epochs, ``p = epoch + i / steps`` at the ``i``-th of an epoch's
``steps`` steps, so the rate at an epoch's steps does not depend on how many steps earlier epochs
took (a resume on another number of processes may skip a trailing batch that one process took):

* warm-up (``warmup_epochs = W``): ``(p·steps + 1) / (W·steps)``, rising linearly to 1 at the last
  step of epoch ``W`` (torch's ``LinearLR`` from ``1/(W·steps)``), before the schedule:
* ``"constant"``: 1;
* ``"cosine"``: ``½(1 + cos(π (p − W)/(E − W)))`` over the ``E − W`` epochs after the warm-up,
  annealed towards 0 (torch's ``CosineAnnealingLR`` over those steps; ``SequentialLR`` after the
  warm-up's ``LinearLR``);
* ``"step"``: ×0.1 after ``⌈E/2⌉`` epochs and ×0.01 after ``⌈3E/4⌉`` (the ResNet recipes' decays
  at 100 and 150 of 200 epochs; torch's ``MultiStepLR``), whole epochs counted from the start.

The schedules that span ``E`` make a resume keep ``--epochs`` (:mod:`curvlab.app.train.checkpoint`).
"""

from __future__ import annotations

import math

import torch

#: ``--lr-schedule`` choices.
LR_SCHEDULES = ("constant", "cosine", "step")
#: Schedules whose shape depends on the number of epochs (a resume may not change it).
SPANNING_EPOCHS = ("cosine", "step")


def lr_factor(schedule: str, epochs: int, warmup_epochs: int, epoch: int, index: int, steps: int) -> float:
    """The factor on the base ``lr`` at step ``index`` of ``steps`` in ``epoch`` (from 0) of a run of
    ``epochs`` epochs."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"curvlab train: lr_schedule={schedule!r}; choose one of {LR_SCHEDULES}")
    if steps < 1:
        raise ValueError(f"curvlab train: an epoch of {steps} steps has no learning rate")
    if epoch < warmup_epochs:
        return (epoch * steps + index + 1) / (warmup_epochs * steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs + index / steps) / (epochs - warmup_epochs)))
    if schedule == "step":
        return 0.01 if 4 * epoch >= 3 * epochs else 0.1 if 2 * epoch >= epochs else 1.0
    return 1.0


class Schedule:
    """The schedule of one run over ``optimizer``'s groups: :meth:`set` before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, epochs: int, warmup_epochs: int = 0) -> None:
        self.optimizer, self.schedule, self.epochs, self.warmup_epochs = optimizer, schedule, epochs, warmup_epochs
        self.constant = schedule == "constant" and not warmup_epochs
        for group in optimizer.param_groups if not self.constant else ():
            group.setdefault("initial_lr", group["lr"])  # the base rate, in the state dict (a resume reads it back)

    def set(self, epoch: int, index: int, steps: int) -> None:
        """Every group's ``lr`` for step ``index`` of ``steps`` in ``epoch``."""
        if self.constant:
            return
        factor = lr_factor(self.schedule, self.epochs, self.warmup_epochs, epoch, index, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
