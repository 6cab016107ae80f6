"""curvlab: how good is each Kronecker approximation of the Fisher?

Data flow: :func:`extract` (one forward + one BackPACK backward) → :func:`approximate`
(KFAC, KFLR, EKFAC, TKFAC, TEKFAC, KFOC) → :func:`compare` (exact, matrix-free metrics as an
``xarray.Dataset``); :mod:`curvlab.optim` inverts the same approximation objects.

The names below are imported at their first use (``curvlab.extract``, ``from curvlab import
compare``): ``import curvlab`` alone costs no torch import, so the ``curvlab`` command answers a
Ctrl-C during its start-up as it does during a run.
"""

from __future__ import annotations

from curvlab._lazy import lazy_names
from curvlab._version import __version__

# ``extract`` and ``compare`` are sub-packages that can be called like their main functions; the
# other public sub-packages are reached as ``curvlab.optim.KFAC`` after ``import curvlab`` too.
_WHERE = {
    "APPROXIMATIONS": "approx",
    "approx": None,
    "distributed": None,
    "io": None,
    "optim": None,
    "ExtractionSession": "extract",
    "KroneckerAttention": "attention",
    "LayerStats": "extract",
    "approximate": "approx",
    "compare": None,
    "extract": None,
    "kronecker_attention": "attention",
    "measure": "compare",
}

__all__ = ["__version__", *_WHERE]
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
