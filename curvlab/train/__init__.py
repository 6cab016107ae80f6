"""Deprecated alias of :mod:`curvlab.app.train` (moved in curvlab 0.2)."""

from curvlab._deprecated import alias

alias(__name__, "curvlab.app.train")
