"""Let a sub-package be called like its main function.

``curvlab.extract`` is both the package ``curvlab/extract/`` and the function
``curvlab.extract(...)``: importing the function into ``curvlab`` under the package's name would
shadow the package (``import curvlab.extract.maths as m`` would then fail), so the package module
itself is made callable instead.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, func: Callable[..., Any]) -> None:
    """Calling the module ``module_name`` calls ``func``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    CallableModule.__call__.__doc__ = func.__doc__
    module = sys.modules[module_name]
    module.__class__ = CallableModule
    module.__signature__ = inspect.signature(func)  # what inspect, IDEs and notebooks show for a call
