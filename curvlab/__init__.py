"""curvlab: how good is each Kronecker approximation of the Fisher?

Data flow: :func:`extract` (one forward + one BackPACK backward) → :func:`approximate`
(KFAC, KFLR, EKFAC, TKFAC, TEKFAC, KFOC) → :func:`compare` (exact, matrix-free metrics as an
``xarray.Dataset``); :mod:`curvlab.optim` inverts the same approximation objects.

The names below are imported at their first use (``curvlab.extract``, ``from curvlab import
compare``): ``import curvlab`` alone costs no torch import, so the ``curvlab`` command answers a
Ctrl-C during its start-up as it does during a run.
"""

from __future__ import annotations

import importlib

from curvlab._version import __version__

# ``extract`` and ``compare`` are sub-packages that can be called like their main functions.
_WHERE = {
    "APPROXIMATIONS": "curvlab.approx",
    "ExtractionSession": "curvlab.extract",
    "LayerStats": "curvlab.extract",
    "approximate": "curvlab.approx",
    "compare": None,
    "extract": None,
    "measure": "curvlab.compare",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'curvlab' has no attribute {name!r}")
    module = _WHERE[name]
    value = importlib.import_module(f"curvlab.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
