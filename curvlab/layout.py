"""Deprecated alias of :mod:`curvlab.block` (:class:`BlockLayout` moved there in curvlab 0.2)."""

from curvlab._deprecated import alias

alias(__name__, "curvlab.block")
