"""Aliases that keep curvlab 0.1's module paths importable, with a ``DeprecationWarning``.

In curvlab 0.2 the application (data sets, built-in models, CLI, training loop, report) moved
to :mod:`curvlab.app`, so that the library never imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Collection
from types import ModuleType


def alias(old: str, new: str) -> ModuleType:
    """Make ``import old`` give the module ``new`` itself, and ``old.<sub>`` ``new.<sub>``."""
    warnings.warn(f"{old} is deprecated since curvlab 0.2; use {new}", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    alias_submodules(old, new)
    return module


def alias_submodules(old: str, new: str, own: Collection[str] = ()) -> None:
    """Make ``import old.<sub>`` give the module ``new.<sub>`` itself, for every ``sub`` but
    ``own`` (modules ``old`` still has): without this, the import system found ``sub`` in
    ``new``'s folder and loaded a second copy of it under the old name."""
    if not any(isinstance(f, _Submodules) and f.old == old for f in sys.meta_path):
        sys.meta_path.insert(0, _Submodules(old, new, own))


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, old: str, new: str, own: Collection[str]) -> None:
        self.old, self.new, self.own = old, new, set(own)
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if not fullname.startswith(self.old + "."):
            return None
        if fullname[len(self.old) + 1:].split(".")[0] in self.own:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.new + spec.name[len(self.old):])
        self._specs[module.__name__] = module.__spec__  # the import system sets the alias's spec
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs.pop(module.__name__)  # already executed: its own spec back
