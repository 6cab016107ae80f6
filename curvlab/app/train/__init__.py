"""Training runs that probe the curvature as they go (``curvlab train``).

The names below are imported at their first use, as :mod:`curvlab.app.report`'s are: the
command line's parser needs :mod:`.config` alone.
"""

from __future__ import annotations

from curvlab._lazy import lazy_names

_WHERE = {
    "OPTIMIZERS": "config",
    "Probe": "probe",
    "TrainConfig": "config",
    "evaluate": "loop",
    "make_optimizer": "config",
    "train": "loop",
}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
