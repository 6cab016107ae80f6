"""Extraction: one forward and one backward pass give every per-block statistic.

Two engines, one result: BackPACK (its extension API and torch.fx graph converter) where it can
run the whole model, the autograd engine (module hooks, batched vjps) anywhere else; see
:mod:`curvlab.extract.engines`.  Only this sub-package talks to BackPACK.
"""

from curvlab._callable import make_callable
from curvlab.extract.api import Extraction, extract
from curvlab.extract.options import ENGINES, KFAC_APPROX, STATISTICS, ExtractOptions
from curvlab.extract.session import ExtractionSession
from curvlab.model_blocks import ModelBlocks, UnsupportedModelError, model_blocks
from curvlab.stats import FLAVOURS, KroneckerFactors, LayerStats, TraceStats

make_callable(__name__, extract)  # curvlab.extract(...) calls extract()

__all__ = [
    "ENGINES",
    "FLAVOURS",
    "KFAC_APPROX",
    "ModelBlocks",
    "STATISTICS",
    "ExtractOptions",
    "Extraction",
    "ExtractionSession",
    "KroneckerFactors",
    "LayerStats",
    "TraceStats",
    "UnsupportedModelError",
    "extract",
    "model_blocks",
]
