"""The learning-rate schedule of ``curvlab train``: a factor on every group's ``lr`` per step,
applied by torch's ``LambdaLR`` (so it works alike for SGD, Adam and the Kronecker optimizers,
whose steps read their groups' ``lr``).

* ``"constant"``: the factor 1.
* ``"cosine"``: ``½(1 + cos(π t/T))`` over the run's ``T = epochs × steps per epoch`` steps
  (to 0 at the end, as torch's ``CosineAnnealingLR`` with ``eta_min=0``).
* ``"step"``: 1, then 0.1 from half the epochs on and 0.01 from three quarters (the ResNet
  recipes' decays at epochs 100 and 150 of 200), by epoch.

``warmup_epochs`` ramps the factor up linearly over the first steps (``(t+1)/W`` for ``W`` steps),
multiplying the schedule.  The clock is the steps taken, restored with the checkpoint, so a
resumed run follows the same schedule; the schedules that span ``epochs`` make a resume keep it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: ``--lr-schedule`` choices.
LR_SCHEDULES = ("constant", "cosine", "step")
#: Schedules whose shape depends on the number of epochs (a resume may not change it).
SPANNING_EPOCHS = ("cosine", "step")


def lr_factor(schedule: str, steps_per_epoch: int, epochs: int, warmup_epochs: int = 0) -> Callable[[int], float]:
    """``t ↦`` the factor on the base ``lr`` at step ``t`` (counted from 0)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"curvlab train: lr_schedule={schedule!r}; choose one of {LR_SCHEDULES}")
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

    def factor(t: int) -> float:
        if schedule == "cosine":
            value = 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
        elif schedule == "step":
            epoch = t // steps_per_epoch
            value = 0.01 if 4 * epoch >= 3 * epochs else 0.1 if 2 * epoch >= epochs else 1.0
        else:
            value = 1.0
        return value * min(1.0, (t + 1) / warmup) if warmup else value

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps_per_epoch: int, epochs: int,
                   warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LambdaLR | None:
    """torch's ``LambdaLR`` over :func:`lr_factor` (stepped once per optimizer step); ``None`` for a
    constant rate without warm-up (the groups' ``lr`` untouched)."""
    if schedule == "constant" and not warmup_epochs:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, steps_per_epoch, epochs, warmup_epochs))
