"""Extraction: one forward and one BackPACK backward give every per-layer statistic.

Only this sub-package talks to BackPACK.
"""

from curvlab.extract.api import Extraction, extract
from curvlab.extract.session import ExtractionSession
from curvlab.extract.stats import FLAVOURS, KroneckerFactors, LayerStats, TraceStats
from curvlab.extract.validate import UnsupportedModelError

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
