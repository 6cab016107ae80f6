"""Comparison: exact, matrix-free quality metrics of each approximation, as an xarray Dataset."""

from curvlab._callable import make_callable
from curvlab.compare.api import LayerApproximations, compare
from curvlab.compare.dataset import measure

make_callable(__name__, compare)  # curvlab.compare(...) calls compare()

__all__ = ["LayerApproximations", "compare", "measure"]
