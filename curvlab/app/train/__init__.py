"""Training runs that probe the curvature as they go (``curvlab train``)."""

from curvlab.app.train.config import OPTIMIZERS, TrainConfig, make_optimizer
from curvlab.app.train.loop import evaluate, train
from curvlab.app.train.probe import Probe

__all__ = ["OPTIMIZERS", "Probe", "TrainConfig", "evaluate", "make_optimizer", "train"]
