"""Aliases that keep curvlab 0.1's module paths importable, with a ``DeprecationWarning``.

In curvlab 0.2 the application (data sets, built-in models, CLI, training loop, report) moved
to :mod:`curvlab.app`, so that the library never imports it.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def alias(old: str, new: str, submodules: tuple[str, ...] = ()) -> ModuleType:
    """Make ``import old`` (and ``old.<sub>``) give the module ``new`` (``new.<sub>``)."""
    warnings.warn(f"{old} is deprecated since curvlab 0.2; use {new}", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")
    return module
