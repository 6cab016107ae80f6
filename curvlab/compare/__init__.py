"""Comparison: exact, matrix-free quality metrics of each approximation, as an xarray Dataset."""

from curvlab.compare.api import compare
from curvlab.compare.measure import measure

__all__ = ["compare", "measure"]
