"""Extraction: one forward and one BackPACK backward give every per-layer statistic.

Only this sub-package talks to BackPACK.
"""

from curvlab._callable import make_callable
from curvlab.extract.api import Extraction, extract
from curvlab.extract.options import STATISTICS, ExtractOptions
from curvlab.extract.session import ExtractionSession
from curvlab.extract.validate import UnsupportedModelError
from curvlab.stats import FLAVOURS, KroneckerFactors, LayerStats, TraceStats

make_callable(__name__, extract)  # curvlab.extract(...) calls extract()

__all__ = [
    "FLAVOURS",
    "STATISTICS",
    "ExtractOptions",
    "Extraction",
    "ExtractionSession",
    "KroneckerFactors",
    "LayerStats",
    "TraceStats",
    "UnsupportedModelError",
    "extract",
]
