"""curvlab: how good is each Kronecker approximation of the Fisher?

Data flow: :func:`extract` (one forward + one BackPACK backward) → :func:`approximate`
(KFAC, KFLR, EKFAC, TKFAC, TEKFAC, KFOC) → :func:`compare` (exact, matrix-free metrics as an
``xarray.Dataset``); :mod:`curvlab.optim` inverts the same approximation objects.
"""

from curvlab._version import __version__

# ``extract`` and ``compare`` are sub-packages that can be called like their main functions.
from curvlab import compare, extract
from curvlab.approx import APPROXIMATIONS, approximate
from curvlab.compare import measure
from curvlab.extract import ExtractionSession, LayerStats

__all__ = [
    "APPROXIMATIONS",
    "ExtractionSession",
    "LayerStats",
    "__version__",
    "approximate",
    "compare",
    "extract",
    "measure",
]
