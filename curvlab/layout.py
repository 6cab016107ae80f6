"""Deprecated: :class:`BlockLayout` lives in :mod:`curvlab.block` since curvlab 0.2."""

import warnings

from curvlab.block import BlockLayout

warnings.warn(
    "curvlab.layout is deprecated; import BlockLayout from curvlab.block", DeprecationWarning, stacklevel=2
)

__all__ = ["BlockLayout"]
