"""Extraction: one forward and one BackPACK backward give every per-layer statistic.

Only this sub-package talks to BackPACK.
"""

from curvlab._callable import make_callable
from curvlab.extract.api import Extraction, extract
from curvlab.extract.session import ExtractionSession
from curvlab.extract.stats import FLAVOURS, KroneckerFactors, LayerStats, TraceStats
from curvlab.extract.validate import UnsupportedModelError

make_callable(__name__, extract)  # curvlab.extract(...) calls extract()

__all__ = [
    "FLAVOURS",
    "Extraction",
    "ExtractionSession",
    "KroneckerFactors",
    "LayerStats",
    "TraceStats",
    "UnsupportedModelError",
    "extract",
]
